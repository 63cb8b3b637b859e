"""Service functions for backups: targets, policies, starting a backup.

Each one that acts for a user checks the team and the action's permission (core.permissions); requested_by /
actor None is the shell user (CLI, schedules, a run's own safety backup).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from audit.models import AuditEntry
from audit.services import audit_record
from core import permissions
from core.secrets import box
from customers import roots
from customers.models import Customer
from engines import dburl, paths
from engines.retention import Item, Policy, plan
from engines.stores import StoreError, StoreNotFound
from operations.models import Run
from operations.services import run_start

from . import artifacts as plans
from . import chains, counters, locks
from .models import Backup, BackupPolicy, StorageTarget
from .reading import select_artifacts
from .selectors import downloadable_names

DEFAULT_TARGET = "local"


class BackupInputError(ValueError):
    pass


def default_target() -> StorageTarget:
    target, _ = StorageTarget.objects.get_or_create(
        name=DEFAULT_TARGET, defaults={"kind": StorageTarget.Kind.LOCAL, "path": str(settings.KASA_BACKUP_DIR)}
    )
    return target


def global_policy() -> BackupPolicy:
    policy = BackupPolicy.objects.filter(customer__isnull=True).first()
    if policy is not None:
        return policy
    try:
        with transaction.atomic():
            return BackupPolicy.objects.create(customer=None, target=default_target())
    except IntegrityError:  # two runs made it at once (a rollout's parallel upgrades): the other one's stands
        return BackupPolicy.objects.get(customer__isnull=True)


def policy_for(customer) -> BackupPolicy:
    return BackupPolicy.objects.filter(customer=customer).first() or global_policy()


def backup_start(
    customer, *, scope: str | None = None, services: list[str] | tuple = (), compression: str | None = None,
    encrypt: bool | None = None, target: str | None = None, requested_by=None, via: str = "admin",
    trigger: str = Backup.Trigger.MANUAL, enqueue: bool = True, schedule_slot: str = "", kind: str = "auto",
) -> Run:
    """Validate the request against the customer's policy and start a backup run. `schedule_slot`: the due time of
    the schedule firing that asks (backups.tasks.scheduled_backup), kept in the run's params."""
    permissions.require(requested_by, permissions.BACKUP, customer)
    params = backup_params(customer, scope=scope, services=services, compression=compression, encrypt=encrypt,
                           target=target, trigger=trigger, kind=kind)
    if schedule_slot:
        params["schedule_slot"] = schedule_slot
    return run_start(customer, kind=Run.Kind.BACKUP, requested_by=requested_by, via=via, params=params,
                     enqueue=enqueue)


def backup_params(
    customer, *, scope: str | None = None, services: list[str] | tuple = (), compression: str | None = None,
    encrypt: bool | None = None, target: str | None = None, trigger: str = Backup.Trigger.MANUAL,
    kind: str = "auto",
) -> dict:
    """The parameters of one backup, from the request and the customer's policy (BackupInputError if invalid).

    Also used by restores and upgrades for the safety backup they take inside their own run.
    """
    policy = policy_for(customer)
    scope = scope or policy.scope
    if scope not in BackupPolicy.Scope.values:
        raise BackupInputError(f"unknown scope {scope!r}: use {', '.join(BackupPolicy.Scope.values)}")
    if kind not in ("auto", "full", "differential"):
        raise BackupInputError(f"unknown backup kind {kind!r}: use full or differential (or leave it to the policy)")
    compression = compression or policy.compression
    if compression not in BackupPolicy.Compression.values:
        raise BackupInputError(f"unknown compression {compression!r}: use zstd, gzip or none")
    known = set(customer.services.values_list("name", flat=True))
    unknown = [s for s in services if s not in known]
    if unknown:
        raise BackupInputError(f"{customer} has no service named {', '.join(unknown)} "
                               f"(services: {', '.join(sorted(known)) or 'none'})")
    if services and scope == BackupPolicy.Scope.DATABASE:
        raise BackupInputError("--service chooses service folders; it cannot be combined with scope 'database'")
    target_obj = StorageTarget.objects.filter(name=target).first() if target else policy.target
    if target_obj is None:
        raise BackupInputError(f"no storage target named {target!r}")
    if not target_obj.enabled:
        raise BackupInputError(f"storage target {target_obj.name!r} is disabled")
    replicas = [] if target else list(policy.replicas.all())
    for t in [target_obj, *replicas]:  # a team's backups go only where the team may put them
        if not t.usable_by(customer.team_id):
            raise BackupInputError(f"storage target {t.name!r} is not open to team {customer.team}: backups of "
                                   f"{customer} may not go there")
    encrypt = policy.encrypt if encrypt is None else encrypt
    if encrypt and not settings.KASA_BACKUP_KEYS:
        raise BackupInputError("backups are encrypted by default but KASA_BACKUP_KEYS is not set "
                               "(or pass --no-encrypt deliberately)")
    params = {
        "scope": scope, "services": list(services), "compression": compression, "encrypt": encrypt,
        "target": target_obj.name, "trigger": trigger,
        "replicas": [t.name for t in replicas],
        "kind": kind, "full_every_days": policy.full_every_days,
        "include_logs": policy.include_logs, "excludes": list(policy.excludes or []),
        "config_paths": list(policy.config_paths or []),
        "bandwidth_limit_mbps": policy.bandwidth_limit_mbps,
    }
    return params


