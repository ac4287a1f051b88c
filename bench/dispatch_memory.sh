#!/usr/bin/env bash
# The dispatcher's memory under a backlog (issue 13, BENCHMARKS.md): builds the release
# binary and runs examples/dispatch_memory.rs: 300 queued mails of 9 MiB, RSS while they
# are routed, and how long one more alert waits. Needs about 3 GB of disk in $TMPDIR.
#   bench/dispatch_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin mailcall --example dispatch_memory
exec target/release/examples/dispatch_memory target/release/mailcall "$@"
