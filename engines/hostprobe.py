"""What a host probe asks a host, and how its answer is read: one POSIX `sh` script, the same on the worker's own
machine (run locally) and on a remote host (run over engines.ssh), so both are read alike.

The script is a constant; the customers root and the PM2 to look at are its positional arguments ($1, $2), never
pasted into it. It runs no customer code and starts nothing: `pm2 --version` would spawn a PM2 daemon, so PM2's
version is read from its package.json instead. It also counts the restore journals left in the root's
`.kasa-journals` (a run that lost the host mid-way): the probe task has them replayed (hosts.tasks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TOOLS = ("python3", "tar", "zstd", "pm2", "pg_dump", "mariadb-dump")
MISSING = "missing"
UNKNOWN = -1  # ProbeAnswer.journals when the probe may not look

SCRIPT = r"""
root=$1; pm2=${2:-pm2}
printf 'os %s\n' "$(sed -n 's/^PRETTY_NAME=//p' /etc/os-release 2>/dev/null | head -n 1)"
if [ -d "$root" ]; then
  printf 'df %s\n' "$(df -P -B1 -- "$root" 2>/dev/null | tail -n 1)"
else
  printf 'noroot\n'
fi
j="$root/.kasa-journals"
if [ -d "$j" ] && ! { [ -r "$j" ] && [ -x "$j" ]; }; then
  printf 'journals unknown\n'
else
  n=0
  for f in "$j"/run-*.json; do [ -e "$f" ] && n=$((n+1)); done
  printf 'journals %s\n' "$n"
fi
for t in python3 tar zstd pg_dump mariadb-dump; do
  if command -v "$t" >/dev/null 2>&1; then
    printf 'tool %s %s\n' "$t" "$("$t" --version 2>&1 </dev/null | head -n 1)"
  else
    printf 'tool %s\n' "$t"
  fi
done
if p=$(command -v "$pm2" 2>/dev/null); then
  d=$(dirname "$(readlink -f "$p")")
  printf 'tool pm2 %s\n' "$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$d/../package.json" 2>/dev/null | head -n 1)"
else
  printf 'tool pm2\n'
fi
"""


def argv(customers_root: str, pm2: str = "pm2") -> list[str]:
    return ["sh", "-c", SCRIPT, "kasa-probe", customers_root, pm2]


@dataclass
class ProbeAnswer:
    os: str = ""
    free_bytes: int | None = None
    root_exists: bool = True
    tools: dict[str, str] = field(default_factory=dict)
    # Restore journals a lost host kept (engines.hostrestore.JOURNALS), to be replayed; UNKNOWN when the probe may
    # not look (a login through sudo: the folder is root's, and the probe runs unprivileged), so a replay looks.
    journals: int = 0


_VERSION = re.compile(r"v?(\d+\.\d+(?:\.\d+)?(?:[-+~][0-9A-Za-z.]+)?)")


def version_of(tool: str, line: str) -> str:
    """The version in a tool's `--version` line ("missing" when the tool is not there, the line itself when it
    holds no version)."""
    line = line.strip()
    if not line:
        return MISSING
    for marker in ("Distrib ", " from "):  # mariadb-dump: "Ver 10.19 Distrib 10.11.6-MariaDB" / "from 11.4.2-…"
        if marker in line:
            line = line.split(marker, 1)[1]
            break
    if tool == "pg_dump":  # "pg_dump (PostgreSQL) 15.10 (Debian 15.10-0+deb12u1)"
        line = line.split(")", 1)[-1]
    m = _VERSION.search(line)
    return m.group(1) if m else line[:60]


def parse(text: str) -> ProbeAnswer:
    answer = ProbeAnswer(tools=dict.fromkeys(TOOLS, MISSING))
    for raw in text.splitlines():
        kind, _, rest = raw.partition(" ")
        if kind == "os":
            answer.os = rest.strip().strip('"').strip("'")[:200]
        elif kind == "noroot":
            answer.root_exists = False
        elif kind == "df":
            fields = rest.split()
            if len(fields) >= 4 and fields[3].isdigit():
                answer.free_bytes = int(fields[3])
        elif kind == "journals":
            answer.journals = int(rest) if rest.strip().isdigit() else UNKNOWN if rest.strip() == "unknown" else 0
        elif kind == "tool":
            name, _, line = rest.partition(" ")
            if name in answer.tools:
                answer.tools[name] = version_of(name, line)
    return answer