def backup_document(backup: Backup, *, stores: dict | None = None) -> dict:
    """A backup as the CLI shows it. `stores` caches one store per target when listing many."""
    store_location = ""
    if backup.prefix:
        try:
            cache = stores if stores is not None else {}
            if backup.target_id not in cache:
                cache[backup.target_id] = backup.target.store()  # an S3 store builds a boto3 client: once per target
            store_location = cache[backup.target_id].location(backup.prefix)
        except Exception:  # an unreachable target must not break listing
            store_location = f"{backup.target.name}:{backup.prefix}"
    return {
        "id": backup.pk,
        "customer": backup.customer.domain,
        "status": backup.status,
        "scope": backup.scope,
        "kind": backup.kind,
        "base": ({"id": backup.base_id, "prefix": backup.base.prefix} if backup.base_id else None),
        "services": backup.services,
        "size": backup.size,
        "encrypted": backup.encrypted,
        "compression": backup.compression,
        "target": backup.target.name,
        "trigger": backup.trigger,
        "pinned": backup.pinned,
        "started_at": backup.started_at,
        "finished_at": backup.finished_at,
        "duration": backup.duration,
        "location": store_location,
        "lock": ({"mode": backup.lock_mode, "until": backup.locked_until} if backup.locked_until else None),
        "copies": [{"target": c.target.name, "status": c.status,
                    "lock": {"mode": c.lock_mode, "until": c.locked_until} if c.locked_until else None}
                   for c in backup.copies.all()],
        "error": backup.error,
        "artifacts": [{"name": a.name, "kind": a.kind, "size": a.size, "sha256": a.sha256,
                       **({"files": (a.details or {}).get("files") or []} if a.kind == "config" else {}),
                       **{k: a.details[k] for k in ("index", "changes") if (a.details or {}).get(k)}}
                      for a in backup.artifacts.all()],
    }


def backup_pin(backup: Backup, *, pinned: bool, reason: str = "", actor=None, via: str = "admin") -> None:
    permissions.require(actor, permissions.PIN, backup.customer)
    Backup.objects.filter(pk=backup.pk).update(pinned=pinned, pin_reason=reason if pinned else "")
    audit_record(action="backup.pin" if pinned else "backup.unpin", source=via, actor=actor, obj=backup,
                 customer=backup.customer, result=reason or "ok")


BYPASS_CONFIRMATION = "bypass the lock of backup #{pk}"


