"""PM2: a customer's apps in a PM2 home of Kasa's choosing, every pm2 call as the customer's user.

Split from engines.procman (which re-exports these names). What PM2 prints (`pm2 jlist`) and the files it
names are the customer's side and are read as untrusted input (runas.read_owned). Run logs stay readable:
PM2's banner, its status tables and its key/value listings are kept out of the log (pm2_line_kept;
"[PM2] ..." lines and errors stay), and after each start or stop one summary line per app, from `pm2 jlist`,
goes to the manager's `log` (name, status, pid).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import time
from collections.abc import Sequence

from . import beneath, proc, runas
from .procbase import (
    REPO_ROOT,
    ManagerBase,
    ProcessError,
    Runner,
    ServiceSpec,
    failure,
    scoped_exec_argv,
    service_env,
    spec_env,
)

PM2_QUIET = ("--no-color", "--mini-list")  # plain text for run logs, not a colored table of every app
ECOSYSTEM_NAMES = ("ecosystem.config.js", "ecosystem.config.cjs", "ecosystem.json", "ecosystem.config.json")
ECOSYSTEM_GLOBS = ("ecosystem*.config.js", "ecosystem*.config.cjs", "ecosystem*.json")
PM2_HOME_NAME = ".kasa-pm2"  # a customer's own PM2 home, in its root, owned by its user
SOCKET_PATH_MAX = 107  # bytes of a unix socket path (sun_path) on Linux
_ERROR_LINE = re.compile(r"error|exception|fatal|denied|refused", re.I)
JLIST_MAX_BYTES = 32 << 20  # `pm2 jlist` is the customer's daemon talking: bounded


def pm2_line_kept(stream: str, line: str) -> bool:
    """Whether a line of PM2's output belongs in a run log: its "[PM2] ..." messages and anything else on stderr
    that is not decoration; not the ASCII-art banner, the status tables or the per-app key/value listing."""
    text = line.strip()
    if text.startswith("[PM2"):
        return True
    return stream == "stderr" and bool(text) and text[0] not in _PM2_DECOR


_PM2_DECOR = "┌│├└─+|_-\\/"



# --- PM2 ------------------------------------------------------------------------------------
def pm2_binary() -> str:
    """KASA_PM2_BIN, else the PM2 that `make install` put in node_modules/, else `pm2` on PATH."""
    if os.environ.get("KASA_PM2_BIN"):
        return os.environ["KASA_PM2_BIN"]
    local = REPO_ROOT / "node_modules" / ".bin" / "pm2"
    if local.exists():
        return str(local)
    return shutil.which("pm2") or "pm2"


def pm2_home_for(root: str | os.PathLike) -> str:
    """A customer's own PM2 home: in its root, so its daemon and apps are its user's, apart from everyone's."""
    return os.path.join(os.path.abspath(root), PM2_HOME_NAME)


def _check_home_length(home: str) -> None:
    # PM2 talks to its daemon over unix sockets in PM2_HOME, whose paths may not exceed 107 bytes.
    if len(os.path.join(home, "rpc.sock").encode()) > SOCKET_PATH_MAX:
        raise ProcessError(f"PM2 home {home} is too long for PM2's unix sockets ({home}/rpc.sock may have at most "
                           f"{SOCKET_PATH_MAX} bytes): give the customer a shorter root folder; nothing was run")


def _pm2_daemon_pid(pm2_home: str, identity: runas.Identity | None = None) -> int | None:
    """The daemon's pid from its pid file, when that process lives. The file is the customer's: read as
    untrusted (a regular file of its user's, a number)."""
    try:
        pid = int(runas.read_owned(os.path.join(pm2_home, "pm2.pid"), identity, limit=64).strip())
        if pid <= 1:
            return None
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def pm2_kill(pm2_home: str, *, runner: Runner | None = None, binary: str | None = None,
             timeout: float = 30.0, identity: runas.Identity | None = None) -> None:
    """Stop the PM2 daemon of `pm2_home` and every app in it (no-op when no daemon runs there), as `identity`
    (the home's user: its daemon is that user's)."""
    pid = _pm2_daemon_pid(pm2_home, identity)
    if pid is None:  # `pm2 kill` would first spawn a daemon just to kill it
        return
    env = {**service_env(identity=identity, home=os.path.dirname(pm2_home)), "PM2_HOME": pm2_home}
    (runner or proc.run)([binary or pm2_binary(), "kill", "--no-color"], env=env, timeout=timeout,
                         cwd=os.path.dirname(pm2_home), identity=identity, keep_line=pm2_line_kept)
    deadline = time.monotonic() + 10
    while _pm2_daemon_pid(pm2_home, identity) == pid and time.monotonic() < deadline:
        time.sleep(0.1)


