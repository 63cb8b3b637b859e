"""Backups on targets with an object lock (S3 Object Lock): written once, read as written, kept by the lock.

The rules (docs/STORAGE.md, "How Kasa uses the lock"):
- every object of a backup on a locked target is written with the same retain-until (start + lock days) and its
  version id is recorded (Backup.versions / BackupCopy.versions); every read asks for exactly that version, so a
  version written over it later — by an attacker holding Kasa's keys — is never read in its place;
- a chain stays whole: a differential extends its full's retain-until to its own (extending is allowed in both
  lock modes), so the full unlocks no earlier than its newest differential;
- retention never fails on a lock: a backup it drops while locked becomes "expired, locked until …" and its
  objects are deleted by the first prune after that date; a delete the server refuses is reported as retained by
  the lock.
"""

from __future__ import annotations

from datetime import datetime

from django.utils import timezone

from engines.stores import StoreLocked
from engines.stores.s3lock import until_from_now

from .models import Backup, BackupCopy, StorageTarget


# --- reading what was written ------------------------------------------------------------------------------
def pin(store, *backups: Backup):
    """Make `store` (the backups' primary target) read the recorded versions of the backups and of their fulls.
    (Replicas are not read by restores; a catalogue rebuilt from one pins its first versions: backups.catalogue.)"""
    if not hasattr(store, "pins"):
        return store
    for bk in backups:
        for b in (bk, bk.base if bk.base_id else None):
            if b is not None:
                store.pins.update(b.versions or {})
    return store


def store_of(bk: Backup):
    """The backup's primary target, reading exactly the versions the backup wrote."""
    return pin(bk.target.store(), bk)


# --- writing -------------------------------------------------------------------------------------------------
def start_writing(target: StorageTarget, store, *, now: datetime | None = None) -> datetime | None:
    """On a locked target every object of this backup is written locked until the same moment; returns it."""
    if not target.immutable or not hasattr(store, "retain_until"):
        return None
    store.retain_until = until_from_now(target.lock_days, now)
    return store.retain_until


def record(obj: Backup | BackupCopy, target: StorageTarget, store) -> list[str]:
    """The versions and the lock of what `store` wrote for this backup (or copy); saved on the row."""
    fields = []
    written = dict(getattr(store, "written", {}) or {})
    if written:
        obj.versions = {**(obj.versions or {}), **written}
        fields.append("versions")
    if target.immutable and getattr(store, "retain_until", None):
        obj.lock_mode, obj.locked_until = target.lock_mode, store.retain_until
        fields += ["lock_mode", "locked_until"]
    if fields and obj.pk:
        obj.save(update_fields=fields)
    return fields


def extend_chain(ctx, bk: Backup, store, target: StorageTarget, copy_of_base: BackupCopy | None = None) -> None:
    """A differential's full stays locked at least as long as the differential (a lock on the newest link
    protects nothing while the link it needs can go). On a copy target pass the full's BackupCopy."""
    until = store.retain_until if target.immutable else None
    base = bk.base if bk.base_id else None
    if base is None or until is None:
        return
    holder = copy_of_base if copy_of_base is not None else base
    current = holder.locked_until
    if current and current >= until:
        return
    versions = holder.versions or {}
    if not versions:
        ctx.warning(f"full backup #{base.pk} on {target.name} was written without recorded versions (before the "
                    f"lock was set?): its lock cannot be extended to match differential #{bk.pk}")
        return
    try:
        for name, version in versions.items():
            store.extend_retention(name, version, until)
    except Exception as exc:  # the differential itself is good; its chain's lock is what falls short
        ctx.warning(f"could not extend the lock of full backup #{base.pk} on {target.name} to {until:%Y-%m-%d %H:%M} "
                    f"UTC: {exc}; a drill will report the chain")
        return
    type(holder).objects.filter(pk=holder.pk).update(locked_until=until)
    holder.locked_until = until
    ctx.info(f"full backup #{base.pk} on {target.name}: locked until {until:%Y-%m-%d %H:%M} UTC, as long as "
             f"differential #{bk.pk}")


