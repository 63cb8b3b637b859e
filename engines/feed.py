"""Feed a stream of chunks to a client program's stdin (pg_restore, psql, mariadb), optionally through a
second one, with flat memory; a failed client is named with its last error line, secrets masked.

Split out of engines.dbrestore, which uses it for every engine.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterable

from . import proc
from .dberrors import RestoreError


def feed_process(argv: list[str], chunks: Iterable[bytes], *, env: dict[str, str] | None = None,
                 secrets_: Iterable[str] = (), then: list[str] | None = None, transform=None) -> None:
    """Write chunks to argv's stdin as they come (flat memory); raise RestoreError naming the failed client.

    With `then`, argv's stdout goes through transform(src, dst) (a thread;
    default: a plain copy) into the stdin of `then`. Every client's output is
    drained by a thread into a bounded tail, so a chatty client never blocks and
    never fills memory. If reading the chunks fails, every client is killed
    before it could see a clean end of input (one that commits at EOF must not
    commit a partial restore).
    """
    first = _Client(argv, env, feeds_next=bool(then))
    clients, pump_errors, pump = [first], [], None
    try:
        if then:
            clients.append(_Client(then, env, feeds_next=False))
            pump = threading.Thread(target=_pump, args=(first, clients[1], transform or shutil.copyfileobj,
                                                        pump_errors), daemon=True)
            pump.start()
        for chunk in chunks:
            try:
                first.proc.stdin.write(chunk)
            except BrokenPipeError:
                break  # the client stopped reading: its exit code and output say why
        with contextlib.suppress(BrokenPipeError):
            first.proc.stdin.close()
    except BaseException:
        for client in clients:
            client.kill()
        raise
    finally:
        if pump:
            pump.join()
    failures = [(c.proc.wait(), c.failure(secrets_)) for c in clients]
    if pump_errors:
        raise RestoreError(f"passing the {first.name} output on failed: {oneline(pump_errors[0])}")
    # A client's own error (exit code > 0) is the cause; one killed because the other stopped is not.
    failed = [why for code, why in failures if why and code > 0] or [why for _, why in failures if why]
    if failed:
        raise RestoreError(failed[0])


class _Client:
    def __init__(self, argv: list[str], env: dict[str, str] | None, *, feeds_next: bool):
        self.name = os.path.basename(argv[0])
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE if feeds_next else subprocess.STDOUT,
                                         env=env, close_fds=True, start_new_session=True)
        except FileNotFoundError:
            raise RestoreError(f"{self.name}: command not found ({argv[0]})") from None
        out = self.proc.stderr if feeds_next else self.proc.stdout
        self.drainer = threading.Thread(target=_drain, args=(out, self.tail), daemon=True)
        self.drainer.start()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def failure(self, secrets_: Iterable[str]) -> str | None:
        code = self.proc.wait()
        self.drainer.join(5)
        if code == 0:
            return None
        lines = [proc.mask(x.strip(), secrets_) for x in self.tail if x.strip()]
        # pg_restore and psql print "error: ..." and then the failing command: the error is the useful line.
        why = next((x for x in lines if "error" in x.lower()), lines[-1] if lines else "no output")
        return f"{self.name} failed ({f'exit code {code}' if code > 0 else f'killed by signal {-code}'}): {why}"


def _pump(first: _Client, second: _Client, transform, errors: list) -> None:
    try:
        transform(first.proc.stdout, second.proc.stdin)
    except BrokenPipeError:
        first.kill()  # the second client stopped reading: the first would block on a full pipe forever
    except Exception as exc:
        errors.append(exc)
        second.kill()  # it must not see a clean end of a half-passed script
        first.kill()
    finally:
        for f in (second.proc.stdin, first.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


def _drain(stream, tail: collections.deque) -> None:
    for raw in iter(lambda: stream.readline(65536), b""):  # bounded: a huge line arrives in pieces
        tail.append(raw.decode("utf-8", "replace").rstrip("\n")[:2000])
    stream.close()


def oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
