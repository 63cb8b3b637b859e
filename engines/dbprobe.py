"""Probe a customer database: can we connect, and which server version is it?

The PostgreSQL and MySQL probes run the real client programs (psql, mysql)
the way dumps will run later, so a probe that passes proves the credentials,
the network path and the client tools together.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass

from . import credentials, proc, sources


class ProbeError(RuntimeError):
    pass


@dataclass
class ProbeResult:
    server_version: str
    client_version: str = ""


def probe_postgresql(
    *, host: str, port: int, user: str, password: str, dbname: str,
    runner=proc.run, sql: str = "SHOW server_version", timeout: float = 30,
) -> ProbeResult:
    psql = shutil.which("psql")
    if not psql:
        raise ProbeError("psql is not installed on this worker (Debian package postgresql-client)")
    with credentials.pg_env(host=host, port=port, user=user, password=password, dbname=dbname) as env:
        argv = [psql, "--no-psqlrc", "--no-password", "--tuples-only", "--no-align",
                "--dbname", dbname, "--command", sql]
        res = runner(argv, env=env, timeout=timeout, secrets=[password])
    if not res.ok:
        raise ProbeError(f"cannot connect to PostgreSQL at {host}:{port}/{dbname}: {res.last_error_line()}")
    lines = [x for x in res.stdout_tail if x.strip()]
    tools = sources.pg_tools("pg_dump")  # the client backups will use: the newest installed
    return ProbeResult(server_version=(lines[-1].strip() if lines else ""), client_version=tools[0][2] if tools else "")


def probe_mysql(
    *, host: str, port: int, user: str, password: str, dbname: str,
    runner=proc.run, sql: str = "SELECT VERSION()", timeout: float = 30, socket: str = "",
) -> ProbeResult:
    client = shutil.which("mariadb") or shutil.which("mysql")
    if not client:
        raise ProbeError("the mysql/mariadb client is not installed on this worker (Debian package mariadb-client)")
    with credentials.mysql_defaults_file(host=host, port=port, user=user, password=password, socket=socket) as cnf:
        argv = [client, f"--defaults-extra-file={cnf}", "--batch", "--skip-column-names",
                "--database", dbname, "--execute", sql]
        res = runner(argv, timeout=timeout, secrets=[password])
    if not res.ok:
        at = "a forward's socket" if socket else f"{host}:{port}"
        raise ProbeError(f"cannot connect to MySQL/MariaDB at {at}/{dbname}: {res.last_error_line()}")
    lines = [x for x in res.stdout_tail if x.strip()]
    try:
        dump = sources.client_version_of(sources.mysql_dump_program())
    except sources.SourceError:
        dump = ""
    return ProbeResult(server_version=(lines[-1].strip() if lines else ""), client_version=dump)


def probe_sqlite(path: str) -> ProbeResult:
    if not os.path.isfile(path):
        raise ProbeError(f"SQLite database file {path} does not exist")
    try:
        # Read-only URI: a probe must never create or change the file.
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            version = con.execute("SELECT sqlite_version()").fetchone()[0]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise ProbeError(f"{path} is not a readable SQLite database: {exc}") from None
    return ProbeResult(server_version=f"SQLite {version}", client_version=f"sqlite3 module {sqlite3.sqlite_version}")


def probe_redis(*, host: str, port: int, user: str, password: str, dbname: str, tls: bool = False,
                tls_ca: str = "") -> ProbeResult:
    """PING and the server's version, with the password handed over in the protocol (never argv)."""
    from . import redisdump  # redis-py loads only when a Redis database is checked
    from .dbbase import DbTarget

    target = DbTarget(engine="redis", host=host, port=port, user=user, password=password, dbname=dbname or "0",
                      tls=tls, tls_ca=tls_ca)
    try:
        con = redisdump.connect(target)
        try:
            version = redisdump.server_version(con)
        finally:
            con.close()
    except (redisdump.RedisError, redisdump.redis.RedisError) as exc:
        raise ProbeError(str(exc)) from None
    return ProbeResult(server_version=f"Redis {version}", client_version="redis-py")
