"""Verify and safely extract backup artifacts.

An artifact is stored as  plaintext → [zstd|gzip] → [encryption] → store,
with its stored size and sha256 in the catalogue. Reading reverses that with
flat memory:

    store.open_read → size/sha256 count → decrypt → decompressor stdin
      (a reader thread)                              ↓
                                     decompressor stdout → caller (plaintext chunks)

Nothing is trusted until the end: only when every byte was read do we know
that the stored bytes match the catalogue, that decryption authenticated to
the last chunk and that the decompressor exited cleanly. So verification
reads everything and throws it away, and extraction goes into an empty
staging folder that is removed on any failure, including one found at the
very end.

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
import hashlib
import os
import posixpath
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator

from . import runas, trees
from . import tarcheck as tc
from .backupcrypto import MAGIC, BackupDecryptError, decrypt_stream
from .stores.base import StoreError, StoreNotFound
from .streams import CHUNK
from .tarcheck import ArchiveRefused, ArtifactError, Limits, Listing, TarScanner, show

__all__ = ["ArchiveRefused", "ArtifactError", "Limits", "Listing", "check_tree", "extract_artifact", "files_owner",
           "open_plain", "setid_warnings", "verify_artifact"]

Progress = Callable[[int], None]
# Child programs get a fixed environment: TAR_OPTIONS, GZIP or a locale would change how they read their input.
_CHILD_ENV = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LC_ALL": "C"}


def _decompressor(compression: str) -> list[str] | None:
    if compression == "zstd":
        return ["zstd", "-d", "-c", "-q"]
    if compression == "gzip":
        return [shutil.which("pigz") or "gzip", "-d", "-c"]
    if compression == "none":
        return None
    raise ArtifactError(f"unknown compression {compression!r}: expected zstd, gzip or none")


def _grow_pipe(fd: int) -> None:
    """1 MiB pipes instead of 64 KiB: fewer wake-ups between us and the child (Linux, best effort)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)
    except (OSError, ImportError):
        pass


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _drain(stream, tail: collections.deque) -> None:
    for raw in iter(stream.readline, b""):
        tail.append(raw.decode("utf-8", "replace").rstrip("\n"))


def _last_line(tail: collections.deque) -> str:
    """The last line that says something (tar ends with a generic 'Exiting with failure status')."""
    lines = [ln.strip() for ln in tail if ln.strip()]
    useful = [ln for ln in lines if "Exiting with failure status" not in ln and "Error is not recoverable" not in ln]
    return (useful or lines or [""])[-1]


class _Stopped(Exception):
    """The consumer went away; the reader thread ends quietly."""


class _Downstream(Exception):
    """The decompressor closed its input; its exit code tells why."""


class _Feeder(threading.Thread):
    """Reads stored bytes, counts and hashes them, decrypts, and writes into the decompressor."""

    def __init__(self, src, out, *, name: str, where: str, size: int, encrypted: bool, keyring):
        super().__init__(name=f"unpack-read {name}", daemon=True)
        self.src, self.out, self.label, self.where = src, out, name, where
        self.expected_size, self.encrypted, self.keyring = size, encrypted, keyring
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0
        self.eof = False
        self.fault: ArtifactError | None = None
        self.stopping = False

    # decrypt_stream's source
    def read(self, n: int = CHUNK) -> bytes:
        if self.stopping:
            raise _Stopped
        data = self.src.read(n)
        if not data:
            self.eof = True
            return b""
        self.sha256.update(data)
        self.bytes_read += len(data)
        if self.bytes_read > self.expected_size:
            raise ArtifactError(f"{self.label}: stored bytes do not match the catalogue (more than the "
                                f"{self.expected_size} bytes it records); the artifact is corrupt or was replaced")
        return data

    # decrypt_stream's destination
    def write(self, data) -> None:
        if data:
            try:
                _write_all(self.out.fileno(), data)
            except (BrokenPipeError, ValueError, OSError):
                raise _Downstream from None

    def run(self) -> None:
        try:
            if self.encrypted:
                decrypt_stream(self, self, self.keyring, chunk_size=CHUNK)
            else:
                first = True
                while data := self.read(CHUNK):
                    if first and data.startswith(MAGIC):
                        raise ArtifactError(f"{self.label}: the artifact is encrypted but the catalogue says it "
                                            "is not; the catalogue entry does not belong to this object")
                    first = False
                    self.write(data)
        except (_Stopped, _Downstream):
            pass
        except ArtifactError as exc:
            self.fault = exc
        except BackupDecryptError as exc:
            self.fault = ArtifactError(f"{self.label}: {exc}")
        except Exception as exc:  # a store read failure (network, disk)
            if not self.stopping:
                why = " ".join(str(exc).split()) or type(exc).__name__
                self.fault = ArtifactError(f"{self.label}: reading it from {self.where} failed: {why}")
        finally:
            try:
                self.out.close()  # EOF for the decompressor
            except OSError:
                pass


