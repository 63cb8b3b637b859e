"""The database side of a restore: staged, swapped in, undone — journalled, never a password in the journal.

Which way a database comes back depends on what its role may do (the run log says which, and why):

- **fresh database, then swap** (engines.dbrestore): the role may create and rename databases (PostgreSQL:
  CREATEDB and ownership; MySQL: ALL on `<db>__kasa_%`), or a maintenance connection is set for its server
  (customers.MaintenanceConnection), which then creates, renames and drops them while the role loads the
  dump into a database it owns. Steps `db_fresh` (staging) and `db_swap`.
- **PostgreSQL in place, in one transaction** (engines.dbrestore_pginplace): a role that owns its database
  and nothing more. Staging only reads the archive whole (`db_verified`); once the services are stopped and
  a backup of the current state exists (the way back), one transaction replaces the database's content
  (`db_inplace`, which records the transaction id before anything is written).
- **MySQL/MariaDB through prefixed tables** (engines.dbrestore_mytables): a user with no right outside its
  database. Staging loads `__kasa_new_<tag>_*` tables beside the live ones (`db_tables_new`), one RENAME
  TABLE swaps them in (`db_tables_swap`).

The journal lives in the run's `result` (shown in the admin) and a local file, so a step names
the database by its connection name only. The credentials are resolved when the run starts (`hold_targets`)
and held in the worker's memory (RunContext.held, never on disk), so an undo needs no control database;
the reaper, undoing for a dead worker, looks them up again.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from core.secrets import box, reveal
from customers.models import Customer, MaintenanceConnection
from engines import dbrestore, dbrestore_mytables, dbrestore_pginplace, dburl, scratchdb, unpack
from engines.dbrestore_mysql import CannotCreateDatabase
from operations import slots
from operations.context import OperationError, RunContext

from . import redisswap
from .models import Backup, BackupArtifact, BackupPolicy
from .operations import make_backup
from .reading import artifact_kwargs, keyring_for, progress, refuse_unreadable, store_of
from .services import BackupInputError, backup_params, backup_pin

# Journal steps this module writes (and undoes / finishes).
STEPS = ("db_fresh", "db_swap", "db_verified", "db_inplace", "db_tables_new", "db_tables_swap", *redisswap.STEPS)
IN_PLACE = "in_place"


def is_step(step: dict) -> bool:
    return step.get("type") in STEPS


def maintenance_for(target: dbrestore.DbTarget) -> dbrestore.DbTarget | None:
    """The maintenance connection set for the target's server (same engine, host and port), as a DbTarget."""
    if target.engine == "sqlite":
        return None
    mc = MaintenanceConnection.objects.filter(engine=target.engine, host=target.host,
                                              port=target.port or dburl.DEFAULT_PORTS[target.engine]).first()
    if mc is None:
        return None
    return dbrestore.DbTarget(engine=mc.engine, host=mc.host, port=mc.port, user=mc.user,
                              password=reveal(mc.password), dbname=mc.database)


def target_for(customer: Customer, source: str, to_databases: dict[str, str] | None = None,
               clone_root=None) -> dbrestore.DbTarget:
    """Where database `source` is restored: a --to-database URL, the copy's SQLite file, or the live connection;
    with the server's maintenance connection attached when one is set."""
    if to_databases and source in to_databases:
        target = dbrestore.DbTarget.from_url(dburl.parse(to_databases[source]))
    else:
        db = customer.databases.get(name=source)
        if db.engine == "sqlite":
            path = db.sqlite_file()
            if clone_root is not None:  # the copy's own SQLite file, at the same place inside its root
                path = clone_root / path.relative_to(customer.root_path())
            return dbrestore.DbTarget(engine="sqlite", sqlite_path=str(path),
                                      sqlite_root=str(clone_root if clone_root is not None else customer.root_path()))
        target = dbrestore.DbTarget(engine=db.engine, host=db.host, port=db.port or 0, user=db.user,
                                    password=reveal(db.password), dbname=db.database, tls=db.tls,
                                    tls_ca=settings.KASA_REDIS_CA_FILE if db.tls else "")
    target.maint = maintenance_for(target)
    return target


def _secrets(ctx: RunContext, target: dbrestore.DbTarget) -> dbrestore.DbTarget:
    for t in (target, target.maint):
        if t is not None and t.password:
            ctx.add_secret(t.password)
    return target


