"""Moving a customer to another host (issue 14, point 7): `restore ID --to-host NAME`, the admin's "Move to host…".

A move is a restore run with the param `to_host` (backups.move_service starts it), not a kind of its own: it is a
restore of one backup, only elsewhere, so it takes the restore's permission, lock (one mutating run per customer),
run page, journal and abandon hook, and its CLI is the restore command's.

The order keeps the customer where it is until the new copy has proved itself:

1. refused before anything is made (on the worker, then on the target host): a disabled, untrusted or unreachable
   host, the customer's root taken there (overlapping another customer's, or a folder that is not empty), too
   little disk, no run_as user there, a backup that lacks a service folder, a health URL that could not be asked
   of the new copy (a move onto `local`, the worker's machine, is backups.move_local: the same
   order with the local restore's parts);
2. the new root made on the target host (the same path relative to its customers root: hosts may keep their
   customers in different folders), then the backup restored into it exactly as a remote restore stages and swaps
   (backups.remote_restore: every archive checked on the worker, unpacked on the host as the customer's user);
   SQLite files into their folders there; PostgreSQL and MySQL/MariaDB databases the old host reached at a
   loopback address or a Unix socket (its own server) into the new host's server, same name, through the
   session's forward (a fresh database: one of that name there already is refused); a database on any other
   address is a shared server both hosts reach: left as it is, the new copy uses it;
3. the services started there (PM2, as the customer's user on that host) and their health URLs asked on that host
   (a loopback URL as it is; one naming the old host's own address pointed at the new host's, 127.0.0.1 on
   `local`);
4. only then, in one transaction: customer.host, root, SQLite paths and health URLs switched, the old copy
   recorded on the customer (`old_copy`), an audit entry;
5. the services stopped on the old host, its folders left in place until the move is confirmed
   (backups.move_service.move_confirm deletes them).

Any failure before the switch removes the new copy (its root, with the PM2 daemon started there) and puts the
databases of the new host's server back (the journal, kept on the target host too), and the run fails saying the
customer is still on its old host, untouched (nothing there is stopped before the switch).
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
import urllib.parse
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from customers import roots
from customers.models import Customer, DatabaseConnection, run_as_identity
from engines import dbrestore, procman, runas
from engines.humanize import human_duration, human_size
from hosts.models import Host
from hosts.remote import RemoteError, RemoteHost
from operations.context import OperationError, RunCancelled, RunContext, RunLost

from . import dbswap, host_journals, remote_restore
from .reading import keyring_for, store_of

LOOPBACK = ("localhost", "::1")
SERVERS = ("postgresql", "mysql")  # databases on a server: the old host's own goes with the move, a shared one stays
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}


# --- what a move does, decided on the worker ---------------------------------------------------------------------
def new_root(customer: Customer, target: Host) -> str:
    """The customer's root on `target`: the same path relative to its host's customers root."""
    rel = os.path.relpath(os.path.normpath(customer.root), os.path.normpath(customer.host.root()))
    if rel.startswith("..") or rel == ".":
        raise OperationError(f"{customer}'s root {customer.root} is not inside host {customer.host.name}'s customers "
                             f"root {customer.host.root()}: where it goes on {target.name} is unknown")
    return os.path.join(target.root(), rel)


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in LOOPBACK


def host_local(db: DatabaseConnection) -> bool:
    """A server on the old host itself (loopback or a Unix socket): the new host has its own there."""
    return db.host.startswith("/") or is_loopback(db.host)


def moved_health_url(url: str, source: Host, target: Host) -> str | None:
    """The health URL as the new copy answers it (health URLs are asked on the customer's host: hosts.remote's
    check_health), or None when it names neither a loopback address (the same on the new host: unchanged) nor the
    old host's own address (the new host's then): a public name would be asked of whatever it points at — the old
    copy until DNS changes."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    name = parts.hostname or ""
    if is_loopback(name):
        return url
    if source.is_local or name != source.address:
        return None
    # `local` has no address of its own in Kasa: the worker asks its own services on its loopback
    address = "127.0.0.1" if target.is_local else f"[{target.address}]" if ":" in target.address else target.address
    netloc = address + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def sqlite_rel(db: DatabaseConnection, root: str) -> str:
    path = db.sqlite_path
    return os.path.relpath(os.path.normpath(path), os.path.normpath(root)) if os.path.isabs(path) else path


