"""Reading an artifact back to plaintext, with flat memory (used by engines.unpack).

An artifact is stored as  plaintext → [zstd|gzip] → [encryption] → store,
with its stored size and sha256 in the catalogue. Reading reverses that:

    store.open_read → size/sha256 count → decrypt → decompressor stdin
      (a reader thread)                              ↓
                                     decompressor stdout → caller (plaintext chunks)

Nothing is trusted until the end: only when every byte was read do we know
that the stored bytes match the catalogue, that decryption authenticated to
the last chunk and that the decompressor exited cleanly.
"""

from __future__ import annotations

import collections
import hashlib
import os
import posixpath
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator

from .backupcrypto import MAGIC, BackupDecryptError, decrypt_stream
from .stores.base import StoreError, StoreNotFound
from .streams import CHUNK
from .tarcheck import ArtifactError

Progress = Callable[[int], None]
# Child programs get a fixed environment: TAR_OPTIONS, GZIP or a locale would change how they read their input.
CHILD_ENV = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LC_ALL": "C"}


def _decompressor(compression: str) -> list[str] | None:
    if compression == "zstd":
        return ["zstd", "-d", "-c", "-q"]
    if compression == "gzip":
        return [shutil.which("pigz") or "gzip", "-d", "-c"]
    if compression == "none":
        return None
    raise ArtifactError(f"unknown compression {compression!r}: expected zstd, gzip or none")


def grow_pipe(fd: int) -> None:
    """1 MiB pipes instead of 64 KiB: fewer wake-ups between us and the child (Linux, best effort)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)
    except (OSError, ImportError):
        pass


def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def drain(stream, tail: collections.deque) -> None:
    for raw in iter(stream.readline, b""):
        tail.append(raw.decode("utf-8", "replace").rstrip("\n"))


def last_line(tail: collections.deque) -> str:
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
                write_all(self.out.fileno(), data)
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
                grow_pipe(w)
                self._out, into = open(r, "rb", buffering=0), open(w, "wb", buffering=0)  # noqa: SIM115
            else:
                try:
                    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
                                                 env=CHILD_ENV, bufsize=0)
                except FileNotFoundError:
                    raise ArtifactError(f"{self.name}: {argv[0]} is not installed, so the {self.compression} "
                                        "artifact cannot be decompressed") from None
                grow_pipe(self.proc.stdin.fileno())
                grow_pipe(self.proc.stdout.fileno())
                self._out, into = self.proc.stdout, self.proc.stdin
                self._stderr_thread = threading.Thread(target=drain, args=(self.proc.stderr, self.stderr_tail),
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
            last = last_line(self.stderr_tail)
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
