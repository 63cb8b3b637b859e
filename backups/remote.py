"""Backups of a customer on a remote host (issue 14): the same artifacts as backups.artifacts.plan(), read over SSH.

- The connection: one engines.ssh Session (a multiplexed master) for the whole backup, and one engines.hostcall
  HostSession on it for the host-side checks (engines.hostside.backup_facts, engines.sources.config_members,
  restore_refusals, sqlite_online_copy): Kasa's pure engines code, shipped for the session, run by the SSH login
  user. Nothing of Django, and no key of Kasa's, reaches the host.
- File trees: GNU tar runs on the host (the local tar_stage's argv, quoted word by word by engines.ssh) and its
  stdout, through the ssh process, is the first stage of the worker's usual chain (compress, encrypt, hash,
  store): the backup keys never leave the worker.
- PostgreSQL: Kasa's own pg_dump (client ≥ server, as for local databases) and the row-count snapshot connect to
  a forward on the master: a Unix socket in the session's 0700 folder to the database's address as the host sees
  it (Session.forward says why not a loopback port). So a database only the host can reach is dumped all the same.
  A host set to its own client tools (Host.db_client_tools "host") has pg_dump run there instead, in the snapshot
  the worker took through the forward (backups.remote_hostpg).
- MySQL/MariaDB: Kasa's own mariadb-dump (rows counted in the dump as it streams, as locally) through the same
  kind of forward, to host:port as the host sees it or to the server's socket file there (a `host` starting
  with "/"); the defaults file names the forward's socket.
- SQLite: the online copy is made on the host, into a 0700 folder of its own, streamed with `cat` and removed in
  every case (when the host was lost meanwhile: by a fresh connection right away, else by the next backup there,
  engines.hostside.sweep_copy_dirs).

What the host answers is untrusted: shapes are checked here, and a host that sends something other than a tar
stream only spoils its own customer's backup, which the verification drill then refuses (every member is
checked on the worker before anything lands).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings

from core.secrets import reveal
from customers.models import Customer, DatabaseConnection
from engines import credentials, hostside, paths, redisdump, sources, ssh
from engines.dbbase import DbTarget
from engines.streams import ChainError
from hosts.remote import RemoteError, RemoteHost
from operations.context import OperationError

from . import artifacts as local
from . import remote_hostpg

REMOTE_TAR = "tar"  # on the host's PATH (the probe reports its version); a test swaps in a hostile one
__all__ = ["RemoteError", "RemoteHost", "host_facts", "plan"]  # the connection lives in hosts.remote


# --- checking what the host says ----------------------------------------------------------------------------
def _strings(value, what: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RemoteError(f"{where} answered {what} that is not a list of names: not trusted")
    return value


def _relative(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise RemoteError(f"{where} answered a {what} that is not a path: not trusted")
    try:
        return paths.relative_inside(value, what=what) or "."
    except paths.PathEscapeError as exc:
        raise RemoteError(f"{where} answered {exc}: not trusted") from None


def host_facts(remote: RemoteHost, customer: Customer) -> dict:
    """The host-side check of the customer's folders (what guard does locally with folder_problems), before
    anything streams; OperationError-worthy RemoteError listing the problems."""
    host = remote.host
    others = list(Customer.objects.filter(host=host).exclude(pk=customer.pk).values_list("root", flat=True))
    services = [[s.name, s.path] for s in customer.services.all()]
    sqlite = [[d.name, d.sqlite_path] for d in customer.databases.all()
              if d.engine == DatabaseConnection.Engine.SQLITE]
    facts = remote.call("engines.hostside.backup_facts", host.root(), customer.root, others, services, sqlite)
    where = remote.where
    if not isinstance(facts, dict) or not isinstance(facts.get("problems"), list):
        raise RemoteError(f"{where} answered something that is not a folder check: not trusted")
    if facts["problems"]:
        raise RemoteError(f"refused before touching anything on {where}: "
                          + "; ".join(str(p)[:500] for p in facts["problems"][:20]))
    if facts.get("root") != os.path.normpath(customer.root) and not _inside(facts.get("root"), host.root()):
        raise RemoteError(f"{where} answered a root folder outside its customers root: not trusted")
    svc = facts.get("services")
    if not isinstance(svc, dict) or set(svc) != {name for name, _ in services}:
        raise RemoteError(f"{where} answered service folders that are not the customer's: not trusted")
    for name, entry in svc.items():
        if not isinstance(entry, dict):
            raise RemoteError(f"{where} answered a service folder that is not one: not trusted")
        entry["path"] = _relative(entry.get("path"), f"service {name} path", where)
        link = entry.get("link")
        if link is not None and not (isinstance(link, dict) and all(isinstance(link.get(k), str)
                                                                     for k in ("path", "target"))):
            raise RemoteError(f"{where} answered a service link that is not one: not trusted")
    db = facts.get("sqlite")
    if not isinstance(db, dict) or set(db) != {name for name, _ in sqlite} or \
            not all(_inside(p, facts["root"]) for p in db.values()):
        raise RemoteError(f"{where} answered SQLite files outside the customer's root: not trusted")
    return facts


def _inside(path, base) -> bool:
    if not isinstance(path, str) or not isinstance(base, str) or not os.path.isabs(path):
        return False
    norm, base = os.path.normpath(path), os.path.normpath(base)
    return norm != base and norm.startswith(base.rstrip("/") + "/") and ".." not in norm.split("/")


def refuse_redis(customer: Customer, what: str, params: dict | None = None) -> None:
    """A Redis database of a remote customer comes through the session's forward, as a socket file here: TLS over
    that forward is not built, so such a database is refused before the host is asked anything (a files-only or
    config-only backup still runs)."""
    if params is not None and (params.get("scope") not in ("full", "database") or params.get("services")):
        return
    names = [d.name for d in customer.databases.all() if d.engine == DatabaseConnection.Engine.REDIS and d.tls]
    if names:
        raise OperationError(f"refused before touching anything: database {', '.join(names)} of {customer} is a "
                             f"Redis one reached with TLS and {customer} lives on host {customer.host.name}: a "
                             f"{what} of Redis over TLS through the SSH forward is not built yet")


# --- the plan -----------------------------------------------------------------------------------------------
def plan(customer: Customer, params: dict, remote: RemoteHost) -> list[local.ArtifactSpec]:
    """The same artifacts, names and details as backups.artifacts.plan() makes for a local customer."""
    scope, compression, encrypted = params["scope"], params["compression"], params["encrypt"]
    refuse_redis(customer, "backup", params)
    facts = host_facts(remote, customer)
    root = facts["root"]
    if any(d.engine == DatabaseConnection.Engine.SQLITE for d in customer.databases.all()):
        remote.call("engines.hostside.sweep_copy_dirs")  # copies an earlier backup could not remove (host lost)
    chosen = params.get("services") or []
    services = [s for s in customer.services.all() if not chosen or s.name in chosen]
    excludes = local.excludes_of(params)
    specs: list[local.ArtifactSpec] = []

    if scope in ("full", "files"):
        for svc in services:
            entry = facts["services"][svc.name]
            rel = entry["path"]
            details = {"path": rel, **({"link": entry["link"]} if entry["link"] else {})}

            @contextlib.contextmanager
            def open_service(rel=rel, details=details):
                # Listed while tar streams (as locally): the helper is idle meanwhile.
                pool = ThreadPoolExecutor(1, thread_name_prefix="kasa-links")
                listing = pool.submit(remote.call, "engines.sources.restore_refusals", root, rel, excludes=excludes)
                pool.shutdown(wait=False)
                tar = sources.tar_stage(root, [rel], excludes=excludes)
                with _streamed(remote, [remote.stage([REMOTE_TAR, *tar.argv[1:]], name="tar", ok_codes=(0, 1)),
                                        local._compressor(compression)]) as chain:
                    yield chain, details
                found = listing.result()
                if not isinstance(found, dict) or not all(
                        isinstance(found.get(k), list) and all(isinstance(p, list) and len(p) == 2 and
                                                               all(isinstance(x, str) for x in p) for p in found[k])
                        for k in ("links", "special")):
                    raise RemoteError(f"{remote.where} answered a list of links that is not one: not trusted")
                local.note_refusals(details, found)

            specs.append(local.ArtifactSpec(local._name(f"{svc.name}.tar", compression, encrypted), "service",
                                            svc.name, open_service))

    if scope in ("full", "config"):
        members = [_relative(m, "config file", remote.where) for m in _strings(
            remote.call("engines.sources.config_members", root, [s.path for s in customer.services.all()],
                        params.get("config_paths") or []),
            "config files", remote.where)]
        if members:
            @contextlib.contextmanager
            def open_config(members=members):
                tar = sources.tar_stage(root, members, no_recursion=True)
                with _streamed(remote, [remote.stage([REMOTE_TAR, *tar.argv[1:]], name="tar", ok_codes=(0, 1)),
                                        local._compressor(compression)]) as chain:
                    yield chain, {"files": members}

            specs.append(local.ArtifactSpec(local._name("config.tar", compression, encrypted), "config", "config",
                                            open_config))

    if scope in ("full", "database") and not chosen:
        for db in customer.databases.all():
            specs.append(_database_spec(remote, db, facts, compression, encrypted))
    return specs


@contextlib.contextmanager
def _streamed(remote: RemoteHost, stages: list, **kw) -> Iterator:
    """The chain, with a lost connection (ssh's 255) turned into an error naming the host."""
    chain = local._chain(stages, **kw)
    try:
        yield chain
    except ChainError:
        for stage, proc in zip(chain.stages, chain.procs, strict=False):
            remote.lost(stage, proc.returncode)
        raise


def _database_spec(remote: RemoteHost, db: DatabaseConnection, facts: dict, compression: str,
                   encrypted: bool) -> local.ArtifactSpec:
    comp = local._compressor(compression)
    seen_from = f"{db.host}:{db.port} as {remote.host.name} sees it"
    if db.engine == DatabaseConnection.Engine.REDIS:
        return _redis_spec(remote, db, comp, compression, encrypted)
    if db.engine == DatabaseConnection.Engine.POSTGRESQL:
        password = reveal(db.password)

        @contextlib.contextmanager
        def open_pg():
            port = db.port or 5432
            # libpq finds a server's socket as <dir>/.s.PGSQL.<port>: the forward's socket is given that name, in
            # a folder of its own per database server.
            # A `host` starting with "/" is a socket folder on the host (libpq's rule): the forward goes to the
            # server's socket in it.
            far = os.path.join(db.host, f".s.PGSQL.{port}") if db.host.startswith("/") else db.host
            sockdir = os.path.dirname(remote.forward(far, db.port, f".s.PGSQL.{port}"))
            # Only when asked: the host's own pg_dump, run there; looked for before anything connects.
            tool = remote.own_pg_dump() if remote.host.host_pg_tools else None
            with contextlib.ExitStack() as stack:
                try:
                    snap = stack.enter_context(sources.pg_snapshot(host=sockdir, port=port, user=db.user,
                                                                   password=password, dbname=db.database))
                except sources.SourceError as exc:
                    raise RemoteError(f"cannot reach PostgreSQL {db.database} at {seen_from}, through the forward: "
                                      f"{str(exc).split(': ', 1)[-1]}") from None
                extra = {}
                if tool is not None:
                    stage, client = remote_hostpg.dump_stage(remote, tool, db, snap, password), tool[1]
                    extra = {"client_host": remote.host.name}
                else:
                    pg_dump, client = sources.pg_tool_for(snap.server_major)
                    env = stack.enter_context(credentials.pg_env(host=sockdir, port=port, user=db.user,
                                                                 password=password, dbname=db.database))
                    stage = sources.pg_dump_stage(pg_dump, dbname=db.database, snapshot=snap.snapshot, env=env)
                # through ssh, its 255 is the connection lost: named as such (Kasa's pg_dump runs here)
                chain = stack.enter_context(_streamed(remote, [stage, comp])) if extra else local._chain([stage, comp])
                yield chain, {
                    "engine": "postgresql", "database": db.database, "format": "pg_dump custom",
                    "server_version": snap.server_version, "client_version": client, **extra,
                    "row_counts": snap.row_counts,
                }

        return local.ArtifactSpec(local._name(f"db-{db.name}.pgdump", compression, encrypted), "database", db.name,
                                  open_pg, secrets=[password])

    if db.engine == DatabaseConnection.Engine.MYSQL:
        password = reveal(db.password)

        @contextlib.contextmanager
        def open_mysql():
            # A `host` starting with "/" is the server's socket file on the host; else host:port as the host sees it.
            sock = remote.forward(db.host, db.port, "mysql.sock")
            settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
            with credentials.mysql_defaults_file(host="", port=0, user=db.user, password=password,
                                                 socket=sock) as cnf, \
                    tempfile.TemporaryDirectory(dir=settings.KASA_SCRATCH_DIR, prefix="rowcount-") as tmp:
                try:
                    version = sources.mysql_query(cnf, db.database, "SELECT VERSION()")[0][0]
                except sources.SourceError as exc:
                    raise RemoteError(f"cannot reach MySQL/MariaDB {db.database} at {seen_from}, through the "
                                      f"forward: {exc}") from None
                stage = sources.mysql_dump_stage(cnf, db.database)
                counts_path = os.path.join(tmp, "counts.json")  # rows counted in the dump as it streams (as locally)
                details = {"engine": "mysql", "database": db.database, "format": "sql", "server_version": version,
                           "client_version": sources.client_version_of(stage.argv[0]), "row_counts": None}
                yield local._chain([stage, sources.mysql_count_stage(counts_path), comp]), details
                details["row_counts"] = sources.read_counts(counts_path)

        return local.ArtifactSpec(local._name(f"db-{db.name}.sql", compression, encrypted), "database", db.name,
                                  open_mysql, secrets=[password])

    real = facts["sqlite"][db.name]

    @contextlib.contextmanager
    def open_sqlite():
        folder = remote.call("engines.hostside.private_copy_dir")
        if not isinstance(folder, str) or not os.path.isabs(folder) or ".." in folder.split("/") or \
                not os.path.basename(folder).startswith(hostside.COPY_PREFIX):
            raise RemoteError(f"{remote.where} answered a temporary folder that is not one: not trusted")
        try:
            copy = os.path.join(folder, "copy.sqlite3")
            counts = remote.call("engines.sources.sqlite_online_copy", real, copy)
            if not isinstance(counts, dict) or not all(isinstance(k, str) and isinstance(v, int)
                                                       for k, v in counts.items()):
                raise RemoteError(f"{remote.where} answered row counts that are not: not trusted")
            version = remote.call("engines.sources.sqlite_version")
            stages = [remote.stage(["cat", "--", copy], name="cat"), comp]
            with _streamed(remote, stages) as chain:
                yield chain, {"engine": "sqlite", "path": db.sqlite_path, "format": "sqlite3 file",
                              "server_version": str(version)[:100], "row_counts": counts}
        finally:
            _remove_copy(remote, folder)

    return local.ArtifactSpec(local._name(f"db-{db.name}.sqlite3", compression, encrypted), "database", db.name,
                              open_sqlite)


def _remove_copy(remote: RemoteHost, folder: str) -> None:
    """The copy goes in every case: through the helper, or (the helper lost with the connection) through a fresh
    connection right away; a host still unreachable keeps it until the next backup there sweeps it."""
    with contextlib.suppress(RemoteError):
        if remote.call("engines.hostside.remove_copy_dir", folder):
            return
    with contextlib.suppress(ssh.SSHError):
        remote.session.run(["rm", "-rf", "--", folder], timeout=30)


def _redis_spec(remote: RemoteHost, db: DatabaseConnection, comp, compression: str,
                encrypted: bool) -> local.ArtifactSpec:
    """As locally (backups.artifacts._redis_spec), the snapshot stage connected to the session's forward: to
    host:port as the host sees it, or the server's socket file there (a `host` starting with "/")."""
    password = reveal(db.password)

    @contextlib.contextmanager
    def open_redis():
        sock = remote.forward(db.host, db.port, "redis.sock")
        target = DbTarget(engine="redis", host=sock, port=0, user=db.user, password=password,
                          dbname=db.database or "0")
        settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=settings.KASA_SCRATCH_DIR, prefix="rdbcount-") as tmp:
            counts_path = os.path.join(tmp, "counts.json")
            details = {"engine": "redis", "database": db.database or "0", "format": "rdb", "tls": False,
                       "server_version": None, "rdb_version": None, "key_counts": None, "expiring_counts": None}
            yield local._chain([redisdump.snapshot_stage(target, counts_path), comp]), details
            try:
                details.update(redisdump.read_counts(counts_path))
            except redisdump.RedisError as exc:
                raise sources.SourceError(str(exc)) from None

    return local.ArtifactSpec(local._name(f"db-{db.name}.rdb", compression, encrypted), "database", db.name,
                              open_redis, secrets=[password])
