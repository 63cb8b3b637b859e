"""The preflight of an upgrade of a customer on a remote host: upgrades.preflight's checks, with what they look at
below the customer's root (the service paths, the live .env files, the free disk) asked from the host through the
session (engines.hostupgrade, engines.hostrestore), never read on the worker's own disk. Nothing is changed; the
release's zips are copied (sha256 checked) into the run's scratch folder on the worker.
"""

from __future__ import annotations

import os

from django.conf import settings

from customers.models import Customer
from engines import layout
from engines.humanize import human_size
from releases.models import Release
from releases.services import ReleaseStorageError, component_zip_copy

from . import preflight
from .models import Upgrade
from .preflight import Change, Check, Report
from .remote_job import RemoteJob


def check(job: RemoteJob, release: Release, *, force: bool, zips_dir: str) -> Report:
    customer = Customer.objects.prefetch_related("services", "databases").get(pk=job.customer.pk)
    current = {k: str(v) for k, v in (customer.versions or {}).items() if v}
    rows = {row.component: row.component_version for row in release.rows.select_related("component_version")}
    to_versions = {c: cv.version for c, cv in rows.items() if current.get(c) != cv.version}
    report = Report(customer=customer.domain, release=release.name,
                    kind=Upgrade.Kind.INSTALL if not current else Upgrade.Kind.UPGRADE,
                    from_versions=current, to_versions=to_versions, changes=[], checks=[])
    checks = report.checks
    checks.append(preflight._release_allowed(customer, release, current, force))
    services = {s.name: s for s in customer.services.all()}
    checks.append(_components(job, rows, to_versions, current, services, report.changes))
    copies: dict[str, str] = {}
    checks.append(_env(job, report.changes, rows, zips_dir, copies))
    checks.append(preflight._startable(report.changes, services, copies))
    checks.append(_disk(job, report.changes))
    if report.kind == Upgrade.Kind.INSTALL:
        checks.append(Check("health", True, "an install: nothing runs yet (every health URL must answer afterwards)"))
    else:
        checks.append(health_check(job))
    checks.append(preflight.exclusive_check(customer, job.ctx.run))
    checks.append(preflight._backup_possible(customer, report.kind))
    inside = [f"{name} ({path})" for name, path in (job.facts.get("sqlite") or {}).items()
              if any(path.startswith(ch.live.rstrip("/") + "/") for ch in report.changes)]
    if inside:  # as preflight._components: the switch would take the file away with the folder
        checks.append(Check("databases", False, f"the SQLite database(s) {', '.join(inside)} on {job.host} live "
                                                "inside a service folder, which an upgrade replaces; move them out "
                                                "of the folder first"))
    others = sorted({d.engine for d in customer.databases.all()} - {"postgresql", "mysql", "sqlite"})
    if others:
        checks.append(Check("databases", False, f"{', '.join(others)} databases of a customer on host {job.host}: "
                                                "a remote upgrade puts back PostgreSQL, MySQL/MariaDB and SQLite "
                                                "databases only"))
    return report


def health_check(job: RemoteJob) -> Check:
    from customers import runtime

    specs = job.specs()
    checked = [s.name for s in specs if s.health_url]
    if not checked:
        return Check("health", True, "no service has a health URL")
    down = [n for n in checked if n not in runtime.healthy_now(specs, checker=job.remote.check_health)]
    if down:
        return Check("health", False, f"not healthy now: {', '.join(down)} (an upgrade starts from a working "
                                      "customer, so that its health checks mean something)")
    return Check("health", True, f"healthy now: {', '.join(checked)}")


def _components(job: RemoteJob, rows, to_versions, current, services, changes: list[Change]) -> Check:
    root = job.root
    problems, planned = [], []
    for comp, version in to_versions.items():
        try:
            svc, live, dest = preflight.component_place(root, comp, version, services)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        planned.append((comp, version, svc, str(live), str(dest)))
    states = job.call("engines.hostupgrade.live_states", str(root), [p[3] for p in planned])
    for comp, version, svc, live, dest in planned:
        state = states.get(live) if isinstance(states, dict) else None
        if not isinstance(state, dict):
            problems.append(f"{comp}: {job.remote.where} answered no state for {live}: not trusted")
            continue
        if state.get("error"):
            problems.append(f"{comp}: {state['error']}")
            continue
        kind = state.get("kind")
        if kind not in ("link", "dir", "none"):
            problems.append(f"{comp}: {live} on {job.host} is neither a folder nor a link into "
                            f"{root / layout.RELEASES}")
        elif kind == "dir":
            moved = layout.release_dir(root, current.get(comp) or layout.UNVERSIONED, comp)
            if job.call("engines.beneath.lexists", str(root), str(moved)):
                problems.append(f"{comp}: the current folder cannot be kept as {moved}: that exists already")
        if kind == "link" and state.get("version") == version:
            problems.append(f"{comp}: {version} is live already although the customer records "
                            f"{current.get(comp) or 'no version'}")
        cv = rows[comp]
        changes.append(Change(component=comp, version=version, previous=current.get(comp, ""), service=svc.name,
                              live=live, dest=dest, root_folder=cv.root, hooks=dict(cv.hooks or {}),
                              unpacked_size=cv.unpacked_size))
    if problems:
        return Check("services", False, "; ".join(problems))
    return Check("services", True, ", ".join(f"{c.component} → {c.service}" for c in changes) or "nothing changes")


def _env(job: RemoteJob, changes: list[Change], rows, zips_dir: str, copies: dict[str, str]) -> Check:
    """As preflight._env, the live .env read on the host (the customer's user's own file only)."""
    problems, notes = [], []
    for ch in changes:
        cv = rows[ch.component]
        try:
            path = component_zip_copy(cv, zips_dir)
        except ReleaseStorageError as exc:
            problems.append(str(exc))
            continue
        copies[ch.component] = ch.zip = str(path)
        example = preflight.example_text(str(path), cv.root)
        try:
            live_text = job.call("engines.hostupgrade.read_env_text", str(job.root), ch.live, job.user) or ""
        except Exception as exc:  # noqa: BLE001 (RemoteError: not the user's own file, or the host)
            problems.append(f"{ch.component}: {exc}")
            continue
        merged = layout.merge_env(live_text, example)
        if merged.missing_required:
            problems.append(f"{ch.component}: {cv} requires {', '.join(merged.missing_required)} (empty in its "
                            f".env.example); set a value in {os.path.join(ch.live, '.env')} on {job.host} first")
        if merged.added:
            notes.append(f"{ch.component} adds {', '.join(merged.added)}")
    if problems:
        return Check("env", False, "; ".join(problems))
    return Check("env", True, "; ".join(notes) or "no new keys")


def _disk(job: RemoteJob, changes: list[Change]) -> Check:
    """Room on the host for the new release folders (the pre-upgrade backup goes to the storage target)."""
    need = sum(c.unpacked_size for c in changes) + settings.KASA_UPGRADE_DISK_MARGIN
    free = job.call("engines.hostrestore.free_bytes", str(job.root))
    if not isinstance(free, int):
        return Check("disk", False, f"{job.remote.where} answered no free disk size: not trusted")
    if free < need:
        return Check("disk", False, f"not enough free disk on {job.host} under {job.root}: {human_size(free)} free, "
                                    f"{human_size(need)} needed (release + margin)")
    return Check("disk", True, f"{job.host}:{job.root}: {human_size(free)} free, {human_size(need)} needed")