def _held(ctx: RunContext, source: str, resolve) -> dbrestore.DbTarget:
    """The target of database `source`, resolved once per run and then kept in memory (see the module doc)."""
    target = ctx.held.get(("db", source))
    if target is None:
        target = ctx.held[("db", source)] = resolve()
    return _secrets(ctx, target)


def hold_targets(ctx: RunContext, customer: Customer, to_databases: dict[str, str] | None = None,
                 clone_root=None) -> None:
    """Resolve every database a run may restore or put back, while the control database answers."""
    names = [db.name for db in customer.databases.all()] + list(to_databases or {})
    for name in dict.fromkeys(names):
        try:
            _held(ctx, name, lambda n=name: target_for(customer, n, to_databases, clone_root))
        except Exception:  # noqa: BLE001 — one this run does not touch; resolved (and refused) when it is used
            continue


def _target_of_step(ctx: RunContext, step: dict) -> dbrestore.DbTarget:
    def resolve() -> dbrestore.DbTarget:
        run = ctx.run
        customer = Customer.objects.get(pk=run.customer_id)
        p = run.params or {}
        to_dbs = {n: box().decrypt(t).reveal() for n, t in (p.get("to_databases") or {}).items()}
        clone_root = Path(p["to_root"]) if p.get("to_root") else None
        return target_for(customer, step["db"], to_dbs, clone_root)

    return _held(ctx, step["db"], resolve)


def _server(target: dbrestore.DbTarget) -> str:
    return f"{target.host}:{target.port or dburl.DEFAULT_PORTS.get(target.engine, '')}"


def _app_name(ctx: RunContext) -> str:
    """The in-place transaction's application_name: the reaper finds (and ends) it by this name."""
    return f"kasa-restore r{ctx.run.pk}"


# --- which way ---------------------------------------------------------------------------------------------------
def choose(target: dbrestore.DbTarget) -> tuple[str, str]:
    """("fresh" | IN_PLACE, why) for a PostgreSQL or SQLite target; MySQL tries a fresh database first."""
    if target.engine == "sqlite":
        return "fresh", ""
    if target.maint is not None:
        return "fresh", (f"through the maintenance connection {target.maint.user}@{_server(target)}, which creates, "
                         "renames and drops the databases")
    if target.engine != "postgresql":
        return "fresh", ""
    try:
        role = dbrestore.pg_role(target)
    except Exception as exc:  # noqa: BLE001 — connection errors are worded by the restore itself
        raise OperationError(f"cannot read the privileges of role {target.user}: {exc}") from None
    if role.can_swap:
        return "fresh", ""
    if not role.live_exists:
        raise OperationError(f"database {target.dbname} does not exist and role {role.user} may not create it (no "
                             f"CREATEDB): create it owned by {role.user}, or set a maintenance connection for "
                             f"{_server(target)}; nothing was touched")
    why = (f"role {role.user} lacks CREATEDB" if not role.createdb else
           f"role {role.user} does not own database {target.dbname}")
    return IN_PLACE, (f"{why} and no maintenance connection is set for {_server(target)}: restoring into the live "
                      "database in one transaction")


def in_place(journal) -> bool:
    """Whether a database of this journal will be restored in place (it then needs a way back: a backup)."""
    return any(s["type"] == "db_verified" and s.get("method") == IN_PLACE for s in journal.steps)


