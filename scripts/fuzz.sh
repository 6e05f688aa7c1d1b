#!/usr/bin/env bash
# Fuzzes what Turnstile parses from others, each target for a budget:
#   scripts/fuzz.sh                 every target, FUZZ_SECONDS each (default 300)
#   scripts/fuzz.sh proxy_header    one target
# Targets (fuzz/fuzz_targets): read_events (recordings), door_frames (the
# proxy's subsystem), proxy_header (a node's PROXY v2 parser), role_yaml,
# config_yaml. Installs cargo-fuzz if missing; uses the stable toolchain's
# nightly flags (RUSTC_BOOTSTRAP=1). Never run by CI (.ci/run): a crash is
# kept under fuzz/artifacts/TARGET and becomes a regression test in the
# crate it is about. Corpora grow in fuzz/corpus/TARGET (not committed).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-300}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> cargo install cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
failed=()
for t in "${targets[@]}"; do
    echo "==> $t for ${seconds}s"
    mkdir -p "corpus/$t"
    if ! cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        >"/tmp/fuzz-$t.log" 2>&1; then
        failed+=("$t")
    fi
    grep -E "^(#[0-9]+ +DONE|==[0-9]+==ERROR|SUMMARY)" "/tmp/fuzz-$t.log" || tail -5 "/tmp/fuzz-$t.log"
done
echo
echo "target          result"
for t in "${targets[@]}"; do
    if printf '%s\n' "${failed[@]}" | grep -qx "$t"; then
        echo "$(printf '%-15s' "$t") CRASH (see fuzz/artifacts/$t, /tmp/fuzz-$t.log)"
    else
        echo "$(printf '%-15s' "$t") ok: $(grep -Eo '^#[0-9]+' "/tmp/fuzz-$t.log" | tail -1 | tr -d '#') runs"
    fi
done
[ ${#failed[@]} -eq 0 ]