def backup_delete(backup: Backup, *, actor=None, via: str = "admin", bypass_governance: bool = False,
                  confirmation: str = "") -> int:
    """Delete a backup's objects from every target; the catalogue row stays, marked deleted.

    A backup under an object lock is refused, saying until when (retention deletes it after that date). Only a
    superuser may bypass a *governance* lock, by typing the confirmation BYPASS_CONFIRMATION; it is audited.
    A compliance lock cannot be bypassed by anyone."""
    permissions.require(actor, permissions.DELETE, backup.customer)
    if backup.pinned:
        raise BackupInputError(f"backup #{backup.pk} is pinned ({backup.pin_reason or 'by hand'}); unpin it first")
    if needed_by := chains.dependents(backup):
        raise BackupInputError(f"backup #{backup.pk} is the full backup that differential(s) "
                               f"{', '.join(f'#{i}' for i in needed_by)} apply on; delete those first")
    until = locks.locked_until(backup)
    if until and bypass_governance:
        permissions.require_superuser(actor, "bypass an object lock")
        modes = {backup.lock_mode} | set(backup.copies.exclude(lock_mode="").values_list("lock_mode", flat=True))
        if "compliance" in modes:
            raise BackupInputError(f"backup #{backup.pk} is under a compliance lock until {until:%Y-%m-%d %H:%M} UTC: "
                                   "nobody can delete it before then, superusers included")
        expected = BYPASS_CONFIRMATION.format(pk=backup.pk)
        if confirmation.strip() != expected:
            raise BackupInputError(f"to bypass the governance lock, type exactly: {expected}")
    elif until:
        raise BackupInputError(f"backup #{backup.pk} is locked until {until:%Y-%m-%d %H:%M} UTC "
                               f"({_lock_places(backup)}): it cannot be deleted before then; retention deletes it "
                               "after that date")
    removed, kept = locks.delete_objects(backup, bypass_governance=bypass_governance and bool(until))
    status = Backup.Status.EXPIRED if kept else Backup.Status.DELETED
    Backup.objects.filter(pk=backup.pk).update(status=status, purge_after=kept)
    action = "backup.delete_bypass_lock" if bypass_governance and until else "backup.delete"
    result = f"{removed} object(s) removed"
    if kept:
        result += f"; the rest is retained by the object lock until {kept:%Y-%m-%d %H:%M} UTC"
    audit_record(action=action, source=via, actor=actor, obj=backup, customer=backup.customer, result=result)
    return removed


def _lock_places(backup: Backup) -> str:
    places = [f"{backup.target.name}: {backup.lock_mode}"] if backup.locked_until else []
    places += [f"{c.target.name}: {c.lock_mode}" for c in backup.copies.select_related("target")
               if c.locked_until and c.locked_until > timezone.now()]
    return ", ".join(places) or "object lock"


class DownloadMissing(LookupError):
    """No such object to download (not in the catalogue, or gone from the target): a 404."""


@dataclass
class Download:
    name: str
    url: str | None  # a short-lived presigned link, where the target makes one (S3)
    stream: object | None  # else an open binary file to stream through Kasa
    size: int | None


def backup_download(backup: Backup, name: str, *, requested_by=None, via: str = "admin",
                    link_seconds: int = 15 * 60) -> Download:
    """One artifact (or backup.json) of a succeeded backup, for download; audited. Only names from the catalogue:
    anything else (a traversal, another key on the target) is DownloadMissing, and the storage is never asked."""

    permissions.require(requested_by, permissions.DOWNLOAD, backup.customer)
    if name not in downloadable_names(backup):
        raise DownloadMissing("no such artifact in this backup")
    key = f"{backup.prefix}/{name}"
    artifact = backup.artifacts.filter(name=name).first()
    try:
        store = locks.store_of(backup)
        url = store.download_url(key, link_seconds)
        stream = None if url else store.open_read(key)
    except StoreNotFound:
        raise DownloadMissing(f"{name} is missing on target {backup.target.name}") from None
    except StoreError as exc:
        raise BackupInputError(f"download of {name} failed: {exc}") from None
    size = None
    if stream is not None:
        size = artifact.size if artifact is not None else _size_or_none(store, key)
    audit_record(action="backup.download", source=_source(via), actor=requested_by, obj=backup,
                 customer=backup.customer, changes={"artifact": name, "how": "presigned link" if url else "stream"},
                 result="ok")
    return Download(name=name, url=url, stream=stream, size=size)


