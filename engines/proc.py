"""Running external commands: argv lists only, output streamed line by line.

Secrets never go into argv (callers pass them through 0600 files); as a second
line of defence every string in `secrets` is masked in the recorded argv and in
each output line before it reaches a callback.

Customer code (PM2, start/stop commands, release hooks) runs with `identity`:
the customer's OS user, no supplementary group, umask 027 (engines.runas).
Children never inherit a descriptor of ours (close_fds) and start in a session
of their own.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from . import runas

MASK = "********"

LineCallback = Callable[[str, str], None]  # (stream name, line without newline)


class CommandNotFound(RuntimeError):
    pass


class CommandTimeout(RuntimeError):
    pass


@dataclass
class CommandResult:
    argv: list[str]  # masked
    exit_code: int
    duration: float
    stdout_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def last_error_line(self) -> str:
        for line in reversed(self.stderr_tail or self.stdout_tail):
            if line.strip():
                return line.strip()
        return f"exit code {self.exit_code}"


def mask(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, MASK)
    return text


def masked_argv(argv: Sequence[str], secrets: Iterable[str]) -> list[str]:
    secrets = [s for s in secrets if s]
    return [mask(a, secrets) for a in argv]


def run(
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    secrets: Iterable[str] = (),
    on_line: LineCallback | None = None,
    on_start: Callable[[int], None] | None = None,
    tail: int = 20,
    identity: runas.Identity | None = None,
    keep_line: Callable[[str, str], bool] | None = None,
) -> CommandResult:
    """Run argv, stream its output to on_line, and return the result.

    identity: run as that OS user (customer code); None runs as Kasa itself.
    Raises CommandNotFound when the program does not exist, CommandTimeout
    (after killing the child) when it outlives `timeout` seconds, and
    runas.RunAsError when this process cannot switch to `identity`.
    keep_line(stream, line): False keeps a line of noise (a banner, a status table) out of on_line; every line
    still reaches the tails an error message is taken from.
    """
    if isinstance(argv, str):  # a shell string is a bug, not a convenience
        raise TypeError("argv must be a list of strings, not a shell string")
    secrets = [s for s in secrets if s]
    shown = masked_argv(argv, secrets)
    as_user = runas.popen_kwargs(identity) if identity is not None else {}
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,
            **as_user,
        )
    except FileNotFoundError:
        raise CommandNotFound(f"command not found: {shown[0]}") from None
    except PermissionError as exc:  # e.g. a program or folder the customer's user may not open
        who = f" as {identity}" if identity is not None else ""
        raise CommandNotFound(f"cannot run {shown[0]}{who} in {cwd or os.getcwd()}: {exc.strerror}") from None
    if on_start:
        on_start(proc.pid)

    tails: dict[str, list[str]] = {"stdout": [], "stderr": []}
    partial: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")

    def emit(stream: str, raw: bytes) -> None:
        line = mask(raw.decode("utf-8", "replace").rstrip("\r"), secrets)
        t = tails[stream]
        t.append(line)
        if len(t) > tail:
            del t[0]
        if on_line and (keep_line is None or keep_line(stream, line)):
            on_line(stream, line)

    deadline = started + timeout if timeout else None
    try:
        while sel.get_map():
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if deadline is not None and wait == 0.0:
                raise CommandTimeout(f"{shown[0]} did not finish within {timeout:g} s and was killed")
            for key, _ in sel.select(timeout=wait):
                stream = key.data
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    if partial[stream]:
                        emit(stream, partial[stream])
                        partial[stream] = b""
                    continue
                data = partial[stream] + chunk
                *lines, partial[stream] = data.split(b"\n")
                for raw in lines:
                    emit(stream, raw)
        remaining = None if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            exit_code = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            raise CommandTimeout(f"{shown[0]} did not finish within {timeout:g} s and was killed") from None
    except BaseException:
        kill_group(proc)
        raise
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return CommandResult(
        argv=shown,
        exit_code=exit_code,
        duration=time.monotonic() - started,
        stdout_tail=tails["stdout"],
        stderr_tail=tails["stderr"],
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in a session of its own, with its group, and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
