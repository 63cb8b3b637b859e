#!/usr/bin/env bash
# Customer code runs as other OS users (Customer.run_as, the scratch PostgreSQL server's user): they must pass
# through the folders above the customers' roots and above the binaries they run from this checkout (PM2 in
# node_modules/, PostgreSQL in .venv/). A checkout without o+x on itself (a clone in `mktemp -d` is 0700) gets
# it here: traverse only, nobody can list it. A folder above the checkout that blocks is reported, not changed:
# an error for the tests, a warning with --warn (`make run`: the demo then runs as Kasa's own user and says so).
set -euo pipefail
warn_only=false; [ "${1:-}" = --warn ] && warn_only=true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
other_x() { local p; p=$(stat -c %A "$1"); [[ "${p:9:1}" == [xt] ]]; }
if ! other_x "$here"; then
  if chmod o+x "$here" 2>/dev/null; then
    echo "note: $here had no o+x; given o+x (traverse only) so that customer users reach PM2, PostgreSQL and var/"
  fi
fi
d="$here"
while [ "$d" != / ]; do
  if ! other_x "$d"; then
    echo "$d lets no other user through (no o+x): customer code, which runs as other users, cannot reach" \
      "this checkout's PM2, PostgreSQL and var/ folders. Run 'chmod o+x $d' or clone Kasa elsewhere." >&2
    $warn_only && exit 0
    exit 1
  fi
  d=$(dirname "$d")
done
