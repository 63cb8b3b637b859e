"""The restore operation: put a backup back, in place or into a copy elsewhere.

In place, the order is what keeps the customer safe:

1. stage, which is also the verification: every chosen artifact is read to
   the end (checksum, decryption), archives are checked member by member as
   they unpack into a folder beside the live one, dumps load into fresh
   databases whose row counts must match the manifest. Two lanes at once; the
   live customer keeps running untouched, and a bad backup is refused here;
2. take a pinned safety backup of the current state (after step 3's stop when a database is restored in
   place: backups.dbswap);
3. stop the services, swap the staged folders and databases in, start the
   services, check their health;
4. only then throw the previous folders and databases away.

(The issue lists "verify, safety backup, stop, unpack, swap"; unpacking and
loading the databases before stopping does the same checks with the services
still up, so the downtime is only the swaps and the restart.)

The files' side — the staging folder, the swaps, the log folders carried over —
is backups.restore_files: below the root only through descriptors that follow
no link the customer's user could have made (engines.beneath).

Every change is journalled (a local file, then the run's `result`) before it
happens. Any failure — or a worker killed mid-way (see `abandon`) — undoes the
journal in reverse, so the customer ends exactly as it was, and the run says so
(even when the control database stops answering: operations.context).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import connection

from core.secrets import box
from customers import runtime
from customers.models import Customer
from engines import dburl, runas, unpack
from engines.humanize import human_duration, human_size, human_time
from operations import slots
from operations.context import OperationError, RunCancelled, RunContext, RunLost
from operations.journal import RunJournal
from operations.models import Run

from . import chains, counters, dbswap, envfiles, restore_files
from .models import Backup, BackupArtifact
from .operations import discard, make_backup
from .reading import (
    Stopped,
    absent_services,
    artifact_kwargs,
    keyring_for,
    progress,
    refuse_unreadable,
    select_artifacts,
    store_of,
)
from .services import BackupInputError, backup_params

# Room we want left on the disk after staging: a restore must not fill the disk the customer runs on.
DISK_MARGIN = 256 * 1024 * 1024


@dataclass
class Plan:
    backup: Backup
    customer: Customer
    artifacts: list[BackupArtifact]
    root: Path  # where files land: the customer's root, or the clone's root
    clone: bool
    to_databases: dict[str, str] = field(default_factory=dict)  # database name -> URL (clone)
    owner: runas.Identity | None = None  # who restored files belong to (None: the worker's own, development)
    # Service folders the backup records as absent (reading.absent_services): in place, removed again.
    absent: list[dict] = field(default_factory=list)


class Journal(RunJournal):
    """What was changed, stored on the run before each change so a dead worker can be undone."""

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.services_down = ""  # set by _undo when the previous state is back but a service did not come up

    def touched_live(self) -> bool:
        """Whether anything beyond staging happened (services stopped, a swap)."""
        return any(s["type"] in ("services_stopped", "files", "carry", "removed", "db_swap", "redis_swap")
                   for s in self.steps)


def restore(ctx: RunContext) -> dict:
    p = ctx.run.params
    started = time.monotonic()
    plan = _plan(ctx, p)  # then the credentials an undo needs, held in memory: it goes on without the database
    if p.get("to_host"):  # a move: the backup restored on another host, then the customer switched (backups.move)
        from . import move, move_local

        moving = move_local.move_here if move_local.onto_local(p["to_host"]) else move.move
        return _read_all(plan, moving(ctx, plan, _remote_steps()))
    if not plan.customer.host.is_local:  # on another host: every change made there (backups.remote_restore)
        from . import remote_restore

        if plan.clone:  # a copy beside the customer on its host (backups.remote_copy)
            from . import remote_copy

            return _read_all(plan, remote_copy.restore_copy(ctx, plan, _remote_steps()))
        return _read_all(plan, remote_restore.restore(ctx, plan, _remote_steps()))
    dbswap.hold_targets(ctx, plan.customer, plan.to_databases, plan.root if plan.clone and p.get("to_root") else None)
    # Restored files belong to the customer's user, and its services are stopped and started as that user:
    # refused now, before anything is touched, if it cannot be (a copy elsewhere starts nothing).
    if plan.clone:
        plan.owner = runtime.run_identity(plan.customer, needed=False)
    else:
        plan.owner = runtime.check_run_as(ctx, plan.customer)
    keyring = keyring_for(plan.backup)
    store = store_of(plan.backup)
    restore_files.sweep_trash(plan.root)
    _check_disk(plan)
    journal = Journal(ctx)
    safety = None
    wants_safety = not plan.clone and p.get("safety_backup", True)
    ctx.phases(*_phases(plan.clone, wants_safety, late=False))
    try:
        # Staging is the verification: every artifact is read to the end, checksummed, authenticated and
        # (archives) checked member by member, or (databases) restored into a fresh database and its rows
        # counted — all beside the live customer, which keeps running untouched.
        staging = _stage(ctx, plan, store, keyring, journal)
        # A database restored in place keeps no copy aside: its way back is a backup taken once the services
        # are stopped (nothing written before the stop is lost), so the safety backup waits until then.
        late = not plan.clone and dbswap.in_place(journal)
        if late:
            ctx.phases(*_phases(plan.clone, wants_safety, late=True))
        if not plan.clone and p.get("safety_backup", True) and not late:
            safety = _safety_backup(ctx, plan)
        if plan.clone:
            _clone_in(ctx, plan, staging, journal)
        else:
            safety = _swap_in(ctx, plan, staging, journal, in_place=late) or safety
    except BaseException as exc:
        counters.error(plan.backup.target, exc)  # only when a StoreError ended it
        touched = journal.touched_live()  # before the undo empties the journal
        undone = _undo(ctx, journal, plan)
        if isinstance(exc, (RunLost, RunCancelled)):
            raise
        what = ("the copy was removed" if plan.clone else
                "the pre-restore state was put back" if touched else "nothing was touched")
        if journal.services_down:
            what += f", but the services did not come back up ({journal.services_down}): an operator must look"
        if not undone:
            raise OperationError(f"restore failed: {exc}; ROLLBACK INCOMPLETE, an operator must look at "
                                 f"{plan.root}: nothing further was deleted") from None
        raise OperationError(f"restore failed: {_short(exc)}; {what}", result={"safety_backup": safety}) from None
    with ctx.uninterruptible():  # the restore holds: its bookkeeping runs to its end, control database or not
        _cleanup(ctx, journal, plan.root)
        if not plan.clone:
            _record_versions(ctx, plan)
    _read_all(plan, None)
    seconds = time.monotonic() - started
    ctx.info(f"restore of backup #{plan.backup.pk} complete in {human_duration(seconds)}"
             + ("" if plan.clone else f" (safety backup #{safety})" if safety else ""))
    return {"backup": plan.backup.pk, "customer": plan.customer.domain, "clone": plan.clone,
            "root": str(plan.root), "artifacts": [a.name for a in plan.artifacts], "safety_backup": safety,
            "databases": plan.to_databases and {k: _display(v) for k, v in plan.to_databases.items()},
            "seconds": round(seconds, 2)}


def _read_all(plan: Plan, result):
    """A restore that succeeded read every chosen artifact to its end: kasa_storage_read_bytes_total (their stored
    sizes; a differential's base is not counted)."""
    counters.read(plan.backup.target, sum(a.size for a in plan.artifacts))
    return result


def _remote_steps():
    from . import remote_restore

    return remote_restore.Steps(journal=Journal, phases=_phases, safety_backup=_safety_backup, short=_short,
                                record_versions=_record_versions, touched_specs=touched_specs, stage=_stage,
                                restore_file_databases=_restore_file_databases, check_disk=_check_disk,
                                cleanup=_cleanup)


# Named phases of a restore (RunContext.phases), weighted by their usual share of the time. A database restored
# in place takes its safety backup once the services are stopped (late).
def _phases(clone: bool, safety: bool, *, late: bool) -> list[tuple[str, float]]:
    if clone:
        return [("verify and unpack", 6), ("copy in", 1)]
    way_back = [("safety backup", 3)] if safety else []
    stop = [("stop", 1)]
    return [("verify and unpack", 6), *(stop + way_back if late else way_back + stop), ("swap", 1), ("start", 1),
            ("health", 1)]


# --- 1. plan and verify -------------------------------------------------------------
def _plan(ctx: RunContext, p: dict) -> Plan:
    bk = Backup.objects.select_related("customer", "target").get(pk=p["backup"])
    if not bk.restorable:
        raise OperationError(f"backup #{bk.pk} is {bk.status}: only a succeeded backup can be restored")
    customer = Customer.objects.select_related("host").prefetch_related("services", "databases").get(
        pk=bk.customer_id)
    arts = select_artifacts(bk, p.get("only") or [])
    refuse_unreadable(arts, "restored")
    to_root = p.get("to_root")
    to_dbs = {name: box().decrypt(token).reveal() for name, token in (p.get("to_databases") or {}).items()}
    for url in to_dbs.values():
        ctx.add_secret(dburl.parse(url).password)
    clone = bool(to_root or to_dbs)
    if clone:
        root = Path(to_root) if to_root else None

        def needs_url(a: BackupArtifact) -> bool:  # a copy's SQLite file simply lives inside its root
            sqlite_in_copy = to_root and (a.details or {}).get("engine") == "sqlite"
            return a.kind == "database" and a.source not in to_dbs and not sqlite_in_copy

        if any(needs_url(a) for a in arts):
            if to_root and not p.get("only"):  # a copy of the files only: the other databases stay out of it
                arts = [a for a in arts if not needs_url(a)]
            else:
                missing = sorted(a.source for a in arts if needs_url(a))
                raise OperationError(f"a copy elsewhere never touches the live databases: give --to-database "
                                     f"for {', '.join(missing)}")
        if root is None:
            arts = [a for a in arts if a.kind == "database"]
            root = customer.root_path() if customer.host.is_local else Path(customer.root)
    else:  # a remote customer's root is the host's: checked there (backups.remote_restore)
        root = customer.root_path() if customer.host.is_local else Path(customer.root)
    absent = absent_services(bk, p.get("only") or [])
    if absent and (clone or p.get("to_host")):  # a copy or a move starts from an empty place: nothing to remove
        ctx.info(f"absent when backup #{bk.pk} was taken, so not in the {'copy' if clone else 'new place'} either: "
                 + ", ".join(f"{e['source']} ({e['path']})" for e in absent))
        absent = []
    elif absent and not customer.host.is_local:
        raise OperationError(f"backup #{bk.pk} records the folders of {', '.join(e['source'] for e in absent)} as "
                             f"absent, and removing them on host {customer.host.name} is not built yet: restore the "
                             "other artifacts with --only, and remove those folders by hand; nothing was touched")
    if not arts and not absent:
        raise OperationError("nothing to restore: no artifact of the backup matches the selection")
    ctx.info(f"restoring backup #{bk.pk} of {customer.domain} ({human_time(bk.finished_at)}) "
             + (f"into a copy at {root}" if clone and p.get("to_root") else f"onto host {p['to_host']}"
                if p.get("to_host") else "in place" if not clone else "")
             + f": {', '.join(a.name for a in arts) or 'no artifact'}"
             + (f"; absent when it was taken, so removed again: {', '.join(e['path'] for e in absent)}"
                if absent else ""))
    return Plan(bk, customer, arts, Path(root), clone, to_dbs, absent=absent)


def _verify_one(ctx: RunContext, plan: Plan, store, keyring, art: BackupArtifact) -> None:
    """Read one artifact end to end (checksum, decryption, every tar member) without unpacking it."""
    bk = plan.backup
    try:
        listing = unpack.verify_artifact(store, f"{bk.prefix}/{art.name}", tar=art.kind != "database",
                                         on_progress=progress(ctx, f"verifying {art.name}"),
                                         **artifact_kwargs(bk, art, keyring))
    except unpack.ArtifactError as exc:
        raise OperationError(f"refused: {exc}") from None
    if listing is not None:
        ctx.info(f"{art.name}: checksum, decryption and {listing.members} members verified "
                 f"({listing.files} files, {human_size(listing.total_size)})")
    else:
        ctx.info(f"{art.name}: checksum and decryption verified")


def _check_disk(plan: Plan) -> None:
    """A first check before staging: the stored (compressed) size is a lower bound of what unpacking needs.
    A disk that fills up anyway fails the staging cleanly (the staged copy is removed)."""
    files = [a for a in plan.artifacts if a.kind != "database"]
    need = sum(a.size for a in files) + chains.base_size(files)  # a differential unpacks its full's archive too
    if not need:
        return
    where = plan.root if plan.root.exists() else plan.root.parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need + DISK_MARGIN:
        raise OperationError(f"not enough free disk on {where}: staging needs at least {human_size(need)} plus "
                             f"a {human_size(DISK_MARGIN)} margin, {human_size(free)} free; nothing was touched")


# --- 2. safety backup -----------------------------------------------------------------
def _safety_backup(ctx: RunContext, plan: Plan) -> int:

    kinds = {a.kind for a in plan.artifacts}
    if kinds == {"database"}:
        scope, services = "database", []
    elif kinds == {"config"}:
        scope, services = "config", []
    elif kinds <= {"service"}:  # also a restore that only removes absent folders (no artifact)
        scope, services = "files", sorted({a.source for a in plan.artifacts} | {e["source"] for e in plan.absent})
    else:
        scope, services = "full", []
    known = {s.name for s in plan.customer.services.all()}
    services = [s for s in services if s in known]
    try:
        params = backup_params(plan.customer, scope=scope, services=services, trigger=Backup.Trigger.RESTORE)
    except BackupInputError as exc:
        raise OperationError(f"cannot take the safety backup: {exc}; nothing was touched") from None
    params["replicas"] = []  # the way back must exist now; copies to replicas can wait for the next backup
    ctx.phase("safety backup")
    ctx.info(f"safety backup of the current state ({scope}) before anything changes")
    with slots.hold(slots.host_slot(plan.customer), settings.KASA_MAX_BACKUPS_PER_HOST, ctx.run.pk,
                    on_wait=lambda waited: ctx.check_alive()):
        try:
            bk, _ = make_backup(ctx, plan.customer, params, pin_reason=f"safety backup before restore run #"
                                f"{ctx.run.pk}")
        except OperationError as exc:
            raise OperationError(f"the safety backup failed ({exc}); nothing was restored") from None
    return bk.pk


# --- 3. staging -------------------------------------------------------------------------
def _stage(ctx: RunContext, plan: Plan, store, keyring, journal: Journal) -> Path | None:
    """Two lanes at once: archives unpack into the staging folder while the database dumps restore into fresh
    databases (mostly the database server's work). The first failure stops the other lane."""
    files = [a for a in plan.artifacts if a.kind != "database"]
    dbs = [a for a in plan.artifacts if a.kind == "database"]
    ctx.phase("verify and unpack")
    files_total, files_done = sum(a.size for a in files), [0]  # the archives' bytes give the phase's progress
    staging = None
    if files or plan.absent:  # an absent service's live folder is set aside in the staging folder (restore_files)
        plan.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # a copy's root, under KASA_CUSTOMERS_ROOT
        staging = restore_files.staging_dir(plan.root, ctx.run.pk)
        journal.add({"type": "staging", "path": str(staging)})
        restore_files.make_staging(plan.root, staging)
    stop = threading.Event()

    def files_lane() -> None:
        for art in files:
            _check_stop(ctx, stop)
            dest = staging / art.name.split(".", 1)[0]
            try:
                owner = plan.owner  # the customer's user, or the worker's own (development)
                listing = unpack.extract_artifact(
                    store, f"{plan.backup.prefix}/{art.name}", dest=str(dest), owner=owner, root=plan.root,
                    on_progress=progress(ctx, f"unpacking {art.name}", stop, base=files_done[0], total=files_total),
                    **artifact_kwargs(plan.backup, art, keyring))
            except unpack.ArtifactError as exc:
                raise OperationError(str(exc)) from None
            files_done[0] += art.size
            for line in unpack.setid_warnings(art.name, listing.setid):
                ctx.warning(line)
            ctx.info(f"{art.name}: checksum, decryption and {listing.members} members verified, "
                     f"{listing.files} files ({human_size(listing.total_size)}) unpacked into staging"
                     + (f" as {owner.user}" if owner else ""))

    def databases_lane() -> None:
        for art in dbs:
            _check_stop(ctx, stop)
            if _inside_tree(art):  # restored after the swap (see _inside_tree); verified now
                _verify_one(ctx, plan, store, keyring, art)
            else:
                dbswap.restore_fresh(ctx, plan, store, keyring, art, journal, stop=stop)

    _two_lanes(files_lane, databases_lane, stop)
    return staging


def _check_stop(ctx: RunContext, stop: threading.Event) -> None:
    if stop.is_set():
        raise Stopped()
    ctx.check_alive()


def _two_lanes(first, second, stop: threading.Event) -> None:
    """Run both; the first error (not a Stopped caused by it) is raised once both have ended."""

    errors: list[BaseException] = []

    def run_second() -> None:
        try:
            second()
        except BaseException as exc:  # handed to the calling thread
            errors.append(exc)
            stop.set()
        finally:
            connection.close()  # this thread's own database connection

    thread = threading.Thread(target=run_second, name="restore-databases")
    thread.start()
    try:
        first()
    except BaseException as exc:
        stop.set()
        thread.join()
        if isinstance(exc, Stopped) and errors:
            raise errors[0] from None
        raise
    thread.join()
    if errors and not isinstance(errors[0], Stopped):
        raise errors[0]


def _inside_tree(art: BackupArtifact) -> bool:
    """An SQLite file lives inside the customer's folders: it is restored after the folders are in place
    (restored earlier, beside a live file, it would be swapped away with the folder that holds it)."""
    return (art.details or {}).get("engine") == "sqlite"


def _restore_file_databases(ctx: RunContext, plan: Plan, journal: Journal) -> None:
    store, keyring = store_of(plan.backup), keyring_for(plan.backup)
    for art in plan.artifacts:
        if art.kind == "database" and _inside_tree(art):
            ctx.check_alive()
            dbswap.restore_fresh(ctx, plan, store, keyring, art, journal)


# --- 4. swap ---------------------------------------------------------------------------
def touched_specs(plan: Plan, specs: list) -> list:
    """The services a restore stops and starts: with only service folders restored (`--only backend`), those
    services; a database or the config may be read by any service, so then all of them."""
    absent = {e["source"] for e in plan.absent}
    if (plan.artifacts or absent) and all(a.kind == BackupArtifact.Kind.SERVICE for a in plan.artifacts):
        names = {a.source for a in plan.artifacts} | absent
        return [s for s in specs if s.name in names]
    return specs


def started_specs(plan: Plan, specs: list) -> list:
    """The stopped services that start again after the swap: not one whose folder the backup records as absent
    (it was not there, so it did not run; its folder is gone again)."""
    absent = {e["source"] for e in plan.absent}
    return [s for s in specs if s.name not in absent]


def _swap_in(ctx: RunContext, plan: Plan, staging: Path | None, journal: Journal, in_place=False) -> int | None:
    specs = touched_specs(plan, runtime.service_specs(plan.customer))
    # Which services answer now: after a rollback those must answer again (one that was down before the
    # restore is not the restore's fault); after a successful restore every health URL must answer.
    healthy_before = runtime.healthy_now(specs)
    ctx.phase("stop")
    ctx.info(f"stopping {len(specs)} service(s): {', '.join(s.name for s in specs) or 'none'}")
    journal.add({"type": "services_stopped", "healthy_before": healthy_before, "services": [s.name for s in specs]})
    runtime.stop_all(ctx, specs)
    way_back = dbswap.way_back(ctx, plan, _safety_backup) if in_place else None  # with the services stopped
    ctx.phase("swap")
    if staging is not None:
        restore_files.swap_in(ctx, plan, staging, journal, clone=False)
    _restore_file_databases(ctx, plan, journal)
    dbswap.swap_all(ctx, plan, journal, way_back=way_back)
    ctx.phase("start")
    started = started_specs(plan, specs)
    if len(started) < len(specs):
        ctx.info(f"not starting {', '.join(s.name for s in specs if s not in started)}: absent when the backup "
                 "was taken")
    specs = started
    ctx.info(f"starting {len(specs)} service(s): {', '.join(s.name for s in specs) or 'none'}")
    runtime.start_all(ctx, specs)
    ctx.phase("health")
    runtime.check_health(ctx, specs)
    return way_back


def _record_versions(ctx: RunContext, plan: Plan) -> None:
    """The restored service folders hold the versions the backup recorded: the customer says so again."""
    recorded = (plan.backup.manifest or {}).get("component_versions") or {}
    restored = {a.source for a in plan.artifacts if a.kind == "service"}
    versions = dict(plan.customer.versions or {})
    changed = {c: v for c, v in recorded.items() if c in restored and versions.get(c) != v}
    if changed:
        versions.update(changed)
        ctx.record(lambda: Customer.objects.filter(pk=plan.customer.pk).update(versions=versions),
                   replay="customer_versions", versions=versions)
        ctx.info("versions now " + ", ".join(f"{c} {v}" for c, v in sorted(changed.items())))


def _clone_in(ctx: RunContext, plan: Plan, staging: Path | None, journal: Journal) -> None:
    ctx.phase("copy in")
    if staging is not None:
        restore_files.swap_in(ctx, plan, staging, journal, clone=True)
    _restore_file_databases(ctx, plan, journal)
    dbswap.swap_all(ctx, plan, journal)
    if plan.to_databases and ctx.run.params.get("rewrite_env") and staging is not None:
        envfiles.rewrite_clone(ctx, plan)


# --- 5. undo and clean up -----------------------------------------------------------------
def _undo(ctx: RunContext, journal: Journal, plan: Plan) -> bool:
    """Undo every journalled step in reverse. True when everything was put back."""
    with ctx.uninterruptible():  # also after a cancel, and for the reaper, whose run is already failed
        return _undo_steps(ctx, journal, plan)


def _undo_steps(ctx: RunContext, journal: Journal, plan: Plan) -> bool:
    ok = True
    restart = next((s for s in journal.steps if s["type"] == "services_stopped"), None)
    if restart:
        # The restored services may be running (started before a failed health check, or by a worker that
        # died): stop them before their folders and databases are swapped back under them.
        try:
            runtime.stop_all(ctx, _stopped_specs(plan, restart))
        except Exception as exc:
            ctx.warning(f"could not stop the services before putting the previous state back: {exc}")
    for step in reversed(journal.steps):
        try:
            if step["type"] != "services_stopped" and not restore_files.undo(ctx, step, plan.root):
                dbswap.undo(ctx, step)
        except Exception as exc:
            ok = False
            ctx.error(f"could not undo {step.get('type')} ({step.get('live') or step.get('db') or ''}): {exc}")
    journal.steps = [] if ok else journal.steps
    journal.save()
    if restart:
        try:
            specs = _stopped_specs(plan, restart)
            runtime.start_all(ctx, specs)
            before = set(restart.get("healthy_before") or [])
            runtime.check_health(ctx, [s for s in specs if s.name in before])
        except Exception as exc:
            journal.services_down = str(exc)
            ctx.error(f"the previous files and databases are back but the services did not come up: {exc}")
    return ok


def _stopped_specs(plan: Plan, step: dict) -> list:
    """The services a journalled stop stopped (every service for a journal written before it said which)."""
    specs = runtime.service_specs(plan.customer)
    names = step.get("services")
    return specs if names is None else [s for s in specs if s.name in names]


def _cleanup(ctx: RunContext, journal: Journal, root: Path) -> None:
    """The restore holds: drop what was kept for the way back (previous folders, old databases)."""
    for step in reversed(journal.steps):
        try:
            if step["type"] != "services_stopped" and not restore_files.clean_up(step, root):
                dbswap.finish(ctx, step)
        except Exception as exc:  # the restore stands; leftovers are reported, not fatal
            ctx.warning(f"could not remove the previous copy ({step.get('path') or step.get('db')}): {exc}")
    journal.clear()


def abandon(run: Run, ctx: RunContext) -> None:
    """The worker died mid-restore: undo its journal so the customer is exactly as it was."""
    steps = (run.result or {}).get("journal") or []
    customer = Customer.objects.select_related("host").get(pk=run.customer_id)
    if (run.params or {}).get("to_host"):
        from . import move_local

        if move_local.onto_local(run.params["to_host"]):  # its steps are this machine's: undone here
            move_local.abandon(run, ctx, steps, customer)
            return
        # A move's steps name the target host's folders (backups.move): never followed on this machine. The customer
        # is switched only once the copy is healthy, so it runs where customer.host says.
        if steps:
            ctx.error(f"the worker died mid-move of {customer} to host {run.params['to_host']}: the customer is "
                      f"on host {customer.host.name} (switched only once the copy is healthy); the half-made copy "
                      f"and its journal stay on {run.params['to_host']} (.kasa-journals/run-{run.pk}.json under its "
                      "customers root): an operator must remove them")
        return
    # A safety backup the dead worker was still writing: it is nobody's restore point.
    for bk in Backup.objects.filter(customer=customer, run=None, status=Backup.Status.RUNNING,
                                    trigger=Backup.Trigger.RESTORE, created_at__gte=run.created_at):
        discard(ctx, bk, bk.target.store(), [], RuntimeError("worker died during the restore"))
    if not customer.host.is_local:
        # Its paths are the host's: never followed on this machine. The journal on the host, written before the
        # copy in `result`, is the one replayed, there, through a session (any worker reaches the host); a host
        # that does not answer now keeps it for its probe's pass (backups.host_journals).
        from . import host_journals

        host_journals.replay_run(run, ctx)
        return
    if not steps:
        return
    journal = Journal(ctx)
    journal.steps = list(steps)
    root = restore_files.journal_root(steps, run.root, customer.root, os.path.realpath(customer.root))
    plan = Plan(backup=None, customer=customer, artifacts=[], root=root, clone=False)
    if _undo(ctx, journal, plan):
        ctx.info("the worker died mid-restore: the pre-restore state was put back")
    else:
        ctx.error("the worker died mid-restore and the pre-restore state could not be fully put back")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:2000]


def _display(url: str) -> str:
    try:
        return dburl.parse(url).display()
    except Exception:
        return "(database URL)"