# --- 1. staging (the services still run) -------------------------------------------------------------------------
def restore_fresh(ctx: RunContext, plan, store, keyring, art: BackupArtifact, journal, stop=None) -> None:
    """Stage one dump: beside the live database (fresh database or prefixed tables) with its row counts checked
    against the manifest, or — for an in-place restore — read whole to prove it restorable."""

    clone_root = plan.root if plan.clone and ctx.run.params.get("to_root") else None
    target = _held(ctx, art.source, lambda: target_for(plan.customer, art.source, plan.to_databases, clone_root))
    tag = f"r{ctx.run.pk}"
    engine = target.engine
    if engine == "redis":  # a spare logical database, swapped in with SWAPDB
        redisswap.stage(ctx, plan, store, keyring, art, journal, target, stop=stop)
        return
    method, why = choose(target)
    name = f"{plan.backup.prefix}/{art.name}"

    def chunks_of(label: str):
        return unpack.open_plain(store, name, on_progress=progress(ctx, f"{label} {art.name}", stop),
                                 **artifact_kwargs(plan.backup, art, keyring))

    if method == IN_PLACE:
        ctx.info(f"{art.name}: {why} (once the services are stopped); reading the archive whole first")
        journal.add({"type": "db_verified", "engine": engine, "db": art.source, "method": IN_PLACE})
        try:
            with chunks_of("verifying") as chunks:
                dbrestore_pginplace.pg_verify_archive(chunks)
        except (dbrestore.RestoreError, unpack.ArtifactError) as exc:
            raise OperationError(f"{art.name}: {exc}; nothing was touched") from None
        ctx.info(f"{art.name}: checksum, decryption and every entry of the archive verified")
        return
    if engine == "sqlite":
        new = None  # known only once written: the journal gets it right after
        step = journal.add({"type": "db_fresh", "engine": engine, "db": art.source, "new": None})
    else:
        new = dbrestore.side_name(target.dbname, "new", tag, engine=engine)
        step = journal.add({"type": "db_fresh", "engine": engine, "db": art.source, "new": new})
    ctx.info(f"{art.name}: restoring into a fresh database beside {target.display()}" + (f" ({why})" if why else ""))
    try:
        with chunks_of("restoring") as chunks:
            if engine == "postgresql":
                counts = dbrestore.pg_restore_fresh(target, new, chunks, privileges=not plan.clone)
            elif engine == "mysql":
                counts = dbrestore.mysql_restore_fresh(target, new, chunks)
            else:
                new, counts = dbrestore.sqlite_restore_fresh(target.sqlite_path, chunks, tag=tag,
                                                                root=target.sqlite_root)
                step["new"] = new
                journal.save()
    except CannotCreateDatabase:
        journal.steps.remove(step)  # nothing was created
        journal.save()
        # Prefixed tables live inside the live database: with none there (a move's new server, a copy) there is
        # nowhere to load them, and nothing of theirs to drop on the way back.
        try:
            live_exists = dbrestore.database_exists(target, target.dbname)
        except dbrestore.RestoreError as exc:
            raise OperationError(f"{art.name}: {exc}") from None
        if not live_exists:
            raise OperationError(f"{art.name}: user {target.user} may not create database {target.dbname} nor "
                                 f"{new} on {_server(target)}: grant it ALL on `{target.dbname}` and "
                                 f"`{target.dbname}__kasa_%` there, or set a maintenance connection for that "
                                 "server") from None
        ctx.info(f"{art.name}: user {target.user} may not create databases beside {target.dbname} (creating {new} "
                 f"was denied) and no maintenance connection is set for {_server(target)}: loading into prefixed "
                 f"tables of {target.dbname}, swapped in with one RENAME TABLE")
        journal.add({"type": "db_tables_new", "engine": engine, "db": art.source, "tag": tag})
        try:
            with chunks_of("restoring") as chunks:
                counts = dbrestore_mytables.load(target, tag, chunks)
        except (dbrestore.RestoreError, unpack.ArtifactError) as exc:
            raise OperationError(f"{art.name}: {exc}") from None
    except (dbrestore.RestoreError, unpack.ArtifactError) as exc:
        raise OperationError(f"{art.name}: {exc}") from None
    expected = (art.details or {}).get("row_counts")
    if expected is not None:
        diffs = dbrestore.compare_counts(expected, counts)
        if diffs:
            raise OperationError(f"{art.name}: the restored database does not match the manifest: "
                                 + "; ".join(diffs[:10]))
    ctx.info(f"{art.name}: {len(counts)} tables, {sum(counts.values())} rows restored; row counts match the "
             "manifest")


# --- 2. swap (the services stopped) ------------------------------------------------------------------------------
def swap_all(ctx: RunContext, plan, journal, *, way_back: int | None = None) -> None:
    """Put every staged database live. way_back: the backup (taken with the services stopped) that an in-place
    restore is undone from, should a later step fail."""
    tag = f"r{ctx.run.pk}"
    staged = {s["db"]: s for s in journal.steps
              if s["type"] in ("db_fresh", "db_verified", "db_tables_new", "redis_spare")}
    for art in plan.artifacts:
        if art.kind != "database":
            continue
        how = staged[art.source]
        target = _target_of_step(ctx, {"db": art.source})
        if how["type"] == "redis_spare":
            redisswap.swap(ctx, art, target, journal, how)
        elif how["type"] == "db_verified":
            _in_place(ctx, plan, art, target, journal, way_back=way_back)
        elif how["type"] == "db_tables_new":
            _tables_swap(ctx, art, target, journal, tag)
        else:
            _fresh_swap(ctx, art, target, journal, how["new"], tag)