def problems(customer: Customer, target: Host, backup=None) -> list[str]:
    """Why `customer` cannot move to `target` (with `backup`), found on the worker: [] when it may try."""
    found = []
    source = customer.host
    if target.pk == source.pk:
        found.append(f"{customer} is on host {target.name} already")
    if target.is_local and customer.run_as:
        try:  # the worker's own users: looked up here, as Customer.clean does for a customer on `local`
            run_as_identity(customer.run_as)
        except runas.RunAsError as exc:
            found.append(f"on `local` (the worker's machine): {exc}")
    if not target.enabled:
        found.append(f"host {target.name} is disabled")
    if not target.is_local and not target.host_key:
        found.append(f"host {target.name} has no trusted host key: trust its fingerprint first")
    if not customer.run_as:
        found.append(f"{customer} has no run_as user: its files on {target.name} belong to that user there")
    for s in customer.services.all():
        if s.process_manager not in remote_restore.MANAGERS:
            found.append(f"service {s.name} is run by {s.process_manager}: a move starts PM2 and start-command "
                         "services only")
        elif s.health_url and target.via_tunnel and not is_loopback(urllib.parse.urlsplit(s.health_url).hostname
                                                                   or ""):
            found.append(f"host {target.name} is reached through a tunnel: its address is the tunnel's end, so service "
                         f"{s.name}'s health URL could not be pointed at the new copy")
        elif s.health_url and moved_health_url(s.health_url, source, target) is None:
            found.append(f"service {s.name}'s health URL {s.health_url} names neither a loopback address nor host "
                         f"{source.name}'s own: the new copy could not be asked (a health URL names the service as "
                         "its host sees it: use 127.0.0.1)")
    for d in customer.databases.all():
        if d.engine not in SERVERS + ("sqlite",):
            found.append(f"database {d.name} is {d.engine}: a move brings PostgreSQL, MySQL/MariaDB and SQLite "
                         "databases only")
    if backup is not None:
        have = {a.source for a in backup.artifacts.all() if a.kind == "service"}
        missing = sorted(s.name for s in customer.services.all() if s.name not in have)
        if missing:
            found.append(f"backup #{backup.pk} holds no folder of {', '.join(missing)}: a move needs a backup of "
                         "every service (a full backup)")
        if any(a.kind == "service" and (a.details or {}).get("link") for a in backup.artifacts.all()):
            found.append(f"backup #{backup.pk} holds a service kept behind a release link: not moved yet")
    if not found:
        try:
            root = new_root(customer, target)
        except OperationError as exc:
            found.append(str(exc))
        else:
            if target.is_local and (problem := local_root_problem(root, target)):
                found.append(problem)
    return found


def local_root_problem(root: str, target: Host) -> str | None:
    """Why `root` cannot be a moved customer's new root on `local`: its local rules (customers.roots)."""
    return roots.move_root_problem(root, Customer.objects.filter(host=target).values_list("root", flat=True))


# --- the run -------------------------------------------------------------------------------------------------------
def prepare(ctx: RunContext, plan) -> tuple[Host, str, list[str]]:
    """The target host, the new root and the shared databases (left as they are) of a move, refused on the worker
    before anything is made; `plan` keeps only what is restored, and points at the new root."""
    p = ctx.run.params
    customer = plan.customer
    target = Host.objects.filter(name=p["to_host"]).first()
    if target is None:
        raise OperationError(f"no host named {p['to_host']}; nothing was touched")
    found = problems(customer, target, plan.backup)
    if found:
        raise OperationError("move refused before touching anything: " + "; ".join(found))
    root = new_root(customer, target)
    shared = [d.name for d in customer.databases.all() if d.engine in SERVERS and not host_local(d)]
    plan.artifacts = [a for a in plan.artifacts if not (a.kind == "database" and a.source in shared)]
    plan.root = Path(root)
    for name in shared:
        ctx.info(f"database {name} is on a shared server (not the old host's own): left as it is, the copy on "
                 f"{target.name} uses it")
    return target, root, shared


