#!/usr/bin/env bash
# The end-to-end demo: pays a 100,000-row POINT campaign and a 20,000-row VOUCHER campaign through
# the simulated Money server at the real rate limit (1,000 requests/s), then checks with the
# simulator's own ledger that every row was granted exactly once.
#
#   scripts/demo.sh                  # release build (the default)
#   PROFILE=debug scripts/demo.sh    # debug build (faster to build, slower to run)
#
# On a fresh Debian/Ubuntu machine it installs what it needs (Rust, a C compiler, MariaDB).
# Logs go to .demo/ in the repository; the database `payoutd_demo` is dropped and recreated at
# start and left in place at the end for inspection. Exits non-zero when a row was granted twice,
# when Money did not see exactly 120,000 grants, or when a row did not end SUCCEEDED.
set -euo pipefail

# Plain "C" number formatting: printf/awk must write 12.5, never 12,5.
export LC_ALL=C

POINT_ID=43
POINT_ROWS=100000
VOUCHER_ID=42
VOUCHER_ROWS=20000
BATCH_ROWS=1000           # rows per INSERT, as the loader sends them
RATE_LIMIT=1000           # requests/s: the daemon's limit and the simulator's, the same as Money's
API_KEY=demo-key
DB_NAME=payoutd_demo
POLL_SECS=2
TIMEOUT_SECS=900          # 15 minutes for paying both campaigns
PROFILE="${PROFILE:-release}"

say() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
# Seconds between two `now` values, one decimal.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

case "$PROFILE" in
  release) CARGO_PROFILE_FLAG=(--release) ;;
  debug) CARGO_PROFILE_FLAG=() ;;
  *) die "PROFILE must be release or debug, not '$PROFILE'" ;;
esac

# ---------------------------------------------------------------------------------------------
# 1. Toolchain, database server, binaries
# ---------------------------------------------------------------------------------------------
cd "$(dirname "$0")/.."
REPO="$PWD"
WORK="$REPO/.demo"

# shellcheck source=/dev/null
source scripts/ensure-rust.sh
export PATH="$HOME/.cargo/bin:$PATH"

SERVER_URL="$(scripts/ensure-mariadb.sh)"
SERVER_URL="${SERVER_URL%/}"

# Only payoutd's own settings below may reach it: a PAYOUTD_SLACK__WEBHOOK_URL or a config file
# left in the shell or in /etc/payoutd must not send demo alerts to a real channel or point the
# demo elsewhere. (Configuration variables are exactly the PAYOUTD_* names containing "__".)
while IFS= read -r name; do
  if [[ "$name" == PAYOUTD_*__* || "$name" == PAYOUTD_CONFIG ]]; then unset "$name"; fi
done < <(compgen -e)

say "building payoutd and money-sim ($PROFILE profile; the first release build takes a few minutes)"
cargo build "${CARGO_PROFILE_FLAG[@]}" -p payoutd -p payout-tests --bins
BIN="${CARGO_TARGET_DIR:-$REPO/target}/$PROFILE"
PAYOUTD="$BIN/payoutd"
MONEY_SIM="$BIN/money-sim"
[ -x "$PAYOUTD" ] && [ -x "$MONEY_SIM" ] || die "the build did not produce $PAYOUTD and $MONEY_SIM"

# ---------------------------------------------------------------------------------------------
# 2. Work directory, background processes and their cleanup
# ---------------------------------------------------------------------------------------------
mkdir -p "$WORK"
# Fresh, existing files: a background process opens its redirections only after the fork, so
# reading one right after `&` could otherwise find no file yet.
for f in payoutd.log money-sim.out money-sim.log status.err ledger.json; do : >"$WORK/$f"; done

SIM_PID=""
DAEMON_PID=""

# Sends SIGTERM to a process we started and waits up to $2 seconds for it, then SIGKILL.
# Returns the process's exit status (137 when it had to be killed).
stop_process() {
  local pid="$1" grace="$2" rc=0 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || rc=$?; return "$rc"; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}

