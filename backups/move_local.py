"""A move onto `local`, the worker's own machine (`restore ID --to-host local`, `customer_move DOMAIN --to local`).

backups.move's order and guarantees, with the parts a restore of a customer on `local` uses instead of a session:

1. refused before anything is made (backups.move.prepare, then here): the new root — the same path relative to
   KASA_CUSTOMERS_ROOT as the old one to its host's customers root — held to Customer.clean's rules for `local`
   (customers.roots.move_root_problem: inside KASA_CUSTOMERS_ROOT with links followed, overlapping no customer
   of `local` nor Kasa's own files, not there yet); the run_as user looked up on this machine (neither root nor
   Kasa's own, and one the worker may switch to); free disk; a database of the same name on this machine's server;
2. the root made as a customer's root is (engines.hostmove.make_root, here: the worker's, the customer's group,
   0750), then the backup restored into it with the local restore's own blocks (backups.restore: `_stage` checks
   every archive and unpacks it as the customer's user, then backups.restore_files.swap_in places the folders as
   for a copy — into an empty place, nothing live to carry over; SQLite files into their folders; databases
   through backups.dbswap);
3. PM2 started here as the customer's user (customers.runtime, the local way), health URLs asked here;
4. the switch (backups.move._switch), then the old copy's services stopped on the old host, its folders kept.

**Databases.** A PostgreSQL or MySQL/MariaDB database the old host reached at a loopback address or a Unix socket
(its own server) goes into the server the worker's side reaches at **that same address, read on the worker's
machine**: the connection is kept exactly as written (host, port or socket, name, role, password), and from the
switch on it means this machine's server — the one every local code path (backups, restores, checks of a customer on
`local`) connects to with it. A maintenance connection set for that address is used as by a local restore. The
database is created fresh there (one of that name already there is refused: a move never replaces a database),
and a database the role could only restore in place is refused (it would have no way back). A database on any
other address is a shared server: left as it is.

Any failure before the switch drops the new databases (dbswap's undo) and removes the new root with the PM2
daemon started in it; the customer is still on its old host, untouched. A worker that dies mid-move is undone the
same way by the reaper (`abandon`): the journal is this machine's (the run's, operations.journal).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from django.conf import settings

from customers import runtime
from customers.models import Customer
from engines import dbrestore, hostmove, runas
from hosts.models import LOCAL, Host
from operations.context import OperationError, RunCancelled, RunContext, RunLost
from operations.journal import RunJournal

from . import dbswap, move, restore_files
from .reading import keyring_for, store_of


def onto_local(host_name: str) -> bool:
    return host_name == LOCAL


def move_here(ctx: RunContext, plan, steps) -> dict:
    """backups.restore's path for a run with `to_host` local; `steps`: its building blocks (remote_restore.Steps)."""
    started = time.monotonic()
    customer = plan.customer
    source, old_root = customer.host, customer.root
    target, root, shared = move.prepare(ctx, plan)
    plan.owner = _check_here(ctx, customer, plan, target, root, steps)
    _hold_databases(ctx, customer, root)
    ctx.info(f"moving {customer} from host {source.name} ({old_root}) to {target.name}, the worker's machine "
             f"({root}): the archives are checked and unpacked here as {customer.run_as}; {customer} keeps running "
             f"on {source.name} until the copy here is healthy")
    ctx.phases(("verify and unpack", 6), ("start", 1), ("health", 1), ("switch", 1), ("stop old copy", 1))
    journal = steps.journal(ctx)
    try:
        # Journalled before, marked made after: a root this run did not make is never removed by its undo.
        step = journal.add({"type": "move_root", "path": root, "made": None})
        step["made"] = hostmove.make_root(target.root(), root, plan.owner.gid, existing_ok=False) is True
        journal.save()
        staging = steps.stage(ctx, plan, store_of(plan.backup), keyring_for(plan.backup), journal)
        if dbswap.in_place(journal):
            # An in-place restore's way back is a backup of what it replaces: here that is nobody's database.
            raise OperationError("a database would be restored in place on this machine's server (its role may "
                                 "not create databases here): give the role CREATEDB, or set a maintenance "
                                 "connection for that server")
        if staging is not None:  # into an empty root, as a copy's folders go: nothing live to carry over
            restore_files.swap_in(ctx, plan, staging, journal, clone=True)
        _sqlite_folders(ctx, plan, root)
        steps.restore_file_databases(ctx, plan, journal)
        dbswap.swap_all(ctx, plan, journal)
        specs = _specs(customer, root, source, target)  # after the files: Kasa's ecosystem file, if any, is there
        ctx.phase("start")
        ctx.info(f"starting {len(specs)} service(s) here as {customer.run_as}")
        runtime.start_all(ctx, specs)
        ctx.phase("health")
        runtime.check_health(ctx, specs)
        ctx.phase("switch")
        ctx.check_alive()
        move._switch(ctx, customer, source, target, old_root, root)
    except BaseException as exc:
        undone = _undo(ctx, journal, customer)
        if isinstance(exc, (RunLost, RunCancelled)):
            raise
        if not undone:
            raise OperationError(
                f"move to host {target.name} failed: {steps.short(exc)}; {customer} is still on host {source.name}, "
                f"running as before, but the copy on {target.name} could NOT be fully removed (the run's journal "
                f"says what is left): an operator must look at {root}") from None
        raise OperationError(f"move to host {target.name} failed: {steps.short(exc)}; {customer} is still on host "
                             f"{source.name}, running as before; the copy on {target.name} was removed") from None
    with ctx.uninterruptible():  # the move holds: its bookkeeping runs to its end
        steps.cleanup(ctx, journal, plan.root)
    return move.finish(ctx, plan, source, target, old_root, shared, started)


