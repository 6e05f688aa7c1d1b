#!/usr/bin/env bash
# Reproducible benchmarks; each prints a table. Release build.
#   scripts/bench.sh semaphores   connection slots and connect latency vs OpenSSH
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-semaphores}"
cargo build --release --bin turnstile --bin turnstile-bench
exec target/release/turnstile-bench "$what"
