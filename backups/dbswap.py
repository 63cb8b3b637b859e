"""The database side of a restore: fresh database, swap, undo — journalled, never a password in the journal.

The journal lives in the run's `result` (shown in the admin) and a local file, so a step names
the database by its connection name only. The credentials are resolved when the run starts (`hold_targets`)
and held in the worker's memory (RunContext.held, never on disk), so an undo needs no control database;
the reaper, undoing for a dead worker, looks them up again.
"""

from __future__ import annotations

from django.conf import settings

from core.secrets import box, reveal
from customers.models import Customer
from engines import dbrestore, dburl, unpack
from operations.context import OperationError, RunContext

from .models import Backup, BackupArtifact


def target_for(customer: Customer, source: str, to_databases: dict[str, str] | None = None,
               clone_root=None) -> dbrestore.DbTarget:
    """Where database `source` is restored: a --to-database URL, the copy's SQLite file, or the live connection."""
    if to_databases and source in to_databases:
        return dbrestore.DbTarget.from_url(dburl.parse(to_databases[source]))
    db = customer.databases.get(name=source)
    if db.engine == "sqlite":
        path = db.sqlite_file()
        if clone_root is not None:  # the copy's own SQLite file, at the same place inside its root
            path = clone_root / path.relative_to(customer.root_path())
        return dbrestore.DbTarget(engine="sqlite", sqlite_path=str(path))
    return dbrestore.DbTarget(engine=db.engine, host=db.host, port=db.port or 0, user=db.user,
                              password=reveal(db.password), dbname=db.database)


def _held(ctx: RunContext, source: str, resolve) -> dbrestore.DbTarget:
    """The target of database `source`, resolved once per run and then kept in memory (see the module doc)."""
    target = ctx.held.get(("db", source))
    if target is None:
        target = ctx.held[("db", source)] = resolve()
    if target.password:
        ctx.add_secret(target.password)
    return target


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
        clone_root = None
        if p.get("to_root"):
            from pathlib import Path

            clone_root = Path(p["to_root"])
        return target_for(customer, step["db"], to_dbs, clone_root)

    return _held(ctx, step["db"], resolve)


def restore_fresh(ctx: RunContext, plan, store, keyring, art: BackupArtifact, journal, stop=None) -> None:
    """Restore one dump beside the live database; check its row counts against the manifest."""
    from .restore import _progress, artifact_kwargs

    clone_root = plan.root if plan.clone and ctx.run.params.get("to_root") else None
    target = _held(ctx, art.source, lambda: target_for(plan.customer, art.source, plan.to_databases, clone_root))
    tag = f"r{ctx.run.pk}"
    engine = target.engine
    if engine == "sqlite":
        new = None  # known only once written: the journal gets it right after
        step = journal.add({"type": "db_fresh", "engine": engine, "db": art.source, "new": None})
    else:
        new = dbrestore.side_name(target.dbname, "new", tag, engine=engine)
        step = journal.add({"type": "db_fresh", "engine": engine, "db": art.source, "new": new})
    ctx.info(f"{art.name}: restoring into a fresh database beside {target.display()}")
    name = f"{plan.backup.prefix}/{art.name}"
    try:
        with unpack.open_plain(store, name, on_progress=_progress(ctx, f"restoring {art.name}", stop),
                               **artifact_kwargs(plan.backup, art, keyring)) as chunks:
            if engine == "postgresql":
                counts = dbrestore.pg_restore_fresh(target, new, chunks, privileges=not plan.clone)
            elif engine == "mysql":
                counts = dbrestore.mysql_restore_fresh(target, new, chunks)
            else:
                new, counts = dbrestore.sqlite_restore_fresh(target.sqlite_path, chunks, tag=tag)
                step["new"] = new
                journal._save()
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


