#!/usr/bin/env bash
# The whole test suite: unit tests of every crate and the integration tests against a real
# MariaDB (a fresh database per test) and the simulated Money server.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -- NAME    # only tests whose name contains NAME
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
source scripts/ensure-rust.sh
export PATH="$HOME/.cargo/bin:$PATH"
PAYOUTD_TEST_DATABASE_URL="$(scripts/ensure-mariadb.sh)"
export PAYOUTD_TEST_DATABASE_URL
echo "test.sh: using MariaDB at ${PAYOUTD_TEST_DATABASE_URL%%:*}://…@${PAYOUTD_TEST_DATABASE_URL##*@}" >&2
# The integration tests run the real binaries (payoutd, money-sim): build them first.
cargo build --workspace --bins
# Run everything, then close with one total line over all test binaries (cargo prints one
# "test result" line per binary, the last of which is often an empty doc-test run).
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
