"""Scratch database servers left behind by a worker that died: found and removed by the next drill.

A scratch server (engines.scratchdb, engines.scratchmysql) runs in a session of its own, so that it survives a
signal to Kasa's process group; a worker killed mid-drill therefore leaves it running, with its folder. Each
scratch folder holds an owner file, written by Kasa itself (`claim`, then `note_server`): the owning process
(pid and start time) and the server's. Before a new scratch server starts, `sweep` looks at the folders of its
kind in the same base folder: one whose owner is gone has its server killed and is removed.

The folder belongs to the scratch user (`nobody`), who could put anything in it, so nothing there is taken on
trust: the owner file counts only when Kasa's own user owns it, and a process is killed only when it is the
server that file names — the scratch user's, started when it was, run on that very folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time

OWNER_FILE = "kasa-owner.json"


def _starttime(pid: int) -> int | None:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if fields and fields[0] != "Z" else None


def _alive(pid, start) -> bool:
    return isinstance(pid, int) and pid > 1 and start is not None and _starttime(pid) == start


def _write(folder: str, info: dict) -> None:
    path = os.path.join(folder, OWNER_FILE)
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    os.replace(tmp, path)


def claim(folder: str, *, socket_dir: str | None = None) -> None:
    """This process owns the scratch folder (and its socket folder elsewhere, when it has one)."""
    _write(folder, {"pid": os.getpid(), "start": _starttime(os.getpid()), "socket_dir": socket_dir})


def note_server(folder: str, pid: int) -> None:
    info = _read(folder) or {}
    _write(folder, {**info, "server": pid, "server_start": _starttime(pid)})


def _read(folder: str) -> dict | None:
    path = os.path.join(folder, OWNER_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if st.st_uid != os.geteuid() or st.st_size > 4096:  # not written by Kasa: not trusted
            return None
        try:
            info = json.load(fh)
        except ValueError:
            return None
    return info if isinstance(info, dict) else None


def _is_server_of(pid: int, folder: str, uid: int) -> bool:
    """The process runs as the scratch folder's owner, on that folder (its command line names it)."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != uid:
            return False
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    return any(arg == folder or arg.startswith(folder + "/") or f"={folder}/" in arg for arg in cmdline)


def sweep(base: str, prefix: str) -> list[str]:
    """Remove every `base/<prefix>*` scratch folder whose owning process is gone, killing its server first.
    Returns the folders removed."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        info = _read(entry.path)
        if info is None or _alive(info.get("pid"), info.get("start")):
            continue  # a live drill's, or one Kasa cannot vouch for: left alone
        server, owner = info.get("server"), entry.stat(follow_symlinks=False).st_uid
        if _alive(server, info.get("server_start")) and _is_server_of(server, entry.path, owner):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server, signal.SIGKILL)  # its own session: the server and its children
            deadline = time.monotonic() + 10
            while _starttime(server) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(entry.path, ignore_errors=True)
        socket_dir = info.get("socket_dir")
        if isinstance(socket_dir, str) and os.path.dirname(socket_dir) == "/tmp" and \
                os.path.basename(socket_dir).startswith("kasa-"):
            shutil.rmtree(socket_dir, ignore_errors=True)
        removed.append(entry.path)
    return removed
