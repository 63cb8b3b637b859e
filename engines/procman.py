"""Stop and start a customer's services around a restore or an upgrade.

One manager per kind of service (Service.process_manager): PM2 (engines.pm2), systemd, plain start/stop
commands, or none. Each has stop(spec), start(spec), is_running(spec) and describe(spec); stop_all/start_all
run them over a customer's services and try to leave things as they were when one fails. This module is
where callers find them all (the spec, the error and the base class live in engines.procbase).

Every external command goes through engines.proc.run (argv lists, masked output), or through a caller's
`runner` with the same signature that wraps it to write the command into its run log. Services get a small
clean environment (PATH, HOME, locale) plus their own `env`, never Kasa's: Kasa's environment holds its
database URL and secret keys, and PM2 in particular copies the environment of the `pm2 start` command into
the app it starts.

Whatever comes from the customer runs as the spec's `identity` (the customer's OS user, engines.runas): every
`pm2` call, so the PM2 daemon of the customer's own PM2 home and its apps are that user's; the start command
(the launcher is Kasa's Python, what it starts is the user's) and the stop command. `systemctl` is Kasa's own
call: it starts a unit that systemd runs as the unit says, and the unit name is a runtime field only
privileged users may set. Under systemd, the long-lived processes (a PM2 daemon, a start command's service)
start in a scope of their own (procbase.service_scope), so that they outlive the worker's unit.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from . import runas
from .pm2 import (  # noqa: F401  (procman is where callers find every manager)
    ECOSYSTEM_NAMES,
    PM2_HOME_NAME,
    Pm2Manager,
    find_ecosystem,
    last_log_line,
    parse_jlist,
    pm2_binary,
    pm2_home_for,
    pm2_kill,
    pm2_line_kept,
)
from .procbase import (  # noqa: F401
    KINDS,
    REPO_ROOT,
    ManagerBase,
    ProcessError,
    Runner,
    ServiceSpec,
    env_secrets,
    failure,
    python_module,
    service_env,
    service_scope,
    spec_env,
)


# --- systemd --------------------------------------------------------------------------------
class SystemdManager(ManagerBase):
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
            raise failure("start", spec, self.label, result, f"unit {unit} is not active after systemctl start")

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


class CommandManager(ManagerBase):
    """start_command detached in its own session (output to <log_dir>/<name>.log, pid in <pid_dir>/<name>.pid);
    stop_command when there is one, else SIGTERM (then SIGKILL) to every process of that session."""

    kind, label = "command", "its command"

    def __init__(self, log_dir: str, *, pid_dir: str | None = None, settle: float = 1.5,
                 stop_timeout: float = 10.0, launcher: list[str] | None = None, **kw):
        super().__init__(**kw)
        self.log_dir, self.pid_dir = log_dir, pid_dir or log_dir
        self.settle, self.stop_timeout = settle, stop_timeout
        # How the launcher runs: Kasa's Python with this package (default), or, on a remote host, the host's
        # python3 with the program text (engines.hostrestore.services: `python3 -I -c LAUNCH_PROGRAM`).
        self.launcher = launcher

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
        # Under systemd the launcher starts in a scope of its own, and the service with it (service_scope).
        launcher = self.launcher or python_module("launch")
        argv = [*service_scope(f"command-{os.path.basename(spec.root or folder)}-{spec.name}"),
                *launcher, "--log", self._file(spec, ".log"), "--pidfile", self._file(spec, ".pid"),
                "--cwd", folder, "--settle", f"{self.settle:g}", *who, "--", *spec.start_command]
        self._run(argv, spec, "start", env=spec_env(spec), cwd=str(REPO_ROOT) if self.launcher is None else folder,
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


# The launcher of a start command, as one program text: run by Kasa's own Python on the worker's machine
# (`python -m engines.procman launch …`, _launch below) and, on a remote host, by the host's python3 through
# `python3 -I -c LAUNCH_PROGRAM …` (Kasa's code is not installed there: engines.hostcall ships it per session).
# Standard library only, Python ≥ 3.9 (Popen's user/group/extra_groups/umask).
LAUNCH_SOURCE = r"""
import os, shlex, subprocess, sys, time