def _read_customer_text(path: str, identity: runas.Identity | None) -> str | None:
    try:
        return runas.read_owned(path, identity).decode("utf-8", "replace")
    except OSError:
        return None


def find_ecosystem(spec: ServiceSpec) -> str | None:
    """spec.ecosystem, else an ecosystem file naming the app in the service folder, then in the customer's
    root (spec.root, else the folder's parent)."""
    if spec.ecosystem:
        return os.path.join(spec.folder, spec.ecosystem)
    quoted = [f"{q}{spec.app_name}{q}" for q in "\"'`"]
    folder = os.path.normpath(spec.folder)
    parent = os.path.normpath(spec.root) if spec.root else os.path.dirname(folder)
    for where in dict.fromkeys((folder, parent)):  # a service at the root itself: look there only
        candidates = [os.path.join(where, n) for n in ECOSYSTEM_NAMES]
        for pattern in ECOSYSTEM_GLOBS:
            candidates += sorted(glob.glob(os.path.join(glob.escape(where), pattern)))
        for path in dict.fromkeys(candidates):
            if not os.path.isfile(path):
                continue
            text = _read_customer_text(path, spec.identity)
            # The customer's root may hold one file for other services: one that never names this
            # app would make `pm2 start --only` start nothing, so it is not this service's file.
            if text is not None and any(q in text for q in quoted):
                return path
    return None


def parse_jlist(lines: Sequence[str]) -> list[dict] | None:
    """The apps of `pm2 jlist` output, as untrusted input: the last line that is a JSON list, keeping only
    objects, each with a str name and a dict pm2_env. None when no line is such a list."""
    for line in reversed(lines):
        if not line.startswith("["):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, list):
            continue
        apps = []
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                env = item.get("pm2_env")
                apps.append({**item, "pm2_env": env if isinstance(env, dict) else {}})
        return apps
    return None


