"""Verify and safely extract backup artifacts.

Plaintext comes from engines.plainread.open_plain (stored bytes counted and
hashed, decrypted, decompressed), where nothing is trusted until the end: so
verification reads everything and throws it away, and extraction goes into an
empty staging folder that is removed on any failure, including one found at
the very end.

Extraction is one pass: plaintext goes through tarcheck.TarScanner, which
checks every member header before GNU tar receives a byte of that member, and
after tar exits check_tree() compares what is on disk with what the scanner
saw, so a disagreement between the two parsers cannot go unnoticed.

Extracted files are tamed: never the archive's owners (`--no-same-owner`),
never a setuid/setgid bit (the scanner strips them from the headers and lists
the members; check_tree refuses any that still appears), never a device or
FIFO (refused), never extended attributes (file capabilities). Given an
`owner` (the customer's run_as user), GNU tar itself runs as that user, so
whatever it writes belongs to the customer and it can write nothing the
customer could not; without one the files are the worker's own.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading

from . import beneath, runas, trees
from .chainread import ChainStream
from .plainread import CHILD_ENV, PlainStream, Progress, drain, grow_pipe, last_line, write_all
from .tarcheck import ArchiveRefused, ArtifactError, Limits, Listing, TarScanner
from .treecheck import check_tree

__all__ = ["ArchiveRefused", "ArtifactError", "Limits", "Listing", "check_tree", "extract_artifact", "open_plain",
           "setid_warnings", "verify_artifact"]

def open_plain(store, name: str, *, sha256: str, size: int, encrypted: bool, keyring, compression: str,
               on_progress: Progress | None = None, chain: dict | None = None) -> PlainStream | ChainStream:
    """engines.plainread's reader of one artifact; with `chain` (a differential's service archive: the full's
    archive and the change list it applies on, backups.chains.chain_kwargs) engines.chainread's reader of the
    merged archive, every part checked the same way."""
    if chain:
        return ChainStream(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                           compression=compression, on_progress=on_progress, chain=chain)
    return PlainStream(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                       compression=compression, on_progress=on_progress)


def verify_artifact(store, name: str, *, sha256: str, size: int, encrypted: bool, keyring, compression: str,
                    tar: bool, limits: Limits | None = None, on_progress: Progress | None = None,
                    chain: dict | None = None) -> Listing | None:
    """Read the whole artifact and check it; for tar artifacts also check every member header (nothing is
    extracted). Returns the tar Listing (without its path map), or None for other artifacts."""
    scanner = TarScanner(name, limits or Limits()) if tar else None
    with open_plain(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                    compression=compression, on_progress=on_progress, chain=chain) as chunks:
        for chunk in chunks:
            if scanner is not None and not scanner.ended:
                scanner.feed(chunk)
        listing = scanner.finish() if scanner is not None else None
    if listing is not None:
        listing.paths = None  # can be large; only extraction needs it
    return listing


# --- extraction ------------------------------------------------------------------------------
def _tar_argv() -> list[str]:
    # Modes as archived (the scanner has taken the set-id bits out), owners never: whoever runs tar owns what
    # it writes. No extended attributes, ACLs or SELinux labels (a capability is a setuid bit by other means),
    # even where a tar build would default to them.
    return ["tar", "--extract", "--file=-", "--preserve-permissions", "--no-same-owner", "--no-xattrs",
            "--no-acls", "--no-selinux", "--delay-directory-restore"]


class _Tar:
    """GNU tar reading the checked stream from a pipe."""

    def __init__(self, dest: str, label: str, owner: runas.Identity | None = None, cwd: str | None = None):
        self.dest, self.label = dest, label
        self.tail: collections.deque = collections.deque(maxlen=20)
        try:
            # As the owner, tar could not enter dest by its path (the staging folder around it is the worker's,
            # 0700): the worker's child enters it before it switches user, and tar extracts into ".". With `cwd`
            # (/proc/self/fd/N: the folder Kasa holds open) the child enters exactly that folder, whatever a
            # customer's user may have swapped on the path since.
            as_owner = runas.popen_kwargs(owner) if owner is not None else {}
        except runas.RunAsError as exc:
            raise ArtifactError(f"{label}: cannot extract as the customer's user: {exc}") from None
        try:
            self.proc = subprocess.Popen(_tar_argv(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
                                         env=CHILD_ENV, bufsize=0, cwd=cwd or dest, **as_owner)
        except FileNotFoundError:
            raise ArtifactError(f"{label}: GNU tar is not installed on this worker") from None
        grow_pipe(self.proc.stdin.fileno())
        self._stderr = threading.Thread(target=drain, args=(self.proc.stderr, self.tail), daemon=True)
        self._stderr.start()

    def write(self, pieces) -> None:
        fd = self.proc.stdin.fileno()
        try:
            for piece in pieces:
                write_all(fd, piece)
        except BrokenPipeError:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            raise self.failure() from None

    def close_input(self) -> None:
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def failure(self) -> ArtifactError:
        code = self.proc.poll()
        why = "stopped reading" if code is None else (f"exit code {code}" if code > 0 else f"signal {-code}")
        last = last_line(self.tail)
        return ArtifactError(f"{self.label}: tar failed extracting into {self.dest} ({why}"
                             f"{': ' + last if last else ''})")

    def finish(self) -> None:
        self.close_input()
        self.proc.wait()
        self._stderr.join(timeout=10)
        self.proc.stderr.close()
        if self.proc.returncode != 0:
            raise self.failure()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._stderr.join(timeout=10)
        for f in (self.proc.stdin, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def _prepare_dest(dest: str, label: str, owner: runas.Identity | None, root=None) -> int:
    """dest absent (created 0700) or an empty folder of ours; given to `owner` when there is one. Returns its
    descriptor, opened without following links: a folder or link put there by someone else is refused, not
    chmod-ed or chown-ed. With `root`, dest's folder is reached from it without following any link
    (engines.beneath): the staging folder lies in a customer's root."""
    with contextlib.ExitStack() as stack:
        if root is not None:
            try:
                pfd, name = stack.enter_context(beneath.parent(root, dest))
            except (beneath.BeneathError, FileNotFoundError, NotADirectoryError) as exc:
                raise ArtifactError(f"{label}: cannot reach the staging folder {dest}: {exc}") from None
        else:
            pfd = os.open(os.path.dirname(dest), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            stack.callback(os.close, pfd)
            name = os.path.basename(dest)
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ArtifactError(f"{label}: cannot create the staging folder {dest}: {exc.strerror}") from None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        except OSError:
            raise ArtifactError(f"{label}: the staging folder {dest} exists and is not a folder; it was left as it "
                                "is") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() and not (owner is not None and st.st_uid == owner.uid):
            raise ArtifactError(f"{label}: the staging folder {dest} belongs to uid {st.st_uid}, not to the worker; "
                                "it was left as it is")
        if os.listdir(fd):
            raise ArtifactError(f"{label}: the staging folder {dest} is not empty; it was left as it is")
        os.fchmod(fd, 0o700)  # exact, whatever the umask
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, owner.uid, owner.gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


# Enough to name every set-id member of a real backup or package; thousands (a hostile archive) get a count.
MAX_SETID_LINES = 200


def setid_warnings(artifact: str, setid: list[tuple[str, int]]) -> list[str]:
    """One warning line per member (name, archived mode) whose setuid/setgid bits were stripped."""
    lines = []
    for member, mode in setid[:MAX_SETID_LINES]:
        bits = " and ".join(b for b, m in (("setuid", 0o4000), ("setgid", 0o2000)) if mode & m)
        lines.append(f"{artifact}: {member!r} had the {bits} bit (mode {mode & 0o7777:04o}): unpacked without it "
                     f"(mode {mode & 0o1777:04o})")
    if len(setid) > MAX_SETID_LINES:
        lines.append(f"{artifact}: {len(setid) - MAX_SETID_LINES} more members had setuid/setgid bits, all unpacked "
                     "without them")
    return lines


def _restate(exc: ArtifactError, suffix: str) -> ArtifactError:
    msg = f"{exc}; {suffix}"
    if isinstance(exc, ArchiveRefused):
        return ArchiveRefused(msg, member=exc.member, rule=exc.rule)
    return ArtifactError(msg)


def extract_artifact(store, name: str, *, sha256: str, size: int, encrypted: bool, keyring, compression: str,
                     dest, limits: Limits | None = None, on_progress: Progress | None = None,
                     owner: runas.Identity | None = None, root: str | os.PathLike | None = None,
                     chain: dict | None = None) -> Listing:
    """Extract a tar artifact into `dest` (absent, then created 0700, or an empty folder) in one pass: every
    member header is checked before tar receives that member, and the tree is checked after tar exits.
    With `owner`, dest and everything in it belong to that user (tar runs as it); else to the worker.
    Set-id bits are stripped: `Listing.setid` names each member that had them, for a warning.
    Any failure removes `dest` entirely and raises ArtifactError/ArchiveRefused. Returns the Listing.
    With `root` (dest lies in a customer's root), dest is reached from it without following a link, tar works in
    the folder Kasa holds open, and a failure removes it through descriptors (engines.beneath)."""
    dest = os.path.abspath(os.fspath(dest))
    if owner is not None and os.geteuid() != 0 and os.geteuid() != owner.uid:
        raise ArtifactError(f"{name}: the worker runs as uid {os.geteuid()} and cannot give the restored files to "
                            f"{owner}: run the worker as root, or leave run_as empty; nothing was unpacked")
    fd = _prepare_dest(dest, name, owner, root)
    try:
        listing = _extract(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                           compression=compression, dest=dest, limits=limits or Limits(), on_progress=on_progress,
                           owner=owner, cwd=beneath.dir_path(fd), chain=chain)
    except ArtifactError as exc:
        trees.remove_tree(dest, root=root)
        raise _restate(exc, f"the staging folder {dest} was removed and nothing else was touched") from None
    except BaseException:
        trees.remove_tree(dest, root=root)
        raise
    finally:
        os.close(fd)
    listing.paths = None
    return listing


def _extract(store, name: str, *, sha256, size, encrypted, keyring, compression, dest, limits, on_progress, owner,
             cwd=None, chain=None):
    scanner = TarScanner(name, limits)
    stream = open_plain(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                        compression=compression, on_progress=on_progress, chain=chain)
    tar = None
    try:
        with stream as chunks:
            tar = _Tar(dest, name, owner, cwd)
            for chunk in chunks:
                if scanner.ended:
                    continue  # what follows the end-of-archive block (tar's padding) is read only to be checked
                pieces = scanner.feed(chunk)
                if pieces:
                    tar.write(pieces)
                if scanner.ended:
                    tar.close_input()
            listing = scanner.finish()
        tar.finish()
    except BaseException:
        if tar is not None:
            tar.kill()
        raise
    try:
        check_tree(dest, listing, artifact=name, uid=owner.uid if owner is not None else os.geteuid())
    except OSError as exc:  # a restored folder we cannot read (mode 0000 and we are not root)
        raise ArtifactError(f"{name}: cannot check the extracted tree in {dest}: {exc.strerror or exc}") from None
    return listing
