"""The check operation for a customer on a remote host: the same items and result as customers.operations.check,
looked at where the customer lives.

The root, the run_as user, the ownership model, the service folders and SQLite files are checked on the host by
Kasa's own pure code (engines.hostside.check_facts through hosts.remote's helper: the host's users, the host's
filesystem, its links followed there). PostgreSQL and MySQL/MariaDB are probed with the worker's own clients
through a forward of the session to the database's address as the host sees it (as a backup dumps them). Health
URLs are asked on the host (hosts.remote.RemoteHost.http_status), as restores and upgrades ask them: a URL names the
service as its host sees it — usually http://127.0.0.1:<port>/…, which from the worker would be another machine.
"""

from __future__ import annotations

import os

from django.conf import settings

from core.secrets import reveal
from engines import dbprobe, hostpgtools, proc
from hosts.remote import RemoteError, RemoteHost
from operations.context import OperationError, RunContext

from .models import Customer, DatabaseConnection

HEALTH_TIMEOUT = 5  # as customers.operations' (one GET, no streak: a check looks, it does not wait)


def check(ctx: RunContext, customer: Customer, *, check_health) -> dict:
    """`check_health` is customers.operations' health URL item (passed in: no import circle)."""
    services = list(customer.services.all())
    databases = list(customer.databases.all())
    total, done = 1 + len(services) + len(databases), 0
    problems: list[str] = []
    result: dict = {"root": None, "databases": [], "services": [], "host": customer.host.name}
    ctx.phases(("root folder", 1), ("databases", len(databases)), ("services", len(services)))
    ctx.phase("root folder")
    ctx.progress(done, total, "root folder")

    def problem(text: str) -> None:
        problems.append(text)
        ctx.error(text)

    if not customer.host.enabled:
        raise OperationError(f"host {customer.host.name} is disabled: no check of {customer} connects to it")
    try:
        remote = RemoteHost(customer.host)
    except Exception as exc:  # engines.ssh: no trusted key, no key
        raise OperationError(str(exc)) from None
    with remote:
        ctx.info(f"customer on {remote.where}: its folders, user and SQLite files are checked there, its database "
                 "servers through forwards of that connection")
        try:
            facts = _facts(remote, customer)
        except RemoteError as exc:
            raise OperationError(str(exc), result={**result, "ok": False, "problems": [str(exc)]}) from None
        if facts["problems"]:
            result["root"] = {"path": customer.root, "ok": False, "error": "; ".join(facts["problems"])}
            for text in facts["problems"]:
                problem(text)
        else:
            result["root"] = {"path": facts["root"], "ok": True}
            ctx.info(f"root folder {facts['root']} on {customer.host.name}: ok")
        result["run_as"] = _run_as(ctx, customer, facts, problem)
        result["ownership"] = {"ok": not facts["ownership"]}
        if facts["ownership"]:
            result["ownership"]["problems"] = facts["ownership"]
            for text in facts["ownership"]:
                problem(f"ownership: {text}")
        done += 1

        ctx.phase("databases")
        for db in databases:
            ctx.progress(done, total, f"database {db.name}")
            result["databases"].append(_database(ctx, remote, db, facts, problem))
            done += 1

        ctx.phase("services")
        for svc in services:
            ctx.progress(done, total, f"service {svc.name}")
            entry = {"name": svc.name, "path": svc.path, "process_manager": svc.process_manager, "ok": True}
            if facts["problems"]:  # the root's item says why; its folders were not looked at
                entry.update(ok=False, error="not checked: the root folder has problems")
            elif svc.name in facts["missing"] or svc.name not in facts["services"]:
                entry.update(ok=False, error=f"folder {svc.path} does not exist on {customer.host.name}")
                problem(f"service {svc.name}: {entry['error']}")
            else:
                entry["folder"] = os.path.join(facts["root"], facts["services"][svc.name]["path"])
                ctx.info(f"service {svc.name}: folder {entry['folder']} ok")
                # Asked on the host: the URL names the service as its host sees it (127.0.0.1 there is not ours).
                check_health(ctx, svc, problems, entry, status_of=lambda url: _status_on_host(remote, url))
            result["services"].append(entry)
            done += 1

    ctx.progress(done, total, "done")
    result["ok"] = not problems
    result["problems"] = problems
    if problems:
        raise OperationError(f"{len(problems)} problem(s): " + "; ".join(problems), result=result)
    ctx.info(f"all {len(databases)} database(s) and {len(services)} service(s) ok on {customer.host.name}")
    return result


def _status_on_host(remote: RemoteHost, url: str) -> tuple[int | None, str]:
    try:
        return remote.http_status(url, HEALTH_TIMEOUT)
    except RemoteError as exc:
        return None, str(exc)