def _fresh_swap(ctx: RunContext, art, target, journal, new: str, tag: str) -> None:
    live = target.sqlite_path if target.engine == "sqlite" else target.dbname
    step = journal.add({"type": "db_swap", "engine": target.engine, "db": art.source, "new": new, "old": None,
                        "done": False})
    try:
        if target.engine == "postgresql":
            old = dbrestore.pg_swap(target, new, tag=tag)
        elif target.engine == "mysql":
            old = dbrestore.mysql_swap(target, new, tag=tag)
        else:
            old = dbrestore.sqlite_swap(target.sqlite_path, new, tag=tag, root=target.sqlite_root)
    except dbrestore.RestoreError as exc:
        raise OperationError(f"database {art.source}: {exc}") from None
    step.update(old=old, done=True)
    journal.save()
    ctx.info(f"database {art.source}: swapped in ({live}"
             + (f"; the previous one kept as {old} until the restore holds)" if old else ")"))


def _tables_swap(ctx: RunContext, art, target, journal, tag: str) -> None:
    try:
        dbrestore_mytables.prepare_swap(target, tag)
    except dbrestore.RestoreError as exc:
        raise OperationError(f"database {art.source}: {exc}") from None
    journal.add({"type": "db_tables_swap", "engine": target.engine, "db": art.source, "tag": tag})
    try:
        dbrestore_mytables.swap(target, tag)
    except dbrestore.RestoreError as exc:
        raise OperationError(f"database {art.source}: {exc}") from None
    ctx.info(f"database {art.source}: the restored tables were swapped in with one RENAME TABLE; the previous ones "
             f"are kept as {dbrestore_mytables.names(tag)[1]}* until the restore holds")


def _in_place(ctx: RunContext, plan, art, target, journal, *, way_back: int | None) -> None:

    if way_back:
        _way_back_artifact(ctx, way_back, art.source)  # held now: undoing needs no control database
    step = journal.add({"type": "db_inplace", "engine": target.engine, "db": art.source, "xid": None,
                        "way_back": way_back, "copy": bool(plan.clone)})

    def on_begin(xid: str) -> None:  # before the transaction writes anything: the reaper can ask about it
        step["xid"] = xid
        journal.save()

    ctx.info(f"database {art.source}: restoring into {target.dbname} in one transaction"
             + (f" (backup #{way_back} is the way back)" if way_back else ""))
    store, keyring = store_of(plan.backup), keyring_for(plan.backup)
    try:
        with unpack.open_plain(store, f"{plan.backup.prefix}/{art.name}", on_progress=progress(
                ctx, f"restoring {art.name}"), **artifact_kwargs(plan.backup, art, keyring)) as chunks:
            counts = dbrestore_pginplace.pg_restore_in_place(
                target, chunks, expected=(art.details or {}).get("row_counts"), on_begin=on_begin,
                application_name=_app_name(ctx), privileges=not plan.clone, require_empty=bool(plan.clone))
    except (dbrestore.RestoreError, unpack.ArtifactError) as exc:
        raise OperationError(f"database {art.source}: {exc}") from None
    ctx.info(f"database {art.source}: {len(counts)} tables, {sum(counts.values())} rows restored in place and "
             "committed; row counts matched the manifest before the commit")


def way_back(ctx: RunContext, plan, safety_backup) -> int:
    """The restore's way back for its in-place databases, taken with the services stopped: its safety backup
    (`safety_backup(ctx, plan)`), or with --no-safety-backup a backup of the databases alone."""
    if ctx.run.params.get("safety_backup", True):
        return _readable_way_back(safety_backup(ctx, plan))
    return way_back_backup(ctx, plan.customer, trigger=Backup.Trigger.RESTORE,
                           pin=f"{WAY_BACK}restore run #{ctx.run.pk}")


WAY_BACK = "way back of "  # the pin reason of a backup taken only as an in-place restore's way back


