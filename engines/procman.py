"""Stop and start a customer's services around a restore or an upgrade.

One manager per kind of service (Service.process_manager): PM2, systemd, plain
start/stop commands, or none. Each has stop(spec), start(spec),
is_running(spec) and describe(spec); stop_all/start_all run them over a
customer's services and try to leave things as they were when one fails.

Every external command goes through engines.proc.run (argv lists, masked
output), or through a caller's `runner` with the same signature that wraps it
to write the command into its run log. Services get a small clean environment
(PATH, HOME, locale) plus their own `env`, never Kasa's: Kasa's environment
holds its database URL and secret keys, and PM2 in particular copies the
environment of the `pm2 start` command into the app it starts.

Whatever comes from the customer runs as the spec's `identity` (the customer's
OS user, engines.runas): every `pm2` call, so the PM2 daemon of the customer's
own PM2 home and its apps are that user's; the start command (the launcher is
Kasa's Python, what it starts is the user's) and the stop command. `systemctl`
is Kasa's own call: it starts a unit that systemd runs as the unit says, and
the unit name is a runtime field only privileged users may set. What PM2
prints (`pm2 jlist`) and the files it names are the customer's side and are
read as untrusted input (runas.read_owned).

Run logs stay readable: PM2's banner, its status tables and its key/value
listings are kept out of the log (pm2_line_kept; "[PM2] ..." lines and errors
stay), and after each start or stop one summary line per app, from `pm2 jlist`,
goes to the managers' `log` (name, status, pid).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import beneath, proc, runas

REPO_ROOT = Path(__file__).resolve().parent.parent
Runner = Callable[..., proc.CommandResult]  # proc.run's signature; a caller's runner must call proc.run
KINDS = ("pm2", "systemd", "command", "none")
_PASSED_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR")
_SECRET_KEY = re.compile(r"PASS|SECRET|TOKEN|KEY|AUTH|CREDENTIAL|DSN|DATABASE_URL|_URL$", re.I)
PM2_QUIET = ("--no-color", "--mini-list")  # plain text for run logs, not a colored table of every app
ECOSYSTEM_NAMES = ("ecosystem.config.js", "ecosystem.config.cjs", "ecosystem.json", "ecosystem.config.json")
ECOSYSTEM_GLOBS = ("ecosystem*.config.js", "ecosystem*.config.cjs", "ecosystem*.json")
PM2_HOME_NAME = ".kasa-pm2"  # a customer's own PM2 home, in its root, owned by its user
SOCKET_PATH_MAX = 107  # bytes of a unix socket path (sun_path) on Linux
_ERROR_LINE = re.compile(r"error|exception|fatal|denied|refused", re.I)
JLIST_MAX_BYTES = 32 << 20  # `pm2 jlist` is the customer's daemon talking: bounded


@dataclass
class ServiceSpec:
    name: str
    folder: str  # absolute path of the service's folder
    manager: str  # one of KINDS
    app_name: str = ""  # PM2 app name or systemd unit
    start_command: Sequence[str] = ()
    stop_command: Sequence[str] = ()
    health_url: str = ""
    env: dict[str, str] | None = None
    ecosystem: str | None = None  # PM2 ecosystem file; relative to folder; found by name when None
    root: str = ""  # the customer's root: the ecosystem search looks no higher (default: folder's parent)
    identity: runas.Identity | None = None  # the OS user its commands run as; None: Kasa's own (development)
    pm2_home: str = ""  # the customer's PM2 home (pm2_home_for(root)); "": the manager's
    state_dir: str = ""  # where a start command's log and pid file go; "": the manager's


class ProcessError(RuntimeError):
    """A service could not be stopped or started; the message names both and the command's last error line."""

    def __init__(self, message: str, *, service: str = "", argv: Sequence[str] = (), detail: str = ""):
        super().__init__(message)
        self.service, self.argv, self.detail = service, list(argv), detail


def service_env(extra: dict[str, str] | None = None, *, identity: runas.Identity | None = None,
                home: str = "") -> dict[str, str]:
    """The environment of a customer's command: a few harmless variables of Kasa's, then `extra` (the service's
    own env). With an identity: only PATH, the locale and TZ are Kasa's; HOME is the user's own home when it
    exists, else `home` (the customer's root); USER and LOGNAME name the user."""
    if identity is None:
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    else:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LANGUAGE", "TZ") or k.startswith("LC_")}
        own_home = identity.home if identity.home and os.path.isdir(identity.home) else ""
        env.update(HOME=own_home or home or "/", USER=identity.user, LOGNAME=identity.user)
    env.setdefault("PATH", os.defpath)
    env.update({str(k): str(v) for k, v in (extra or {}).items()})
    return env