def move(ctx: RunContext, plan, local: remote_restore.Steps) -> dict:
    """backups.restore's path for a run with `to_host` (a remote host); `plan` from its _plan (every artifact)."""
    started = time.monotonic()
    customer = plan.customer
    source = customer.host
    old_root = customer.root
    target, root, shared = prepare(ctx, plan)
    try:
        remote = RemoteHost(target)
    except Exception as exc:  # engines.ssh: no key
        raise OperationError(f"{exc}; nothing was touched") from None
    with remote:
        who = _check_target(ctx, remote, customer, plan, root)
        _hold_host_databases(ctx, remote, customer)
        ctx.info(f"moving {customer} from host {source.name} ({old_root}) to host {target.name} ({root}): the "
                 f"archives are checked here, unpacked there as {customer.run_as}; {customer} keeps running on "
                 f"{source.name} until the copy there is healthy")
        ctx.phases(("verify and unpack", 6), ("start", 1), ("health", 1), ("switch", 1), ("stop old copy", 1))
        journal = remote_restore.Journal(local.journal(ctx), remote, ctx.run.pk, root)
        specs = _specs(customer, root, source, target)
        try:
            # Journalled before, marked made after: a root this run did not make (another run's, taken between the
            # check and now) is never removed by its undo.
            step = journal.add({"type": "move_root", "path": root, "host": True, "made": None})
            step["made"] = remote.call("engines.hostmove.make_root", target.root(), root, who["gid"],
                                       existing_ok=False) is True
            journal.save()
            staging = remote_restore._stage(ctx, plan, remote, store_of(plan.backup), keyring_for(plan.backup),
                                            journal, who)
            if dbswap.in_place(journal):
                # An in-place restore's way back is a backup of what it replaces: on the new host's server that is
                # nobody's database, and the old host's is not the one being changed. Only fresh databases here.
                raise OperationError(f"a database would be restored in place on host {target.name}'s server (its "
                                     "role may not create databases there): give the role CREATEDB there, or set "
                                     "a maintenance connection for that server")
            if staging is not None:
                remote_restore._swap_files(ctx, plan, remote, staging, journal)
            _sqlite_in(ctx, plan, remote, journal, who, root)
            dbswap.swap_all(ctx, dataclasses.replace(plan, artifacts=[a for a in plan.artifacts
                                                                     if not remote_restore._sqlite(a)]), journal)
            ctx.phase("start")
            ctx.info(f"starting {len(specs)} service(s) on {target.name}")
            _services(ctx, remote, customer, specs, "start")
            ctx.phase("health")
            from customers import runtime

            runtime.check_health(ctx, specs, checker=remote.check_health)  # asked on the new host
            ctx.phase("switch")
            ctx.check_alive()
            _switch(ctx, customer, source, target, old_root, root)
        except BaseException as exc:
            undone = _undo(ctx, remote, journal, customer, root)
            if isinstance(exc, (RunLost, RunCancelled)):
                raise
            if not undone:
                raise OperationError(
                    f"move to host {target.name} failed: {local.short(exc)}; {customer} is still on host "
                    f"{source.name}, running as before, but the copy on {target.name} could NOT be fully removed: "
                    f"its journal stays there ({journal.path}); an operator must look at {root} on "
                    f"{target.name}") from None
            raise OperationError(f"move to host {target.name} failed: {local.short(exc)}; {customer} is still on "
                                 f"host {source.name}, running as before; the copy on {target.name} was "
                                 "removed") from None
        with ctx.uninterruptible():  # the move holds: its bookkeeping runs to its end
            host_journals.cleanup(ctx, remote, journal, root)
    return finish(ctx, plan, source, target, old_root, shared, started)


def finish(ctx: RunContext, plan, source: Host, target: Host, old_root: str, shared: list[str],
           started: float) -> dict:
    """After the switch: the old copy's services stopped (its folders kept), and the run's result."""
    customer, root = plan.customer, str(plan.root)
    ctx.phase("stop old copy")
    stopped = _stop_old(ctx, customer, source, old_root)
    if not stopped:
        Customer.objects.filter(pk=customer.pk).update(old_copy={**_old_copy(ctx, source, old_root),
                                                                 "stopped": False})
    seconds = time.monotonic() - started
    ctx.info(f"{customer} moved to host {target.name} in {human_duration(seconds)}; the old copy stays on "
             f"{source.name} at {old_root}" + (" (stopped)" if stopped else " (NOT stopped: see above)")
             + " until the move is confirmed")
    return {"backup": plan.backup.pk, "customer": customer.domain, "clone": False, "moved": True,
            "host": target.name, "from_host": source.name, "root": root, "old_root": old_root,
            "old_stopped": stopped, "artifacts": [a.name for a in plan.artifacts], "shared_databases": shared,
            "safety_backup": None, "databases": {}, "seconds": round(seconds, 2)}


