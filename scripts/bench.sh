#!/usr/bin/env bash
# Reproducible benchmarks; each prints a table. Release build.
#   scripts/bench.sh semaphores   connection slots (over gRPC; straight on SQLite, etcd, etcd with two
#                                 auth servers) and connect latency vs OpenSSH
#   scripts/bench.sh audit        the first page of an audit search over BENCH_EVENTS events (default
#                                 1,000,000) in a private PostgreSQL
#   scripts/bench.sh recording    bulk output in each recording mode and with OpenSSH (BENCH_BYTES,
#                                 default 1 GiB; BENCH_RUNS runs of each, default 3; BENCH_MODES,
#                                 default node,node-sync,proxy, always after off) and node-sync to
#                                 S3 servers (BENCH_STORES, default moto,s3s-fs; installed by
#                                 scripts/install-test-deps.sh)
#   scripts/bench.sh sessions     BENCH_SESSIONS interactive sessions at once (default 1000), each
#                                 typing and printing ~1 KiB every 100 ms for BENCH_SECONDS (default
#                                 60), per recording mode (BENCH_MODES, default node,node-sync) and
#                                 against sshd: CPU, memory (PSS) per session, bytes stored
#   scripts/bench.sh web-seek     the web console's player seeking in a synthetic one-hour session
#                                 (BENCH_EVERY_MS, default 100; BENCH_EVENT_BYTES, default 200) in
#                                 headless Chromium (needs scripts/install-test-deps.sh); no build
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-semaphores}"
if [ "$what" = web-seek ]; then
  tools="${TURNSTILE_TEST_TOOLS:-$HOME/.cache/turnstile-test-tools}"
  exec env NODE_PATH="$tools/node/node_modules" node crates/turnstile/tests/web/bench_seek.cjs
fi
# The build's own verbose log is the "real build log" input of the recording bench.
cargo build --release --bin turnstile --bin turnstile-bench -vv 2>&1 | tee target/bench-build.log | tail -1
exec target/release/turnstile-bench "$what"
