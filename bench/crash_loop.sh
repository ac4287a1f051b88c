#!/usr/bin/env bash
# The full crash loop behind BENCHMARKS.md ("Crash loop"): 500 alerts over 50 dedup keys
# while the real daemon is killed with kill -9 about every second, 10 times, and a fake
# Twilio on 127.0.0.1 answers in 0-3 s and drops 5 % of its answers after creating the
# call. Prints the report (acknowledged alerts, incidents, numbers called zero times,
# numbers called twice) and fails if a number was missed or rung twice unexplained.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --release --locked --test it crash::crash_loop_full -- --ignored --nocapture --exact
