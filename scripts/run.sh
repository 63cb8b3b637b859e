#!/usr/bin/env bash
# Run daphne (web + WebSockets) and a django-q2 worker together; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
HOST=${KASA_HOST:-127.0.0.1}
PORT=${KASA_PORT:-8000}

pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "stopping Kasa…"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

$BIN/python manage.py qcluster & pids+=($!)
$BIN/daphne -b "$HOST" -p "$PORT" config.asgi:application & pids+=($!)

echo
echo "Kasa is running: admin at http://$HOST:$PORT/  (login printed above by kasa_setup)"
echo "Press Ctrl-C to stop the web server and the worker."
# Whichever child exits first ends the session (and the trap stops the other).
wait -n
