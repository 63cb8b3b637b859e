#!/usr/bin/env bash
# Run daphne (web + WebSockets) and a django-q2 worker together; Ctrl-C stops both.
# `make run` calls this after migrate and kasa_setup. KASA_HOST / KASA_PORT choose
# where daphne listens (default 127.0.0.1:8000). KASA_S3=1 (`make run S3=1`) also runs a local SeaweedFS whose
# Object Lock bucket holds an immutable copy of the demo's backups (manage.py kasa_seaweedfs; docs/STORAGE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
HOST=${KASA_HOST:-127.0.0.1}
PORT=${KASA_PORT:-8000}
GRACE=10   # seconds each process gets to stop cleanly before it is killed
# SeaweedFS's filer waits 15 s for its gRPC streams to end before it stops (and its volume server after it).
[ "${KASA_S3:-}" = 1 ] && GRACE=25

for tool in python daphne; do
  [ -x "$BIN/$tool" ] || { echo "$BIN/$tool is missing: run 'make install' first" >&2; exit 1; }
done

# Job control: each server runs in its own process group. A Ctrl-C in the terminal
# then reaches only this script, which stops each server exactly once (a second signal
# would tell the worker to cut its running tasks off instead of letting them finish).
set -m
pids=()
alive() { local pid; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
stop() {
  trap - INT TERM EXIT
  echo; echo "stopping Kasa…"
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 $((GRACE * 10))); do alive || break; sleep 0.1; done
  if alive; then
    echo "still running after ${GRACE} s: killing" >&2
  fi
  # Each server's whole process group (the worker's own processes included), in case any is left.
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "Kasa stopped; customers' services keep running (the demo's: README, \"The demo, end to end\")"
}
# Ctrl-C or SIGTERM is a requested stop (exit 0); a server exiting on its own is not (its status).
trap 'stop; exit 0' INT TERM
trap stop EXIT

if [ "${KASA_S3:-}" = 1 ]; then
  # weed runs as one of this script's jobs (not under a Python parent), so it stops with the others.
  s3dir=$($BIN/python manage.py kasa_seaweedfs prepare)
  mapfile -d '' weed_argv < "$s3dir/weed.argv"
  (cd "$s3dir" && exec "${weed_argv[@]}" >>"$s3dir/weed.log" 2>&1) & pids+=($!)
  $BIN/python manage.py kasa_seaweedfs demo --pid "$!" || { echo "SeaweedFS did not start: $s3dir/weed.log" >&2; exit 1; }
fi

$BIN/python manage.py qcluster & pids+=($!)
$BIN/daphne -b "$HOST" -p "$PORT" config.asgi:application & pids+=($!)

case "$HOST" in
  0.0.0.0|::|"[::]") shown=localhost ;;
  \[*) shown=$HOST ;;
  *:*) shown="[$HOST]" ;;
  *) shown=$HOST ;;
esac
echo
echo "Kasa is running: admin at http://$shown:$PORT/  (login printed above by kasa_setup)"
echo "Press Ctrl-C to stop the web server and the worker."
# Whichever child exits first ends the session (and the trap stops the other).
status=0
wait -n || status=$?
exit $status
