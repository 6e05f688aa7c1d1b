#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with a Rust toolchain:
# installs what the tests need if it is missing (OpenSSH client and server,
# asciinema, cargo-nextest, the S3 servers moto and s3s-fs, the GCS emulator,
# Azurite, etcd, PostgreSQL), prepares the
# unprivileged test login, and runs every test of the workspace. Servers the
# tests need are started by the tests themselves on 127.0.0.1, on free ports,
# and stopped by them.
set -euo pipefail
cd "$(dirname "$0")/.."

# Where the test servers are (scripts/install-test-deps.sh installs them).
export TURNSTILE_TEST_TOOLS="${TURNSTILE_TEST_TOOLS:-$HOME/.cache/turnstile-test-tools}"
scripts/install-test-deps.sh

# Debug builds with line tables only: faster to build, same tests.
export CARGO_INCREMENTAL=0
export CARGO_PROFILE_DEV_DEBUG=line-tables-only
export RUST_BACKTRACE=0

echo "==> cargo nextest run --workspace"
cargo nextest run --workspace --no-fail-fast "$@"