def _check_target(ctx: RunContext, remote: RemoteHost, customer: Customer, plan, root: str) -> dict:
    """The target host's own answers: its user, the new root's place, its free disk. Nothing is made yet."""
    host = remote.host
    try:
        who = remote.call("engines.hostrestore.identity", customer.run_as)
        others = list(Customer.objects.filter(host=host).values_list("root", flat=True))
        found = remote.call("engines.hostmove.root_check", host.root(), root, others, existing_ok=False)
        free = remote.call("engines.hostrestore.free_bytes", host.root())
    except RemoteError as exc:
        raise OperationError(f"move refused before touching anything: {exc}") from None
    if not isinstance(who, dict) or not all(isinstance(who.get(k), int) for k in ("uid", "gid")) or who["uid"] == 0:
        raise OperationError(f"{remote.where} answered a user that is not one: not trusted; nothing was touched")
    if not isinstance(found, list):
        raise OperationError(f"{remote.where} answered something that is not a folder check: not trusted")
    if found:
        raise OperationError(f"move refused before touching anything on host {host.name}: "
                             + "; ".join(str(f)[:500] for f in found[:10]))
    need = sum(a.size for a in plan.artifacts)
    if not isinstance(free, int) or free < need + remote_restore.DISK_MARGIN:
        raise OperationError(f"not enough free disk on host {host.name} under {host.root()}: the copy needs at least "
                             f"{human_size(need)} plus a {human_size(remote_restore.DISK_MARGIN)} margin, "
                             f"{human_size(free if isinstance(free, int) else 0)} free; nothing was touched")
    ctx.info(f"host {host.name}: {customer.run_as} is uid {who['uid']} there, {root} is free, "
             f"{human_size(free)} free")
    return who


def _hold_host_databases(ctx: RunContext, remote: RemoteHost, customer: Customer) -> None:
    """dbswap's targets for this run: each PostgreSQL and MySQL/MariaDB database of the old host's own server, on
    the new host's server (the same address or socket as the new host sees it, the same name and user) through a
    forward of the session, as backups.remote_parts.hold_forwarded_targets points a restore in place at it."""
    from core.secrets import reveal

    for db in customer.databases.all():
        if db.engine not in SERVERS or not host_local(db):
            continue
        port = db.port or DEFAULT_PORTS[db.engine]
        try:
            if db.engine == "postgresql":
                far = os.path.join(db.host, f".s.PGSQL.{port}") if db.host.startswith("/") else db.host
                host = os.path.dirname(remote.forward(far, db.port, f".s.PGSQL.{port}"))
            else:  # engines.dbrestore_mysql reads a host starting with "/" as a socket file
                host = remote.forward(db.host, db.port, "mysql.sock")
        except RemoteError as exc:
            raise OperationError(f"{exc}; nothing was touched") from None
        password = reveal(db.password)
        ctx.add_secret(password)
        target = dbrestore.DbTarget(engine=db.engine, host=host, port=port, user=db.user, password=password,
                                    dbname=db.database)
        # A database of that name there is not this customer's (it lives on the old host): a fresh swap would set
        # it aside and drop it. Refused rather than guessed at.
        try:
            taken = dbrestore.database_exists(target, db.database)
        except dbrestore.RestoreError as exc:
            raise OperationError(f"move refused before touching anything: database {db.name} on host "
                                 f"{remote.host.name}'s server: {exc}") from None
        if taken:
            raise OperationError(f"move refused before touching anything: a database named {db.database} exists "
                                 f"already on host {remote.host.name}'s server ({db.host}:{port} as that host sees "
                                 "it); a move creates it there, it never replaces one")
        ctx.held[("db", db.name)] = target


def _sqlite_in(ctx: RunContext, plan, remote: RemoteHost, journal, who: dict, root: str) -> None:
    dbs = {d.name: d for d in plan.customer.databases.all()}
    for art in plan.artifacts:
        if not remote_restore._sqlite(art):
            continue
        live = os.path.join(root, sqlite_rel(dbs[art.source], plan.customer.root))
        remote.call("engines.hostmove.make_folder", root, os.path.dirname(live), who["uid"], who["gid"])
        remote_restore._sqlite_in(ctx, plan, remote, art, live, journal)


def _specs(customer: Customer, root: str, source: Host, target: Host) -> list[procman.ServiceSpec]:
    return [procman.ServiceSpec(name=s.name, folder=os.path.join(root, s.path or "."), manager=s.process_manager,
                                app_name=s.app_name, start_command=tuple(s.start_command or ()),
                                health_url=moved_health_url(s.health_url, source, target) or "", root=root)
            for s in sorted(customer.services.all(), key=lambda s: s.name)]


