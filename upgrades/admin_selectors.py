"""Read-only documents the admin's upgrade pages render: the Versions card, the history, what an upgrade
or a rollback would change. Nothing here changes a customer; values of .env files are masked throughout."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from django.conf import settings

from engines import envfile, layout
from engines.humanize import human_duration

from . import preflight
from .models import Upgrade
from .selectors import releases_offered, rollback_target


def duration_seconds(upgrade: Upgrade) -> float | None:
    if upgrade.started_at and upgrade.finished_at:
        return (upgrade.finished_at - upgrade.started_at).total_seconds()
    return None


def versions_text(versions: dict | None) -> str:
    return ", ".join(f"{c} {v or 'nothing'}" for c, v in sorted((versions or {}).items())) or "—"


def versions_card(customer) -> dict:
    """What the customer page's Versions card shows: current versions, every release with whether it is
    allowed and why (a release that failed for this customer marked, allowed only when forced), the
    rollback on offer, an upgrade in progress and an unresolved quarantine."""
    current = {c: v for c, v in sorted((customer.versions or {}).items()) if v}
    offered = []
    for o in releases_offered(customer, include_bad=True):
        rel = o["release"]
        target = rel.versions()  # rows were prefetched by releases_for
        offered.append({
            "release": rel, "allowed": o["allowed"], "why": o["why"], "bad": o["bad"],
            "changes": [{"component": c, "from": current.get(c, ""), "to": v}
                        for c, v in sorted(target.items()) if current.get(c) != v],
            "is_current": bool(target) and all(current.get(c) == v for c, v in target.items()),
        })
    active = (Upgrade.objects.filter(customer=customer, status__in=(Upgrade.Status.PENDING, Upgrade.Status.RUNNING))
              .select_related("to_release").order_by("-created_at").first())
    rollback = rollback_target(customer)
    return {
        "current": current,
        "current_release": next((o["release"] for o in offered if o["is_current"]), None),
        "offered": offered,
        "any_allowed": any(o["allowed"] for o in offered),
        "rollback": rollback,
        "rollback_text": ", ".join(f"{c} {v} → {rollback.from_versions.get(c) or 'nothing'}"
                                   for c, v in sorted(rollback.to_versions.items())) if rollback else "",
        "active": active,
        "quarantined": list(Upgrade.objects.unresolved_quarantine().filter(customer=customer).order_by("-created_at")),
    }


def upgrade_history(customer, limit: int = 20) -> list[Upgrade]:
    """The customer's upgrades, installs and rollbacks (dry runs left out), newest first, with `duration`."""
    rows = list(Upgrade.objects.real().filter(customer=customer)
                .select_related("to_release", "backup", "rolls_back", "run__requested_by")
                .order_by("-created_at", "-id")[:limit])
    for up in rows:
        up.duration = duration_seconds(up)
        up.from_text, up.to_text = versions_text(up.from_versions), versions_text(up.to_versions)
    return rows


def upgrade_plan(customer, release, *, force: bool = False) -> dict:
    """The "Upgrade to…" page: every preflight check (as `upgrade_preflight` runs them), the release notes,
    and per component the .env the upgrade would leave, key by key against the live one, values masked.

    The zips are copied (sha256 checked) into a temporary folder for the .env.example files, then removed."""
    settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="upgrade-page-", dir=settings.KASA_SCRATCH_DIR)
    try:
        report = preflight.check(customer, release, force=force, zips_dir=tmp)
        env = [_env_plan(ch) for ch in report.changes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {r.component: r.component_version for r in release.rows.select_related("component_version")}
    notes = [{"component": ch.component, "version": ch.version, "notes": rows[ch.component].notes}
             for ch in report.changes if ch.component in rows and rows[ch.component].notes]
    return {"report": report, "checks": report.checks, "ok": report.ok, "env": env, "release_notes": release.notes,
            "component_notes": notes,
            "changes": [{"component": c.component, "from": c.previous, "to": c.version, "service": c.service}
                        for c in report.changes]}


def _env_plan(change: preflight.Change) -> dict:
    live_text, example = preflight.change_env_text(change)
    merged = layout.merge_env(live_text, example)
    old, new = envfile.parse(live_text or ""), envfile.parse(merged.text)
    return {
        "component": change.component,
        "file": str(Path(change.live) / ".env"),
        "exists": live_text is not None,
        "example": example is not None,
        # Unchanged keys too (masked): the operator sees the whole .env the new release starts with.
        "changes": envfile.diff(old, new, include_same=True),
        "added": list(merged.added),
        "kept": merged.removed,
        "missing_required": merged.missing_required,
    }


def rollback_plan(customer) -> dict | None:
    """The "Roll back" page: the upgrade it undoes, the versions before and after, the backup its databases
    come back from, and per component the .env that becomes live again (masked). None: nothing to roll back."""
    target = rollback_target(customer)
    if target is None:
        return None
    target = Upgrade.objects.select_related("to_release", "backup", "run").get(pk=target.pk)
    components = []
    # A remote customer's folders are on its host, never read on this machine: the rollback's preflight checks them
    # there (upgrades.remote_rollback), and its env step logs what becomes live again.
    remote = not customer.host.is_local
    for comp, info in sorted((target.layout or {}).items()):
        after_dir, before_dir = info.get("after_dir"), info.get("before_dir")
        now = envfile.read(Path(after_dir) / ".env") if after_dir and not remote else {}
        back = envfile.read(Path(before_dir) / ".env") if before_dir and not remote else {}
        components.append({
            "component": comp, "from": info.get("after_version", ""), "to": info.get("before_version") or "",
            "before_dir": before_dir or "",
            "before_exists": bool(before_dir) and (remote or Path(before_dir).is_dir()),
            "env": [c for c in envfile.diff(now, back)],
        })
    return {"target": target, "components": components, "databases": list(customer.databases.all()),
            "backup": target.backup, "duration": duration_seconds(target)}


def steps_document(upgrade: Upgrade) -> dict:
    """The step list as the upgrade page polls it while the run goes on."""
    steps = []
    for s in upgrade.steps.all():
        took = (s.finished_at - s.started_at).total_seconds() if s.finished_at else None
        steps.append({"position": s.position, "name": s.name, "status": s.status,
                      "status_label": s.get_status_display(), "started_at": s.started_at.isoformat(),
                      "finished_at": s.finished_at.isoformat() if s.finished_at else None,
                      "duration": took, "duration_text": human_duration(took) if took is not None else ""})
    return {"id": upgrade.pk, "status": upgrade.status, "status_label": upgrade.get_status_display(),
            "active": upgrade.is_active, "steps": steps}
