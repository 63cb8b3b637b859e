"""Read-only queries and documents of upgrades (nothing here writes)."""

from __future__ import annotations

from releases.models import Release
from releases.services import releases_for

from .models import BadRelease, Upgrade, UpgradeStep


def releases_offered(customer, *, include_bad: bool = False) -> list[dict]:
    """Releases newest first, as an upgrade page offers them: whether the customer may move there by
    `requires`, why, and whether the release failed for this customer before (then it is not allowed
    unless forced; left out altogether unless include_bad)."""
    bad = {b.release_id: b for b in BadRelease.objects.filter(customer=customer)}
    out = []
    for release, allowed, why in releases_for(customer.versions or {}):
        mark = bad.get(release.pk)
        if mark is not None and not include_bad:
            continue
        out.append({"release": release, "allowed": allowed and mark is None, "why": why,
                    "bad": mark.reason if mark else ""})
    return out


def bad_release(customer, release: Release) -> BadRelease | None:
    return BadRelease.objects.filter(customer=customer, release=release).first()


def last_succeeded(customer) -> Upgrade | None:
    """The customer's last upgrade, install or rollback that succeeded (dry runs do not count)."""
    return (Upgrade.objects.real().filter(customer=customer, status=Upgrade.Status.SUCCEEDED)
            .order_by("-finished_at", "-id").first())


def rollback_target(customer) -> Upgrade | None:
    """The upgrade a manual rollback undoes: the last successful one, unless a rollback came after it."""
    last = last_succeeded(customer)
    if last is None or last.kind == Upgrade.Kind.ROLLBACK:
        return None
    return last


def live_order(customer, component: str) -> list[str]:
    """Versions of `component` most recently live first, from the customer's successful upgrades."""
    order: list[str] = []
    current = (customer.versions or {}).get(component)
    if current:
        order.append(current)
    for up in Upgrade.objects.real().filter(customer=customer, status=Upgrade.Status.SUCCEEDED).order_by(
            "-finished_at", "-id"):
        for versions in (up.to_versions, up.from_versions):
            v = (versions or {}).get(component)
            if v and v not in order:
                order.append(v)
    return order


def protected_versions(customer, component: str) -> set[str]:
    """Release folders pruning must keep: the live one, the way back of the last upgrade, and every folder
    an unresolved quarantine may still need."""
    keep = set()
    current = (customer.versions or {}).get(component)
    if current:
        keep.add(current)
    target = rollback_target(customer)
    if target is not None:
        before = (target.layout.get(component) or {}).get("before_version")
        if before:
            keep.add(before)
    for up in Upgrade.objects.unresolved_quarantine().filter(customer=customer):
        for versions in (up.from_versions, up.to_versions):
            if (versions or {}).get(component):
                keep.add(versions[component])
    return keep


def step_document(step: UpgradeStep, *, detail: bool = False) -> dict:
    doc = {"name": step.name, "status": step.status, "started_at": step.started_at,
           "finished_at": step.finished_at}
    if detail:
        doc["detail"] = step.detail
    return doc


def upgrade_document(upgrade: Upgrade, *, detail: bool = False) -> dict:
    """An upgrade as the CLI prints it and an admin page shows it: {id, customer, status, from, to, steps…}."""
    return {
        "id": upgrade.pk,
        "kind": upgrade.kind,
        "customer": upgrade.customer.domain,
        "status": upgrade.status,
        "dry_run": upgrade.dry_run,
        "release": upgrade.to_release.name if upgrade.to_release_id else None,
        "from": upgrade.from_versions,
        "to": upgrade.to_versions,
        "run": upgrade.run_id,
        "backup": upgrade.backup_id,
        "rolls_back": upgrade.rolls_back_id,
        "force": upgrade.force,
        "error": upgrade.error,
        "env_diff": upgrade.env_diff,
        "preflight": upgrade.preflight,
        "created_at": upgrade.created_at,
        "started_at": upgrade.started_at,
        "finished_at": upgrade.finished_at,
        "resolved_at": upgrade.resolved_at,
        "steps": [step_document(s, detail=detail) for s in upgrade.steps.all()],
    }
