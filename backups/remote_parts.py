"""Parts of a remote restore in place (backups.remote_restore) that the local restore has its own way of doing:
databases reached through the session's forwards, and release links put back on the host.

- **Databases**: backups.dbswap restores them exactly as locally (a fresh database swapped in; PostgreSQL in place
  in one transaction, MySQL/MariaDB through prefixed tables, for a user that may not create databases), with
  Kasa's own client tools on the worker. Only the address differs: dbswap's targets for this run are held
  pointing at a forward of the SSH session (hosts.remote.RemoteHost.forward, a Unix socket in the session's
  0700 folder) to the database as the host sees it, as a remote backup dumps it (backups.remote). No
  maintenance connection: it names the worker's view of a server, not the host's.
- **Release links**: an upgraded service's path is a link to `releases/<version>/<name>` (engines.layout); the
  backup records where it pointed. As backups.restore_files.relink does locally, the link is made beside the
  live path and exchanged with it (engines.swap, renameat2), on the host through the helper
  (engines.hostrestore.link_beside, engines.swap.plan/apply), journalled on the host before the exchange
  like every other file step: the undo (engines.hostrestore.undo_step) puts the previous link back, and once
  the restore holds the previous link set aside is removed.
"""

from __future__ import annotations

import os

from customers.models import Customer
from engines import dbrestore, paths
from hosts.remote import RemoteError, RemoteHost
from operations.context import OperationError, RunContext

LINK_MARK = ".kasa-link-"  # as backups.restore_files.relink names the new link beside the live path


def hold_forwarded_targets(ctx: RunContext, remote: RemoteHost, customer: Customer) -> None:
    """dbswap's targets for this run, through forwards of the session: PostgreSQL to its address (or socket
    folder) as the host sees it, MySQL/MariaDB to host:port or its socket file there (a `host` starting with
    "/"), each forward's socket given as the target's host (engines.dbrestore_mysql reads a host starting with
    "/" as a socket file, libpq as a socket folder)."""
    from core.secrets import reveal

    for db in customer.databases.all():
        if db.engine not in ("postgresql", "mysql"):
            continue
        try:
            if db.engine == "postgresql":
                port = db.port or 5432
                far = os.path.join(db.host, f".s.PGSQL.{port}") if db.host.startswith("/") else db.host
                # libpq finds a server's socket as <dir>/.s.PGSQL.<port>: the forward is given that name
                host = os.path.dirname(remote.forward(far, db.port, f".s.PGSQL.{port}"))
            else:
                port = db.port or 3306
                host = remote.forward(db.host, db.port, "mysql.sock")
        except RemoteError as exc:
            raise OperationError(f"{exc}; nothing was touched") from None
        ctx.held[("db", db.name)] = dbrestore.DbTarget(engine=db.engine, host=host, port=port, user=db.user,
                                                       password=reveal(db.password), dbname=db.database)


def relink(ctx: RunContext, plan, remote: RemoteHost, journal) -> None:
    """Every service kept behind a release link: its link points where it pointed at backup time again (a later
    upgrade may have moved it). After the service folders are swapped in, before the config files (written
    through the link), as locally."""
    root = str(plan.root)
    for art in plan.artifacts:
        link = (art.details or {}).get("link") if art.kind == "service" else None
        if not link:
            continue
        rel, target = paths.relative_inside(link["path"], what="service path"), link["target"]
        # the link's text, read from the backup's manifest: it must lead inside the root as seen from its folder
        paths.relative_inside(os.path.normpath(os.path.join(os.path.dirname(rel), target)), what="link target")
        live = os.path.join(root, rel)
        tmp = f"{live}{LINK_MARK}{ctx.run.pk}"
        made = remote.call("engines.hostrestore.link_beside", root, live, target, tmp)
        if not isinstance(made, bool):
            raise RemoteError(f"{remote.where} answered something that is not a link made: not trusted")
        if not made:
            ctx.info(f"{rel} already points at {target} on {remote.host.name}")
            continue
        step = journal.add({"type": "files", "beside": True,
                            **remote.call("engines.swap.plan", live, tmp, root=root)})
        remote.call("engines.swap.apply", step, root=root)
        ctx.info(f"{rel} points at {target} again on {remote.host.name}")


def clean_up(remote: RemoteHost, root: str, step: dict) -> bool:
    """The restore holds: what a file step kept aside for the way back goes (for a link put back: the previous
    link, or folder, set aside beside it). False when the step is not one of this module's."""
    if step.get("type") != "files" or not step.get("beside"):
        return False
    remote.call("engines.hostrestore.remove_tree", root, step["staged"])
    return True
