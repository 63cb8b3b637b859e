"""A restore into a copy of a customer on a remote host (issue 14, point 2): `restore ID --to-root PATH` with PATH on
the customer's host, `--to-database NAME=URL` with URL as that host reaches the server.

The local clone's rules (backups.restore, restore_files), on the host: the copy's folder lies strictly inside the
host's customers root and overlaps no customer root of that host, the customer's own included (checked by name on
the worker when the run is asked for, then on the host, links resolved there: engines.hostmove.root_check); it is
new or empty. Every archive is checked on the worker and unpacked on the host as the customer's user there, as a
remote restore in place does (backups.remote_restore's staging and swaps, pointed at the copy's folder); a SQLite
file lands at the same place inside the copy; a PostgreSQL --to-database is a new database made through a forward
of the session (the URL's address as the host sees it). Nothing of the live customer is read on the host, stopped
or changed, and nothing is started in the copy (as locally). A failure removes the copy (its folder, the new
databases) and leaves the journal on the host when the host went away.
"""

from __future__ import annotations

import os
import time

from customers.models import Customer
from engines import dbrestore, dburl
from engines.humanize import human_duration, human_size
from hosts.remote import RemoteError, RemoteHost
from operations.context import OperationError, RunCancelled, RunContext, RunLost

from . import dbswap, host_journals, remote_restore
from .reading import keyring_for, store_of


def restore_copy(ctx: RunContext, plan, local: remote_restore.Steps) -> dict:
    """backups.restore's clone path for a customer on a remote host; `plan` from its _plan."""
    p = ctx.run.params
    started = time.monotonic()
    customer, host = plan.customer, plan.customer.host
    if not host.enabled:
        raise OperationError(f"host {host.name} is disabled: no restore of {customer} connects to it")
    if not customer.run_as:
        raise OperationError(f"customer {customer} has no run_as user: a copy on host {host.name} belongs to the "
                             "customer's user there; nothing was touched")
    to_root = p.get("to_root")
    for art in plan.artifacts:
        if art.kind == "database" and not remote_restore._sqlite(art) and \
                dburl.parse(plan.to_databases[art.source]).engine != "postgresql":
            raise OperationError(f"refused before touching anything: a copy on host {host.name} restores PostgreSQL "
                                 f"databases only (not built yet for {art.source}'s engine)")
    try:
        remote = RemoteHost(host)
    except Exception as exc:  # engines.ssh: no key
        raise OperationError(f"{exc}; nothing was touched") from None
    with remote:
        try:
            who = remote.call("engines.hostrestore.identity", customer.run_as)
            found = remote.call("engines.hostmove.root_check", host.root(), to_root,
                                list(Customer.objects.filter(host=host).values_list("root", flat=True))) \
                if to_root else []
        except RemoteError as exc:
            raise OperationError(f"{exc}; nothing was touched") from None
        if not isinstance(who, dict) or not all(isinstance(who.get(k), int) for k in ("uid", "gid")) or \
                who["uid"] == 0:
            raise OperationError(f"{remote.where} answered a user that is not one: not trusted; nothing was touched")
        if not isinstance(found, list):
            raise OperationError(f"{remote.where} answered something that is not a folder check: not trusted")
        if found:
            raise OperationError(f"refused before touching anything on host {host.name}: "
                                 + "; ".join(str(f)[:500] for f in found[:10]))
        _hold_copy_databases(ctx, remote, plan)
        root = str(plan.root)
        ctx.info(f"copy of {customer} on host {host.name}" + (f" at {to_root}" if to_root else "")
                 + f": the archives are checked here, unpacked there as {customer.run_as}; the live customer is "
                 "not touched")
        ctx.phases(*local.phases(True, False, late=False))
        journal = remote_restore.Journal(local.journal(ctx), remote, ctx.run.pk, root)
        try:
            if to_root:
                # Journalled before, marked after: made (the undo removes it) or an empty folder that was there
                # (emptied again); None when the call failed (nothing of this run's to remove).
                step = journal.add({"type": "move_root", "path": to_root, "host": True, "made": None,
                                    "gid": who["gid"]})
                step["made"] = bool(remote.call("engines.hostmove.make_root", host.root(), to_root, who["gid"]))
                journal.save()
            staging = remote_restore._stage(ctx, plan, remote, store_of(plan.backup), keyring_for(plan.backup),
                                            journal, who)
            ctx.phase("copy in")
            if staging is not None:
                remote_restore._swap_files(ctx, plan, remote, staging, journal)
            dbs = {d.name: d for d in customer.databases.all()}
            for art in plan.artifacts:
                if remote_restore._sqlite(art):
                    live = _copy_sqlite_path(dbs[art.source], customer.root, root)
                    remote.call("engines.hostmove.make_folder", root, os.path.dirname(live), who["uid"], who["gid"])
                    remote_restore._sqlite_in(ctx, plan, remote, art, live, journal)
            import dataclasses

            dbswap.swap_all(ctx, dataclasses.replace(plan, artifacts=[a for a in plan.artifacts
                                                                     if not remote_restore._sqlite(a)]), journal)
        except BaseException as exc:
            undone = _undo(ctx, remote, journal, customer, to_root)
            if isinstance(exc, (RunLost, RunCancelled)):
                raise
            if not undone:
                raise OperationError(f"restore failed: {local.short(exc)}; the copy on host {host.name} could NOT be "
                                     f"fully removed: its journal stays there ({journal.path}); an operator must look "
                                     f"at {root}; the live customer was not touched") from None
            raise OperationError(f"restore failed: {local.short(exc)}; the copy was removed from host {host.name}; "
                                 "the live customer was not touched") from None
        with ctx.uninterruptible():
            host_journals.cleanup(ctx, remote, journal, root)
    seconds = time.monotonic() - started
    size = sum(a.size for a in plan.artifacts)
    ctx.info(f"copy of backup #{plan.backup.pk} on host {host.name} complete in {human_duration(seconds)} "
             f"({human_size(size)} stored)")
    return {"backup": plan.backup.pk, "customer": customer.domain, "clone": True, "host": host.name,
            "root": to_root or None, "artifacts": [a.name for a in plan.artifacts], "safety_backup": None,
            "databases": {k: dburl.parse(v).display() for k, v in plan.to_databases.items()},
            "seconds": round(seconds, 2)}