# Whatever happens (success, failure, Ctrl-C), no daemon or simulator outlives the demo. The
# daemon stops first so that its requests in flight still get answers.
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$DAEMON_PID" ]; then stop_process "$DAEMON_PID" 15 || true; fi
  if [ -n "$SIM_PID" ]; then stop_process "$SIM_PID" 5 || true; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# 3. The demo database
# ---------------------------------------------------------------------------------------------
# mysql://user[:password]@host[:port] -> the client's options. The password goes through
# MYSQL_PWD so that it appears neither on the command line nor in `ps`.
rest="${SERVER_URL#mysql://}"
rest="${rest%%/*}"
if [[ "$rest" == *@* ]]; then creds="${rest%@*}"; hostport="${rest##*@}"; else creds=""; hostport="$rest"; fi
DB_USER="${creds%%:*}"
DB_PASS=""
[[ "$creds" == *:* ]] && DB_PASS="${creds#*:}"
DB_PASS="$(printf '%b' "${DB_PASS//%/\\x}")"   # undo URL %-escapes, e.g. %40 -> @
DB_HOST="${hostport%%:*}"
DB_PORT=3306
[[ "$hostport" == *:* ]] && DB_PORT="${hostport##*:}"
if command -v mariadb >/dev/null 2>&1; then DB_CLIENT=mariadb; else DB_CLIENT=mysql; fi

# sql [DATABASE] < statements
sql() {
  MYSQL_PWD="$DB_PASS" "$DB_CLIENT" --protocol=TCP -h "$DB_HOST" -P "$DB_PORT" -u "$DB_USER" \
    --batch --skip-column-names "$@"
}

say "using MariaDB at $DB_HOST:$DB_PORT as $DB_USER; recreating database $DB_NAME"
sql <<<"DROP DATABASE IF EXISTS $DB_NAME; CREATE DATABASE $DB_NAME CHARACTER SET utf8mb4;"

export PAYOUTD_DATABASE__URL="$SERVER_URL/$DB_NAME"
export PAYOUTD_MONEY__API_KEY="$API_KEY"
export PAYOUTD_MONEY__RATE_LIMIT_PER_SEC="$RATE_LIMIT"
export PAYOUTD_LOG__FORMAT=text
# An explicit (comment-only) file, so that an /etc/payoutd/payoutd.toml is not read either.
printf '# payoutd demo: every setting comes from PAYOUTD_* variables set by scripts/demo.sh\n' \
  >"$WORK/payoutd.toml"
export PAYOUTD_CONFIG="$WORK/payoutd.toml"

"$PAYOUTD" migrate

# ---------------------------------------------------------------------------------------------
# 4. Load the targets exactly as the loader does (contract.md): the campaign row, then
#    multi-row INSERTs of the loader's columns only, 1,000 rows each. awk, because a fresh
#    machine may have no python.
# ---------------------------------------------------------------------------------------------
# Points: customers u-000001..u-100000, amounts 100..5,000 varying by row, far-future expiry.
gen_points() {
  awk -v id="$POINT_ID" -v n="$POINT_ROWS" -v batch="$BATCH_ROWS" -v q="'" 'BEGIN {
    printf "INSERT INTO campaigns (id, kind, name) VALUES (%d, %sPOINT%s, %swinter points%s);\n", id, q, q, q, q
    for (i = 1; i <= n; i++) {
      if ((i - 1) % batch == 0)
        printf "INSERT INTO point_targets (event_id, customer_uid, amount, expiry_at, reason) VALUES "
      amount = 100 * (1 + (i * 37) % 50)
      printf "(%d, %su-%06d%s, %d, %s20991231235959%s, %swinter sale%s)", id, q, i, q, amount, q, q, q, q
      if (i % batch == 0 || i == n) printf ";\n"; else printf ", "
    }
  }'
}
# Vouchers: the same customers u-000001..u-020000 (a customer may be in any number of
# campaigns), each with its own voucher number.
gen_vouchers() {
  awk -v id="$VOUCHER_ID" -v n="$VOUCHER_ROWS" -v batch="$BATCH_ROWS" -v q="'" 'BEGIN {
    printf "INSERT INTO campaigns (id, kind, name) VALUES (%d, %sVOUCHER%s, %swinter vouchers%s);\n", id, q, q, q, q
    for (i = 1; i <= n; i++) {
      if ((i - 1) % batch == 0)
        printf "INSERT INTO voucher_targets (event_id, customer_uid, voucher_number, reason) VALUES "
      printf "(%d, %su-%06d%s, %sV-%d-%06d%s, %swinter sale%s)", id, q, i, q, q, id, i, q, q, q
      if (i % batch == 0 || i == n) printf ";\n"; else printf ", "
    }
  }'
}

