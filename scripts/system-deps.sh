#!/usr/bin/env bash
# Install the Debian packages the suite needs, only those missing.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have psql        || need+=(postgresql-client)
have pg_ctlcluster || need+=(postgresql)
have mariadb     || need+=(mariadb-client)
have mariadbd || [ -x /usr/sbin/mariadbd ] || need+=(mariadb-server)
have redis-server || need+=(redis-server)
have chromium    || need+=(chromium)
have zstd        || need+=(zstd)
have node        || need+=(nodejs)
have python3.11  || need+=(python3.11 python3.11-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! have apt-get; then
    echo "missing system packages: ${need[*]} (install them with apt-get as root)" >&2; exit 1
  fi
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