def way_back_backup(ctx: RunContext, customer: Customer, *, trigger: str, pin: str) -> int:
    """A pinned backup of the customer's databases, taken now (the services stopped): the only way back for a
    database restored in place, which keeps no copy aside. `pin` starts with WAY_BACK: once the run holds,
    finish() unpins it and retention decides (a restore's own safety backup stays pinned)."""
    try:
        params = backup_params(customer, scope=BackupPolicy.Scope.DATABASE, trigger=trigger)
    except BackupInputError as exc:
        raise OperationError(f"cannot back the databases up before restoring them in place: {exc}") from None
    params["replicas"] = []
    ctx.info("backing the databases up before restoring them in place (their only way back)")
    with slots.hold(slots.host_slot(customer), settings.KASA_MAX_BACKUPS_PER_HOST, ctx.run.pk,
                    on_wait=lambda waited: ctx.check_alive()):
        try:
            bk, _ = make_backup(ctx, customer, params, pin_reason=pin)
        except OperationError as exc:
            raise OperationError(f"the backup of the databases failed ({exc}); nothing was restored") from None
    return _readable_way_back(bk.pk)


def _readable_way_back(backup_id: int) -> int:
    """A dump by a host's own pg_dump newer than Kasa's pg_restore here: a way back this worker could not read
    is no way back, so the restore stops before the first write (the services are started again by the undo)."""
    try:
        refuse_unreadable(list(BackupArtifact.objects.filter(backup_id=backup_id)), "read back", tail="")
    except OperationError as exc:
        raise OperationError(f"backup #{backup_id} is the databases' only way back, but {exc}; nothing was "
                             "restored") from None
    return backup_id


# --- 3. undo and finish ------------------------------------------------------------------------------------------
def undo(ctx: RunContext, step: dict) -> None:
    kind = step["type"]
    if kind == "db_verified":
        return  # only read
    target = _target_of_step(ctx, step)
    if kind in redisswap.STEPS:
        redisswap.undo(ctx, step, target)
    elif kind == "db_inplace":
        _undo_in_place(ctx, step, target)
    elif kind == "db_tables_swap":
        what = dbrestore_mytables.unswap(target, step["tag"])
        ctx.info(f"database {step['db']}: {what}")
    elif kind == "db_tables_new":
        dbrestore_mytables.drop_new(target, step["tag"])
    elif kind == "db_swap":
        _undo_swap(ctx, step, target)
    elif kind == "db_fresh" and step.get("new"):
        try:
            dbrestore.drop_database(target, step["new"])
        except dbrestore.RestoreError as exc:
            ctx.warning(f"database {step['db']}: could not drop {step['new']}: {exc}")


def _undo_in_place(ctx: RunContext, step: dict, target) -> None:
    if not step.get("xid"):
        ctx.info(f"database {step['db']}: the in-place restore never began writing; {target.dbname} is as it was")
        return
    status = dbrestore_pginplace.pg_transaction_status(target, step["xid"], application_name=_app_name(ctx))
    if status != "committed":
        ctx.info(f"database {step['db']}: the in-place restore was rolled back ({status}); {target.dbname} is "
                 "exactly as it was")
        return
    if step.get("copy"):
        dbrestore_pginplace.sweep(target, application_name=_app_name(ctx))
        ctx.info(f"database {step['db']}: the copy restored into {target.dbname} was removed (empty again)")
        return
    if not step.get("way_back"):
        raise OperationError(f"database {step['db']} was restored in place and no backup of its previous state "
                             "exists: it cannot be put back")
    art = _way_back_artifact(ctx, step["way_back"], step["db"])

    ctx.info(f"database {step['db']}: putting back its state from before the restore (backup #{art.backup_id}), in "
             "one transaction")
    with unpack.open_plain(store_of(art.backup), f"{art.backup.prefix}/{art.name}",
                           **artifact_kwargs(art.backup, art, keyring_for(art.backup))) as chunks:
        dbrestore_pginplace.pg_restore_in_place(target, chunks, expected=(art.details or {}).get("row_counts"),
                                                application_name=_app_name(ctx) + " undo")
    ctx.info(f"database {step['db']}: the previous database is live again")


def _way_back_artifact(ctx: RunContext, backup_id: int, source: str) -> BackupArtifact:
    """The dump of `source` in the way-back backup, with its backup and target: looked up once, while the control
    database answers, and held in the worker's memory like the run's credentials (an undo goes on without it;
    the reaper, undoing for a dead worker, looks it up again)."""
    key = ("way_back", backup_id, source)
    if key not in ctx.held:
        ctx.held[key] = BackupArtifact.objects.select_related("backup", "backup__target").get(
            backup_id=backup_id, kind="database", source=source)
    return ctx.held[key]