def _int(value, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class Pm2Manager(ManagerBase):
    """PM2 apps in a PM2 home of Kasa's choosing (never the user's ~/.pm2): a customer's spec names its own
    (spec.pm2_home, in its root); `pm2_home` is the default for specs that do not.

    Every pm2 call runs as spec.identity, so the daemon it starts in that home, and the apps, are the
    customer's user's. stop is `pm2 delete` so the next start reads the ecosystem file and env afresh:
    `pm2 restart --update-env` keeps env keys that were removed from the file.
    """

    kind, label = "pm2", "PM2"
    keep_line = staticmethod(pm2_line_kept)

    def __init__(self, pm2_home: str | None = None, *, binary: str | None = None, settle: float = 2.0, **kw):
        super().__init__(**kw)
        self.pm2_home = os.path.abspath(pm2_home) if pm2_home else ""
        if self.pm2_home:
            _check_home_length(self.pm2_home)
        self.binary = binary or pm2_binary()
        self.settle = settle
        self._ready: set[tuple[str, int | None]] = set()

    def home(self, spec: ServiceSpec) -> str:
        """The spec's PM2 home, created 0700 and given to its user the first time."""
        home = os.path.abspath(spec.pm2_home) if spec.pm2_home else self.pm2_home
        if not home:
            raise ProcessError(f"service {spec.name!r} has no PM2 home; nothing was run", service=spec.name)
        key = (home, spec.identity.uid if spec.identity else None)
        if key not in self._ready:
            _check_home_length(home)
            root = os.path.abspath(spec.root) if spec.root else ""
            if root and home.startswith(root.rstrip("/") + "/"):
                # In the customer's root: made and given through descriptors (engines.beneath), never through a
                # link that the customer's user put there.
                try:
                    beneath.makedirs(root, home, mode=0o700)
                    if spec.identity is not None and os.geteuid() == 0:
                        beneath.chown(root, home, spec.identity.uid, spec.identity.gid)
                except beneath.BeneathError as exc:
                    raise ProcessError(f"service {spec.name!r}: {exc}; nothing was run", service=spec.name) from None
            else:
                if not os.path.lexists(home):
                    os.makedirs(home, mode=0o700)
                runas.give(home, spec.identity)  # the folder only: what is inside is the user's own doing
            self._ready.add(key)
        return home

    def _env(self, spec: ServiceSpec, *, own: bool = False) -> dict[str, str]:
        # PM2_NO_INTERACTION for every call, not only a start's (spec.env, engines.hostrestore): without it a pm2
        # CLI looks for a PM2.io agent's socket, which now and then crashes it. A `jlist` crashing the same way
        # ("pm2 jlist gave no process list: Node.js v20…") was seen on a loaded machine; this is the likely cause,
        # not a proven one. Kasa never uses PM2.io.
        return {**spec_env(spec, with_own=own), "PM2_HOME": self.home(spec), "PM2_NO_INTERACTION": "true"}

    @staticmethod
    def _cwd(spec: ServiceSpec) -> str:
        return spec.root or spec.folder

    def apps(self, spec: ServiceSpec) -> list[dict]:
        """`pm2 jlist` of the spec's PM2 home, or [] when no daemon runs there (a read never spawns one)."""
        home = self.home(spec)
        if _pm2_daemon_pid(home, spec.identity) is None:
            return []
        lines: list[str] = []
        size = 0

        def keep(stream: str, line: str) -> None:
            nonlocal size
            size += len(line)
            if stream == "stdout" and size <= JLIST_MAX_BYTES:
                lines.append(line)

        # Straight through proc.run, not the caller's runner: jlist prints every app's whole
        # environment, secrets included, which must not end up in a run log.
        try:
            result = proc.run([self.binary, "jlist"], env=self._env(spec), cwd=self._cwd(spec),
                              timeout=self.timeout, on_line=keep, identity=spec.identity)
        except (proc.CommandNotFound, proc.CommandTimeout, runas.RunAsError) as exc:
            raise failure("check", spec, self.label, detail=str(exc)) from None
        apps = parse_jlist(lines)
        if apps is None:
            raise ProcessError(f"pm2 jlist gave no process list (PM2_HOME {home}): {result.last_error_line()}",
                               argv=result.argv)
        return apps

    def app(self, spec: ServiceSpec) -> dict | None:
        return next((a for a in self.apps(spec) if a.get("name") == spec.app_name), None)

    def is_running(self, spec: ServiceSpec) -> bool:
        app = self.app(spec)
        return bool(app) and app["pm2_env"].get("status") == "online"

    def describe(self, spec: ServiceSpec) -> str:
        eco = find_ecosystem(spec) if spec.app_name else None
        how = f"from {eco}" if eco else f"with {shlex.join(spec.start_command)}"
        home = os.path.abspath(spec.pm2_home) if spec.pm2_home else self.pm2_home
        who = f", as {spec.identity}" if spec.identity else ""
        return f"PM2 app {spec.app_name!r} {how} (PM2_HOME {home}{who})"

    def stop(self, spec: ServiceSpec) -> None:
        self._need_app(spec, "stop")
        if self.app(spec) is None:  # a missing app is already stopped
            return
        result = self._delete(spec)
        left = self.app(spec)
        if not result.ok and left is not None:
            raise failure("stop", spec, self.label, result)
        self.log(self.summary(spec, left))

    def _delete(self, spec: ServiceSpec) -> proc.CommandResult:
        return self._run([self.binary, "delete", spec.app_name, "--no-color"], spec, "stop", env=self._env(spec),
                         cwd=self._cwd(spec), check=False, identity=spec.identity)

    def start(self, spec: ServiceSpec) -> None:
        self._need_app(spec, "start")
        folder = self._folder(spec, "start")
        if self.app(spec) is not None:  # a listed app keeps its old config: delete it, as stop does
            self.stop(spec)
        eco = find_ecosystem(spec)
        if eco:
            if not os.path.isfile(eco):
                raise ProcessError(f"could not start service {spec.name!r}: its PM2 ecosystem file {eco} does not "
                                   "exist; nothing was started", service=spec.name)
            argv = [self.binary, "start", eco, "--only", spec.app_name, *PM2_QUIET]
            cwd = os.path.dirname(eco)  # PM2 resolves an app's relative script and cwd from here
        elif spec.start_command:
            # --interpreter none: start_command is an argv, its first word the program itself
            # (PM2 would otherwise run any script without a known extension under node).
            argv = [self.binary, "start", spec.start_command[0], "--name", spec.app_name, "--cwd", folder,
                    "--interpreter", "none", *PM2_QUIET, "--", *spec.start_command[1:]]
            cwd = folder
        else:
            raise ProcessError(f"could not start service {spec.name!r} with PM2: it has neither an ecosystem file "
                               f"naming app {spec.app_name!r} nor a start command; nothing was started",
                               service=spec.name)
        self._daemon_in_scope(spec)
        result = self._run(argv, spec, "start", env=self._env(spec, own=True), cwd=cwd, identity=spec.identity)
        self.log(self.summary(spec, self._await_online(spec, result)))

    def _daemon_in_scope(self, spec: ServiceSpec) -> None:
        """Under systemd, start the home's daemon in a scope of its own first (procbase.service_scope): PM2 forks
        its daemon from whichever pm2 command finds none, and a daemon forked from the worker's group would be
        killed with the worker. `pm2 ping` starts it; the start that follows finds it running."""
        home = self.home(spec)
        if _pm2_daemon_pid(home, spec.identity) is not None:
            return
        argv = scoped_exec_argv(f"pm2-{os.path.basename(os.path.dirname(home))}", [self.binary, "ping"],
                                cwd=self._cwd(spec), identity=spec.identity)
        if argv:
            self._run(argv, spec, "start", env=self._env(spec), cwd=str(REPO_ROOT), shown=[self.binary, "ping"])

    @staticmethod
    def summary(spec: ServiceSpec, app: dict | None) -> str:
        """One line for the run's log in place of PM2's table: the app's name, status and pid (from jlist)."""
        if app is None:
            return f"PM2 app {spec.app_name} ({spec.name}): stopped, not listed"
        env = app["pm2_env"]
        pid = _int(app.get("pid"))
        return (f"PM2 app {spec.app_name} ({spec.name}): {str(env.get('status') or 'unknown')[:40]}"
                + (f", pid {pid}" if pid else ""))

    def _await_online(self, spec: ServiceSpec, result: proc.CommandResult) -> dict:
        """PM2 says "started" even for an app that dies at once; watch it for `settle` seconds."""
        deadline = time.monotonic() + self.settle
        while True:
            app = self.app(spec)
            if app is None:
                raise failure("start", spec, self.label, result, f"PM2 lists no app {spec.app_name!r} after the start "
                            "(is it named so in the ecosystem file?)")
            env = app["pm2_env"]
            restarts = _int(env.get("restart_time"))
            if env.get("status") in ("errored", "stopped") or restarts > 0:
                last = (last_log_line(env.get("pm_err_log_path"), spec.identity)
                        or last_log_line(env.get("pm_out_log_path"), spec.identity))
                code = env.get("exit_code")
                code = code if isinstance(code, int) and not isinstance(code, bool) else None
                self._delete(spec)
                if self.app(spec) is not None:  # a restart in flight as PM2 deleted it can list it again
                    time.sleep(0.3)
                    self._delete(spec)
                detail = (f"it exited{f' with code {code}' if code is not None else ''} at once and PM2 "
                          f"restarted it {restarts} times; it was removed from PM2 again; "
                          f"last error: {last or 'none logged'}")
                raise failure("start", spec, self.label, result, detail)
            if time.monotonic() >= deadline and env.get("status") == "online":
                return app
            if time.monotonic() >= deadline + 10:  # e.g. stuck "launching"
                raise failure("start", spec, self.label, result, f"PM2 still shows it {str(env.get('status'))[:40]!r}")
            time.sleep(0.3)

    @staticmethod
    def _need_app(spec: ServiceSpec, action: str) -> None:
        if not spec.app_name:
            raise ProcessError(f"could not {action} service {spec.name!r} with PM2: it has no PM2 app name; "
                               "nothing was run", service=spec.name)


def last_log_line(path, identity: runas.Identity | None, limit: int = 8192) -> str:
    """The last line of an app's log, whose path PM2 (the customer's side) reported: only a regular file of the
    customer's user is read, never one of Kasa's through a path or link the customer chose."""
    if not isinstance(path, str) or not path:
        return ""
    try:
        text = runas.read_owned(path, identity, limit=limit, tail=True).decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # A Node crash ends with its stack and error object ("}"): the line that names the error says more.
    named = [line for line in lines[-40:] if _ERROR_LINE.search(line) and not line.startswith("at ")]
    return (named or lines or [""])[-1][:500]

