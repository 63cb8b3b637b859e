"""A customer's running services, for operations that must stop, start and health-check them.

Restores and upgrades call these; the engines (engines.procman, engines.health)
do the work and every command they run is recorded in the run's log.

Everything that comes from the customer (PM2 and its daemon, start/stop
commands, release hooks) runs as the customer's OS user `run_as`, looked up
again each time (the user may have been removed since it was set). Without
run_as, a deployed Kasa refuses; development falls back to Kasa's own user,
with a warning on the run (check_run_as).
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from django.conf import settings

from engines import ecosystem, health, procman, runas
from operations.context import OperationError, RunContext

from .models import Customer, run_as_identity

USER_KINDS = ("pm2", "command")  # process managers that run the customer's own code


def runs_code(customer: Customer) -> bool:
    """Whether stopping/starting the customer's services runs commands of the customer's (PM2, start/stop)."""
    return any(s.process_manager in USER_KINDS for s in customer.services.all())


def run_identity(customer: Customer, *, needed: bool = True) -> runas.Identity | None:
    """The OS user the customer's code runs as, checked now: it exists, is neither root nor Kasa's own user, and
    this worker can switch to it. None: development's fallback to Kasa's own user (or nothing needs a user).
    OperationError with a clear message otherwise, and when a deployed Kasa would need it and it is not set."""
    if customer.run_as:
        try:
            identity = run_as_identity(customer.run_as)
            runas.popen_kwargs(identity)  # a worker that cannot switch users says so before anything runs
        except runas.RunAsError as exc:
            raise OperationError(f"customer {customer}: {exc}") from None
        return identity
    if needed and settings.DEPLOYED:
        raise OperationError(f"customer {customer} has no run_as user: a deployed Kasa never runs a customer's "
                             "commands (PM2, start/stop commands, release hooks) as its own user; a superuser must "
                             "set run_as to the customer's own OS user first")
    return None


def check_run_as(ctx: RunContext, customer: Customer, *, hooks: bool = False) -> runas.Identity | None:
    """Before an operation that runs customer code touches anything: who it runs as, or OperationError
    ("nothing was touched"). In development without run_as, a WARNING on the run's log."""
    needed = hooks or runs_code(customer)
    try:
        identity = run_identity(customer, needed=needed)
    except OperationError as exc:
        raise OperationError(f"{exc}; nothing was touched") from None
    if identity is not None:
        ctx.info(f"customer commands run as {identity}")
    elif needed:
        ctx.warning(f"customer {customer} has no run_as user: its commands run as Kasa's own user "
                    f"({_user_name()}), within reach of Kasa's keys; development only (a deployed Kasa refuses)")
    return identity


def _user_name() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def state_dir(customer: Customer) -> Path:
    """Kasa's own folder for a customer's start commands (log, pid file): one per customer, so two customers'
    services of the same name never share a pid file."""
    return settings.KASA_VAR_DIR / "services" / str(customer.uuid)


def service_specs(customer: Customer, *, root=None) -> list[procman.ServiceSpec]:
    """In the customer's order; `root` points the specs at another root (a copy of the customer)."""
    base = root if root is not None else customer.root_path()
    identity = run_identity(customer, needed=runs_code(customer))
    # After an upgrade Kasa's own ecosystem file (env from the merged .env) is what PM2 must start, not an
    # ecosystem.config.js the customer shipped before.
    kasa_ecosystem = base / ecosystem.FILE_NAME
    managed = {a.get("name") for a in ecosystem.read_apps(kasa_ecosystem, owner=identity)}
    specs = []
    # Sorted here, not by the database: a customer loaded with prefetch_related("services") needs no query, so
    # an undo that runs without the control database still finds its services (operations.context).
    for s in sorted(customer.services.all(), key=lambda s: s.name):
        specs.append(procman.ServiceSpec(
            ecosystem=str(kasa_ecosystem) if s.process_manager == "pm2" and s.app_name in managed else None,
            name=s.name, folder=str(base / (s.path or ".")), manager=s.process_manager, app_name=s.app_name,
            start_command=tuple(s.start_command or ()), stop_command=tuple(s.stop_command or ()),
            health_url=s.health_url, root=str(base), identity=identity, pm2_home=procman.pm2_home_for(base),
            state_dir=str(state_dir(customer)),
        ))
    return specs


def side_app_specs(customer: Customer, ecosystem_path: str, names) -> list[procman.ServiceSpec]:
    """Specs of PM2 apps Kasa started beside the customer's own (blue-green's green copies, the standby), by
    name, enough to stop and delete them from the customer's PM2 home."""
    root = customer.root_path()
    who = run_identity(customer)
    return [procman.ServiceSpec(name=name, folder=str(root), manager="pm2", app_name=name, ecosystem=ecosystem_path,
                                root=str(root), identity=who, pm2_home=procman.pm2_home_for(root)) for name in names]


def managers(*, runner=None, log=None) -> dict:
    """The process managers, recording through `runner` (a run's); each spec names its own PM2 home and state.
    `log` gets one summary line per PM2 app after each start or stop (instead of PM2's tables)."""
    services = settings.KASA_VAR_DIR / "services"
    services.mkdir(parents=True, exist_ok=True, mode=0o700)
    return procman.managers(state_dir=str(services), runner=runner, timeout=settings.KASA_SERVICE_TIMEOUT, log=log,
                            pm2_settle=settings.KASA_PM2_SETTLE)


def run_managers(ctx: RunContext) -> dict:
    return managers(runner=ctx.runner(), log=ctx.info)


def stop_all(ctx: RunContext, specs) -> None:
    try:
        procman.stop_all(specs, run_managers(ctx))
    except procman.ProcessError as exc:
        raise OperationError(str(exc)) from None


def start_all(ctx: RunContext, specs) -> None:
    try:
        procman.start_all(specs, run_managers(ctx))
    except procman.ProcessError as exc:
        raise OperationError(str(exc)) from None


def healthy_now(specs, *, checker=None) -> list[str]:
    """Names of the services whose health URL answers right now (one quick probe each, in parallel). `checker`:
    engines.health.check_all's stand-in for a customer on a remote host (hosts.remote.RemoteHost.check_health)."""
    results = (checker or health.check_all)([s for s in specs if s.health_url], consecutive=1, timeout=2.0,
                                            interval=0.5)
    return sorted(name for name, res in results.items() if res.ok)


def check_health(ctx: RunContext, specs, *, label: str = "", what: str = "health checks",
                 failure: str = "health check failed", checker=None) -> None:
    """Every service with a health URL must answer 200 KASA_HEALTH_STREAK times in a row; the others are logged as
    having none (never as "healthy": nothing was asked). `label` prefixes each log line and `what`/`failure` name
    the checks (a deep drill's copy); the OperationError reads "<failure>: <service> (<last error>); …"."""
    checked = [s for s in specs if s.health_url]
    for spec in specs:
        if not spec.health_url:
            ctx.info(f"{label}{spec.name}: no health URL, not health-checked")
    if not checked:
        return
    ctx.info(f"{label}{what}: {', '.join(f'{s.name} {s.health_url}' for s in checked)}")
    results = (checker or health.check_all)(checked, consecutive=settings.KASA_HEALTH_STREAK,
                                            timeout=settings.KASA_HEALTH_TIMEOUT,
                                            interval=settings.KASA_HEALTH_INTERVAL)
    bad = []
    for name, res in results.items():
        (ctx.info if res.ok else ctx.error)(f"{label}{name}: {res.summary()}")
        if not res.ok:
            bad.append(f"{name} ({res.last_error})")
    if bad:
        raise OperationError(f"{failure}: {'; '.join(bad)}")