say "loading campaign $POINT_ID (POINT, $POINT_ROWS rows) and campaign $VOUCHER_ID (VOUCHER, $VOUCHER_ROWS rows) in INSERTs of $BATCH_ROWS rows"
load_start=$(now)
gen_points | sql "$DB_NAME"
gen_vouchers | sql "$DB_NAME"
load_secs=$(elapsed "$load_start" "$(now)")
loaded_points=$(sql "$DB_NAME" <<<"SELECT COUNT(*) FROM point_targets WHERE event_id = $POINT_ID")
loaded_vouchers=$(sql "$DB_NAME" <<<"SELECT COUNT(*) FROM voucher_targets WHERE event_id = $VOUCHER_ID")
[ "$loaded_points" -eq "$POINT_ROWS" ] && [ "$loaded_vouchers" -eq "$VOUCHER_ROWS" ] ||
  die "loaded $loaded_points point rows and $loaded_vouchers voucher rows"
say "loaded $((loaded_points + loaded_vouchers)) rows in $load_secs s"

# ---------------------------------------------------------------------------------------------
# 5. The simulated Money server
# ---------------------------------------------------------------------------------------------
# Port 0: the simulator binds a free port itself and announces it, so there is no race with
# other programs (or other demo runs) for a port we picked.
say "starting money-sim (limit $RATE_LIMIT requests/s, latency 20 ms +- 10 ms)"
"$MONEY_SIM" --listen 127.0.0.1:0 --api-key "$API_KEY" --rate-limit-per-sec "$RATE_LIMIT" \
  --latency-ms 20 --latency-jitter-ms 10 --expected-grants 150000 >"$WORK/money-sim.out" 2>"$WORK/money-sim.log" &
SIM_PID=$!
MONEY_URL=""
for ((i = 0; i < 300; i++)); do   # up to 30 s
  MONEY_URL=$(sed -n 's/^money-sim listening on \(http[^ ]*\).*/\1/p' "$WORK/money-sim.out") || true
  [ -n "$MONEY_URL" ] && break
  kill -0 "$SIM_PID" 2>/dev/null || { tail -n 20 "$WORK/money-sim.log" >&2; die "money-sim exited at start"; }
  sleep 0.1
done
[ -n "$MONEY_URL" ] || die "money-sim did not announce its address within 30 s (see $WORK/money-sim.log)"
export PAYOUTD_MONEY__BASE_URL="$MONEY_URL"
say "money-sim listening on $MONEY_URL"

# ---------------------------------------------------------------------------------------------
# 6. Pay: start the campaigns (points first: first come, first served), run the daemon, and
#    follow progress until both are COMPLETED.
# ---------------------------------------------------------------------------------------------
"$PAYOUTD" campaign start "$POINT_ID"
"$PAYOUTD" campaign start "$VOUCHER_ID"

# The value of "key" in JSON flattened to one line: strings unquoted, null stays null, the
# indentation after a last value dropped. Enough for the flat fields read here.
json_get() { sed -n 's/.*"'"$2"'": *"\{0,1\}\([^",}]*[^",} ]\).*/\1/p' <<<"$1" | head -n 1; }
# rows_per_sec is null until the daemon has started the campaign.
fmt_rate() { if [[ "$1" =~ ^[0-9.]+$ ]]; then printf '%.1f' "$1"; else printf -- '-'; fi; }

