#!/usr/bin/env bash
# Start the servers the test suite talks to when they are down, and give the
# suite the local access it expects. Idempotent: a running, reachable server is
# left alone. Meant for a test or CI machine (it is what `make test` runs):
#   PostgreSQL  127.0.0.1:5432  user postgres without a password (a `trust` line
#               for that user on loopback only, added to pg_hba.conf if needed)
#   MariaDB     127.0.0.1:3306  user root without a password (on loopback)
#   Redis       127.0.0.1:6379  nothing kept on disk
set -uo pipefail
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_up() {
  for _ in $(seq 1 120); do up "$1" && return 0; sleep 0.5; done
  echo "$2 did not come up on port $1" >&2; return 1
}
is_root() { [ "$(id -u)" = 0 ]; }
ok=0

# --- PostgreSQL ---------------------------------------------------------------
pg_ok() { psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -w -Atqc 'SELECT 1' >/dev/null 2>&1; }
pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -1; }
if ! up 5432; then
  echo "starting PostgreSQL"
  version=$(pg_version)
  if [ -z "$version" ] || [ ! -d "/etc/postgresql/$version/main" ]; then
    # Installed without its default cluster: create it for the newest server installed.
    version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1)
    [ -n "$version" ] && pg_createcluster "$version" main >/dev/null
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_up 5432 PostgreSQL || ok=1
fi
if up 5432 && ! pg_ok; then
  version=$(pg_version)
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if is_root && [ -f "$hba" ]; then
    echo "PostgreSQL: allowing user postgres without a password on loopback ($hba)"
    { printf '# added by Kasa scripts/services.sh for the test suite\n'
      printf 'host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust\n'
      cat "$hba"; } >"$hba.kasa-new" && cat "$hba.kasa-new" >"$hba" && rm -f "$hba.kasa-new"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true
    for _ in $(seq 1 20); do pg_ok && break; sleep 0.5; done
  fi
  pg_ok || { echo "PostgreSQL: cannot log in as postgres on 127.0.0.1 without a password" >&2; ok=1; }
fi

# --- MariaDB ------------------------------------------------------------------
my_ok() { mariadb --protocol=TCP -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1' >/dev/null 2>&1; }
if ! up 3306; then
  echo "starting MariaDB"
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
  if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null || true
  fi
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  wait_up 3306 MariaDB || ok=1
fi
if up 3306 && ! my_ok; then
  if is_root; then
    # Debian's root@localhost logs in by unix socket only; give loopback TCP the same, without a password.
    echo "MariaDB: allowing root without a password on loopback"
    mariadb -u root <<'SQL' || true
ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('');
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
CREATE USER IF NOT EXISTS 'root'@'::1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'::1' WITH GRANT OPTION;
FLUSH PRIVILEGES;
SQL
  fi
  my_ok || { echo "MariaDB: cannot log in as root on 127.0.0.1 without a password" >&2; ok=1; }
fi

# --- Redis --------------------------------------------------------------------
if ! up 6379; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_up 6379 Redis || ok=1
fi
exit $ok
