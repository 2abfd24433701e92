#!/usr/bin/env bash
# payoutd's benchmark: builds the release binaries and runs payout-bench, which creates a fresh
# database, loads the rows, runs money-sim and the daemon until the campaign completes, prints a
# summary and writes bench-results/<timestamp>.json. See BENCHMARKS.md.
#
#   scripts/bench.sh --rows 200000 --limit 1000 --latency-ms 20 --jitter-ms 10
#   scripts/bench.sh --rows 200000 --limit 0 --latency-ms 10 --jitter-ms 10 --db-ceiling
#   scripts/bench.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
source scripts/ensure-rust.sh
export PATH="$HOME/.cargo/bin:$PATH"
if [ -z "${PAYOUTD_TEST_DATABASE_URL:-}" ]; then
  PAYOUTD_TEST_DATABASE_URL="$(scripts/ensure-mariadb.sh)"
  export PAYOUTD_TEST_DATABASE_URL
fi
cargo build --release -p payoutd -p payout-tests --bins >&2
exec target/release/payout-bench "$@"
