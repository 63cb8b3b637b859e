"""Restore a database dump into a FRESH database, then swap it in for the live one.

The live database is never written to: the dump goes into a new database beside
it (`<live>__kasa_new_<tag>`), is checked (row counts, or SQLite's integrity
check), and only then is exchanged with the live one, which is kept aside as
`<live>__kasa_old_<tag>` until the caller drops it — or swaps it back with
*_unswap. Any failure drops what was created and leaves the live database as it was.

Privileges needed (nothing here asks for more):
- PostgreSQL: the role must own the live database and have CREATEDB (CREATE
  DATABASE, and ALTER DATABASE ... RENAME needs both), or be a superuser. To end
  other sessions it must be a member of their role (or of pg_signal_backend).
- MySQL/MariaDB: ALL on the `<live>__kasa_%` databases (CREATE/DROP of the side
  databases, RENAME TABLE into and out of them) besides ALL on the live one, e.g.
  GRANT ALL ON `shop\\_\\_kasa\\_%`.* TO 'shop'@'%'. Live names longer than 33
  characters are shortened in side names, so the grant must match that prefix.
- Or a maintenance connection (DbTarget.maint, a superuser or root login to the
  same server): it creates, renames and drops the databases, and the customer's
  role only loads the dump into a fresh database it owns (PostgreSQL: OWNER;
  MySQL: ALL on that one database, granted for the restore and revoked after).
Roles with none of this restore through engines.dbrestore_pginplace (one
transaction in the live database) or engines.dbrestore_mytables (prefixed tables
of the live database).
- SQLite: write access to the folder of the live file.
The application must be stopped while swapping: open sessions are ended
(PostgreSQL) or waited for (MySQL metadata locks), and a SQLite file must not be
open at all.

Passwords reach client programs only through engines.credentials (PGPASSFILE,
--defaults-extra-file); psycopg gets them in-process. No message carries one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Iterable, Iterator

from . import credentials, sources
from .dbbase import (  # noqa: F401 (DbTarget, compare_counts, new_tag, side_name: engines.dbrestore's API)
    PG_ATTVER,
    DbTarget,
    compare_counts,
    drop_after_failure,
    new_tag,
    side_name,
)
from .dberrors import RestoreError
from .dbrestore_mysql import (  # noqa: F401 (re-exported: dbrestore.mysql_* is the API callers use)
    mysql_database_exists,
    mysql_drop_database,
    mysql_restore_fresh,
    mysql_swap,
    mysql_unswap,
)
from .dbrestore_sqlite import (  # noqa: F401 (re-exported: dbrestore.sqlite_* is the API callers use)
    SQLITE_SIDE_FILES,
    sqlite_remove,
    sqlite_repair,
    sqlite_restore_fresh,
    sqlite_row_counts,
    sqlite_swap,
    sqlite_unswap,
)
from .feed import feed_process
from .feed import oneline as _oneline
from .streams import CHUNK


def drop_database(target: DbTarget, name: str) -> None:
    """Drop a side database (or remove a side SQLite file); refuses the live one."""
    live = target.sqlite_path if target.engine == "sqlite" else target.dbname
    if not name or name == live or (target.engine == "sqlite" and os.path.abspath(name) == os.path.abspath(live)):
        raise RestoreError(f"refusing to drop {name or 'an unnamed database'}: it is the live database")
    if target.engine == "postgresql":
        _pg_drop(target, name)
    elif target.engine == "mysql":
        mysql_drop_database(target, name)
    elif target.engine == "sqlite":
        sqlite_remove(name, target.sqlite_root)
    else:
        raise RestoreError(f"unknown database engine {target.engine!r}")


# --- PostgreSQL --------------------------------------------------------------------------
PG_MAINTENANCE_DBS = ("postgres", "template1")


def _pg_connect(target: DbTarget, dbname: str):
    import psycopg

    return psycopg.connect(host=target.host, port=target.port, user=target.user, password=target.password or None,
                           dbname=dbname, connect_timeout=10, autocommit=True, application_name="kasa-restore")


@contextlib.contextmanager
def _pg_admin(target: DbTarget, *busy: str | None) -> Iterator:
    """A connection to a maintenance database other than `busy`: one cannot rename or drop the database one is in.
    Through the maintenance connection when the target has one."""
    import psycopg

    admin = target.maint or target
    error = None
    names = ([admin.dbname] if target.maint and admin.dbname else []) + list(PG_MAINTENANCE_DBS)
    for name in [n for n in dict.fromkeys(names) if n not in busy]:
        try:
            con = _pg_connect(admin, name)
            break
        except psycopg.Error as exc:
            error = exc
    else:
        raise RestoreError(f"cannot connect to PostgreSQL at {target.host}:{target.port} (database postgres or "
                           f"template1) as {admin.user}: {_oneline(error)}; nothing was changed")
    try:
        yield con
    finally:
        con.close()


def _pg_exists(con, name: str) -> bool:
    return con.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None


def _pg_ident(name: str):
    from psycopg import sql

    return sql.Identifier(name)


def _pg_create_options(con, like: str):
    """TEMPLATE template0 plus the live database's encoding and locale, so the dump loads as it was made."""
    from psycopg import sql

    opts = [sql.SQL("TEMPLATE template0")]
    version = con.info.server_version
    loc = "datlocale" if version >= 170000 else "daticulocale" if version >= 150000 else "NULL"
    provider = "datlocprovider" if version >= 150000 else "'c'"
    row = con.execute(f"SELECT pg_encoding_to_char(encoding), datcollate, datctype, {provider}::text, {loc} "
                      "FROM pg_database WHERE datname = %s", [like]).fetchone()
    if row:
        encoding, collate, ctype, kind, locale = row
        opts.append(sql.SQL("ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Literal(encoding), sql.Literal(collate), sql.Literal(ctype)))
        if kind == "i" and locale:
            opts.append(sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(locale)))
        elif kind == "b" and locale:
            opts.append(sql.SQL("LOCALE_PROVIDER builtin BUILTIN_LOCALE {}").format(sql.Literal(locale)))
    return sql.SQL(" ").join(opts)


def _pg_conninfo_dbname(name: str) -> str:
    # As a conninfo string a name containing "=" or a URI prefix cannot be mistaken for one.
    return "dbname='" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"




def _pg_script_filter(src, dst, *, drop_transaction_timeout: bool) -> None:
    """Pass pg_restore's script to psql, mending two things a server would refuse; the data passes untouched.

    - pg_restore 17+ always starts with `SET transaction_timeout = 0;`, which a
      server before 17 rejects: dropped from the header (before the first entry).
    - pg_dump 18.6 copies the server-managed column option `pg_attver` of
      PostgreSQL 15.20 into `ALTER TABLE ONLY ... ALTER COLUMN ... SET (...)`;
      15.20 ignores it and other servers reject it (pg_dump 15.20 leaves it out,
      and so do we; the server gives each restored column its own).
    Both live in the definitions before the first COPY: from there on the rest is
    copied in raw chunks. Lines are read at most CHUNK bytes at a time (flat memory).
    """
    header = at_start = True
    while line := src.readline(CHUNK):
        if at_start:
            if line.startswith(b"COPY "):
                dst.write(line)
                shutil.copyfileobj(src, dst, CHUNK)
                return
            header = header and not line.startswith(b"-- Name: ")
            if header and drop_transaction_timeout and line == b"SET transaction_timeout = 0;\n":
                continue
            if b"pg_attver=" in line and (m := PG_ATTVER.fullmatch(line)):
                options = [o for o in m.group(2).split(b", ") if not o.startswith(b"pg_attver=")]
                if not options:
                    continue
                line = m.group(1) + b", ".join(options) + m.group(3)
        dst.write(line)
        at_start = line.endswith(b"\n")


def pg_restore_fresh(target: DbTarget, new_dbname: str, chunks: Iterable[bytes], *, owner: str | None = None,
                     privileges: bool = True, extra_args: Iterable[str] = ()) -> dict[str, int]:
    """CREATE DATABASE new_dbname and restore the custom-format dump from chunks into it, all or nothing.

    pg_restore (the newest installed, as it must read archives of the newest
    pg_dump) writes the script, psql of the same version runs it in one
    transaction, stopping at the first error; _pg_script_filter in between
    mends what a newer pg_restore writes that the server refuses.
    Returns row counts keyed "schema.table" like the manifest. `--no-owner`:
    objects belong to the restoring role (or `owner`, through --role), as the
    original owner may not exist here. Through a maintenance connection the new
    database is created OWNER the target's role, which then loads the dump. Privileges (GRANTs) are restored by default:
    in place the roles exist, and an app that loses its grants after a swap fails
    later and worse than a restore that fails now (live untouched) naming the
    missing role. Pass privileges=False (--no-privileges) for a clone to another
    server or a scratch check. On any failure the new database is dropped.
    """
    import psycopg

    live = target.dbname
    if new_dbname == live:
        raise RestoreError(f"refusing to restore into the live database {live}; nothing was changed")
    with _pg_admin(target, new_dbname) as con:
        user, can_create = con.execute(
            "SELECT current_user::text, rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if not can_create:
            raise RestoreError(f"role {user} lacks the CREATEDB privilege needed to restore into a fresh database "
                               f"(a superuser can grant it: ALTER ROLE {user} CREATEDB); nothing was changed")
        if _pg_exists(con, new_dbname):
            raise RestoreError(f"database {new_dbname} already exists: refusing to restore over it; "
                               "nothing was changed")
        major = con.info.server_version // 10000
        try:
            pg_restore = sources.pg_tool_for(major, "pg_restore")[0]
            psql = os.path.join(os.path.dirname(pg_restore), "psql")
            psql = psql if os.access(psql, os.X_OK) else sources.pg_tool_for(major, "psql")[0]
        except sources.SourceError as exc:
            raise RestoreError(f"{exc}; nothing was changed") from None
        create = psycopg.sql.SQL("CREATE DATABASE {} {}").format(_pg_ident(new_dbname),
                                                                 _pg_create_options(con, live))
        if owner or target.maint:
            create = psycopg.sql.SQL("{} OWNER {}").format(create, _pg_ident(owner or target.user))
        try:
            con.execute(create)
        except psycopg.Error as exc:
            raise RestoreError(f"cannot create database {new_dbname}: {_oneline(exc)}; nothing was changed") from None
    # No archive argument: it comes on stdin. --single-transaction wraps the script in BEGIN/COMMIT.
    argv = [pg_restore, "--file=-", "--single-transaction", "--no-owner"]
    argv += ([] if privileges else ["--no-privileges"]) + ([f"--role={owner}"] if owner else []) + list(extra_args)
    then = [psql, "--no-psqlrc", "--no-password", "--quiet", "--set=ON_ERROR_STOP=1", "--output=/dev/null",
            "--dbname", _pg_conninfo_dbname(new_dbname)]
    try:
        with credentials.pg_env(host=target.host, port=target.port, user=target.user,
                                password=target.password) as env:
            feed_process(argv, chunks, env=env, secrets_=[target.password], then=then,
                         transform=functools.partial(_pg_script_filter, drop_transaction_timeout=major < 17))
        return pg_row_counts(target, new_dbname)
    except BaseException as exc:
        drop_after_failure(lambda: _pg_drop(target, new_dbname), exc, new_dbname, live)
        raise


@dataclasses.dataclass
class PgRole:
    """What the target's own role may do on its server (engines.dbrestore's fresh path, or in place)."""

    user: str
    superuser: bool
    createdb: bool
    live_exists: bool
    owns_live: bool

    @property
    def can_swap(self) -> bool:
        """Create a fresh database and rename it over the live one (CREATEDB and ownership, or superuser)."""
        return self.superuser or (self.createdb and (self.owns_live or not self.live_exists))


def pg_role(target: DbTarget) -> PgRole:
    """The target role's attributes, read through its own live database (or a maintenance database when the
    live one does not exist yet)."""
    import psycopg

    query = ("SELECT current_user::text, r.rolsuper, r.rolcreatedb, d.datname IS NOT NULL, "
             "COALESCE(pg_has_role(d.datdba, 'USAGE'), false) FROM pg_roles r LEFT JOIN pg_database d "
             "ON d.datname = %s WHERE r.rolname = current_user")
    try:
        with _pg_connect(target, target.dbname) as con:
            row = con.execute(query, [target.dbname]).fetchone()
    except psycopg.Error:
        with _pg_admin(dataclasses.replace(target, maint=None)) as con:
            row = con.execute(query, [target.dbname]).fetchone()
    return PgRole(*row)


def pg_row_counts(target: DbTarget, dbname: str) -> dict[str, int]:
    """Rows per "schema.table" of every base table, counted by the very code that counts them for the manifest."""
    import psycopg

    try:
        with _pg_connect(target, dbname) as con:
            return sources.pg_count_rows(con)
    except psycopg.Error as exc:
        raise RestoreError(f"counting rows in {dbname} failed: {_oneline(exc)}") from None


def pg_swap(target: DbTarget, new_dbname: str, *, tag: str | None = None) -> str | None:
    """Put new_dbname in place of the live database; return the name the old one is kept under.

    Connections to the live database are refused during the swap, its other
    sessions (and any on new_dbname) are ended, then two renames. If the second
    fails the first is undone. Returns None when there was no live database (a
    clone to a new name).
    """
    live = target.dbname
    with _pg_admin(target, live, new_dbname) as con:
        if not _pg_exists(con, new_dbname):
            raise RestoreError(f"database {new_dbname} does not exist: nothing to swap in; {live} was not touched")
        if not _pg_exists(con, live):
            _pg_check_rename(con, [new_dbname])
            _pg_exchange(con, live, incoming=new_dbname, outgoing=None)
            return None
        old = side_name(live, "old", tag)
        if _pg_exists(con, old):
            raise RestoreError(f"database {old} already exists; {live} was not touched")
        _pg_check_rename(con, [live, new_dbname])
        _pg_exchange(con, live, incoming=new_dbname, outgoing=old)
        return old


def pg_unswap(target: DbTarget, old_dbname: str | None, new_dbname: str) -> None:
    """Undo pg_swap: the live (restored) database goes back to new_dbname, old_dbname becomes live again."""
    live = target.dbname
    with _pg_admin(target, live, old_dbname, new_dbname) as con:
        if _pg_exists(con, new_dbname):
            raise RestoreError(f"database {new_dbname} already exists; {live} was not touched")
        if old_dbname and not _pg_exists(con, old_dbname):
            raise RestoreError(f"database {old_dbname} does not exist: nothing to swap back; {live} was not touched")
        _pg_check_rename(con, [live] + ([old_dbname] if old_dbname else []))
        _pg_exchange(con, live, incoming=old_dbname, outgoing=new_dbname)


def pg_repair(target: DbTarget) -> list[str]:
    """Re-open the live database (and its swap side databases) to connections an interrupted swap left closed.

    pg_swap and pg_unswap refuse new connections to the database being renamed
    and allow them again when done; a worker killed in between leaves it
    refusing them (datallowconn false), and the application cannot connect.
    Only the live name and `<live>__kasa_old_*`/`__kasa_new_*` (where the
    closed database may have been renamed to) are looked at. Returns one human
    line per database fixed; empty when nothing needed fixing.
    """
    import psycopg

    live = target.dbname
    fixed: list[str] = []
    with _pg_admin(target, live) as con:
        closed = [r[0] for r in con.execute("SELECT datname FROM pg_database WHERE NOT datallowconn").fetchall()]
        for name in [n for n in closed if n == live or _pg_is_side_of(n, live)]:
            try:
                con.execute(psycopg.sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(_pg_ident(name)))
            except psycopg.Error as exc:
                done = f"{len(fixed)} other database(s) were re-opened" if fixed else "nothing was changed"
                raise RestoreError(f"database {name} refuses connections and re-enabling them failed "
                                   f"({_oneline(exc)}; the role must own it); {done}") from None
            what = "the live database" if name == live else f"a swap copy of {live}"
            fixed.append(f"database {name} ({what}) refused connections, as an interrupted swap leaves it: "
                         "connections are allowed again")
    return fixed


def _pg_is_side_of(name: str, live: str) -> bool:
    """Whether name is exactly side_name(live, "old"|"new", tag) for the tag it ends with."""
    at = name.rfind("__kasa_")
    kind, _, tag = name[at + 7:].partition("_") if at > 0 else ("", "", "")
    return kind in ("old", "new") and bool(tag) and side_name(live, kind, tag) == name


def database_exists(target: DbTarget, name: str) -> bool:
    """Whether database `name` exists on target's server (for sqlite: whether file `name` exists)."""
    if target.engine == "postgresql":
        with _pg_admin(target) as con:
            return _pg_exists(con, name)
    if target.engine == "mysql":
        return mysql_database_exists(target, name)
    if target.engine == "sqlite":
        return os.path.isfile(name)
    raise RestoreError(f"unknown database engine {target.engine!r}")


def _pg_check_rename(con, names: list[str]) -> None:
    """Fail before changing anything when the role may not rename these databases (owner + CREATEDB)."""
    user, superuser, createdb = con.execute(
        "SELECT current_user::text, rolsuper, rolcreatedb FROM pg_roles WHERE rolname = current_user").fetchone()
    if superuser:
        return
    if not createdb:
        raise RestoreError(f"role {user} lacks the CREATEDB privilege needed to rename databases "
                           f"(a superuser can grant it: ALTER ROLE {user} CREATEDB); nothing was changed")
    for name, owns in con.execute("SELECT datname, pg_has_role(current_user, datdba, 'USAGE') FROM pg_database "
                                  "WHERE datname = ANY(%s)", [names]).fetchall():
        if not owns:
            raise RestoreError(f"role {user} does not own database {name}, which renaming it needs; "
                               "nothing was changed")


def _pg_exchange(con, live: str, *, incoming: str | None, outgoing: str | None) -> None:
    """live → outgoing, then incoming → live; the first rename is undone if the second fails."""
    import psycopg

    q = psycopg.sql.SQL
    here = live if _pg_exists(con, live) else None  # the current name of the original live database
    closed = False
    try:
        if here:
            allowed = con.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", [live]).fetchone()[0]
            if allowed:  # an application's pool reconnects at once; refuse it while the names change
                try:
                    con.execute(q("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(_pg_ident(live)))
                except psycopg.Error as exc:
                    raise RestoreError(f"cannot close database {live} to new connections: {_oneline(exc)}; "
                                       "nothing was changed") from None
                closed = True
        _pg_end_sessions(con, [n for n in (live, incoming) if n])
        if here:
            try:
                con.execute(q("ALTER DATABASE {} RENAME TO {}").format(_pg_ident(live), _pg_ident(outgoing)))
            except psycopg.Error as exc:
                raise RestoreError(f"cannot rename database {live}: {_oneline(exc)}; nothing was changed") from None
            here = outgoing
        if incoming:
            try:
                con.execute(q("ALTER DATABASE {} RENAME TO {}").format(_pg_ident(incoming), _pg_ident(live)))
            except psycopg.Error as exc:
                why = _oneline(exc)
                if here:
                    try:
                        con.execute(q("ALTER DATABASE {} RENAME TO {}").format(_pg_ident(here), _pg_ident(live)))
                    except psycopg.Error as back:
                        raise RestoreError(f"cannot rename database {incoming} to {live}: {why}; renaming {here} "
                                           f"back failed too ({_oneline(back)}): the live data is in {here}") from None
                    here = live
                raise RestoreError(f"cannot rename database {incoming} to {live}: {why}; "
                                   f"{live} was renamed back and is unchanged") from None
    finally:
        if closed and here:
            try:
                con.execute(q("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(_pg_ident(here)))
            except psycopg.Error as exc:
                raise RestoreError(f"database {here} still refuses connections, re-enabling them failed: "
                                   f"{_oneline(exc)}; run ALTER DATABASE ... ALLOW_CONNECTIONS true") from None


def _pg_end_sessions(con, names: list[str], timeout: float = 15) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = con.execute("SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()", [names]).fetchall()
        except psycopg.Error as exc:
            raise RestoreError(f"cannot end the other sessions on {', '.join(names)}: {_oneline(exc)} (the role "
                               "needs their role or pg_signal_backend); nothing was renamed") from None
        if not rows:
            return
        if time.monotonic() > deadline:
            raise RestoreError(f"{len(rows)} session(s) on {', '.join(names)} did not end within {timeout:g} s; "
                               "nothing was renamed")
        time.sleep(0.1)  # pg_terminate_backend only signals; the backends exit a moment later


def _pg_drop(target: DbTarget, name: str) -> None:
    import psycopg

    with _pg_admin(target, name) as con:
        force = " WITH (FORCE)" if con.info.server_version >= 130000 else ""
        try:
            con.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {}" + force).format(_pg_ident(name)))
        except psycopg.Error as exc:
            raise RestoreError(f"cannot drop database {name}: {_oneline(exc)}") from None
