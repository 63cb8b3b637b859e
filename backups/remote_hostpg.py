"""A PostgreSQL dump made with the host's own pg_dump (issue 14: "fall back to the host's tools only when asked"):
for a host whose Host.db_client_tools is "host" — typically its server is newer than every pg_dump on the worker.

What changes against backups.remote's own way (Kasa's pg_dump on the worker, through a forward):
- pg_dump runs ON the host (found there by hosts.remote.RemoteHost.own_pg_dump: engines.hostpgtools.find_tool,
  in KASA_REMOTE_PG_BIN or on the host's PATH), connecting to the database's address as the host sees it; its
  stdout comes through the SSH session into the worker's usual chain (compress, encrypt, hash, store), as the
  remote tar does. The backup keys never leave the worker.
- The snapshot and the row counts are still taken by the worker through the forward (engines.sources.pg_snapshot):
  the host's pg_dump reads that same exported snapshot (`--snapshot`), so the manifest's counts match the dump.
- The password never reaches an argv on either machine: it goes on the stdin of engines.hostpgtools.LAUNCHER,
  which writes it to a PGPASSFILE in a private 0700 folder on the host and removes the folder afterwards.
- Run as the SSH login user, never through sudo: pg_dump needs no privilege on the host.
- The host's pg_dump must be at least the server's major version (the rule Kasa's own choice keeps): refused
  before anything streams, naming the host and both versions. A host without pg_dump is refused the same way.
- The manifest's client_version is the host's pg_dump's, and client_host names the host: a drill or restore with
  Kasa's own pg_restore says clearly when that pg_restore is too old for such a dump (hostpgtools.too_new_to_read).
"""

from __future__ import annotations

import json

from customers.models import DatabaseConnection
from engines import credentials, hostpgtools, sources
from engines.streams import Stage
from hosts.remote import RemoteError, RemoteHost


def dump_stage(remote: RemoteHost, tool: tuple[str, str], db: DatabaseConnection, snap: sources.PgSnapshot,
               password: str) -> Stage:
    """The chain's first stage: the launcher running the host's pg_dump (`tool`, RemoteHost.own_pg_dump's) in
    `snap`. RemoteError naming the host when that pg_dump is older than the server (it would abort)."""
    pg_dump = tool[0]
    problem = remote.own_pg_dump_problem(tool, snap.server_major)
    if problem:
        raise RemoteError(problem)
    port = db.port or 5432
    dump = sources.pg_dump_stage(pg_dump, dbname=db.database, snapshot=snap.snapshot, env={})
    # The connection as the host sees it: an address, or (a `host` starting with "/") the server's socket folder.
    request = {"pgpass": credentials.pgpass_line(user=db.user, password=password, dbname=db.database),
               "env": {"PGHOST": db.host, "PGPORT": str(port), "PGUSER": db.user, "PGCONNECT_TIMEOUT": "10",
                       "PGAPPNAME": "kasa-backup"}}
    argv = remote.session.argv(["python3", "-I", "-c", hostpgtools.LAUNCHER, *dump.argv], privileged=False)
    return Stage(argv, name=f"pg_dump on {remote.host.name}", input=json.dumps(request).encode() + b"\n")