def _check_here(ctx: RunContext, customer: Customer, plan, target: Host, root: str, steps) -> runas.Identity:
    """This machine's answers: the customer's user, the free disk (the new root's place: move.prepare, just before).
    Nothing is made yet."""
    try:
        who = runtime.run_identity(customer)  # exists here, not root nor Kasa's, and the worker can switch to it
    except OperationError as exc:
        raise OperationError(f"move refused before touching anything on host {target.name}: {exc}") from None
    if who is None:
        raise OperationError(f"move refused before touching anything: {customer} has no run_as user")
    steps.check_disk(plan)  # "…; nothing was touched"
    ctx.info(f"host {target.name}: {customer.run_as} is uid {who.uid} here, {root} is free")
    return who


def _hold_databases(ctx: RunContext, customer: Customer, root: str) -> None:
    """dbswap's targets for this run: SQLite files at their place in the new root; each PostgreSQL and MySQL/MariaDB
    database of the old host's own server at the same address read on this machine (the connection as written),
    never one that exists already there."""
    for db in customer.databases.all():
        if db.engine == "sqlite":
            live = os.path.join(root, move.sqlite_rel(db, customer.root))
            ctx.held[("db", db.name)] = dbrestore.DbTarget(engine="sqlite", sqlite_path=live, sqlite_root=root)
            continue
        if db.engine not in move.SERVERS or not move.host_local(db):
            continue
        target = dbswap.target_for(customer, db.name)  # with the maintenance connection set for that address
        for t in (target, target.maint):
            if t is not None and t.password:
                ctx.add_secret(t.password)
        where = f"this machine's server ({db.host}:{db.port or move.DEFAULT_PORTS[db.engine]} as the worker reaches it)"
        try:
            taken = dbrestore.database_exists(target, db.database)
        except dbrestore.RestoreError as exc:
            raise OperationError(f"move refused before touching anything: database {db.name} on {where}: "
                                 f"{exc}") from None
        if taken:
            raise OperationError(f"move refused before touching anything: a database named {db.database} exists "
                                 f"already on {where}; a move creates it there, it never replaces one")
        ctx.held[("db", db.name)] = target


def _sqlite_folders(ctx: RunContext, plan, root: str) -> None:
    """The folder of each SQLite file that no restored folder brought, the customer's user's (the application
    writes beside its file: journal, WAL)."""
    for art in plan.artifacts:
        if art.kind == "database" and (art.details or {}).get("engine") == "sqlite":
            folder = os.path.dirname(ctx.held[("db", art.source)].sqlite_path)
            if os.path.normpath(folder) != os.path.normpath(root):
                hostmove.make_folder(root, folder, plan.owner.uid, plan.owner.gid)


def _specs(customer: Customer, root: str, source: Host, target: Host) -> list:
    """The services as they run here (customers.runtime), health URLs as the new copy answers them."""
    return [dataclasses.replace(s, health_url=move.moved_health_url(s.health_url, source, target) or "")
            for s in runtime.service_specs(customer, root=Path(root))]


def _undo(ctx: RunContext, journal, customer: Customer) -> bool:
    """The new copy removed: its databases dropped from this machine's server, then the root with the PM2 daemon
    started in it (engines.hostmove.remove_root: the daemon stopped as its user first). True when nothing is left."""
    with ctx.uninterruptible():
        ok = True
        for step in reversed(journal.steps):
            if dbswap.is_step(step) and step.get("engine") != "sqlite":  # an SQLite file goes with the root
                try:
                    dbswap.undo(ctx, step)
                except Exception as exc:
                    ok = False
                    ctx.error(f"could not undo {step.get('type')} ({step.get('db') or ''}) here: {exc}")
        made = next((s for s in journal.steps if s["type"] == "move_root" and s.get("made")), None)
        if made:
            try:
                hostmove.remove_root(str(settings.KASA_CUSTOMERS_ROOT), made["path"], customer.run_as)
                ctx.info(f"the copy on {LOCAL} was removed ({made['path']})")
            except Exception as exc:
                ok = False
                ctx.error(f"could not remove the copy on {LOCAL} ({made['path']}): {exc}")
        if ok:
            journal.clear()
        return ok


def abandon(run, ctx: RunContext, steps: list[dict], customer: Customer) -> None:
    """The worker died mid-move onto `local` (the reaper): before the switch, the half-made copy is removed here
    as a failed move removes it; after it, the move holds."""
    made = next((s for s in steps if s.get("type") == "move_root" and s.get("made")), None)
    if made and customer.host.is_local and os.path.normpath(customer.root) == os.path.normpath(made["path"]):
        ctx.warning(f"the worker died after {customer} was switched to {LOCAL}: the move holds; the old copy's "
                    f"services on host {(customer.old_copy or {}).get('host')} may still run: stop them by hand")
        return
    if not steps:
        return
    journal = RunJournal(ctx)
    journal.steps = list(steps)
    if _undo(ctx, journal, customer):
        ctx.info(f"the worker died mid-move of {customer} to {LOCAL}: the half-made copy was removed; the customer "
                 f"is on host {customer.host.name}, as before")
    else:
        ctx.error(f"the worker died mid-move of {customer} to {LOCAL} and the half-made copy could not be fully "
                  "removed: an operator must look")