def spec_env(spec: ServiceSpec, *, with_own: bool = True) -> dict[str, str]:
    """service_env for a spec: its identity, HOME defaulting to its root, its own env unless with_own=False."""
    return service_env(spec.env if with_own else None, identity=spec.identity, home=spec.root or spec.folder)


def env_secrets(env: dict[str, str] | None) -> list[str]:
    """Values of a service's env that look secret, masked in recorded output (second line of defence)."""
    return [str(v) for k, v in (env or {}).items() if _SECRET_KEY.search(k) and len(str(v)) >= 6]


def _fail(action: str, spec: ServiceSpec, how: str, result: proc.CommandResult | None = None,
          detail: str = "") -> ProcessError:
    argv = result.argv if result else []
    detail = detail or (result.last_error_line() if result else "")
    cmd = f" ({shlex.join(argv)})" if argv else ""
    return ProcessError(f"could not {action} service {spec.name!r} with {how}{cmd}: {detail}",
                        service=spec.name, argv=argv, detail=detail)


def pm2_line_kept(stream: str, line: str) -> bool:
    """Whether a line of PM2's output belongs in a run log: its "[PM2] ..." messages and anything else on stderr
    that is not decoration; not the ASCII-art banner, the status tables or the per-app key/value listing."""
    text = line.strip()
    if text.startswith("[PM2"):
        return True
    return stream == "stderr" and bool(text) and text[0] not in _PM2_DECOR


_PM2_DECOR = "┌│├└─+|_-\\/"


class _Base:
    kind = ""
    label = ""  # how error messages name the manager: "with PM2", "with systemd"
    keep_line = None  # engines.proc.run's filter of what reaches the run log (None: every line)

    def __init__(self, *, runner: Runner | None = None, timeout: float = 60.0, secrets: Iterable[str] = (),
                 log: Callable[[str], None] | None = None):
        self.runner = runner or proc.run
        self.timeout = timeout
        self.secrets = list(secrets)
        self.log = log or (lambda text: None)  # one line for the run's log (a summary of what a command did)

    def _run(self, argv: Sequence[str], spec: ServiceSpec, action: str, *, env: dict[str, str],
             cwd: str | None = None, timeout: float | None = None, check: bool = True,
             shown: Sequence[str] | None = None, identity: runas.Identity | None = None) -> proc.CommandResult:
        """Run through the runner (as `identity`); ProcessError on failure, naming `shown` (default: argv)."""
        secrets = [*self.secrets, *env_secrets(spec.env)]
        extra = {"keep_line": self.keep_line} if self.keep_line else {}
        try:
            result = self.runner(list(argv), cwd=cwd, env=env, timeout=timeout or self.timeout, secrets=secrets,
                                 identity=identity, **extra)
        except (proc.CommandNotFound, proc.CommandTimeout, runas.RunAsError) as exc:
            raise _fail(action, spec, self.label, detail=str(exc)) from None
        if check and not result.ok:
            if shown is not None:
                result = proc.CommandResult(proc.masked_argv(shown, secrets), result.exit_code, result.duration,
                                            result.stdout_tail, result.stderr_tail)
            raise _fail(action, spec, self.label, result)
        return result

    @staticmethod
    def _folder(spec: ServiceSpec, action: str) -> str:
        if not os.path.isdir(spec.folder):
            raise ProcessError(f"could not {action} service {spec.name!r}: its folder {spec.folder} does not exist;"
                               " nothing was run", service=spec.name)
        return spec.folder


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