class PlainStream:
    """The context manager open_plain() returns; iterate what __enter__ gives for plaintext chunks."""

    def __init__(self, store, name: str, *, sha256: str, size: int, encrypted: bool, keyring, compression: str,
                 on_progress: Progress | None = None):
        self.store, self.name = store, name
        self.sha256, self.size = (sha256 or "").lower(), size
        self.encrypted, self.keyring, self.compression = encrypted, keyring, compression
        self.on_progress = on_progress
        self.proc: subprocess.Popen | None = None
        self.feeder: _Feeder | None = None
        self.stderr_tail: collections.deque = collections.deque(maxlen=20)
        self._stderr_thread: threading.Thread | None = None
        self._src = None
        self._out = None  # where the plaintext comes from (decompressor stdout or our pipe)
        self.plain_eof = False
        self.plain_bytes = 0
        self._exit_before_kill: int | None = None

    def _where(self) -> str:
        folder = posixpath.dirname(self.name)
        try:
            return self.store.location(folder)
        except Exception:  # a location is only for the message
            return f"the {getattr(self.store, 'kind', '')} store".replace("  ", " ")

    # --- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Iterator[bytes]:
        argv = _decompressor(self.compression)
        if self.encrypted and self.keyring is None:
            raise ArtifactError(f"{self.name}: the artifact is encrypted and no backup keys are configured "
                                "(KASA_BACKUP_KEYS); nothing was read")
        try:
            self._src = self.store.open_read(self.name)
        except StoreNotFound:
            raise ArtifactError(f"{self.name} is missing from {self._where()}") from None
        except StoreError as exc:
            raise ArtifactError(f"{self.name}: cannot open it: {exc}") from None
        try:
            if argv is None:
                r, w = os.pipe()
                _grow_pipe(w)
                self._out, into = open(r, "rb", buffering=0), open(w, "wb", buffering=0)  # noqa: SIM115
            else:
                try:
                    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
                                                 env=_CHILD_ENV, bufsize=0)
                except FileNotFoundError:
                    raise ArtifactError(f"{self.name}: {argv[0]} is not installed, so the {self.compression} "
                                        "artifact cannot be decompressed") from None
                _grow_pipe(self.proc.stdin.fileno())
                _grow_pipe(self.proc.stdout.fileno())
                self._out, into = self.proc.stdout, self.proc.stdin
                self._stderr_thread = threading.Thread(target=_drain, args=(self.proc.stderr, self.stderr_tail),
                                                       daemon=True)
                self._stderr_thread.start()
            self.feeder = _Feeder(self._src, into, name=self.name, where=self._where(), size=self.size,
                                  encrypted=self.encrypted, keyring=self.keyring)
            self.feeder.start()
        except BaseException:
            self._abort()
            raise
        return self._chunks()

    def _chunks(self) -> Iterator[bytes]:
        fd = self._out.fileno()
        progress = self.on_progress
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                self.plain_eof = True
                return
            self.plain_bytes += len(data)
            if progress:
                progress(self.feeder.bytes_read)
            yield data

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                if not self.plain_eof:
                    for _ in self._chunks():  # the checks below need every byte read
                        pass
                self.feeder.join()
                if self.on_progress:
                    self.on_progress(self.feeder.bytes_read)
                if self.proc is not None:
                    self.proc.wait()
                    self._exit_before_kill = self.proc.returncode
                problem = self._diagnose()
            except BaseException:
                self._abort()
                raise
            finally:
                self._close()
            if problem is not None:
                raise problem
            return
        self._abort()
        problem = self._diagnose() if issubclass(exc_type, Exception) else None
        if problem is not None:
            # The consumer's error (say, a tar stream cut short) is a symptom of this one.
            raise problem from exc

    def _abort(self) -> None:
        """Stop everything: no thread or process outlives the block."""
        if self.proc is not None:
            if self.plain_eof:
                # It closed its output, so it is exiting: its exit code may say why the consumer failed.
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._exit_before_kill = self.proc.poll()
            if self._exit_before_kill is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.feeder is not None:
            self.feeder.stopping = True
        if self._out is not None and self.proc is None:
            self._out.close()  # our own pipe: the feeder's next write fails at once
        if self.feeder is not None:
            self.feeder.join()
        if self.proc is not None:
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=10)
        for f in (self._out, self._src, *((self.proc.stdin, self.proc.stderr) if self.proc else ())):
            if f is not None:
                try:
                    f.close()
                except Exception:  # closing a store stream that already failed
                    pass

    def _diagnose(self) -> ArtifactError | None:
        """The most basic thing wrong with the stream, if anything: the stored bytes, then decryption,
        then decompression."""
        feeder = self.feeder
        if feeder is None:
            return None
        if feeder.eof:
            if feeder.bytes_read != self.size:
                return ArtifactError(f"{self.name}: stored bytes do not match the catalogue (size "
                                     f"{feeder.bytes_read} bytes, the catalogue records {self.size}); the artifact "
                                     "is truncated, corrupt or was replaced")
            digest = feeder.sha256.hexdigest()
            if digest != self.sha256:
                return ArtifactError(f"{self.name}: stored bytes do not match the catalogue (sha256 {digest}, the "
                                     f"catalogue records {self.sha256 or 'none'}); the artifact is corrupt or was "
                                     "replaced")
        if feeder.fault is not None:
            return feeder.fault
        code = self._exit_before_kill
        if self.proc is not None and code not in (None, 0):
            why = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
            last = _last_line(self.stderr_tail)
            return ArtifactError(f"{self.name}: {os.path.basename(self.proc.args[0])} could not decompress it "
                                 f"({why}{': ' + last if last else ''}); the artifact is corrupt")
        if self.plain_eof and not feeder.eof:
            return ArtifactError(f"{self.name}: the decompressor stopped before the end of the stored bytes; "
                                 "the artifact is corrupt")
        return None