def _services(ctx: RunContext, remote: RemoteHost, customer: Customer, specs, action: str) -> None:
    """PM2 on `remote`, as the customer's user there (engines.hostrestore.services)."""
    remote_restore._services(ctx, remote, types.SimpleNamespace(customer=customer), specs, action)


def _old_copy(ctx: RunContext, source: Host, old_root: str) -> dict:
    return {"host": source.name, "root": old_root, "run": ctx.run.pk, "moved_at": timezone.now().isoformat(),
            "stopped": True}


def _switch(ctx: RunContext, customer: Customer, source: Host, target: Host, old_root: str, root: str) -> None:
    """customer.host and everything that names its old place, in one transaction with the audit entry."""
    from audit.services import audit_record

    with transaction.atomic():
        c = Customer.objects.select_for_update().get(pk=customer.pk)
        if c.host_id != source.pk or c.root != old_root:
            raise OperationError(f"{customer} changed while it was moved (host {c.host}, root {c.root})")
        for db in c.databases.filter(engine=DatabaseConnection.Engine.SQLITE):
            if os.path.isabs(db.sqlite_path):
                db.sqlite_path = os.path.join(root, sqlite_rel(db, old_root))
                db.save(update_fields=["sqlite_path"])
        for s in c.services.all():
            url = moved_health_url(s.health_url, source, target)
            if url and url != s.health_url:
                s.health_url = url
                s.save(update_fields=["health_url"])
        c.host, c.root, c.old_copy = target, root, _old_copy(ctx, source, old_root)
        c.save(update_fields=["host", "root", "old_copy", "updated_at"])
        audit_record(action="customer.moved", source="worker", obj=c, customer=c,
                     changes={"host": [source.name, target.name], "root": [old_root, root], "run": ctx.run.pk},
                     result="ok")
    ctx.info(f"{customer} is on host {target.name} now ({root})")


def _stop_old(ctx: RunContext, customer: Customer, source: Host, old_root: str) -> bool:
    """The services of the old copy stopped (its folders stay); False, with the reason logged, when they could
    not be: the move holds all the same."""
    from customers import runtime

    try:
        old = Customer.objects.prefetch_related("services").get(pk=customer.pk)
        old.host, old.root = source, old_root  # as it was, for the specs (never saved)
        if source.is_local:
            runtime.stop_all(ctx, runtime.service_specs(old))
        else:
            with RemoteHost(source) as remote:
                specs = [procman.ServiceSpec(name=s.name, folder=os.path.join(old_root, s.path or "."),
                                             manager=s.process_manager, app_name=s.app_name,
                                             start_command=tuple(s.start_command or ()), root=old_root)
                         for s in sorted(old.services.all(), key=lambda s: s.name)]
                _services(ctx, remote, old, specs, "stop")
    except Exception as exc:  # the move holds: the old copy is reported as still running
        ctx.error(f"the services of the old copy on host {source.name} could not be stopped: {exc}; stop them "
                  f"by hand (the customer answers from the new host)")
        return False
    ctx.info(f"the services of the old copy on host {source.name} are stopped; its folders stay at {old_root}")
    return True


def _undo(ctx: RunContext, remote: RemoteHost, journal, customer: Customer, root: str) -> bool:
    """The new copy removed: databases put back on the new host's server, then the root with its PM2 daemon. True
    when nothing is left of it."""
    with ctx.uninterruptible():
        ok = True
        for step in reversed(journal.steps):
            if dbswap.is_step(step) and not step.get("host"):
                try:
                    dbswap.undo(ctx, step)
                except Exception as exc:
                    ok = False
                    ctx.error(f"could not undo {step.get('type')} ({step.get('db') or ''}) on {remote.host.name}: "
                              f"{exc}")
        if any(s["type"] == "move_root" and s.get("made") for s in journal.steps):
            try:
                remote.call("engines.hostmove.remove_root", remote.host.root(), root, customer.run_as,
                            settings.KASA_REMOTE_PM2 or "")
                ctx.info(f"the copy on {remote.host.name} was removed ({root})")
            except Exception as exc:
                ok = False
                ctx.error(f"could not remove the copy on {remote.host.name} ({root}): {exc}")
        if ok:
            try:
                journal.clear()
            except Exception as exc:
                ctx.warning(f"the copy is gone but its journal could not be removed on {remote.host.name}: {exc}")
        return ok