class Pm2Manager(_Base):
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
        return {**spec_env(spec, with_own=own), "PM2_HOME": self.home(spec)}

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
            raise _fail("check", spec, self.label, detail=str(exc)) from None
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
            raise _fail("stop", spec, self.label, result)
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
        result = self._run(argv, spec, "start", env=self._env(spec, own=True), cwd=cwd, identity=spec.identity)
        self.log(self.summary(spec, self._await_online(spec, result)))

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
                raise _fail("start", spec, self.label, result, f"PM2 lists no app {spec.app_name!r} after the start "
                            "(is it named so in the ecosystem file?)")
            env = app["pm2_env"]
            restarts = _int(env.get("restart_time"))
            if env.get("status") in ("errored", "stopped") or restarts > 0:
                last = (_last_line(env.get("pm_err_log_path"), spec.identity)
                        or _last_line(env.get("pm_out_log_path"), spec.identity))
                code = env.get("exit_code")
                code = code if isinstance(code, int) and not isinstance(code, bool) else None
                self._delete(spec)
                detail = (f"it exited{f' with code {code}' if code is not None else ''} at once and PM2 "
                          f"restarted it {restarts} times; it was removed from PM2 again; "
                          f"last error: {last or 'none logged'}")
                raise _fail("start", spec, self.label, result, detail)
            if time.monotonic() >= deadline and env.get("status") == "online":
                return app
            if time.monotonic() >= deadline + 10:  # e.g. stuck "launching"
                raise _fail("start", spec, self.label, result, f"PM2 still shows it {str(env.get('status'))[:40]!r}")
            time.sleep(0.3)

    @staticmethod
    def _need_app(spec: ServiceSpec, action: str) -> None:
        if not spec.app_name:
            raise ProcessError(f"could not {action} service {spec.name!r} with PM2: it has no PM2 app name; "
                               "nothing was run", service=spec.name)


def _last_line(path, identity: runas.Identity | None, limit: int = 8192) -> str:
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


# --- systemd --------------------------------------------------------------------------------
class SystemdManager(_Base):
    """systemctl stop/start/is-active; --no-ask-password so a missing permission fails instead of prompting.

    systemctl is Kasa's own call, not customer code: it runs as Kasa with Kasa's clean service_env() and asks
    systemd to start a unit, which runs as its unit file says (User=). The unit name is a runtime field that
    only superusers and holders of customers.change_runtime may set."""

    kind, label = "systemd", "systemd"

    def _unit(self, spec: ServiceSpec, action: str) -> str:
        if not spec.app_name:
            raise ProcessError(f"could not {action} service {spec.name!r} with systemd: it has no unit name; "
                               "nothing was run", service=spec.name)
        return spec.app_name

    def stop(self, spec: ServiceSpec) -> None:
        self._run(["systemctl", "--no-ask-password", "stop", self._unit(spec, "stop")], spec, "stop",
                  env=service_env())

    def start(self, spec: ServiceSpec) -> None:
        unit = self._unit(spec, "start")
        result = self._run(["systemctl", "--no-ask-password", "start", unit], spec, "start", env=service_env())
        if not self.is_running(spec):
            raise _fail("start", spec, self.label, result, f"unit {unit} is not active after systemctl start")

    def is_running(self, spec: ServiceSpec) -> bool:
        argv = ["systemctl", "is-active", "--quiet", self._unit(spec, "check")]
        return self._run(argv, spec, "check", env=service_env(), check=False).ok

    def describe(self, spec: ServiceSpec) -> str:
        return f"systemd unit {spec.app_name!r}"


# --- start/stop commands --------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from the state on (field 3); the command name may hold spaces."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _starttime(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and fields[0] != "Z" else None