pay_start=$(now)
"$PAYOUTD" run >"$WORK/payoutd.log" 2>&1 &
DAEMON_PID=$!
say "payoutd run started (pid $DAEMON_PID, log $WORK/payoutd.log); progress every $POLL_SECS s:"

declare -A STATUS_JSON=() DONE_SECS=()
while :; do
  # Sleep to the next multiple of POLL_SECS since the start, so that the time the status
  # calls take does not stretch the interval.
  sleep "$(awk -v s="$pay_start" -v n="$(now)" -v p="$POLL_SECS" 'BEGIN { printf "%.3f", p - (n - s) % p }')"
  t=$(elapsed "$pay_start" "$(now)")
  if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
    tail -n 50 "$WORK/payoutd.log" >&2
    die "payoutd run exited while paying (last 50 log lines above)"
  fi
  for id in "$POINT_ID" "$VOUCHER_ID"; do
    [ -n "${DONE_SECS[$id]:-}" ] && continue   # reported COMPLETED already
    # A status call that fails (e.g. the database is briefly busy) is just retried next round.
    json=$("$PAYOUTD" campaign status "$id" --json 2>"$WORK/status.err" | tr -d '\n') || {
      say "t+${t}s campaign $id: status unavailable: $(head -n 1 "$WORK/status.err")"; continue; }
    STATUS_JSON[$id]="$json"
    status=$(json_get "$json" status)
    rate=$(fmt_rate "$(json_get "$json" rows_per_sec)")
    printf '  t+%6ss  campaign %s %-7s %-9s %6s/%s succeeded  %8s rows/s\n' "$t" "$id" \
      "$(json_get "$json" kind)" "$status" "$(json_get "$json" SUCCEEDED)" "$(json_get "$json" rows)" "$rate"
    [ "$status" = COMPLETED ] && DONE_SECS[$id]="$t"
  done
  [ -n "${DONE_SECS[$POINT_ID]:-}" ] && [ -n "${DONE_SECS[$VOUCHER_ID]:-}" ] && break
  if awk -v t="$t" -v max="$TIMEOUT_SECS" 'BEGIN { exit !(t > max) }'; then
    tail -n 50 "$WORK/payoutd.log" >&2
    die "the campaigns did not complete within $TIMEOUT_SECS s (last 50 lines of $WORK/payoutd.log above)"
  fi
done
total_secs=$(elapsed "$pay_start" "$(now)")

# ---------------------------------------------------------------------------------------------
# 7. Stop the daemon gracefully, read the simulator's ledger, stop the simulator.
# ---------------------------------------------------------------------------------------------
say "both campaigns COMPLETED; stopping payoutd (SIGTERM)"
daemon_rc=0
stop_process "$DAEMON_PID" 30 || daemon_rc=$?
DAEMON_PID=""
[ "$daemon_rc" -eq 0 ] || say "WARNING: payoutd exited with status $daemon_rc on SIGTERM (see $WORK/payoutd.log)"

# GET with curl when present, else with bash's /dev/tcp (HTTP/1.0: the server closes the
# connection after answering, so reading to the end of the stream gets the whole body).
http_get() {
  local url="$1" hostport path reply
  if command -v curl >/dev/null 2>&1; then curl -fsS --max-time 10 "$url"; return; fi
  hostport="${url#http://}"; path="/${hostport#*/}"; hostport="${hostport%%/*}"
  exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}"
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$hostport" >&3
  reply=$(timeout 10 cat <&3) || true
  exec 3<&-
  [[ "$reply" == "HTTP/1."?" 200"* ]] || return 1
  printf '%s\n' "${reply#*$'\r\n\r\n'}"
}
ledger=$(http_get "$MONEY_URL/_sim/ledger" | tr -d '\n') || die "could not read the money-sim ledger"
printf '%s\n' "$ledger" >"$WORK/ledger.json"
stop_process "$SIM_PID" 5 || true
SIM_PID=""

