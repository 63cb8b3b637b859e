"""Blue-green upgrades: the new release proves itself beside the live one before anything live stops.

With strategy `blue-green`, after the release is staged, its `.env` merged and its hooks (migrations included,
once) have run, each changed PM2 service with a health URL is started from its staged folder as a second PM2
app, `<app>--green`, in the customer's own PM2 home and as its user, on a free port (the `.env` key that holds
the live port, PORT and the like, is moved). Its health URL must answer on that port, then the release's
optional `smoke` hook runs with KASA_SMOKE_URL (the green copy) and KASA_LIVE_URL (the live one, still the old
release) in its environment. Only then is the green copy stopped and the live service switched (stop, symlink,
start), as in place. The live service answers with the old release the whole time the new one is checked.

What it does not do: keep the previous version running after the switch for an instant way back. A service
holds its port; two versions can only share one behind a proxy that Kasa does not manage. The way back stays
the rollback (files, `.env` and databases from the pinned backup).

The green apps are journalled ("green") before they start: whatever ends the upgrade, the way back deletes them
and their ecosystem file (upgrades.rollback).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from customers import runtime
from engines import drillcopy, ecosystem, procman
from operations.context import OperationError

from . import release_files
from .rollback import remove_green

GREEN_SUFFIX = "--green"


def _base(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/"


def plan(job, slog) -> list[tuple[object, object, int, dict]]:
    """(service, change, free port, env) of each changed PM2 service with a health URL; OperationError when one
    cannot run beside the live one (no setting holds its port)."""
    who = runtime.run_identity(job.customer)
    changed = {ch.service: ch for ch in job.changes}
    out, used = [], set()
    for svc in job.customer.services.all().order_by("name"):
        ch = changed.get(svc.name)
        if ch is None or svc.process_manager != svc.ProcessManager.PM2:
            continue
        if not svc.health_url:
            slog.info(f"{svc.name}: no health URL, nothing to check beside the live one")
            continue
        live_port = urlsplit(svc.health_url).port
        env = release_files.read_env(Path(ch.dest) / ".env", who)
        keys = [k for k, v in env.items() if drillcopy.is_port_key(k) and v.strip() == str(live_port)]
        if not keys:
            raise OperationError(f"blue-green: no setting of {svc.name}'s .env holds the port of its health URL "
                                 f"({live_port}), so the new release cannot run beside the live one; upgrade it in "
                                 "place")
        port = drillcopy.free_ports(1, avoid={live_port, *used})[0]
        used.add(port)
        out.append((svc, ch, port, {**env, **{k: str(port) for k in keys}}))
    return out


def verify(job, slog, run_hook: Callable[[str, dict[str, dict[str, str]]], None]) -> None:
    """Start the green copies, require their health URLs, run the smoke hook, stop them (whatever happens)."""
    greens = plan(job, slog)
    if not greens:
        slog.info("no changed PM2 service with a health URL: nothing to start beside the live release")
        run_hook("smoke", {})
        return
    root, who = job.root, runtime.run_identity(job.customer)
    path = root / f"ecosystem.kasa-green-r{job.ctx.run.pk}.config.js"
    apps = [ecosystem.app(f"{svc.app_name}{GREEN_SUFFIX}", cwd=ch.dest, folder=ch.dest,
                          start_command=svc.start_command, env=env) for svc, ch, _port, env in greens]
    step = job.journal.add({"type": "green", "path": str(path), "apps": [a["name"] for a in apps]})
    specs = [procman.ServiceSpec(name=f"{svc.name} (green)", folder=ch.dest, manager="pm2",
                                 app_name=f"{svc.app_name}{GREEN_SUFFIX}", ecosystem=str(path), root=str(root),
                                 identity=who, pm2_home=procman.pm2_home_for(root),
                                 health_url=drillcopy.with_port(svc.health_url, port))
             for svc, ch, port, _env in greens]
    try:
        ecosystem.write(path, apps, owner=who, root=root)
        slog.info("green: " + ", ".join(f"{s.name} on port {urlsplit(s.health_url).port}" for s in specs))
        runtime.start_all(job.ctx, specs)
        runtime.check_health(job.ctx, specs, label="green: ", failure="the new release is not healthy beside "
                             "the live one")
        run_hook("smoke", {ch.component: {"KASA_SMOKE_URL": _base(spec.health_url),
                                          "KASA_LIVE_URL": _base(svc.health_url)}
                           for (svc, ch, _port, _env), spec in zip(greens, specs, strict=True)})
    finally:
        remove_green(job, step, specs)


def smoke_in_place(job, run_hook) -> None:
    """In place, the smoke hook runs once the switched services are healthy, against the live URLs."""
    extra = {}
    for svc in job.customer.services.all():
        for ch in job.changes:
            if ch.service == svc.name and svc.health_url:
                base = _base(svc.health_url)
                extra[ch.component] = {"KASA_SMOKE_URL": base, "KASA_LIVE_URL": base}
    run_hook("smoke", extra)