def _size_or_none(store, key: str) -> int | None:

    try:
        return store.size(key)
    except StoreError:
        return None


def _source(via: str) -> str:
    return via if via in AuditEntry.Source.values else AuditEntry.Source.SYSTEM


def target_check(target: StorageTarget, *, actor=None) -> str:
    """Write, read back and delete a probe. Targets serve the whole fleet: superusers only."""

    permissions.require_superuser(actor, "check a storage target")
    try:
        detail = target.store().check()
    except StoreError as exc:
        counters.checked(target, False)
        counters.error(target)
        raise BackupInputError(f"target {target.name}: {exc}") from None
    counters.checked(target, True)
    return detail


def retention_policy(policy: BackupPolicy):

    return Policy(keep_last=policy.keep_last, keep_daily=policy.keep_daily, keep_weekly=policy.keep_weekly,
                  keep_monthly=policy.keep_monthly, max_age_days=policy.max_age_days,
                  keep_verified=policy.keep_verified, keep_restored_days=settings.KASA_KEEP_RESTORED_DAYS)


SAFETY_TRIGGERS = (Backup.Trigger.UPGRADE, Backup.Trigger.RESTORE)


def restored_from(customer, since) -> dict[int, object]:
    """Backup id -> when a restore (any outcome, in place or a copy) last started from it, since `since`."""
    last: dict[int, object] = {}
    for params, started in (Run.objects.filter(customer=customer, kind=Run.Kind.RESTORE, started_at__gte=since)
                            .order_by("started_at").values_list("params", "started_at")):
        if isinstance(params, dict) and isinstance(params.get("backup"), int):
            last[params["backup"]] = started
    return last


def prune_customer(customer, *, dry_run: bool = False, actor=None, via: str = "cli"):
    """Apply the customer's retention policy; returns the engine's Plan (keep reasons, ids deleted)."""
    now = timezone.now()
    policy = retention_policy(policy_for(customer))
    restored = restored_from(customer, now - timedelta(days=policy.keep_restored_days))
    finished = Backup.objects.filter(customer=customer, finished_at__isnull=False,
                                     status__in=[Backup.Status.SUCCEEDED, Backup.Status.FAILED])
    items = [Item(id=b.pk, finished_at=b.finished_at, succeeded=b.status == Backup.Status.SUCCEEDED,
                  pinned=b.pinned, verified=b.verified_at is not None, safety=b.trigger in SAFETY_TRIGGERS,
                  restored_at=restored.get(b.pk), base_id=b.base_id) for b in finished]
    result = plan(items, policy, now)
    # A differential still being written names its full already: that full stays (engines.retention sees only
    # finished backups).
    for bk_id, base_id in Backup.objects.filter(customer=customer, status=Backup.Status.RUNNING,
                                                base__isnull=False).values_list("pk", "base_id"):
        if base_id in result.delete:
            result.delete.remove(base_id)
            result.keep.setdefault(base_id, []).append(f"the full backup that running backup #{bk_id} builds on")
    if not dry_run:
        for bk in Backup.objects.filter(pk__in=result.delete).select_related("target", "customer"):
            if until := locks.locked_until(bk):
                _expire(bk, until, actor=actor, via=via)
                result.locked[bk.pk] = until
            else:
                backup_delete(bk, actor=actor, via=via)
        result.purged = purge_unlocked(customer, actor=actor, via=via)
    return result


def _expire(bk: Backup, until, *, actor, via: str) -> None:
    """Retention dropped it, a lock keeps it: not restorable any more, deleted by the first prune after `until`."""
    Backup.objects.filter(pk=bk.pk).update(status=Backup.Status.EXPIRED, purge_after=until,
                                           error=f"expired by retention, locked until {until:%Y-%m-%d %H:%M} UTC")
    audit_record(action="backup.expire", source=_source(via), actor=actor, obj=bk, customer=bk.customer,
                 result=f"retained by the object lock until {until:%Y-%m-%d %H:%M} UTC")


