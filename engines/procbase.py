"""What every process manager shares: the service spec, its error, the clean environment of customer
commands, and the base class that runs a manager's commands through a runner (engines.procman,
engines.pm2). The scope in which detached customer processes are started lives here too (service_scope).
"""

from __future__ import annotations

import os
import re
import secrets as _secrets
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import proc, runas

REPO_ROOT = Path(__file__).resolve().parent.parent
Runner = Callable[..., proc.CommandResult]  # proc.run's signature; a caller's runner must call proc.run
KINDS = ("pm2", "systemd", "command", "none")
_PASSED_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR")
_SECRET_KEY = re.compile(r"PASS|SECRET|TOKEN|KEY|AUTH|CREDENTIAL|DSN|DATABASE_URL|_URL$", re.I)


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


def failure(action: str, spec: ServiceSpec, how: str, result: proc.CommandResult | None = None,
          detail: str = "") -> ProcessError:
    argv = result.argv if result else []
    detail = detail or (result.last_error_line() if result else "")
    cmd = f" ({shlex.join(argv)})" if argv else ""
    return ProcessError(f"could not {action} service {spec.name!r} with {how}{cmd}: {detail}",
                        service=spec.name, argv=argv, detail=detail)



class ManagerBase:
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
            raise failure(action, spec, self.label, detail=str(exc)) from None
        if check and not result.ok:
            if shown is not None:
                result = proc.CommandResult(proc.masked_argv(shown, secrets), result.exit_code, result.duration,
                                            result.stdout_tail, result.stderr_tail)
            raise failure(action, spec, self.label, result)
        return result

    @staticmethod
    def _folder(spec: ServiceSpec, action: str) -> str:
        if not os.path.isdir(spec.folder):
            raise ProcessError(f"could not {action} service {spec.name!r}: its folder {spec.folder} does not exist;"
                               " nothing was run", service=spec.name)
        return spec.folder



# --- the scope of a detached customer process -----------------------------------------------------------------
SCOPE_SLICE = "kasa-customers.slice"
_UNIT_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def service_scope(what: str) -> list[str]:
    """The argv prefix that starts a long-lived customer process (a PM2 daemon, a start command's launcher) in a
    systemd scope of its own, in SCOPE_SLICE, outside the worker's unit; [] when none is needed.

    Why: systemd stops a unit by its control group, not by its process tree. With the worker's KillMode=mixed,
    SIGTERM goes to the worker and, once it has exited, SIGKILL to every process left in its group: a PM2
    daemon or a detached service the worker had started would die with every restart of Kasa. A process
    started through `systemd-run --scope` lives in the new scope's group instead, so customers' services keep
    running when Kasa stops, as they do without systemd.

    KASA_SERVICE_SCOPE: `auto` (default) uses a scope when this process runs as root in a systemd unit
    ($INVOCATION_ID set, systemd running) and systemd-run exists; `systemd` always (an error when
    systemd-run is missing); `off` never. KASA_SYSTEMD_RUN names the systemd-run binary (tests use a stand-in).
    """
    mode = (os.environ.get("KASA_SERVICE_SCOPE") or "auto").strip().lower()
    if mode == "off":
        return []
    binary = os.environ.get("KASA_SYSTEMD_RUN") or shutil.which("systemd-run") or ""
    if mode == "auto":
        under_systemd = bool(os.environ.get("INVOCATION_ID")) and os.path.isdir("/run/systemd/system")
        if not (under_systemd and binary and os.geteuid() == 0):
            return []
    elif mode != "systemd":
        raise ProcessError(f"KASA_SERVICE_SCOPE is {mode!r}: it must be auto, systemd or off; nothing was run")
    elif not binary:
        raise ProcessError("KASA_SERVICE_SCOPE=systemd but systemd-run is not installed (Debian: package systemd); "
                           "nothing was run")
    name = _UNIT_UNSAFE.sub("_", what)[:80]
    return [binary, "--scope", "--quiet", "--collect", f"--slice={SCOPE_SLICE}",
            f"--unit=kasa-{name}-{_secrets.token_hex(3)}", f"--description=Kasa customer process: {name}", "--"]


def scoped_exec_argv(what: str, argv: Sequence[str], *, cwd: str, identity: runas.Identity | None) -> list[str]:
    """argv as `identity` in `cwd`, in a scope of its own (service_scope), or [] when no scope is needed.

    systemd-run must run as Kasa (only root may make a scope in the system manager), so the switch to the
    customer's user happens inside the scope, in `python -m engines.procman exec` (no supplementary groups,
    the customer umask: as engines.runas does for every customer command)."""
    scope = service_scope(what)
    if not scope:
        return []
    if identity is not None:
        runas.popen_kwargs(identity)  # a worker that cannot switch users says so before anything starts
    who = ["--uid", str(identity.uid), "--gid", str(identity.gid)] if identity is not None else []
    return [*scope, *python_module("exec"), "--cwd", cwd, *who, "--", *argv]


def python_module(command: str) -> list[str]:
    """`python -E -m engines.procman <command>`: this module's helpers run by Kasa's own Python (run from
    REPO_ROOT, so that `engines` imports)."""
    return [sys.executable, "-E", "-m", "engines.procman", command]
