"""The check operation: can Kasa reach everything a customer is made of?

For the root: it exists inside KASA_CUSTOMERS_ROOT, and the customer's run_as user exists (not root, not Kasa's),
may enter it, and nobody else may read it; the root follows the ownership model (engines.ownership: the root and
the folders Kasa makes there are Kasa's, each service folder the run_as user's).
For each database: connect with the real client and report the server version.
For each service: the folder exists inside the root, and the health URL answers.
Any problem fails the run, with every problem listed in its error and result.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from django.conf import settings

from core.secrets import reveal
from engines import dbprobe, ownership, paths, proc, runas
from hosts.models import LOCAL
from operations.context import OperationError, RunContext

from . import remote_check, roots
from .models import Customer, DatabaseConnection, run_as_identity

HEALTH_TIMEOUT = 5
# The kinds that run for a customer on a remote host (guard).
REMOTE_KINDS = ("backup", "verify", "check", "upgrade", "rollback")


def guard(ctx: RunContext) -> None:
    """Every run passes this right before its handler (operations.registry.add_guard, CustomersConfig.ready).

    A mutating run (backup, restore, upgrade, rollback) refuses to start when its customer's folders, or the
    folder it would change (a copy's --to-root), are not the customer's own any more: a folder may have been
    swapped for a link since it was validated. Nothing has been touched at that point.
    """
    run = ctx.run
    # On a remote host only what is built for it runs: a backup (backups.remote, which checks the customer's
    # folders on the host itself, with the rules below, before anything streams), a verification drill (it
    # reads the storage target only and restores into the worker's scratch), a check (customers.remote_check,
    # on the host), an upgrade or rollback (upgrades.remote: the folders checked on the host, every change made
    # there) and every restore (below). A kind not built for remote hosts would read or change a folder of *this*
    # machine in the customer's name: refused.
    host = Customer.objects.filter(pk=run.customer_id).values_list("host__name", flat=True).first()
    if host is not None and host != LOCAL:
        if run.kind in REMOTE_KINDS:
            return
        if run.kind == "restore":
            # In place (backups.remote_restore), into a copy on the same host (backups.remote_copy: the copy's
            # folder checked there against every customer root of that host) or a move to another host
            # (backups.move): every change made on a host, its folders checked there.
            return
        raise OperationError(f"refused before touching anything: {run.customer} lives on host {host}, and "
                             f"{run.kind} on remote hosts is not built yet (there: {', '.join(REMOTE_KINDS)}, "
                             "restore in place or into a copy, move)")
    if not run.mutating:
        return  # a drill reads no customer file; a check reports these problems itself
    customer = Customer.objects.prefetch_related("services", "databases").get(pk=run.customer_id)
    problems = customer.folder_problems()
    if run.root and run.root != customer.root:
        if problem := roots.copy_root_problem(run.root, Customer.objects.values_list("root", flat=True)):
            problems.append(problem)
    if problems:
        raise OperationError("refused before touching anything: " + "; ".join(problems))


def check(ctx: RunContext) -> dict:
    customer = Customer.objects.prefetch_related("services", "databases").get(pk=ctx.run.customer_id)
    if not customer.host.is_local:  # the same items, looked at on the host (customers.remote_check)
        return remote_check.check(ctx, customer, check_health=_check_health)
    services = list(customer.services.all())
    databases = list(customer.databases.all())
    total = 1 + len(services) + len(databases)
    done = 0
    problems: list[str] = []
    result: dict = {"root": None, "databases": [], "services": []}

    ctx.phases(("root folder", 1), ("databases", len(databases)), ("services", len(services)))
    ctx.phase("root folder")
    ctx.progress(done, total, "root folder")
    try:
        root = customer.root_path()
        if not root.is_dir():
            raise paths.PathEscapeError(f"root folder {root} does not exist")
        if problem := roots.root_conflict(customer.root, Customer.objects.exclude(pk=customer.pk)
                                          .values_list("root", flat=True)):
            raise paths.PathEscapeError(problem)
        result["root"] = {"path": str(root), "ok": True}
        ctx.info(f"root folder {root}: ok")
    except paths.PathEscapeError as exc:
        result["root"] = {"path": customer.root, "ok": False, "error": str(exc)}
        problems.append(str(exc))
        ctx.error(str(exc))
    result["run_as"] = _check_run_as(ctx, customer, problems)
    result["ownership"] = _check_ownership(ctx, customer, services, problems)
    done += 1

    ctx.phase("databases")
    for db in databases:
        ctx.progress(done, total, f"database {db.name}")
        result["databases"].append(_check_database(ctx, db, problems))
        done += 1

    ctx.phase("services")
    for svc in services:
        ctx.progress(done, total, f"service {svc.name}")
        result["services"].append(_check_service(ctx, svc, problems))
        done += 1

    ctx.progress(done, total, "done")
    result["ok"] = not problems
    result["problems"] = problems
    if problems:
        raise OperationError(f"{len(problems)} problem(s): " + "; ".join(problems), result=result)
    unasked = [s.name for s in services if not s.health_url]
    ctx.info(f"all {len(databases)} database(s) and {len(services)} service(s) ok"
             + (f"; no health URL: {', '.join(unasked)}" if unasked else ""))
    return result


def _check_run_as(ctx: RunContext, customer: Customer, problems: list[str]) -> dict:
    """Part of the root's item: who the customer's code runs as, and whether that user can work in the root
    while nobody else may look in."""
    entry: dict = {"user": customer.run_as, "ok": True}

    def problem(text: str) -> dict:
        entry.update(ok=False, error=text)
        problems.append(f"run as: {text}")
        ctx.error(f"run as: {text}")
        return entry

    if not customer.run_as:
        if settings.DEPLOYED:
            return problem("no run_as user is set: a deployed Kasa refuses to run this customer's commands")
        entry["note"] = "no run_as user: its commands would run as Kasa's own user (development only)"
        ctx.warning(f"run as: {entry['note']}")
        return entry
    try:
        identity = run_as_identity(customer.run_as)
        root = customer.root_path()
    except (runas.RunAsError, paths.PathEscapeError) as exc:
        return problem(str(exc))
    entry["uid"] = identity.uid
    if not root.is_dir():
        return entry  # the root's own item says so
    if not runas.may_access(root, identity, os.R_OK | os.X_OK):
        return problem(f"{identity} cannot enter the root folder {root} (each folder above it needs x for that "
                       "user, the root itself r and x)")
    mode = root.stat().st_mode & 0o777
    if mode & 0o006:
        return problem(f"the root folder {root} is open to every user (mode {mode:04o}): chmod o-rwx it, so other "
                       "customers' users cannot read it")
    ctx.info(f"run as: {identity}, who may enter {root}; other users may not read it")
    return entry


def _check_ownership(ctx: RunContext, customer: Customer, services, problems: list[str]) -> dict:
    """Part of the root's item: the root follows the ownership model (engines.ownership), so that the customer's
    user cannot rename or replace what Kasa's worker makes and changes there."""
    entry: dict = {"ok": True}
    try:
        root = customer.root_path()
        identity = run_as_identity(customer.run_as) if customer.run_as else None
    except (runas.RunAsError, paths.PathEscapeError):
        return entry  # reported by the root's and run_as's own checks
    if not root.is_dir():
        return entry
    found = ownership.problems(root, identity=identity, services=[(s.name, s.path) for s in services])
    for text in found:
        problems.append(f"ownership: {text}")
        ctx.error(f"ownership: {text}")
    if found:
        entry.update(ok=False, problems=found)
    else:
        ctx.info(f"ownership: {root} and the folders Kasa makes there are Kasa's"
                 + (f", the services' folders {identity.user}'s" if identity else ""))
    return entry


def _check_database(ctx: RunContext, db: DatabaseConnection, problems: list[str]) -> dict:
    entry = {"name": db.name, "engine": db.engine, "target": db.display_url(), "ok": False}
    ctx.info(f"database {db.name}: connecting to {db.display_url()}")
    try:
        if db.engine == DatabaseConnection.Engine.SQLITE:
            res = dbprobe.probe_sqlite(str(db.sqlite_file()))
        elif db.engine == DatabaseConnection.Engine.REDIS:
            password = reveal(db.password)
            ctx.add_secret(password)
            res = dbprobe.probe_redis(host=db.host, port=db.port, user=db.user, password=password,
                                      dbname=db.database, tls=db.tls, tls_ca=settings.KASA_REDIS_CA_FILE)
        else:
            password = reveal(db.password)
            ctx.add_secret(password)
            is_pg = db.engine == DatabaseConnection.Engine.POSTGRESQL
            probe = dbprobe.probe_postgresql if is_pg else dbprobe.probe_mysql
            res = probe(host=db.host, port=db.port, user=db.user, password=password, dbname=db.database,
                        runner=ctx.runner())
        entry.update(ok=True, server_version=res.server_version, client_version=res.client_version)
        ctx.info(f"database {db.name}: ok, server {res.server_version}")
    except (dbprobe.ProbeError, paths.PathEscapeError, OperationError, proc.CommandNotFound,
            proc.CommandTimeout) as exc:
        entry["error"] = str(exc)
        problems.append(f"database {db.name}: {exc}")
        ctx.error(f"database {db.name}: {exc}")
    return entry


def _check_service(ctx: RunContext, svc, problems: list[str]) -> dict:
    entry = {"name": svc.name, "path": svc.path, "process_manager": svc.process_manager, "ok": True}
    try:
        folder = svc.folder()
        if not folder.is_dir():
            raise paths.PathEscapeError(f"folder {folder} does not exist")
        entry["folder"] = str(folder)
        ctx.info(f"service {svc.name}: folder {folder} ok")
    except paths.PathEscapeError as exc:
        entry.update(ok=False, error=str(exc))
        problems.append(f"service {svc.name}: {exc}")
        ctx.error(f"service {svc.name}: {exc}")
    _check_health(ctx, svc, problems, entry)
    return entry


def _check_health(ctx: RunContext, svc, problems: list[str], entry: dict, *, status_of=None) -> None:
    """The service's health URL, asked from the worker (or, for a customer on a remote host, on that host:
    `status_of`, customers.remote_check)."""
    if svc.health_url:
        status, error = (status_of or _http_status)(svc.health_url)
        entry["health"] = {"url": svc.health_url, "status": status, "ok": status == 200}
        if status == 200:
            ctx.info(f"service {svc.name}: {svc.health_url} answered 200")
        else:
            msg = f"health URL {svc.health_url} " + (f"answered {status}" if status else f"unreachable ({error})")
            entry.update(ok=False, error=msg)
            problems.append(f"service {svc.name}: {msg}")
            ctx.error(f"service {svc.name}: {msg}")
    else:
        ctx.info(f"service {svc.name}: no health URL configured")


def _http_status(url: str) -> tuple[int | None, str]:
    req = urllib.request.Request(url, headers={"User-Agent": "kasa-check"})
    try:
        with urllib.request.urlopen(req, timeout=HEALTH_TIMEOUT) as resp:  # noqa: S310 (operator-set http(s) URL)
            return resp.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError) as exc:
        return None, str(getattr(exc, "reason", exc))
