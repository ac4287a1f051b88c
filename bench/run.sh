#!/usr/bin/env bash
# One command for BENCHMARKS.md: builds the release binaries, installs mailrise (PyPI)
# into target/bench-venv, and runs the end-to-end benchmark on loopback.
#   bench/run.sh            full run (a few minutes)
#   bench/run.sh --quick    a tenth of the load, for a smoke test
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin mailcall --example bench
if [ ! -x target/bench-venv/bin/mailrise ]; then
    python3 -m venv target/bench-venv
    target/bench-venv/bin/pip install --quiet 'mailrise==1.4.0'
fi
exec target/release/examples/bench --mailcall target/release/mailcall \
    --mailrise target/bench-venv/bin/mailrise "$@"