def _copy_sqlite_path(db, live_root: str, copy_root: str) -> str:
    rel = db.sqlite_path
    if os.path.isabs(rel):
        rel = os.path.relpath(os.path.normpath(rel), os.path.normpath(live_root))
    if rel.startswith(".."):
        raise OperationError(f"database {db.name}'s file {db.sqlite_path} is not inside {live_root}")
    return os.path.join(copy_root, rel)


def _hold_copy_databases(ctx: RunContext, remote: RemoteHost, plan) -> None:
    """dbswap's targets for this run: each --to-database (PostgreSQL) through a forward to its address as the host
    sees it."""
    for name, url in plan.to_databases.items():
        parsed = dburl.parse(url)
        port = parsed.port or 5432
        far = os.path.join(parsed.host, f".s.PGSQL.{port}") if parsed.host.startswith("/") else parsed.host
        try:
            sockdir = os.path.dirname(remote.forward(far, parsed.port, f".s.PGSQL.{port}"))
        except RemoteError as exc:
            raise OperationError(f"{exc}; nothing was touched") from None
        ctx.add_secret(parsed.password)
        target = dbrestore.DbTarget(engine="postgresql", host=sockdir, port=port, user=parsed.user,
                                    password=parsed.password, dbname=parsed.name)
        try:  # "into this new database" (the restore command's words): an existing one is never replaced
            taken = dbrestore.database_exists(target, parsed.name)
        except dbrestore.RestoreError as exc:
            raise OperationError(f"--to-database {name}: {exc}; nothing was touched") from None
        if taken:
            raise OperationError(f"refused before touching anything: --to-database {name}: database "
                                 f"{parsed.name} exists already on {parsed.display()} (as host "
                                 f"{remote.host.name} reaches it); a copy goes into a new database")
        ctx.held[("db", name)] = target


def _undo(ctx: RunContext, remote: RemoteHost, journal, customer: Customer, to_root: str | None) -> bool:
    """The copy removed: its new databases dropped, its folder (with everything unpacked there) removed; without a
    --to-root, the host-side SQLite steps undone. True when nothing is left of it."""
    with ctx.uninterruptible():
        ok = True
        for step in reversed(journal.steps):
            try:
                if dbswap.is_step(step) and not step.get("host"):
                    dbswap.undo(ctx, step)
                elif step["type"] == "staging":
                    remote.call("engines.hostrestore.remove_tree", str(journal.root), step["path"])
            except Exception as exc:
                ok = False
                ctx.error(f"could not undo {step.get('type')} ({step.get('db') or step.get('path') or ''}) on "
                          f"{remote.host.name}: {exc}")
        made_step = next((s for s in journal.steps if s["type"] == "move_root"), {})
        made = made_step.get("made")
        if to_root and made is not None:
            try:
                if made:
                    remote.call("engines.hostmove.remove_root", remote.host.root(), to_root, customer.run_as)
                else:
                    remote.call("engines.hostmove.empty_root", remote.host.root(), to_root, made_step["gid"],
                                customer.run_as)
            except Exception as exc:
                ok = False
                ctx.error(f"could not remove the copy on {remote.host.name} ({to_root}): {exc}")
        if ok:
            try:
                journal.clear()
            except Exception as exc:
                ctx.warning(f"the copy is gone but its journal could not be removed on {remote.host.name}: {exc}")
        return ok