def open_plain(store, name: str, *, sha256: str, size: int, encrypted: bool, keyring, compression: str,
               on_progress: Progress | None = None) -> PlainStream:
    """Context manager yielding an iterator of plaintext chunks (decrypted, decompressed), read with flat
    memory. On a clean exit of the block, the rest is read and checked: stored size and sha256 match the
    catalogue, decryption authenticated to the end, the decompressor exited 0; else ArtifactError. On an
    exception inside the block the reader thread and decompressor are stopped at once. on_progress gets
    the stored bytes read so far (compare with `size`)."""
    return PlainStream(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                       compression=compression, on_progress=on_progress)


def verify_artifact(store, name: str, *, sha256: str, size: int, encrypted: bool, keyring, compression: str,
                    tar: bool, limits: Limits | None = None, on_progress: Progress | None = None) -> Listing | None:
    """Read the whole artifact and check it; for tar artifacts also check every member header (nothing is
    extracted). Returns the tar Listing (without its path map), or None for other artifacts."""
    scanner = TarScanner(name, limits or Limits()) if tar else None
    with open_plain(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                    compression=compression, on_progress=on_progress) as chunks:
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

    def __init__(self, dest: str, label: str, owner: runas.Identity | None = None):
        self.dest, self.label = dest, label
        self.tail: collections.deque = collections.deque(maxlen=20)
        try:
            # As the owner, tar could not enter dest by its path (the staging folder around it is the worker's,
            # 0700): the worker's child enters it before it switches user, and tar extracts into ".".
            as_owner = runas.popen_kwargs(owner) if owner is not None else {}
        except runas.RunAsError as exc:
            raise ArtifactError(f"{label}: cannot extract as the customer's user: {exc}") from None
        try:
            self.proc = subprocess.Popen(_tar_argv(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
                                         env=_CHILD_ENV, bufsize=0, cwd=dest, **as_owner)
        except FileNotFoundError:
            raise ArtifactError(f"{label}: GNU tar is not installed on this worker") from None
        _grow_pipe(self.proc.stdin.fileno())
        self._stderr = threading.Thread(target=_drain, args=(self.proc.stderr, self.tail), daemon=True)
        self._stderr.start()

    def write(self, pieces) -> None:
        fd = self.proc.stdin.fileno()
        try:
            for piece in pieces:
                _write_all(fd, piece)
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
        last = _last_line(self.tail)
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


def _prepare_dest(dest: str, label: str, owner: runas.Identity | None) -> None:
    """dest absent (created 0700) or an empty folder of ours; given to `owner` when there is one. Through a
    descriptor opened without following links: a folder or link put there by someone else is refused, not
    chmod-ed or chown-ed."""
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ArtifactError(f"{label}: cannot create the staging folder {dest}: {exc.strerror}") from None
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
    finally:
        os.close(fd)


def files_owner(run_as: str) -> runas.Identity | None:
    """Who unpacked files belong to: the customer's run_as user; None (the worker's own: development) when empty."""
    try:
        return runas.lookup(run_as) if run_as else None
    except runas.RunAsError as exc:
        raise ArtifactError(f"cannot unpack files for the customer: {exc}; nothing was unpacked") from None


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
                     owner: runas.Identity | None = None) -> Listing:
    """Extract a tar artifact into `dest` (absent, then created 0700, or an empty folder) in one pass: every
    member header is checked before tar receives that member, and the tree is checked after tar exits.
    With `owner`, dest and everything in it belong to that user (tar runs as it); else to the worker.
    Set-id bits are stripped: `Listing.setid` names each member that had them, for a warning.
    Any failure removes `dest` entirely and raises ArtifactError/ArchiveRefused. Returns the Listing."""
    dest = os.path.abspath(os.fspath(dest))
    if owner is not None and os.geteuid() != 0 and os.geteuid() != owner.uid:
        raise ArtifactError(f"{name}: the worker runs as uid {os.geteuid()} and cannot give the restored files to "
                            f"{owner}: run the worker as root, or leave run_as empty; nothing was unpacked")
    _prepare_dest(dest, name, owner)
    try:
        listing = _extract(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                           compression=compression, dest=dest, limits=limits or Limits(), on_progress=on_progress,
                           owner=owner)
    except ArtifactError as exc:
        trees.remove_tree(dest)
        raise _restate(exc, f"the staging folder {dest} was removed and nothing else was touched") from None
    except BaseException:
        trees.remove_tree(dest)
        raise
    listing.paths = None
    return listing