def _session_members(sid: int, not_before: int) -> list[int]:
    """Live processes of session `sid` started no earlier than its leader was (a reused id is not ours)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z" and int(fields[3]) == sid and int(fields[19]) >= not_before:
                found.append(int(entry))
    return found


class CommandManager(_Base):
    """start_command detached in its own session (output to <log_dir>/<name>.log, pid in <pid_dir>/<name>.pid);
    stop_command when there is one, else SIGTERM (then SIGKILL) to every process of that session."""

    kind, label = "command", "its command"

    def __init__(self, log_dir: str, *, pid_dir: str | None = None, settle: float = 1.5,
                 stop_timeout: float = 10.0, **kw):
        super().__init__(**kw)
        self.log_dir, self.pid_dir = log_dir, pid_dir or log_dir
        self.settle, self.stop_timeout = settle, stop_timeout

    def _file(self, spec: ServiceSpec, ext: str) -> str:
        """<log_dir>/<name>.log and <pid_dir>/<name>.pid, or both in the spec's own state_dir (one per customer:
        two customers' services of one name never share a pid file)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name)
        if spec.state_dir:
            return os.path.join(spec.state_dir, safe + ext)
        return os.path.join(self.log_dir if ext == ".log" else self.pid_dir, safe + ext)

    def _tracked(self, spec: ServiceSpec) -> list[int]:
        try:
            pid, started = (int(x) for x in Path(self._file(spec, ".pid")).read_text().split()[:2])
        except (OSError, ValueError):
            return []
        now = _starttime(pid)
        if now is not None and now != started:  # the pid was reused by another process: stale file
            return []
        return _session_members(pid, started)

    def is_running(self, spec: ServiceSpec) -> bool:
        return bool(self._tracked(spec))

    def describe(self, spec: ServiceSpec) -> str:
        return f"command {shlex.join(spec.start_command)} in {spec.folder} (log {self._file(spec, '.log')})"

    def start(self, spec: ServiceSpec) -> None:
        folder = self._folder(spec, "start")
        if not spec.start_command:
            raise ProcessError(f"could not start service {spec.name!r}: it has no start command; nothing was run",
                               service=spec.name)
        if self.is_running(spec):  # a fresh start, as with PM2: never a second copy beside the first
            self.stop(spec)
        for path in (self._file(spec, ".log"), self._file(spec, ".pid")):
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # Kasa's: the user gets only the fd
        # A launcher (this module, run by the same Python, as Kasa) starts the command in a new session and
        # exits: the service is then nobody's child here (no zombie in Kasa), and the launch itself
        # is one ordinary command for the runner to record. The command itself runs as spec.identity.
        who = ["--uid", str(spec.identity.uid), "--gid", str(spec.identity.gid)] if spec.identity else []
        if spec.identity:
            runas.popen_kwargs(spec.identity)  # a worker that cannot switch users says so before the launch
        argv = [sys.executable, "-E", "-m", "engines.procman", "launch", "--log", self._file(spec, ".log"),
                "--pidfile", self._file(spec, ".pid"), "--cwd", folder, "--settle", f"{self.settle:g}", *who,
                "--", *spec.start_command]
        self._run(argv, spec, "start", env=spec_env(spec), cwd=str(REPO_ROOT),
                  timeout=self.settle + self.timeout, shown=spec.start_command)

    def stop(self, spec: ServiceSpec) -> None:
        if spec.stop_command:
            self._run(list(spec.stop_command), spec, "stop", env=spec_env(spec), cwd=self._folder(spec, "stop"),
                      identity=spec.identity)
            self._wait_gone(spec, self.stop_timeout)  # stop commands may return before the service is gone
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            pids = self._tracked(spec)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            self._wait_gone(spec, wait)
        left = self._tracked(spec)
        if left:
            raise ProcessError(f"could not stop service {spec.name!r}: processes {left} survived SIGKILL",
                               service=spec.name)
        try:
            os.unlink(self._file(spec, ".pid"))
        except FileNotFoundError:
            pass

    def _wait_gone(self, spec: ServiceSpec, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._tracked(spec) and time.monotonic() < deadline:
            time.sleep(0.05)


def _launch(args: list[str]) -> int:
    """`python -m engines.procman launch --log L --pidfile P --cwd D --settle S -- argv…` (see CommandManager)."""
    opts, argv = args[: args.index("--")], args[args.index("--") + 1:]
    o = dict(zip(opts[::2], opts[1::2], strict=True))
    log = open(o["--log"], "ab")  # append: the previous runs' output is kept for diagnosis
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} kasa starts: {shlex.join(argv)}\n".encode())
    log.flush()
    start = log.tell()
    as_user = {}
    if "--uid" in o:  # the customer's user, no supplementary group, umask 027 (engines.runas)
        who = runas.Identity(user=f"uid {o['--uid']}", uid=int(o["--uid"]), gid=int(o["--gid"]), home="")
        as_user = runas.popen_kwargs(who)
    try:
        child = subprocess.Popen(argv, cwd=o["--cwd"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True, close_fds=True, **as_user)
    except OSError as exc:
        print(f"cannot run {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    tmp = o["--pidfile"] + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{child.pid} {_starttime(child.pid) or 0}\n")
    os.replace(tmp, o["--pidfile"])
    deadline = time.monotonic() + float(o["--settle"])
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    code = child.poll()
    if code is None or code == 0:  # still running, or a command that daemonizes itself and returns 0
        print(f"started pid {child.pid}; output in {o['--log']}")
        return 0
    os.unlink(o["--pidfile"])
    with open(o["--log"], "rb") as fh:
        fh.seek(start)
        lines = [ln for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()][-5:]
    for line in lines or [f"exited with code {code} at once, printing nothing"]:
        print(line, file=sys.stderr)
    return code if code > 0 else 1


# --- none -------------------------------------------------------------------------------------
class NoManager:
    """Services Kasa does not run (static files, a process managed elsewhere): nothing to stop or start."""

    kind = "none"

    def stop(self, spec: ServiceSpec) -> None:
        pass

    def start(self, spec: ServiceSpec) -> None:
        pass

    def is_running(self, spec: ServiceSpec) -> bool:
        return False

    def describe(self, spec: ServiceSpec) -> str:
        return "not managed by Kasa"


# --- all of a customer's services -------------------------------------------------------------
def managers(*, state_dir: str, pm2_home: str = "", runner: Runner | None = None, timeout: float = 60.0,
             secrets: Iterable[str] = (), log: Callable[[str], None] | None = None) -> dict[str, object]:
    """One manager per kind: command logs and pidfiles in `state_dir`, PM2 in `pm2_home`; a spec's own
    state_dir and pm2_home (a customer's) win. `log` receives one summary line per app after a start or stop."""
    kw = dict(runner=runner, timeout=timeout, secrets=list(secrets), log=log)
    return {"pm2": Pm2Manager(pm2_home, **kw), "systemd": SystemdManager(**kw),
            "command": CommandManager(state_dir, **kw), "none": NoManager()}


def _manager(mgrs: dict, spec: ServiceSpec):
    try:
        return mgrs[spec.manager]
    except KeyError:
        raise ProcessError(f"service {spec.name!r} has an unknown process manager {spec.manager!r} "
                           f"(known: {', '.join(KINDS)}); nothing was run", service=spec.name) from None


def stop_all(specs: Iterable[ServiceSpec], mgrs: dict) -> list[str]:
    """Stop services in reverse order; returns the names of those that were running.

    When one cannot be stopped, the ones stopped before it that were running are
    started again (in order) and ProcessError is raised.
    """
    stopped: list[ServiceSpec] = []
    for spec in reversed(list(specs)):
        manager = _manager(mgrs, spec)
        was_running = manager.is_running(spec)
        try:
            manager.stop(spec)
        except ProcessError as exc:
            undone, failed = _each(reversed(stopped), mgrs, "start")
            note = _undo_note("started again", undone, failed, "stopped")
            raise ProcessError(f"{exc}; {note}", service=exc.service, argv=exc.argv, detail=exc.detail) from exc
        if was_running:
            stopped.append(spec)
    return [s.name for s in reversed(stopped)]


def start_all(specs: Iterable[ServiceSpec], mgrs: dict) -> list[str]:
    """Start services in order; returns their names. When one fails, those started before it are
    stopped again (in reverse order) and ProcessError is raised."""
    started: list[ServiceSpec] = []
    for spec in specs:
        try:
            _manager(mgrs, spec).start(spec)
        except ProcessError as exc:
            undone, failed = _each(reversed(started), mgrs, "stop")
            note = _undo_note("stopped again", undone, failed, "started")
            raise ProcessError(f"{exc}; {note}", service=exc.service, argv=exc.argv, detail=exc.detail) from exc
        started.append(spec)
    return [s.name for s in started]


def _each(specs: Iterable[ServiceSpec], mgrs: dict, action: str) -> tuple[list[str], list[str]]:
    done, failed = [], []
    for spec in specs:
        try:
            getattr(_manager(mgrs, spec), action)(spec)
            done.append(spec.name)
        except ProcessError as exc:
            failed.append(f"{spec.name} ({exc.detail or exc})")
    return done, failed


def _undo_note(verb: str, done: list[str], failed: list[str], before: str) -> str:
    if not done and not failed:
        return f"no service had been {before} before it"
    note = f"{verb} the services {before} before it: {', '.join(done)}" if done else ""
    if failed:
        note += ("; " if note else "") + f"could not be {verb.split()[0]} again: {', '.join(failed)}"
    return note


if __name__ == "__main__" and sys.argv[1:2] == ["launch"]:
    sys.exit(_launch(sys.argv[2:]))