def _facts(remote: RemoteHost, customer: Customer) -> dict:
    """check_facts on the host, its shape checked as a backup checks host_facts' (untrusted input)."""
    host = customer.host
    others = list(Customer.objects.filter(host=host).exclude(pk=customer.pk).values_list("root", flat=True))
    services = [[s.name, s.path] for s in customer.services.all()]
    sqlite = [[d.name, d.sqlite_path] for d in customer.databases.all()
              if d.engine == DatabaseConnection.Engine.SQLITE]
    facts = remote.call("engines.hostside.check_facts", host.root(), customer.root, others, services, sqlite,
                        customer.run_as)
    if not isinstance(facts, dict) or not isinstance(facts.get("problems"), list):
        raise RemoteError(f"{remote.where} answered something that is not a folder check: not trusted")
    facts["problems"] = [str(p)[:500] for p in facts["problems"][:20]]
    if facts["problems"]:  # nothing else of the answer is used
        return {"problems": facts["problems"], "root": "", "services": {}, "sqlite": {}, "missing": [],
                "run_as": None, "ownership": [], "sqlite_probe": {}}
    svc = facts.get("services")
    if not isinstance(svc, dict) or set(svc) != {name for name, _ in services} or \
            not all(isinstance(e, dict) and isinstance(e.get("path"), str) and ".." not in e["path"].split("/")
                    and not e["path"].startswith("/") for e in svc.values()):
        raise RemoteError(f"{remote.where} answered service folders that are not the customer's: not trusted")
    for key, kind in (("root", str), ("missing", list), ("ownership", list), ("sqlite_probe", dict)):
        if not isinstance(facts.get(key), kind):
            raise RemoteError(f"{remote.where} answered a check that is not one: not trusted")
    if facts.get("run_as") is not None and not isinstance(facts["run_as"], dict):
        raise RemoteError(f"{remote.where} answered a run_as check that is not one: not trusted")
    facts["missing"] = [str(x)[:100] for x in facts["missing"]]
    facts["ownership"] = [str(x)[:500] for x in facts["ownership"][:20]]
    return facts


def _run_as(ctx: RunContext, customer: Customer, facts: dict, problem) -> dict:
    entry: dict = {"user": customer.run_as, "ok": True}
    if not customer.run_as:
        if settings.DEPLOYED:
            entry.update(ok=False, error="no run_as user is set: a deployed Kasa refuses to run this customer's "
                                         "commands")
            problem(f"run as: {entry['error']}")
            return entry
        entry["note"] = "no run_as user: its commands would run as the SSH login user (development only)"
        ctx.warning(f"run as: {entry['note']}")
        return entry
    found = facts.get("run_as") or {}
    if "error" in found:
        entry.update(ok=False, error=str(found["error"])[:500])
        problem(f"run as: {entry['error']} (on host {customer.host.name})")
        return entry
    if isinstance(found.get("uid"), int):
        entry["uid"] = found["uid"]
        ctx.info(f"run as: {customer.run_as} (uid {found['uid']}) on {customer.host.name}, who may enter the root; "
                 "other users may not read it")
    return entry


def _database(ctx: RunContext, remote: RemoteHost, db: DatabaseConnection, facts: dict, problem) -> dict:
    entry = {"name": db.name, "engine": db.engine, "target": db.display_url(), "ok": False}
    where = f"{db.display_url()} as {remote.host.name} sees it"
    ctx.info(f"database {db.name}: connecting to {where}")
    try:
        if db.engine == DatabaseConnection.Engine.SQLITE:
            found = facts.get("sqlite_probe", {}).get(db.name)
            if not isinstance(found, dict) or "error" in found:
                raise dbprobe.ProbeError(str((found or {}).get("error", "not checked on the host"))[:500])
            res = dbprobe.ProbeResult(server_version=str(found.get("server_version"))[:100],
                                      client_version=str(found.get("client_version"))[:100])
        else:
            password = reveal(db.password)
            ctx.add_secret(password)
            if db.engine == DatabaseConnection.Engine.POSTGRESQL:
                port = db.port or 5432
                far = os.path.join(db.host, f".s.PGSQL.{port}") if db.host.startswith("/") else db.host
                sock = remote.forward(far, db.port, f".s.PGSQL.{port}")
                res = dbprobe.probe_postgresql(host=os.path.dirname(sock), port=port, user=db.user,
                                               password=password, dbname=db.database, runner=ctx.runner())
            elif db.engine == DatabaseConnection.Engine.REDIS:
                if db.tls:
                    raise dbprobe.ProbeError("Redis over TLS is not reached through the SSH forward (not built)")
                sock = remote.forward(db.host, db.port, "redis.sock")
                res = dbprobe.probe_redis(host=sock, port=0, user=db.user, password=password, dbname=db.database)
            else:
                sock = remote.forward(db.host, db.port, "mysql.sock")
                res = dbprobe.probe_mysql(host="", port=0, user=db.user, password=password, dbname=db.database,
                                          runner=ctx.runner(), socket=sock)
        client = res.client_version
        if db.engine == DatabaseConnection.Engine.POSTGRESQL and remote.host.host_pg_tools:
            # backups use the host's own pg_dump: the one that must be there and new enough is that one
            tool = remote.own_pg_dump()
            why = remote.own_pg_dump_problem(tool, hostpgtools.major_of(res.server_version))
            if why:
                raise RemoteError(why)
            client = f"{tool[1]} (on {remote.host.name}: its own tools)"
        entry.update(ok=True, server_version=res.server_version, client_version=client)
        ctx.info(f"database {db.name}: ok, server {res.server_version}"
                 + (f", backed up with {client}" if client != res.client_version else ""))
    except (dbprobe.ProbeError, RemoteError, OperationError, proc.CommandNotFound, proc.CommandTimeout) as exc:
        text = str(exc).replace(os.path.dirname(str(remote.session.dir)), "…")  # not the worker's socket paths
        entry["error"] = f"{text} (through {remote.host.name})"
        problem(f"database {db.name}: {entry['error']}")
    return entry
