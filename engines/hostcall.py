"""Kasa's own pure engines code, run on a customer's host for one session: nothing to install or update there.

The steps that must be atomic on the host (a swap, its undo, a journal on the host's disk, a check of a folder
without following links) cannot be a string of shell commands: they are the same engines functions the worker
runs on its own machine (engines.swap, engines.beneath, engines.localjournal, …). A session ships them:

    python3 -c BOOT        (on the host: through engines.ssh, or as a local process for the worker's machine)
      ← "<length>\\n" + a zip of engines/*.py       (the bundle, imported from memory; nothing written to disk)
      ← {"id": 1, "call": "engines.swap.apply", "args": [...], "kwargs": {...}}       one JSON line per call
      → {"id": 1, "ok": true, "result": ...}
      → {"id": 1, "ok": false, "type": "LinkRefused", "message": "...", "errno": null}

The host's answers are untrusted input: a line is read up to MAX_LINE bytes, must be one JSON object naming the
call it answers, and an error comes back as HostCallError with the remote type's *name* only (mapped to a local
class from an allowlist, never looked up by that name). Anything the called code prints goes to stderr (the
protocol owns the real stdout), and stderr's last lines are kept for the error message.

Pure: the standard library only (engines.ssh builds the argv that reaches the host).
"""

from __future__ import annotations

import collections
import io
import json
import os
import selectors
import subprocess
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path

MAX_LINE = 64 << 20

# Runs on the host with any python3 ≥ 3.8; kept short, it travels in argv (it holds no secret).
BOOT = r"""
import importlib.abc, importlib.util, io, json, os, sys, zipfile
inp = sys.stdin.buffer
bundle = zipfile.ZipFile(io.BytesIO(inp.read(int(inp.readline()))))
names = set(bundle.namelist())
class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        base = name.replace(".", "/")
        for file, pkg in ((base + "/__init__.py", True), (base + ".py", False)):
            if file in names:
                spec = importlib.util.spec_from_loader(name, self, is_package=pkg, origin="kasa-bundle:" + file)
                spec.loader_state = file
                return spec
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        file = module.__spec__.loader_state
        module.__file__ = "/kasa-bundle/" + file
        exec(compile(bundle.read(file), "kasa-bundle/" + file, "exec"), module.__dict__)
sys.meta_path.insert(0, Finder())
out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.stdout = sys.stderr
for line in inp:
    req = json.loads(line)
    try:
        mod, _, fn = req["call"].rpartition(".")
        result = getattr(importlib.import_module(mod), fn)(*req.get("args", []), **req.get("kwargs", {}))
        ans = {"id": req["id"], "ok": True, "result": result}
    except BaseException as exc:
        ans = {"id": req["id"], "ok": False, "type": type(exc).__name__, "message": str(exc),
               "errno": getattr(exc, "errno", None)}
    out.write(json.dumps(ans, default=str).encode() + b"\n")
    out.flush()
"""


class HostCallError(RuntimeError):
    """A call failed on the host: `type` is the remote exception's class name, `errno` its errno if any."""

    def __init__(self, message: str, *, type: str = "", errno: int | None = None):
        super().__init__(message)
        self.type, self.errno = type, errno


class HostLost(HostCallError):
    """The session ended (the host went away, the connection was cut, python3 died): the call's outcome is
    unknown; a journal on the host says what happened."""


def bundle(modules: Sequence[str] | None = None) -> bytes:
    """A zip of the engines package's top-level modules (or just `modules`), as the host imports them."""
    here = Path(__file__).resolve().parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("engines/__init__.py", (here / "__init__.py").read_bytes())
        for path in sorted(here.glob("*.py")):
            if path.name != "__init__.py" and (modules is None or path.stem in modules):
                z.writestr(f"engines/{path.name}", path.read_bytes())
    return buf.getvalue()


_BUNDLE: bytes | None = None


def _default_bundle() -> bytes:
    global _BUNDLE
    if _BUNDLE is None:
        _BUNDLE = bundle()
    return _BUNDLE


class HostSession:
    """One python3 on the host serving calls in order. `argv` starts it: `["python3", "-c", BOOT]` locally, or
    engines.ssh's argv around that. Use as a context manager; not thread-safe (one call at a time)."""

    def __init__(self, argv: Sequence[str], *, where: str = "the host", timeout: float = 120.0,
                 env: dict[str, str] | None = None, payload: bytes | None = None):
        self.where, self.timeout, self._next = where, timeout, 0
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, start_new_session=True)
        self._stderr = threading.Thread(target=self._drain, daemon=True)
        self._stderr.start()
        self._buf = b""
        data = payload if payload is not None else _default_bundle()
        try:
            self.proc.stdin.write(f"{len(data)}\n".encode() + data)
            self.proc.stdin.flush()
        except OSError:
            self.close()
            raise HostLost(self._lost("could not start Kasa's helper")) from None

    @staticmethod
    def boot_argv(python: str = "python3") -> list[str]:
        # -I: the host's PYTHON* variables, user site and working folder change nothing of what runs.
        return [python, "-I", "-c", BOOT]

    def __enter__(self) -> HostSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drain(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            self._tail.append(line.decode(errors="replace").rstrip())

    def _lost(self, what: str) -> str:
        tail = [t for t in self._tail if t][-3:]
        return f"{what} on {self.where}: the session ended" + (f" ({' / '.join(tail)})" if tail else "")

    def call(self, function: str, *args, timeout: float | None = None, **kwargs):
        """Call `function` (dotted: engines.module.name) on the host with JSON-able arguments; its result as JSON
        gives it back. HostCallError when it raised there, HostLost when the session ended."""
        self._next += 1
        req = {"id": self._next, "call": function, "args": list(args), "kwargs": kwargs}
        try:
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise HostLost(self._lost(f"{function}")) from None
        ans = self._answer(function, timeout if timeout is not None else self.timeout)
        if ans["ok"]:
            return ans.get("result")
        kind = ans.get("type") if isinstance(ans.get("type"), str) else ""
        err = ans.get("errno") if isinstance(ans.get("errno"), int) else None
        raise HostCallError(f"{function} failed on {self.where}: {kind}: {str(ans.get('message'))[:2000]}",
                            type=kind[:100], errno=err)

    def _answer(self, function: str, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                if len(self._buf) > MAX_LINE:
                    self.close()
                    raise HostCallError(f"{function}: the answer from {self.where} is over {MAX_LINE} bytes")
                if not sel.select(timeout):
                    self.close()
                    raise HostLost(self._lost(f"{function} got no answer within {timeout:.0f} s"))
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise HostLost(self._lost(function))
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            ans = json.loads(line)
        except ValueError:
            ans = None
        if not isinstance(ans, dict) or ans.get("id") != self._next or not isinstance(ans.get("ok"), bool):
            self.close()
            raise HostCallError(f"{function}: {self.where} answered something that is not Kasa's helper speaking")
        return ans

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream and not stream.closed:
                stream.close()