def _undo_swap(ctx: RunContext, step: dict, target) -> None:
    if not step.get("done") and target.engine == "sqlite":
        # The worker died inside the swap: what exists tells how far it got (the names come from the tag).
        old = dbrestore.sqlite_repair(target.sqlite_path, step["new"], tag=f"r{ctx.run.pk}",
                                      root=target.sqlite_root)
        if old is None:
            ctx.info(f"database {step['db']}: the worker died inside the swap, before the restored file went "
                     "live; the previous file is live")
            return
        step = {**step, "old": old or None}
    elif not step.get("done"):
        # The worker died inside the swap. Work out from what exists how far it got.
        if target.engine == "postgresql":
            for line in dbrestore.pg_repair(target):
                ctx.warning(f"database {step['db']}: {line}")
        live, new = target.dbname, step.get("new")
        swapped = (new and not dbrestore.database_exists(target, new)
                   and dbrestore.database_exists(target, live))
        if not swapped:
            return  # never swapped: the fresh database (dropped by its own step) never went live
        old = dbrestore.side_name(live, "old", f"r{ctx.run.pk}", engine=target.engine)
        if not dbrestore.database_exists(target, old):
            old = None
        step = {**step, "old": old}
    if target.engine == "postgresql":
        dbrestore.pg_unswap(target, step["old"], step["new"])
    elif target.engine == "mysql":
        dbrestore.mysql_unswap(target, step["old"], step["new"])
    else:
        dbrestore.sqlite_unswap(target.sqlite_path, step["old"], step["new"], root=target.sqlite_root)
    ctx.info(f"database {step['db']}: the previous database is live again")


def finish(ctx: RunContext, step: dict) -> None:
    """The restore holds: drop what was kept for the way back (the previous database, or the previous tables),
    and hand a backup taken only as a way back to retention."""
    if step["type"] in redisswap.STEPS:
        redisswap.finish(ctx, step, _target_of_step(ctx, step))
    elif step["type"] == "db_swap" and step.get("old"):
        dbrestore.drop_database(_target_of_step(ctx, step), step["old"])
    elif step["type"] == "db_tables_swap":
        dbrestore_mytables.finish(_target_of_step(ctx, step), step["tag"])
    elif step["type"] == "db_inplace" and step.get("way_back"):
        bk = Backup.objects.filter(pk=step["way_back"], pinned=True, pin_reason__startswith=WAY_BACK).first()
        if bk is not None:
            backup_pin(bk, pinned=False, via="worker")


# --- drills ------------------------------------------------------------------------------------------------------
def restore_to_scratch(ctx: RunContext, bk: Backup, store, keyring, art: BackupArtifact) -> dict[str, int]:
    """A drill: restore one dump into a throwaway database and return its row counts."""

    engine = (art.details or {}).get("engine")
    scratch = None
    if engine == "postgresql" and settings.KASA_SCRATCH_PG_URL:
        scratch = dbrestore.DbTarget.from_url(dburl.parse(settings.KASA_SCRATCH_PG_URL))
    elif engine == "mysql":
        if settings.KASA_SCRATCH_MYSQL_URL:
            scratch = dbrestore.DbTarget.from_url(dburl.parse(settings.KASA_SCRATCH_MYSQL_URL))
        else:  # the customer's own server (through its maintenance connection, if set) under a scratch name
            scratch = target_for(bk.customer, art.source)
    if scratch is not None:
        _secrets(ctx, scratch)
    settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    try:
        with unpack.open_plain(store, f"{bk.prefix}/{art.name}", on_progress=progress(ctx, f"drill {art.name}"),
                               **artifact_kwargs(bk, art, keyring)) as chunks:
            # SQLite copies go to Kasa's scratch disk; a scratch PostgreSQL cluster to the system temp folder,
            # which the unprivileged user it runs as can reach (see engines.scratchdb).
            base = str(settings.KASA_SCRATCH_DIR) if engine == "sqlite" else None
            return scratchdb.restore_to_scratch(engine, chunks, scratch=scratch, base_dir=base)
    except dbrestore.RestoreError as exc:
        raise OperationError(f"{art.name}: {exc}") from None


def compare_counts(expected: dict, got: dict) -> list[str]:
    return dbrestore.compare_counts(expected, got)
