"""A run's journal on local disk: the way back that never depends on the control database.

A restore or an upgrade writes every journal step here, written and fsynced, BEFORE the change it announces and
before the copy in the run's `result`. While an undo runs with the control database unreachable, the log lines,
the commands and the run's end go here too (operations.context), and are put into the database later
(operations.reconcile) — by the worker once the database answers again, else by the reaper's next pass.

Where, and why not "beside the staging folder": a customer's root is writable by the customer's OS user, who
could edit or plant a journal that Kasa (root) would then follow — a rename of any path of the machine, a
database dropped. So the journals live in Kasa's own var folder, `$KASA_VAR_DIR/journals/run-<id>.json`: the
folder 0700 and each file 0600, owned by Kasa's user, which no customer user can write. Belt and braces, each
file is also authenticated: an HMAC-SHA256 under a key derived (HKDF, its own label) from KASA_SECRET_KEYS covers
the whole body, which names its run. A file that is not a regular file owned by us with no group/other bits, does
not parse, carries no valid tag under any configured key, or names another run is refused; and the caller checks
every absolute path in the journal against the run's root before following it (`outside`).

Writes are atomic: a new file is written beside the old one (O_EXCL, O_NOFOLLOW, 0600), fsynced, renamed over
it, and the folder fsynced — a crash leaves the previous version or the new one, never half of one.

A worker holds `run-<id>.lock` (flock) while it owns the run: a lock nobody holds means that worker is gone
(flock dies with its process), which is how the reaper on this host tells a worker still undoing without a
database from a dead one. Plain Python, no Django.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

FORMAT = "kasa-local-journal/1"
_HKDF_INFO = b"kasa local journal v1"
MAX_BYTES = 64 * 1024 * 1024  # a journal with every log line of a long undo stays far below this
_NAME = re.compile(r"^run-(\d+)\.json$")


class JournalRefused(Exception):
    """The file is corrupt, forged, unsafe or names another run: nothing in it is followed."""


def derive_keys(secret_keys: Iterable[str]) -> list[tuple[str, bytes]]:
    """(key id, HMAC key) per configured secret key, newest first: files are tagged with the first, read with any."""
    # Imported here: a remote restore ships this module to a host's python3 (engines.hostrestore's journal), which
    # only writes and reads with a key the worker derived, and may have no `cryptography`.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    keys = []
    for raw in secret_keys:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(raw.encode())
        keys.append((hashlib.sha256(key).hexdigest()[:12], key))
    if not keys:
        raise ValueError("no key to authenticate local journals with")
    return keys


def path_for(folder: str | os.PathLike, run_id: int) -> Path:
    return Path(folder) / f"run-{int(run_id)}.json"


def lock_path(folder: str | os.PathLike, run_id: int) -> Path:
    return Path(folder) / f"run-{int(run_id)}.lock"


def ensure_folder(folder: str | os.PathLike) -> Path:
    """The journals folder: created 0700; refused when it is a link, not ours, or open to others."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise JournalRefused(f"{folder} is not a folder of this user: local journals are not kept there")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _tag(key: bytes, kid: str, body: dict) -> str:
    return hmac.new(key, _canonical({"format": FORMAT, "key": kid, "body": body}), hashlib.sha256).hexdigest()


def write(folder: str | os.PathLike, run_id: int, body: dict, keys: list[tuple[str, bytes]]) -> None:
    """Replace the run's journal with `body` (JSON-able; it must hold "run": run_id), atomically and durably."""
    if body.get("run") != run_id:
        raise ValueError("a journal body names its own run")
    folder = ensure_folder(folder)
    kid, key = keys[0]
    data = _canonical({"format": FORMAT, "key": kid, "hmac": _tag(key, kid, body), "body": body})
    path = path_for(folder, run_id)
    tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a crash of a process with this same id: never reused half-written
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(folder)


def read(folder: str | os.PathLike, run_id: int, keys: list[tuple[str, bytes]]) -> dict | None:
    """The body of the run's journal; None when there is none. JournalRefused when it cannot be trusted."""
    path = path_for(folder, run_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symbolic link planted in its place
        raise JournalRefused(f"{path.name}: cannot be opened safely ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JournalRefused(f"{path.name}: not a regular file")
        if st.st_uid != os.geteuid():
            raise JournalRefused(f"{path.name}: owned by uid {st.st_uid}, not by Kasa's user")
        if st.st_mode & 0o077:
            raise JournalRefused(f"{path.name}: mode {stat.S_IMODE(st.st_mode):o}, not 600")
        if st.st_size > MAX_BYTES:
            raise JournalRefused(f"{path.name}: {st.st_size} bytes, more than a journal holds")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        doc = json.loads(b"".join(chunks))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a Kasa local journal")
        kid, tag, body = doc["key"], doc["hmac"], doc["body"]
        if not (isinstance(kid, str) and isinstance(tag, str) and isinstance(body, dict)):
            raise ValueError("malformed envelope")
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalRefused(f"{path.name}: corrupt ({exc})") from None
    key = dict(keys).get(kid)
    if key is None:
        raise JournalRefused(f"{path.name}: tagged with key {kid!r}, which is not configured (KASA_SECRET_KEYS)")
    if not hmac.compare_digest(_tag(key, kid, body), tag):
        raise JournalRefused(f"{path.name}: its authentication tag is wrong (tampered with or forged)")
    if body.get("run") != int(run_id):
        raise JournalRefused(f"{path.name}: it is the journal of run {body.get('run')!r}, not of run {run_id}")
    return body


def remove(folder: str | os.PathLike, run_id: int) -> None:
    """The run is reconciled: its journal goes (the lock file too), durably."""
    for path in (path_for(folder, run_id), lock_path(folder, run_id)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    with contextlib.suppress(FileNotFoundError):
        _fsync_dir(Path(folder))


def set_aside(folder: str | os.PathLike, run_id: int, suffix: str) -> Path | None:
    """A refused journal is kept for an operator under another name (never read again as a journal)."""
    path = path_for(folder, run_id)
    aside = path.with_name(f"{path.name}.refused-{suffix}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    return aside


def listed(folder: str | os.PathLike) -> list[int]:
    """Run ids of the journals in the folder, oldest run first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)


class Lock:
    """flock on run-<id>.lock: held by the worker that owns the run, released when that process ends."""

    def __init__(self, folder: str | os.PathLike, run_id: int):
        self.path = lock_path(ensure_folder(folder), run_id)
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when taken; False when another process (or another Lock of this one) holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def held_elsewhere(folder: str | os.PathLike, run_id: int) -> bool:
    """Whether a live process holds the run's lock (its worker, still at work — perhaps undoing offline)."""
    path = lock_path(folder, run_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases our probe's lock
    return False


def outside(obj, root: str | os.PathLike) -> list[str]:
    """Every absolute path in `obj` (values and keys, at any depth) that is not `root` or below it, lexically,
    or that holds a `..` component: a journal only ever names paths inside the root its run changes."""
    root = os.path.normpath(os.fspath(root))
    bad: list[str] = []

    def check(text: str) -> None:
        if not text.startswith("/"):
            return
        norm = os.path.normpath(text)
        if ".." in text.split("/") or not (norm == root or norm.startswith(root.rstrip("/") + "/")):
            bad.append(text)

    def walk(node) -> None:
        if isinstance(node, str):
            check(node)
        elif isinstance(node, dict):
            for k, v in node.items():
                check(str(k))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(obj)
    return bad


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
