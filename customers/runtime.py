"""A customer's running services, for operations that must stop, start and health-check them.

Restores and upgrades call these; the engines (engines.procman, engines.health)
do the work and every command they run is recorded in the run's log.
"""

from __future__ import annotations

from django.conf import settings

from engines import ecosystem, health, procman
from operations.context import OperationError, RunContext

from .models import Customer


def service_specs(customer: Customer, *, root=None) -> list[procman.ServiceSpec]:
    """In the customer's order; `root` points the specs at another root (a copy of the customer)."""
    base = root if root is not None else customer.root_path()
    # After an upgrade Kasa's own ecosystem file (env from the merged .env) is what PM2 must start, not an
    # ecosystem.config.js the customer shipped before.
    kasa_ecosystem = base / ecosystem.FILE_NAME
    managed = {a.get("name") for a in ecosystem.read_apps(kasa_ecosystem)}
    specs = []
    # Sorted here, not by the database: a customer loaded with prefetch_related("services") needs no query, so
    # an undo that runs without the control database still finds its services (operations.context).
    for s in sorted(customer.services.all(), key=lambda s: s.name):
        specs.append(procman.ServiceSpec(
            ecosystem=str(kasa_ecosystem) if s.process_manager == "pm2" and s.app_name in managed else None,
            name=s.name, folder=str(base / (s.path or ".")), manager=s.process_manager, app_name=s.app_name,
            start_command=tuple(s.start_command or ()), stop_command=tuple(s.stop_command or ()),
            health_url=s.health_url, root=str(base),
        ))
    return specs


def _managers(ctx: RunContext) -> dict:
    settings.KASA_PM2_HOME.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = settings.KASA_VAR_DIR / "services"
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    return procman.managers(pm2_home=str(settings.KASA_PM2_HOME), state_dir=str(state), runner=ctx.runner(),
                            timeout=settings.KASA_SERVICE_TIMEOUT)


def stop_all(ctx: RunContext, specs) -> None:
    try:
        procman.stop_all(specs, _managers(ctx))
    except procman.ProcessError as exc:
        raise OperationError(str(exc)) from None


def start_all(ctx: RunContext, specs) -> None:
    try:
        procman.start_all(specs, _managers(ctx))
    except procman.ProcessError as exc:
        raise OperationError(str(exc)) from None


def healthy_now(specs) -> list[str]:
    """Names of the services whose health URL answers right now (one quick probe each, in parallel)."""
    results = health.check_all([s for s in specs if s.health_url], consecutive=1, timeout=2.0, interval=0.5)
    return sorted(name for name, res in results.items() if res.ok)


def check_health(ctx: RunContext, specs) -> None:
    """Every service with a health URL must answer 200 KASA_HEALTH_STREAK times in a row."""
    checked = [s for s in specs if s.health_url]
    if not checked:
        return
    ctx.info(f"health checks: {', '.join(s.name for s in checked)}")
    results = health.check_all(checked, consecutive=settings.KASA_HEALTH_STREAK,
                               timeout=settings.KASA_HEALTH_TIMEOUT, interval=settings.KASA_HEALTH_INTERVAL)
    bad = []
    for name, res in results.items():
        (ctx.info if res.ok else ctx.error)(f"{name}: {res.summary()}")
        if not res.ok:
            bad.append(f"{name} ({res.last_error})")
    if bad:
        raise OperationError(f"health check failed: {'; '.join(bad)}")
