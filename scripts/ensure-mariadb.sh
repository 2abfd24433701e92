#!/usr/bin/env bash
# Makes sure a MariaDB/MySQL server is reachable for payoutd's tests, demo and benchmarks, and
# prints the server URL to use (without a database name) on stdout; everything else goes to
# stderr.
#
#   1. PAYOUTD_TEST_DATABASE_URL, when set, is used as is (it must answer).
#   2. root with an empty password on 127.0.0.1:3306 (how CI machines come) is used if it answers.
#   3. Otherwise a local server is installed (Debian/Ubuntu: apt-get install mariadb-server) and
#      started if needed, and a dedicated account payoutd/payoutd@127.0.0.1 is created that may
#      create and drop the `payoutd_*` databases the tests and the demo use.
set -euo pipefail

log() { echo "ensure-mariadb: $*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

client() {
  if command -v mariadb >/dev/null 2>&1; then echo mariadb; elif command -v mysql >/dev/null 2>&1; then echo mysql; else echo ""; fi
}

# Parses mysql://user[:pass]@host[:port] and tries a connection.
answers() {
  local url="$1" rest creds hostport user pass host port cli
  cli=$(client); [ -n "$cli" ] || return 1
  rest="${url#mysql://}"; rest="${rest%%/*}"
  if [[ "$rest" == *@* ]]; then creds="${rest%@*}"; hostport="${rest##*@}"; else creds=""; hostport="$rest"; fi
  user="${creds%%:*}"; pass=""; [[ "$creds" == *:* ]] && pass="${creds#*:}"
  host="${hostport%%:*}"; port=3306; [[ "$hostport" == *:* ]] && port="${hostport##*:}"
  MYSQL_PWD="$pass" "$cli" --protocol=TCP -h "$host" -P "$port" -u "$user" -e 'SELECT 1' >/dev/null 2>&1
}

if [ -n "${PAYOUTD_TEST_DATABASE_URL:-}" ]; then
  if answers "$PAYOUTD_TEST_DATABASE_URL"; then echo "$PAYOUTD_TEST_DATABASE_URL"; exit 0; fi
  log "PAYOUTD_TEST_DATABASE_URL is set but the server does not answer"; exit 1
fi

ROOT_URL="mysql://root@127.0.0.1:3306"
APP_URL="mysql://payoutd:payoutd@127.0.0.1:3306"
if answers "$ROOT_URL"; then echo "$ROOT_URL"; exit 0; fi
if answers "$APP_URL"; then echo "$APP_URL"; exit 0; fi

if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ] && [ ! -x /usr/sbin/mysqld ]; then
  log "installing mariadb-server (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq mariadb-server mariadb-client >&2
fi

server_up() { $SUDO "$(client)" -uroot -e 'SELECT 1' >/dev/null 2>&1; }

if ! server_up; then
  log "starting the MariaDB server"
  if [ ! -d /var/lib/mysql/mysql ]; then
    $SUDO mkdir -p /var/lib/mysql && $SUDO chown mysql:mysql /var/lib/mysql
    $SUDO mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null 2>&1 || true
  fi
  $SUDO mkdir -p /run/mysqld && $SUDO chown mysql:mysql /run/mysqld
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl start mariadb >&2 || true
  fi
  if ! server_up; then
    bin=/usr/sbin/mariadbd; [ -x "$bin" ] || bin=/usr/sbin/mysqld
    $SUDO start-stop-daemon --start --oknodo --background --exec "$bin" -- --user=mysql >&2
  fi
  for _ in $(seq 1 60); do server_up && break; sleep 1; done
  server_up || { log "the MariaDB server did not come up"; exit 1; }
fi

# A fresh install's anonymous accounts shadow user@'%' logins from localhost: drop them.
# Then the dedicated account, allowed to create and drop payoutd_* databases only.
$SUDO "$(client)" -uroot <<'SQL'
DELETE FROM mysql.global_priv WHERE User = '';
FLUSH PRIVILEGES;
CREATE USER IF NOT EXISTS 'payoutd'@'127.0.0.1' IDENTIFIED BY 'payoutd';
CREATE USER IF NOT EXISTS 'payoutd'@'localhost' IDENTIFIED BY 'payoutd';
GRANT ALL PRIVILEGES ON `payoutd\_%`.* TO 'payoutd'@'127.0.0.1';
GRANT ALL PRIVILEGES ON `payoutd\_%`.* TO 'payoutd'@'localhost';
FLUSH PRIVILEGES;
SQL
if answers "$APP_URL"; then echo "$APP_URL"; exit 0; fi
log "cannot log in as payoutd@127.0.0.1 after setting it up"
exit 1