# --- checking the lock (verify, drills) ----------------------------------------------------------------------
def lock_problems(bk: Backup) -> list[str]:
    """Each object of the backup on each locked target whose lock is missing, of another mode or shorter than
    recorded; and a chain whose full unlocks before this differential."""
    problems: list[str] = []
    places = [(bk.target, bk)] + [(c.target, c) for c in bk.copies.select_related("target").filter(status="succeeded")]
    for target, holder in places:
        if not holder.locked_until:
            continue
        store = target.store()
        for name, version in sorted((holder.versions or {}).items()):
            got = store.retention(name, version)
            short = name.rsplit("/", 1)[-1]
            if got is None:
                problems.append(f"{short} on {target.name}: no object lock (the catalogue promises "
                                f"{holder.lock_mode} until {holder.locked_until:%Y-%m-%d %H:%M} UTC)")
            elif got[1] < holder.locked_until.replace(microsecond=0):
                problems.append(f"{short} on {target.name}: locked only until {got[1]:%Y-%m-%d %H:%M} UTC, "
                                f"{holder.locked_until:%Y-%m-%d %H:%M} UTC was promised")
            elif holder.lock_mode and got[0].lower() != holder.lock_mode:
                problems.append(f"{short} on {target.name}: lock mode {got[0].lower()}, {holder.lock_mode} was "
                                "promised")
        if bk.base_id:
            base_holder = bk.base if holder is bk else bk.base.copies.filter(target=target).first()
            base_until = _base_until(store, base_holder)
            if base_until is not None and base_until < holder.locked_until.replace(microsecond=0):
                problems.append(f"chain: full backup #{bk.base_id} on {target.name} unlocks "
                                f"{base_until:%Y-%m-%d %H:%M} UTC, before this differential "
                                f"({holder.locked_until:%Y-%m-%d %H:%M} UTC)")
    return problems


def _base_until(store, base_holder) -> datetime | None:
    if base_holder is None or not (base_holder.versions or {}):
        return timezone.now() if base_holder is not None else None  # unlocked (or unknown) full: it unlocks now
    untils = []
    for name, version in base_holder.versions.items():
        got = store.retention(name, version)
        untils.append(got[1] if got else timezone.now())
    return min(untils)


# --- retention and deletion ----------------------------------------------------------------------------------
def locked_until(bk: Backup) -> datetime | None:
    """The latest lock still in force on any of the backup's copies, or None."""
    now = timezone.now()
    dates = [d for d in [bk.locked_until, *bk.copies.values_list("locked_until", flat=True)] if d and d > now]
    return max(dates) if dates else None


def delete_objects(bk: Backup, *, bypass_governance: bool = False, copies_only=None) -> tuple[int, datetime | None]:
    """Delete the backup's objects on every target (or only on the given BackupCopy rows: a failed copy's leftovers
    beside a good primary); (objects removed, the date a lock keeps the rest until)."""
    removed, kept_until = 0, None
    if copies_only is not None:
        places = [(c.target, c) for c in copies_only]
    else:
        places = [(bk.target, bk)] + [(c.target, c) for c in bk.copies.select_related("target")]
    for target, holder in places:
        if not bk.prefix:
            continue
        store = target.store()
        try:
            if bypass_governance and hasattr(store, "versioned"):
                removed += store.delete_prefix(bk.prefix, bypass_governance=True)
            else:
                removed += store.delete_prefix(bk.prefix)
            if holder.purge_after:
                type(holder).objects.filter(pk=holder.pk).update(purge_after=None)
        except StoreLocked as exc:
            until = exc.until or holder.locked_until
            kept_until = max([d for d in (kept_until, until) if d], default=None)
            type(holder).objects.filter(pk=holder.pk).update(purge_after=until)
    return removed, kept_until