# ---------------------------------------------------------------------------------------------
# 8. Summary and verdict
# ---------------------------------------------------------------------------------------------
failures=()
echo
echo "================================ payoutd demo summary ================================"
printf 'loading: %d rows in %s s (INSERTs of %d rows)\n' "$((POINT_ROWS + VOUCHER_ROWS))" "$load_secs" "$BATCH_ROWS"
for id in "$POINT_ID" "$VOUCHER_ID"; do
  json="${STATUS_JSON[$id]}"
  rows=$(json_get "$json" rows)
  secs="${DONE_SECS[$id]}"
  counts=""
  for s in PENDING IN_FLIGHT SUCCEEDED FAILED DEAD; do counts+=" $s=$(json_get "$json" "$s")"; done
  # Paying time by the daemon's own clock (started_at -> completed_at, UTC); a campaign queued
  # behind another starts when the one before it is done.
  started=$(json_get "$json" started_at)
  completed=$(json_get "$json" completed_at)
  paid_secs="?"
  if [ "$started" != null ] && [ "$completed" != null ]; then
    paid_secs=$(elapsed "$(date -u -d "$started" +%s.%N)" "$(date -u -d "$completed" +%s.%N)")
  fi
  printf 'campaign %s %s: %s rows paid in %s s = %s rows/s (daemon start -> COMPLETED); demo saw COMPLETED %s s after payoutd started\n' \
    "$id" "$(json_get "$json" kind)" "$rows" "$paid_secs" "$(fmt_rate "$(json_get "$json" rows_per_sec)")" "$secs"
  printf '  rows by status:%s\n' "$counts"
  expected=$POINT_ROWS; [ "$id" = "$VOUCHER_ID" ] && expected=$VOUCHER_ROWS
  [ "$rows" = "$expected" ] && [ "$(json_get "$json" SUCCEEDED)" = "$expected" ] ||
    failures+=("campaign $id: $(json_get "$json" SUCCEEDED) of $expected rows SUCCEEDED ($rows rows)")
done
grants=$(json_get "$ledger" grants_total)
dups=$(json_get "$ledger" duplicate_grants)
limited=$(json_get "$ledger" rate_limited_total)
peak=$(json_get "$ledger" max_requests_in_any_second)
for v in "$grants" "$dups" "$limited" "$peak"; do
  [[ "$v" =~ ^[0-9]+$ ]] || die "unexpected money-sim ledger (saved in $WORK/ledger.json): $ledger"
done
printf 'both campaigns: %d rows in %s s = %.0f rows/s overall (limit %d/s)\n' "$((POINT_ROWS + VOUCHER_ROWS))" \
  "$total_secs" "$(awk -v r="$((POINT_ROWS + VOUCHER_ROWS))" -v s="$total_secs" 'BEGIN { print r / s }')" "$RATE_LIMIT"
printf 'money-sim: %s grants, %s duplicate grants, %s requests (%s replays), %s answered 429\n' \
  "$grants" "$dups" "$(json_get "$ledger" requests_total)" "$(json_get "$ledger" replays_total)" "$limited"
if [ "$peak" -le "$RATE_LIMIT" ]; then verdict="within"; else verdict="ABOVE"; fi
printf 'money-sim: at most %s requests in any 1-second window: %s the limit of %d/s\n' "$peak" "$verdict" "$RATE_LIMIT"
[ "$dups" = 0 ] || failures+=("money-sim saw $dups duplicate grants")
[ "$grants" = "$((POINT_ROWS + VOUCHER_ROWS))" ] || failures+=("money-sim saw $grants grants, not $((POINT_ROWS + VOUCHER_ROWS))")
echo "logs: $WORK/ (payoutd.log, money-sim.log, ledger.json)"
echo "database $DB_NAME is left in place for inspection, e.g.:"
echo "  $DB_CLIENT -h $DB_HOST -P $DB_PORT -u $DB_USER $DB_NAME -e 'SELECT status, COUNT(*) FROM point_targets GROUP BY status'"
echo "  (drop it with: DROP DATABASE $DB_NAME)"
echo "======================================================================================="
if [ "${#failures[@]}" -gt 0 ]; then
  for f in "${failures[@]}"; do echo "demo: FAILED: $f" >&2; done
  exit 1
fi
echo "demo: OK: every row was paid exactly once"
