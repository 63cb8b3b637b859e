#!/usr/bin/env bash
# Install the Debian packages Kasa needs, only those missing (a no-op when all are there).
#   scripts/system-deps.sh           everything the test suite needs (servers, clients, tools, browser)
#   scripts/system-deps.sh --python  only Python 3.11 with venv support (what `make run` needs)
#   scripts/system-deps.sh --image   podman and mmdebstrap (what `make image` needs)
set -euo pipefail
only_python=false
[ "${1:-}" = "--python" ] && only_python=true
only_image=false
[ "${1:-}" = "--image" ] && only_image=true

need=()
have() { command -v "$1" >/dev/null 2>&1; }
# A Python 3.11 that can create a virtual environment (Debian splits venv/ensurepip
# into python3.11-venv). Same probe as the Makefile's.
py_ok() {
  local p
  for p in python3.11 /usr/bin/python3.11 python3; do
    "$p" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1 && return 0
  done
  return 1
}

if $only_image; then
  have podman     || need+=(podman)      # builds the Dockerfile (`podman build --isolation=chroot`)
  have mmdebstrap || need+=(mmdebstrap)  # makes the Debian bookworm base the image is built on
  only_python=true  # and nothing of the suite's list below
else
  py_ok || need+=(python3.11 python3.11-venv)
fi
$only_image || have npm || need+=(npm)  # make install puts PM2 (customer services run under it) in node_modules/
if ! $only_python; then
  [ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
  have psql          || need+=(postgresql-client)
  have pg_dump       || need+=(postgresql-client)
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null && have pg_ctlcluster || need+=(postgresql)
  have mariadb       || need+=(mariadb-client)
  have mariadb-dump  || need+=(mariadb-client)
  [ -x /usr/sbin/mariadbd ] || have mariadbd || need+=(mariadb-server)
  have redis-server  || need+=(redis-server)
  have chromium      || need+=(chromium)
  [ -d /usr/share/fonts/truetype/liberation ] || need+=(fonts-liberation)  # text for headless chromium
  have zstd          || need+=(zstd)
  have node          || need+=(nodejs)
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)  # a real SFTP server for the storage-target tests
  [ -x /usr/bin/sudo ] || need+=(sudo)  # a host's non-root login user with Kasa's sudo rule (deploy/sudoers/kasa)
  have prometheus    || need+=(prometheus)  # rollouts' PromQL gates are evaluated by a real Prometheus
  have systemd-analyze || need+=(systemd)  # tests/test_deploy_files.py verifies deploy/systemd/ with it
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
# Unique, order kept.
mapfile -t need < <(printf '%s\n' "${need[@]}" | awk '!seen[$0]++')
if [ "$(id -u)" != 0 ] || ! have apt-get; then
  echo "missing system packages: ${need[*]}" >&2
  echo "install them as root: apt-get install ${need[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/kasa-apt.XXXXXX.log)
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "apt-get failed (full log: $log)" >&2
  exit 1
fi
rm -f "$log"