def swap_all(ctx: RunContext, plan, journal) -> None:
    tag = f"r{ctx.run.pk}"
    fresh = {s["db"]: s for s in journal.steps if s["type"] == "db_fresh"}
    for art in plan.artifacts:
        if art.kind != "database":
            continue
        new = fresh[art.source]["new"]
        target = _target_of_step(ctx, {"db": art.source})
        live = target.sqlite_path if target.engine == "sqlite" else target.dbname
        step = journal.add({"type": "db_swap", "engine": target.engine, "db": art.source, "new": new, "old": None,
                            "done": False})
        try:
            if target.engine == "postgresql":
                old = dbrestore.pg_swap(target, new, tag=tag)
            elif target.engine == "mysql":
                old = dbrestore.mysql_swap(target, new, tag=tag)
            else:
                old = dbrestore.sqlite_swap(target.sqlite_path, new, tag=tag)
        except dbrestore.RestoreError as exc:
            raise OperationError(f"database {art.source}: {exc}") from None
        step.update(old=old, done=True)
        journal._save()
        ctx.info(f"database {art.source}: swapped in ({live}"
                 + (f"; the previous one kept as {old} until the restore holds)" if old else ")"))


def undo(ctx: RunContext, step: dict) -> None:
    target = _target_of_step(ctx, step)
    if step["type"] == "db_swap":
        if not step.get("done") and target.engine == "sqlite":
            # The worker died inside the swap: what exists tells how far it got (the names come from the tag).
            old = dbrestore.sqlite_repair(target.sqlite_path, step["new"], tag=f"r{ctx.run.pk}")
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
            dbrestore.sqlite_unswap(target.sqlite_path, step["old"], step["new"])
        ctx.info(f"database {step['db']}: the previous database is live again")
    elif step["type"] == "db_fresh" and step.get("new"):
        try:
            dbrestore.drop_database(target, step["new"])
        except dbrestore.RestoreError as exc:
            ctx.warning(f"database {step['db']}: could not drop {step['new']}: {exc}")


def finish(ctx: RunContext, step: dict) -> None:
    """The restore holds: drop the previous database kept for the way back."""
    if step["type"] == "db_swap" and step.get("old"):
        target = _target_of_step(ctx, step)
        dbrestore.drop_database(target, step["old"])


def restore_to_scratch(ctx: RunContext, bk: Backup, store, keyring, art: BackupArtifact) -> dict[str, int]:
    """A drill: restore one dump into a throwaway database and return its row counts."""
    from .restore import _progress, artifact_kwargs

    engine = (art.details or {}).get("engine")
    scratch = None
    if engine == "postgresql" and settings.KASA_SCRATCH_PG_URL:
        scratch = dbrestore.DbTarget.from_url(dburl.parse(settings.KASA_SCRATCH_PG_URL))
    elif engine == "mysql":
        if settings.KASA_SCRATCH_MYSQL_URL:
            scratch = dbrestore.DbTarget.from_url(dburl.parse(settings.KASA_SCRATCH_MYSQL_URL))
        else:  # the customer's own server, under a scratch database name the engine creates and drops
            scratch = target_for(bk.customer, art.source)
    if scratch is not None and scratch.password:
        ctx.add_secret(scratch.password)
    settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    try:
        with unpack.open_plain(store, f"{bk.prefix}/{art.name}", on_progress=_progress(ctx, f"drill {art.name}"),
                               **artifact_kwargs(bk, art, keyring)) as chunks:
            # SQLite copies go to Kasa's scratch disk; a scratch PostgreSQL cluster to the system temp folder,
            # which the unprivileged user it runs as can reach (see engines.scratchdb).
            base = str(settings.KASA_SCRATCH_DIR) if engine == "sqlite" else None
            return dbrestore.restore_to_scratch(engine, chunks, scratch=scratch, base_dir=base)
    except dbrestore.RestoreError as exc:
        raise OperationError(f"{art.name}: {exc}") from None


def compare_counts(expected: dict, got: dict) -> list[str]:
    return dbrestore.compare_counts(expected, got)