def launch(args):
    '''launch --log L --pidfile P --cwd D --settle S [--uid U --gid G] -- argv…: argv in a new session (output
    appended to L, "<pid> <starttime>" in P), as that user (no supplementary groups, umask 027); 0 when it still
    runs after S seconds (or exited 0: it daemonized itself), else its exit code and its last lines on stderr.'''
    opts, argv = args[: args.index("--")], args[args.index("--") + 1:]
    o = dict(zip(opts[::2], opts[1::2]))
    log = open(o["--log"], "ab")  # append: the previous runs' output is kept for diagnosis
    log.write(("--- %s kasa starts: %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), shlex.join(argv))).encode())
    log.flush()
    start = log.tell()
    as_user = {"umask": 0o027}
    if "--uid" in o:
        as_user.update(user=int(o["--uid"]), group=int(o["--gid"]), extra_groups=[])
    try:
        child = subprocess.Popen(argv, cwd=o["--cwd"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True, close_fds=True, **as_user)
    except OSError as exc:
        print("cannot run %s: %s" % (argv[0], exc.strerror or exc), file=sys.stderr)
        return 127
    tmp = o["--pidfile"] + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("%d %d\n" % (child.pid, starttime(child.pid) or 0))
    os.replace(tmp, o["--pidfile"])
    deadline = time.monotonic() + float(o["--settle"])
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    code = child.poll()
    if code is None or code == 0:  # still running, or a command that daemonizes itself and returns 0
        print("started pid %d; output in %s" % (child.pid, o["--log"]))
        return 0
    os.unlink(o["--pidfile"])
    with open(o["--log"], "rb") as fh:
        fh.seek(start)
        lines = [ln for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()][-5:]
    for line in lines or ["exited with code %d at once, printing nothing" % code]:
        print(line, file=sys.stderr)
    return code if code > 0 else 1


def starttime(pid):
    '''The process's start time (field 22 of /proc/<pid>/stat), None when it is gone or a zombie.'''
    try:
        fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if fields[0] != "Z" else None
"""
LAUNCH_PROGRAM = LAUNCH_SOURCE + "\nsys.exit(launch(sys.argv[1:]))\n"


def _launch(args: list[str]) -> int:
    """`python -m engines.procman launch --log L --pidfile P --cwd D --settle S -- argv…` (see CommandManager)."""
    namespace: dict = {}
    exec(compile(LAUNCH_SOURCE, "engines.procman:LAUNCH_SOURCE", "exec"), namespace)  # noqa: S102 (our own text)
    return namespace["launch"](args)


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
             secrets: Iterable[str] = (), log: Callable[[str], None] | None = None,
             pm2_settle: float = 2.0) -> dict[str, object]:
    """One manager per kind: command logs and pidfiles in `state_dir`, PM2 in `pm2_home`; a spec's own
    state_dir and pm2_home (a customer's) win. `log` receives one summary line per app after a start or stop."""
    kw = dict(runner=runner, timeout=timeout, secrets=list(secrets), log=log)
    return {"pm2": Pm2Manager(pm2_home, settle=pm2_settle, **kw), "systemd": SystemdManager(**kw),
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


def _exec(args: list[str]) -> int:
    """`python -m engines.procman exec --cwd D [--uid U --gid G] -- argv…`: become the customer's user (no
    supplementary groups, the customer umask) in D and exec argv; what procbase.scoped_exec_argv runs inside a
    systemd scope."""
    opts, argv = args[: args.index("--")], args[args.index("--") + 1:]
    o = dict(zip(opts[::2], opts[1::2], strict=True))
    os.umask(runas.CUSTOMER_UMASK)
    if "--uid" in o:
        os.setgroups([])
        os.setgid(int(o["--gid"]))
        os.setuid(int(o["--uid"]))
    try:
        os.chdir(o["--cwd"])
        os.execvp(argv[0], argv)  # noqa: S606  (an argv list, the point of this helper)
    except OSError as exc:
        print(f"cannot run {argv[0]} in {o['--cwd']}: {exc.strerror or exc}", file=sys.stderr)
        return 127


if __name__ == "__main__" and sys.argv[1:2] == ["launch"]:
    sys.exit(_launch(sys.argv[2:]))
if __name__ == "__main__" and sys.argv[1:2] == ["exec"]:
    sys.exit(_exec(sys.argv[2:]))