def purge_unlocked(customer, *, actor=None, via: str = "cli") -> list[int]:
    """Objects left under a lock (expired backups, a failed backup's partial objects) whose lock has ended: delete
    them now. Returns the backups whose objects are all gone."""
    done = []
    now = timezone.now()
    due = (Backup.objects.filter(Q(purge_after__lte=now) | Q(copies__purge_after__lte=now), customer=customer)
           .distinct().select_related("target", "customer"))
    for bk in due:
        if bk.purge_after and bk.purge_after <= now:  # the backup itself is gone (expired, failed): every place
            removed, kept = locks.delete_objects(bk)
        else:  # a failed copy's leftovers beside a good primary: only those
            removed, kept = locks.delete_objects(bk, copies_only=list(
                bk.copies.select_related("target").filter(purge_after__lte=now)))
            if not kept:
                audit_record(action="backup.purge", source=_source(via), actor=actor, obj=bk, customer=bk.customer,
                             result=f"{removed} object(s) of failed copies removed after the lock ended")
            continue
        fields = {"purge_after": kept}
        if not kept and bk.status == Backup.Status.EXPIRED:
            fields["status"] = Backup.Status.DELETED
        Backup.objects.filter(pk=bk.pk).update(**fields)
        if not kept:
            done.append(bk.pk)
        audit_record(action="backup.purge", source=_source(via), actor=actor, obj=bk, customer=bk.customer,
                     result=f"{removed} object(s) removed after the lock ended"
                            + (f"; still locked until {kept:%Y-%m-%d %H:%M} UTC" if kept else ""))
    return done


