"""Streaming plumbing for backups: process chains and writer stacks.

A backup artifact flows  producer → [compressor] → encrypt → sha256 → store
with no full-size temporary copy. The producer and compressor are external
programs (GNU tar, pg_dump, mariadb-dump, zstd, gzip) connected pipe to pipe
by the kernel — faster than Python's tarfile on many small files, and their
output is read by Python in fixed-size chunks, so memory stays flat whatever
the data size.
"""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

CHUNK = 1 << 20


class ChainError(RuntimeError):
    """A stage of a process chain failed; the message names the stage and its last stderr line."""


@dataclass
class Stage:
    argv: list[str]
    name: str = ""
    ok_codes: tuple[int, ...] = (0,)  # GNU tar exits 1 when a file changed while read: callers may allow it
    env: dict[str, str] | None = None
    # Bytes written to the first stage's stdin, then closed: how a secret reaches a program on a host (a launcher
    # reads it there), never argv. Not shown in repr, which may reach a log.
    input: bytes | None = field(default=None, repr=False)
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50))

    def label(self) -> str:
        return self.name or os.path.basename(self.argv[0])


class ProcessChain:
    """Run stages connected stdout→stdin; iterate the last stage's stdout in chunks.

    stderr of every stage is drained by a thread into a bounded tail (a chatty
    tool can never block on a full pipe nor fill memory). After iteration,
    call finish() to reap the stages and raise ChainError for a failed one.
    Use as a context manager: leaving early (an exception downstream) kills
    every stage's process group.
    """

    def __init__(self, stages: Sequence[Stage], *, cwd: str | None = None, env: dict[str, str] | None = None,
                 stdin_path: str | None = None):
        if not stages:
            raise ValueError("a chain needs at least one stage")
        self.stages = list(stages)
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self._cwd, self._env, self._stdin_path = cwd, env, stdin_path
        self.bytes_out = 0

    def __enter__(self) -> ProcessChain:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.kill()
        self._close()

    def start(self) -> None:
        prev_stdout = open(self._stdin_path, "rb") if self._stdin_path else subprocess.DEVNULL  # noqa: SIM115
        if self.stages[0].input is not None and not self._stdin_path:
            prev_stdout = subprocess.PIPE
        try:
            for stage in self.stages:
                try:
                    proc = subprocess.Popen(
                        stage.argv, cwd=self._cwd, env=stage.env or self._env, stdin=prev_stdout,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
                    )
                except FileNotFoundError:
                    self.kill()
                    raise ChainError(f"{stage.label()}: command not found ({stage.argv[0]})") from None
                if prev_stdout is subprocess.PIPE:
                    _feed(proc.stdin, stage.input)
                elif hasattr(prev_stdout, "close"):
                    prev_stdout.close()  # the child holds its own copy; keeping ours would block EOF
                _grow_pipe(proc.stdout)
                prev_stdout = proc.stdout
                self.procs.append(proc)
                t = threading.Thread(target=_drain, args=(proc.stderr, stage.stderr_tail), daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:
            self.kill()
            raise

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        out = self.procs[-1].stdout
        while True:
            data = out.read(size)
            if not data:
                return
            self.bytes_out += len(data)
            yield data

    def read_into(self, buf) -> int:
        """Fill `buf` from the last stage's stdout; the byte count, 0 at the end.

        The streaming loop reuses one buffer instead of allocating a fresh
        bytes object per chunk, as chunks() does: fewer page faults per GB.
        """
        n = self.procs[-1].stdout.readinto(buf) or 0
        self.bytes_out += n
        return n

    def finish(self) -> list[int]:
        """Wait for every stage; raise ChainError naming the first failed stage."""
        codes = [p.wait() for p in self.procs]
        for t in self._threads:
            t.join(timeout=5)
        for stage, code in zip(self.stages, codes, strict=True):
            if code not in stage.ok_codes:
                last = next((ln for ln in reversed(stage.stderr_tail) if ln.strip()), "")
                why = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
                raise ChainError(f"{stage.label()} failed ({why})" + (f": {last.strip()}" if last else ""))
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait()

    def _close(self) -> None:
        for p in self.procs:
            for f in (p.stdout, p.stderr):
                if f and not f.closed:
                    f.close()

    def stderr_lines(self) -> list[tuple[str, str]]:
        return [(s.label(), line) for s in self.stages for line in s.stderr_tail]


def _grow_pipe(pipe, size: int = 1 << 20) -> None:
    """Ask for 1 MiB pipes instead of 64 KiB: fewer wake-ups between stages (Linux only, best effort)."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ImportError):
        pass


def _feed(pipe, data: bytes) -> None:
    """A stage's few bytes of input (well under a pipe's size: no blocking), then EOF. A stage that died before
    reading them fails on its own; its exit code says so in finish()."""
    try:
        pipe.write(data)
        pipe.close()
    except OSError:
        pass


def _drain(stream, tail: collections.deque) -> None:
    for raw in iter(stream.readline, b""):
        tail.append(raw.decode("utf-8", "replace").rstrip("\n"))


# --- writer stack ---------------------------------------------------------------
class HashingWriter:
    """Counts and hashes the bytes that reach storage (the manifest's sha256 is of stored bytes)."""

    def __init__(self, inner):
        self.inner = inner
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


class ThrottledWriter:
    """Caps the average write rate (bandwidth limit in bytes per second)."""

    def __init__(self, inner, bytes_per_second: float, *, clock=time.monotonic, sleep=time.sleep):
        self.inner = inner
        self.rate = float(bytes_per_second)
        self._clock, self._sleep = clock, sleep
        self._start = clock()
        self._sent = 0

    def write(self, data: bytes) -> int:
        self.inner.write(data)
        self._sent += len(data)
        ahead = self._sent / self.rate - (self._clock() - self._start)
        if ahead > 0:
            self._sleep(ahead)
        return len(data)


def sha256_of(fileobj, size: int = CHUNK) -> tuple[str, int]:
    """Stream a readable object and return (sha256 hex, byte count)."""
    h = hashlib.sha256()
    n = 0
    while True:
        data = fileobj.read(size)
        if not data:
            return h.hexdigest(), n
        h.update(data)
        n += len(data)
