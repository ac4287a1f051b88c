#!/usr/bin/env bash
# The HTTP memory and slowloris figures in BENCHMARKS.md (issue 13): builds the release
# binary and runs examples/http_memory.rs, which starts it once per scenario on loopback,
# posts 24 × 40 MiB to the SendGrid endpoint and reads VmRSS/VmHWM from /proc.
#   bench/http_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin mailcall --example http_memory
exec target/release/examples/http_memory target/release/mailcall "$@"