# --- restore and verification ---------------------------------------------------------
def restore_start(
    backup: Backup, *, only: list[str] | tuple = (), to_root: str | None = None,
    to_databases: dict[str, str] | None = None, rewrite_env: bool = False, confirmed: bool = False,
    safety_backup: bool = True, requested_by=None, via: str = "admin", enqueue: bool = True,
) -> Run:
    """Check a restore request completely, then start it. Nothing is touched before the run verifies."""



    customer = backup.customer
    permissions.require(requested_by, permissions.RESTORE, customer)
    if not confirmed:
        raise BackupInputError(f"a restore replaces what {customer.domain} has now: confirm it (admin: type the "
                               "domain; CLI: --yes)")
    if not backup.restorable:
        raise BackupInputError(f"backup #{backup.pk} is {backup.status}: only a succeeded backup can be restored")
    if backup.encrypted and not settings.KASA_BACKUP_KEYS:
        raise BackupInputError(f"backup #{backup.pk} is encrypted and KASA_BACKUP_KEYS is not set")
    try:
        arts = select_artifacts(backup, list(only))
    except Exception as exc:  # OperationError from the shared selector: same words here
        raise BackupInputError(str(exc)) from None
    for art in arts:  # the backup run warned: refuse now rather than after the safety backup and the staging
        if why := plans.restore_refusal(art.details):
            raise BackupInputError(
                f"backup #{backup.pk} cannot be restored as it is: {art.name} holds {why}, which a restore refuses. "
                "Restore the other artifacts without it (untick it on the Restore page, or name the others with "
                "--only), and exclude them in the backup policy")
    remote = not customer.host.is_local
    if remote and rewrite_env and (to_root or to_databases):
        raise BackupInputError(f"--rewrite-env: {customer} lives on host {customer.host.name}, where a copy's .env "
                               "files are not rewritten yet; restore the copy without it and edit them there")
    if to_root and remote:  # a copy on the customer's host: by name here, links resolved there (backups.remote_copy)
        from .copy_roots import to_root_problem

        to_root, problem = to_root_problem(customer, to_root)
        if problem:
            raise BackupInputError(problem)
    elif to_root:
        try:
            target_root = paths.resolve_strictly_inside(to_root, settings.KASA_CUSTOMERS_ROOT, what="--to-root")
        except paths.PathEscapeError as exc:
            raise BackupInputError(f"{exc} (KASA_CUSTOMERS_ROOT)") from None
        live = customer.root_path()
        if target_root == live or live in target_root.parents or target_root in live.parents:
            raise BackupInputError(f"--to-root {target_root} overlaps the customer's live root {live}: a copy goes "
                                   "somewhere else (or restore in place without --to-root)")
        # Nor any other customer's root (a copy would write into another team's folder) nor Kasa's files.
        if problem := roots.copy_root_problem(str(target_root), Customer.objects.values_list("root", flat=True)):
            raise BackupInputError(problem)
        if target_root.exists() and any(target_root.iterdir()):
            raise BackupInputError(f"--to-root {target_root} is not empty: a copy is only made into an empty folder")
        to_root = str(target_root)
    sealed = {}
    shown = {}
    databases = {a.source: a for a in arts if a.kind == "database"}
    for name, url in (to_databases or {}).items():
        if name not in databases:
            raise BackupInputError(f"--to-database {name}=…: backup #{backup.pk} holds no chosen database named "
                                   f"{name!r} (it has: {', '.join(sorted(databases)) or 'none'})")
        try:
            parsed = dburl.parse(url)
        except dburl.DatabaseURLError as exc:
            raise BackupInputError(f"--to-database {name}: {exc}") from None
        engine = (databases[name].details or {}).get("engine")
        if engine and parsed.engine != engine:
            raise BackupInputError(f"--to-database {name}: the dump is {engine}, the URL is {parsed.engine}")
        if remote and parsed.engine != "postgresql":
            raise BackupInputError(f"--to-database {name}: {customer} lives on host {customer.host.name}, where a "
                                   "copy's database is a PostgreSQL one (a SQLite file goes inside the --to-root "
                                   "copy by itself)")
        if parsed.engine == "sqlite":
            try:
                paths.resolve_strictly_inside(parsed.path, settings.KASA_CUSTOMERS_ROOT, what="SQLite path")
            except paths.PathEscapeError as exc:
                raise BackupInputError(f"--to-database {name}: {exc} (KASA_CUSTOMERS_ROOT)") from None
            if Path(parsed.path).exists():
                raise BackupInputError(f"--to-database {name}: {parsed.path} exists; a copy never overwrites")
            if problem := _copy_sqlite_problem(parsed.path, customer, to_root):
                raise BackupInputError(f"--to-database {name}: {problem}")
        sealed[name] = box().encrypt(url)  # run params are shown in the admin: the URL's password stays sealed
        shown[name] = parsed.display()
    params = {"backup": backup.pk, "only": list(only), "to_root": to_root, "to_databases": sealed,
              "to_databases_shown": shown, "rewrite_env": bool(rewrite_env), "safety_backup": bool(safety_backup)}
    return run_start(customer, kind=Run.Kind.RESTORE, requested_by=requested_by, via=via, params=params,
                     enqueue=enqueue)


def _copy_sqlite_problem(path: str, customer, to_root: str | None) -> str | None:
    """A copy's SQLite file lives inside the copy's own folder (--to-root); without one, in no other customer's
    root and none of Kasa's files."""

    if to_root:
        try:
            paths.resolve_strictly_inside(path, to_root, what="SQLite path")
        except paths.PathEscapeError as exc:
            return f"{exc}: a copy's SQLite file goes inside its --to-root"
        return None
    if problem := roots.kasa_conflict(path, what="SQLite path"):
        return problem
    for other in Customer.objects.exclude(pk=customer.pk).values_list("root", flat=True):
        if roots.overlap(roots.real(path), roots.real(other)):
            return f"SQLite path {path} lies inside another customer's root folder"
    return None


def verify_start(backup: Backup, *, requested_by=None, via: str = "admin", enqueue: bool = True) -> Run:
    permissions.require(requested_by, permissions.VERIFY, backup.customer)
    if not backup.restorable:
        raise BackupInputError(f"backup #{backup.pk} is {backup.status}: only a succeeded backup can be verified")
    if backup.encrypted and not settings.KASA_BACKUP_KEYS:
        raise BackupInputError(f"backup #{backup.pk} is encrypted and KASA_BACKUP_KEYS is not set")
    return run_start(backup.customer, kind=Run.Kind.VERIFY, requested_by=requested_by, via=via,
                     params={"backup": backup.pk}, enqueue=enqueue)