def _extract(store, name: str, *, sha256, size, encrypted, keyring, compression, dest, limits, on_progress, owner):
    scanner = TarScanner(name, limits)
    stream = open_plain(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                        compression=compression, on_progress=on_progress)
    tar = None
    try:
        with stream as chunks:
            tar = _Tar(dest, name, owner)
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


# --- after tar -----------------------------------------------------------------------------
def check_tree(dest, listing: Listing, *, artifact: str = "", uid: int | None = None) -> None:
    """Walk the extracted tree without following links. Refuse devices, FIFOs, sockets, a setuid/setgid bit,
    an entry not owned by `uid` (when given), a symlink that resolves outside dest, a file hard-linked to
    something outside dest; then require the tree to be exactly what the scanner listed (every path and its
    type when listing.paths is kept, else the counts and total size). Raises ArchiveRefused / ArtifactError."""
    root = os.fsencode(os.path.abspath(os.fspath(dest)))
    real_root = os.path.realpath(root)
    label = f"{artifact}: " if artifact else ""
    expected = listing.paths
    counts = {tc.DIR: 0, tc.FILE: 0, tc.SYMLINK: 0}
    inodes: dict[tuple[int, int], list[int]] = {}
    sizes: dict[tuple[int, int], int] = {}
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
            for entry in it:
                rel = rel_dir + b"/" + entry.name if rel_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                mode = st.st_mode
                if mode & tc.SETID and not stat.S_ISLNK(mode):
                    raise ArchiveRefused(f"{label}the extracted {show(rel)} has a setuid or setgid bit (mode "
                                         f"{stat.S_IMODE(mode):o}) although its header had none: the two readings "
                                         "of the archive differ", member=show(rel)[1:-1], rule="set-id bit")
                if uid is not None and st.st_uid != uid:
                    raise ArchiveRefused(f"{label}the extracted {show(rel)} belongs to uid {st.st_uid}, not {uid}: "
                                         "the archive's owners are never used", member=show(rel)[1:-1],
                                         rule="owner")
                if stat.S_ISDIR(mode):
                    kind = tc.DIR
                    stack.append(rel)
                elif stat.S_ISREG(mode):
                    kind = tc.FILE
                    key = (st.st_dev, st.st_ino)
                    sizes[key] = st.st_size
                    if st.st_nlink > 1:
                        inodes.setdefault(key, [0, st.st_nlink])[0] += 1
                elif stat.S_ISLNK(mode):
                    kind = tc.SYMLINK
                    target = os.path.realpath(entry.path)
                    if target != real_root and not target.startswith(real_root + b"/"):
                        raise ArchiveRefused(f"{label}the extracted symbolic link {show(rel)} resolves outside "
                                             f"{os.fsdecode(root)}", member=show(rel)[1:-1],
                                             rule="symlink outside")
                else:
                    raise ArchiveRefused(f"{label}the extracted {show(rel)} is a device, FIFO or socket",
                                         member=show(rel)[1:-1], rule="special file")
                counts[kind] += 1
                if expected is not None:
                    want = expected.get(rel)
                    if want != kind and not (kind == tc.FILE and want == tc.HARDLINK):
                        what = f"lists it as a {tc.KIND_NAMES[want]}" if want else "does not have it"
                        raise ArtifactError(f"{label}tar extracted {show(rel)} as a {tc.KIND_NAMES[kind]} but the "
                                            f"checked listing {what}: the two readings of the archive differ")
    for (_dev, ino), (seen, nlink) in inodes.items():
        if seen != nlink:
            raise ArchiveRefused(f"{label}an extracted file (inode {ino}) has {nlink} hard links but only {seen} "
                                 "inside the extraction folder: it is linked to a file outside",
                                 rule="hard link outside")
    total = sum(sizes.values())
    want = (listing.dirs, listing.files + listing.hardlinks, listing.symlinks, listing.total_size)
    got = (counts[tc.DIR], counts[tc.FILE], counts[tc.SYMLINK], total)
    if want != got:
        raise ArtifactError(f"{label}the extracted tree does not match the checked listing (directories, files, "
                            f"symlinks, bytes: {got} on disk, {want} listed): the two readings of the archive differ")
