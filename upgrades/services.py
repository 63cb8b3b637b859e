"""Service functions of upgrades: what the CLI and the admin call. Nothing else creates upgrade runs.

    upgrade_preflight(customer, release)            -> preflight.Report (nothing changes)
    upgrade_start(customer, release, …)              -> Run (kind "upgrade"; an install when no version is recorded)
    rollback_start(customer, …)                      -> Run (kind "rollback" of the last successful upgrade)
    upgrade_document(upgrade)                        -> dict (the CLI's JSON)
    quarantine_resolve(upgrade, …)                   -> an operator has dealt with a quarantine
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from audit.models import AuditEntry
from audit.services import audit_record
from core import permissions
from operations.models import Run
from operations.services import OperationRefused, run_start
from releases.models import Release

from . import preflight
from .models import Upgrade
from .selectors import bad_release, rollback_target, upgrade_document  # noqa: F401  (part of this API)


class UpgradeInputError(ValueError):
    """The request is refused before any run exists; the message says why and that nothing was touched."""


def upgrade_preflight(customer, release: Release, *, force: bool = False) -> preflight.Report:
    """Every preflight check, now, without changing anything (the upgrade repeats them as its first step)."""
    return preflight.check(customer, release, force=force)


def upgrade_start(customer, release: Release, *, requested_by=None, via: str = "admin", force: bool = False,
                  dry_run: bool = False, enqueue: bool = True, strategy: str = Upgrade.Strategy.IN_PLACE) -> Run:
    """Start an upgrade run (dry_run: its preflight only). Refused at once for a release that failed for this
    customer before, unless forced; every other check is the run's preflight step, recorded.

    The first upgrade of a customer without versions is an install: it needs upgrades.install_release instead of
    upgrades.upgrade_customer (core.permissions)."""
    permission = permissions.upgrade_permission(customer)
    permissions.require(requested_by, permission, customer)
    mark = bad_release(customer, release)
    if mark is not None and not force and not dry_run:
        raise UpgradeInputError(f"release {release.name} failed for {customer} before ({mark.reason}); force it to "
                                "try again; nothing was started")
    if strategy not in Upgrade.Strategy.values:
        raise UpgradeInputError(f"unknown strategy {strategy!r} (known: {', '.join(Upgrade.Strategy.values)})")
    versions = {k: v for k, v in (customer.versions or {}).items() if v}
    kind = Upgrade.Kind.UPGRADE if versions else Upgrade.Kind.INSTALL
    if kind == Upgrade.Kind.INSTALL:
        strategy = Upgrade.Strategy.IN_PLACE  # nothing live to keep answering
    params = {"release": release.name, "force": bool(force), "dry_run": bool(dry_run), "strategy": strategy}
    with transaction.atomic():
        try:
            run = run_start(customer, kind=Run.Kind.UPGRADE, requested_by=requested_by, via=via, params=params,
                            enqueue=enqueue, permission=permission)
        except OperationRefused as exc:
            raise UpgradeInputError(str(exc)) from None
        Upgrade.objects.create(customer=customer, run=run, kind=kind, to_release=release, force=bool(force),
                               dry_run=bool(dry_run), from_versions=versions, strategy=strategy)
    return run


def rollback_start(customer, *, requested_by=None, via: str = "admin", enqueue: bool = True,
                   switch_back: bool = False) -> Run:
    """Roll back the customer's last successful upgrade (refused when there is none to roll back).

    switch_back: go back to the previous release that a blue-green upgrade keeps running for its grace period
    (upgrades.standby): links and processes only, the databases and .env files as they are, no backup."""
    permissions.require(requested_by, permissions.ROLLBACK, customer)
    target = rollback_target(customer)
    if target is None:
        raise UpgradeInputError(f"{customer} has no successful upgrade to roll back (the last one may have been "
                                "rolled back already); nothing was started")
    if switch_back and not target.standby_live:
        raise UpgradeInputError(f"upgrade #{target.pk} of {customer} has no standby to switch back to (not a "
                                "blue-green upgrade, or its grace period has ended); a full rollback puts files "
                                "and databases back; nothing was started")
    with transaction.atomic():
        try:
            run = run_start(customer, kind=Run.Kind.ROLLBACK, requested_by=requested_by, via=via,
                            params={"upgrade": target.pk}, enqueue=enqueue)
        except OperationRefused as exc:
            raise UpgradeInputError(str(exc)) from None
        to = {c: target.from_versions.get(c, "") for c in target.to_versions}
        Upgrade.objects.create(customer=customer, run=run, kind=Upgrade.Kind.ROLLBACK, rolls_back=target,
                               from_versions=dict(customer.versions or {}), to_versions=to,
                               switch_back=bool(switch_back))
    return run


def quarantine_resolve(upgrade: Upgrade, *, actor=None, note: str, via: str = "admin") -> None:
    """An operator has checked a quarantined customer: upgrades are allowed again. Nothing else changes."""
    permissions.require(actor, permissions.RESOLVE, upgrade.customer)
    if upgrade.status != Upgrade.Status.QUARANTINED:
        raise UpgradeInputError(f"upgrade #{upgrade.pk} is {upgrade.status}, not quarantined")
    if not note.strip():
        raise UpgradeInputError("say what was done about the quarantine (it goes into the audit log)")
    Upgrade.objects.filter(pk=upgrade.pk).update(resolved_at=timezone.now(), resolved_by=actor, resolution=note)
    audit_record(action="upgrade.quarantine_resolved", source=via if via in AuditEntry.Source.values else "system",
                 actor=actor, obj=upgrade, customer=upgrade.customer, result=note[:300])
