"""Blue-green upgrades: the new release proves itself beside the live one before anything live stops.

With strategy `blue-green`, after the release is staged, its `.env` merged and its hooks (migrations included,
once) have run, each changed PM2 service with a health URL is started from its staged folder as a second PM2
app, `<app>--green`, in the customer's own PM2 home and as its user, on a free port (the `.env` key that holds
the live port, PORT and the like, is moved). Its health URL must answer on that port, then the release's
optional `smoke` hook runs with KASA_SMOKE_URL (the green copy) and KASA_LIVE_URL (the live one, still the old
release) in its environment. Only then is the green copy stopped and the live service switched (stop, symlink,
start), as in place. The live service answers with the old release the whole time the new one is checked.

After the switch the previous release is kept running the same way, as `<app>--previous` on a side port, for
the grace period (KASA_BLUEGREEN_GRACE, upgrades.standby): a `rollback --switch-back` then only points the service
paths back and restarts, in seconds, with the databases as they are. A service holds its port, so the live port
itself cannot be shared by two versions without a proxy Kasa does not manage; a proxy in front may point at the
standby's port at once.

The green apps are journalled ("green") before they start: whatever ends the upgrade, the way back deletes them
and their ecosystem file (upgrades.rollback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class Side:
    """One service's copy beside the live one: its ecosystem entry and its spec (health URL on the side port)."""

    service: str
    live_url: str
    app: dict
    spec: procman.ServiceSpec


def side_copies(job, slog, folders: dict[str, str], *, suffix: str, label: str, path: Path) -> list[Side]:
    """For each PM2 service with a health URL in `folders` (service name → release folder): a second PM2 app of
    that folder, `<app><suffix>`, of the ecosystem file `path`, on a free port (the `.env` keys holding the live
    port moved to it). OperationError when a service cannot run beside the live one (no setting holds its port)."""
    who = runtime.run_identity(job.customer)
    out, used = [], set()
    for svc in job.customer.services.all().order_by("name"):
        folder = folders.get(svc.name)
        if folder is None or svc.process_manager != svc.ProcessManager.PM2:
            continue
        if not svc.health_url:
            slog.info(f"{svc.name}: no health URL, nothing to check beside the live one")
            continue
        live_port = urlsplit(svc.health_url).port
        env = release_files.read_env(Path(folder) / ".env", who)
        keys = [k for k, v in env.items() if drillcopy.is_port_key(k) and v.strip() == str(live_port)]
        if not keys:
            raise OperationError(f"blue-green: no setting of {svc.name}'s .env holds the port of its health URL "
                                 f"({live_port}), so a release cannot run beside the live one; upgrade it in place")
        port = drillcopy.free_ports(1, avoid={live_port, *used})[0]
        used.add(port)
        app = ecosystem.app(f"{svc.app_name}{suffix}", cwd=folder, folder=folder, start_command=svc.start_command,
                            env={**env, **{k: str(port) for k in keys}})
        spec = procman.ServiceSpec(
            name=f"{svc.name} ({label})", folder=folder, manager="pm2", app_name=app["name"], ecosystem=str(path),
            root=str(job.root), identity=who, pm2_home=procman.pm2_home_for(job.root),
            health_url=drillcopy.with_port(svc.health_url, port))
        out.append(Side(svc.name, svc.health_url, app, spec))
    return out


def write_sides(job, path: Path, sides: list[Side], label: str, slog) -> list[procman.ServiceSpec]:
    ecosystem.write(path, [s.app for s in sides], owner=runtime.run_identity(job.customer), root=job.root)
    slog.info(f"{label}: " + ", ".join(f"{s.service} on port {urlsplit(s.spec.health_url).port}" for s in sides))
    return [s.spec for s in sides]


def verify(job, slog, run_hook: Callable[[str, dict[str, dict[str, str]]], None]) -> None:
    """Start the green copies, require their health URLs, run the smoke hook, stop them (whatever happens)."""
    changes = {ch.service: ch for ch in job.changes}
    path = job.root / f"ecosystem.kasa-green-r{job.ctx.run.pk}.config.js"
    sides = side_copies(job, slog, {name: ch.dest for name, ch in changes.items()}, suffix=GREEN_SUFFIX,
                        label="green", path=path)
    if not sides:
        slog.info("no changed PM2 service with a health URL: nothing to start beside the live release")
        run_hook("smoke", {})
        return
    step = job.journal.add({"type": "green", "path": str(path), "apps": [s.app["name"] for s in sides]})
    specs = [s.spec for s in sides]
    try:
        write_sides(job, path, sides, "green", slog)
        runtime.start_all(job.ctx, specs)
        runtime.check_health(job.ctx, specs, label="green: ", failure="the new release is not healthy beside "
                             "the live one")
        run_hook("smoke", {changes[s.service].component: {"KASA_SMOKE_URL": _base(s.spec.health_url),
                                                          "KASA_LIVE_URL": _base(s.live_url)} for s in sides})
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

