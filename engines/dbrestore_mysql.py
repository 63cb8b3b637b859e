"""MySQL/MariaDB: restore a dump into a fresh database, swap it in for the live one, swap it back.

The engine-neutral parts (DbTarget, side names) are in engines.dbbase, RestoreError in engines.dberrors;
engines.dbrestore re-exports the public functions here, and its docstring tells the whole procedure
(privileges included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator

from . import credentials, sources
from .dbbase import DbTarget, drop_after_failure, side_name
from .dberrors import RestoreError
from .feed import feed_process

# --- MySQL / MariaDB ---------------------------------------------------------------------
# There is no RENAME DATABASE: base tables move between databases in one RENAME TABLE
# (atomic), but views, triggers, routines and events cannot move, so they are
# re-created from their SHOW CREATE definitions. The side database that receives
# the live tables also receives the live objects' definitions, in MY_META, so
# mysql_unswap re-creates them exactly (same text, sql_mode, charset, time zone).
MY_META = "__kasa_swap_objects"
MY_DELIM = "$kasa$"  # statement delimiter while creating objects: their bodies contain ";"
MY_CODECS = {"utf8": "utf-8", "utf8mb3": "utf-8", "utf8mb4": "utf-8", "latin1": "cp1252", "ascii": "ascii"}
MY_SHOW = {"FUNCTION": "Create Function", "PROCEDURE": "Create Procedure", "VIEW": "Create View",
           "TRIGGER": "SQL Original Statement", "EVENT": "Create Event"}  # also the order of creation


@dataclasses.dataclass
class _MyObject:
    kind: str
    name: str
    definition: str
    sql_mode: str | None = None
    time_zone: str | None = None
    charset: str | None = None
    collation: str | None = None


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _lit(value: str | None) -> str:
    """A string literal that no sql_mode (NO_BACKSLASH_ESCAPES, ANSI_QUOTES) can misread."""
    if value is None:
        return "NULL"
    return "_utf8mb4 0x" + value.encode().hex() if value else "''"


@contextlib.contextmanager
def _my_cnf(target: DbTarget) -> Iterator[str]:
    # A host starting with "/" is the server's socket file (as a DatabaseConnection's): a remote customer's
    # database is reached through the SSH session's forward, a socket on the worker (backups.remote_parts).
    socket = target.host if target.host.startswith("/") else ""
    with credentials.mysql_defaults_file(host=target.host, port=target.port, user=target.user,
                                         password=target.password, socket=socket) as cnf:
        yield cnf


def _my_admin_cnf(target: DbTarget):
    """The login that creates, renames and drops databases: the maintenance connection when there is one."""
    return _my_cnf(target.maint or target)


class CannotCreateDatabase(RestoreError):
    """The user may not create the side database (no grant outside its own): nothing was changed."""


def _grant_pattern(name: str) -> str:
    """A database name as a GRANT pattern matching it alone (`_` and `%` are wildcards there)."""
    return _q(name.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%"))


def _my_account(cnf: str) -> str:
    """'user'@'host' of the account the server matched for this login (CURRENT_USER())."""
    who = _my_run(cnf, "SELECT CURRENT_USER();").strip()
    user, _, host = who.rpartition("@")

    def quoted(v: str) -> str:  # an account name must be a quoted string; our sessions keep backslash escapes
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{quoted(user)}@{quoted(host)}"


def _my_grant(target: DbTarget, admin: str, name: str, *, revoke: bool = False) -> None:
    """Let the customer's own user into side database `name` (or take that right back)."""
    with _my_cnf(target) as cnf:
        account = _my_account(cnf)
    if revoke:
        with contextlib.suppress(RestoreError):  # nothing was granted, or already revoked
            _my_run(admin, f"REVOKE ALL PRIVILEGES ON {_grant_pattern(name)}.* FROM {account}", what="REVOKE")
    else:
        _my_run(admin, f"GRANT ALL PRIVILEGES ON {_grant_pattern(name)}.* TO {account}", what="GRANT")


def my_argv(cnf: str, *extra: str) -> list[str]:
    try:
        client = sources.mysql_client_program()
    except sources.SourceError as exc:
        raise RestoreError(f"{exc}; nothing was changed") from None
    return [client, f"--defaults-extra-file={cnf}", "--batch", "--default-character-set=utf8mb4", *extra]


def _my_run(cnf: str, script: str | bytes, *, database: str | None = None, xml: bool = False,
            what: str = "query") -> str:
    """Run a script on the client's stdin (never argv: bodies can be long); return its stdout."""
    argv = my_argv(cnf, "--xml" if xml else "--skip-column-names",
                    *([f"--database={database}"] if database else []))
    data = script.encode() if isinstance(script, str) else script
    try:
        res = subprocess.run(argv, input=data, capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise RestoreError(f"MySQL/MariaDB {what} did not finish within 600 s") from None
    if res.returncode != 0:
        lines = res.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RestoreError(f"MySQL/MariaDB {what} failed: {lines[-1] if lines else f'exit code {res.returncode}'}")
    return res.stdout.decode("utf-8", "replace")


def _my_results(cnf: str, script: str, *, database: str | None = None) -> list[list[dict[str, str | None]]]:
    """One list of rows per statement. XML output: values keep their newlines and tabs, NULL stays None."""
    nil = "{http://www.w3.org/2001/XMLSchema-instance}nil"
    results = []
    for doc in _my_run(cnf, script, database=database, xml=True).split('<?xml version="1.0"?>'):
        if doc.strip():
            results.append([{f.get("name"): None if f.get(nil) == "true" else (f.text or "")
                             for f in row.findall("field")} for row in ET.fromstring(doc.strip()).findall("row")])
    return results


def _my_db_options(cnf: str, name: str) -> str | None:
    """`CHARACTER SET x COLLATE y` of an existing database; None when it does not exist."""
    rows = _my_results(cnf, "SELECT DEFAULT_CHARACTER_SET_NAME AS c, DEFAULT_COLLATION_NAME AS o FROM "
                            f"information_schema.SCHEMATA WHERE SCHEMA_NAME = {_lit(name)}")[0]
    return f"CHARACTER SET {_q(rows[0]['c'])} COLLATE {_q(rows[0]['o'])}" if rows else None


def _my_list(cnf: str, db: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Base tables (and sequences) of db, and its (kind, name) objects in creation order."""
    s = _lit(db)
    tables, routines, views, triggers, events = _my_results(cnf, (
        f"SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = {s} AND TABLE_TYPE <> 'VIEW' "
        "ORDER BY 1;"
        f"SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {s} "
        "AND ROUTINE_TYPE IN ('FUNCTION', 'PROCEDURE') ORDER BY 1, 2;"
        f"SELECT 'VIEW', TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = {s} ORDER BY 2;"
        f"SELECT 'TRIGGER', TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = {s} "
        "ORDER BY EVENT_OBJECT_TABLE, ACTION_TIMING, EVENT_MANIPULATION, ACTION_ORDER;"  # keeps their firing order
        f"SELECT 'EVENT', EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = {s} ORDER BY 2;"))
    objects = [tuple(r.values()) for rows in (routines, views, triggers, events) for r in rows]
    return [next(iter(r.values())) for r in tables], objects


def _my_native_objects(cnf: str, db: str, listed: list[tuple[str, str]]) -> list[_MyObject]:
    if not listed:
        return []
    # With db as the default database, SHOW CREATE VIEW leaves db's own tables unqualified,
    # so the definition means the same thing when created in another database.
    results = _my_results(cnf, "".join(f"SHOW CREATE {kind} {_q(name)};\n" for kind, name in listed), database=db)
    objects = []
    for (kind, name), rows in zip(listed, results, strict=True):
        row = rows[0]
        if row.get(MY_SHOW[kind]) is None:
            raise RestoreError(f"cannot read the definition of {kind.lower()} {name} in {db} (the user must be its "
                               "definer or may read mysql.proc); nothing was changed")
        objects.append(_MyObject(kind, name, row[MY_SHOW[kind]], row.get("sql_mode"), row.get("time_zone"),
                                 row.get("character_set_client"), row.get("collation_connection")))
    views = [o for o in objects if o.kind == "VIEW"]
    ordered: list[_MyObject] = []
    while views:  # a view that selects from another view must come after it
        ready = [v for v in views if not any(_q(w.name) in v.definition for w in views if w is not v)] or views[:1]
        ordered += ready
        views = [v for v in views if v not in ready]
    return [o for o in objects if o.kind in ("FUNCTION", "PROCEDURE")] + ordered + \
        [o for o in objects if o.kind in ("TRIGGER", "EVENT")]


def _my_store_objects(cnf: str, db: str, objects: list[_MyObject]) -> None:
    script = (f"CREATE TABLE {_q(db)}.{_q(MY_META)} (seq INT PRIMARY KEY, kind VARCHAR(16) NOT NULL, "
              "name VARCHAR(64) NOT NULL, sql_mode TEXT, time_zone VARCHAR(64), character_set_client VARCHAR(64), "
              "collation_connection VARCHAR(64), definition LONGTEXT NOT NULL) DEFAULT CHARSET=utf8mb4;\n")
    for i, o in enumerate(objects):
        values = ", ".join(_lit(v) for v in (o.kind, o.name, o.sql_mode, o.time_zone, o.charset, o.collation,
                                             o.definition))
        script += f"INSERT INTO {_q(db)}.{_q(MY_META)} VALUES ({i}, {values});\n"
    _my_run(cnf, script, what=f"saving the object definitions in {db}")


def _my_stored_objects(cnf: str, db: str) -> list[_MyObject]:
    rows = _my_results(cnf, "SELECT kind, name, definition, sql_mode, time_zone, character_set_client, "
                            f"collation_connection FROM {_q(db)}.{_q(MY_META)} ORDER BY seq")[0]
    return [_MyObject(*r.values()) for r in rows]


def _my_drop_objects(cnf: str, db: str, objects: list[_MyObject]) -> None:
    if objects:
        script = "".join(f"DROP {o.kind} IF EXISTS {_q(o.name)};\n" for o in reversed(objects))
        _my_run(cnf, script, database=db, what=f"dropping views, triggers and routines of {db}")


def _my_create_objects(cnf: str, db: str, objects: list[_MyObject]) -> None:
    """Re-create objects from their definitions with the sql_mode, time zone and client charset they had."""
    if not objects:
        return
    out = [f"DELIMITER {MY_DELIM}\n".encode()]
    for o in objects:
        charset = o.charset if o.charset in MY_CODECS else "utf8mb4"
        sets = [f"SET SESSION sql_mode = {_lit(o.sql_mode or '')}", f"SET SESSION character_set_client = {charset}"]
        if o.collation and charset == o.charset:
            sets.append(f"SET SESSION collation_connection = {_lit(o.collation)}")
        if o.time_zone:
            sets.append(f"SET SESSION time_zone = {_lit(o.time_zone)}")
        sets.append(f"DROP {o.kind} IF EXISTS {_q(o.name)}")
        out += [f"{s}{MY_DELIM}\n".encode() for s in sets]
        # The text is sent in the charset the server will read it in (character_set_client).
        out.append(o.definition.encode(MY_CODECS[charset], "replace") + f"{MY_DELIM}\n".encode())
    _my_run(cnf, b"".join(out), database=db, what=f"creating views, triggers and routines in {db}")


def _my_rename(cnf: str, moves: list[tuple[str, str, str]]) -> None:
    """All moves in ONE RENAME TABLE statement: atomic, either every table moved or none."""
    if moves:
        pairs = ", ".join(f"{_q(src)}.{_q(t)} TO {_q(dst)}.{_q(t)}" for src, t, dst in moves)
        # lock_wait_timeout: a session holding a table fails the swap in a minute instead of a day.
        _my_run(cnf, f"SET SESSION lock_wait_timeout = 60; RENAME TABLE {pairs};", what="RENAME TABLE")


def _my_exchange(cnf: str, live: str, incoming: str | None, outgoing: str | None) -> None:
    """Tables of live → outgoing and of incoming → live; the objects follow by definition; incoming is dropped."""
    live_tables, listed = _my_list(cnf, live)
    live_objects = _my_native_objects(cnf, live, listed)
    in_tables, in_objects, in_triggers = [], [], []
    if incoming:
        in_tables, listed = _my_list(cnf, incoming)
        if MY_META in in_tables:  # a side database from an earlier swap keeps its definitions in MY_META
            in_tables.remove(MY_META)
            in_objects = _my_stored_objects(cnf, incoming)
        else:
            in_objects = _my_native_objects(cnf, incoming, listed)
            in_triggers = [o for o in in_objects if o.kind == "TRIGGER"]
    moves = [(live, t, outgoing) for t in live_tables] + [(incoming, t, live) for t in in_tables]
    done: list = []  # undo steps, run last first; each is registered before its step (which may half-fail)
    created = False
    try:
        if outgoing:
            _my_run(cnf, f"CREATE DATABASE {_q(outgoing)} {_my_db_options(cnf, live)}", what="CREATE DATABASE")
            created = True
            _my_store_objects(cnf, outgoing, live_objects)
        # Triggers forbid moving their table to another database; from here until the objects are
        # re-created the live database has none (the application is stopped for a restore).
        done.append(lambda: _my_create_objects(cnf, live, live_objects))  # DROP IF EXISTS + CREATE: idempotent
        _my_drop_objects(cnf, live, live_objects)
        if incoming:
            done.append(lambda: _my_create_objects(cnf, incoming, in_triggers))
            _my_drop_objects(cnf, incoming, in_triggers)
        _my_rename(cnf, moves)
        # Within one RENAME TABLE the moves run in order: tables leave live before others arrive, both ways.
        done.append(lambda: _my_rename(cnf, [(dst, t, src) for src, t, dst in reversed(moves)]))
        done.append(lambda: _my_drop_objects(cnf, live, in_objects))
        _my_create_objects(cnf, live, in_objects)
    except RestoreError as exc:
        failed = []
        for step in reversed(done):
            try:
                step()
            except RestoreError as undo_exc:
                failed.append(str(undo_exc))
        if created and not failed:
            with contextlib.suppress(RestoreError):
                _my_run(cnf, f"DROP DATABASE IF EXISTS {_q(outgoing)}")
        if failed:
            raise RestoreError(f"{exc}; putting {live} back failed too ({failed[0]}): its previous tables may be in "
                               f"database {outgoing or '(none)'} and its definitions in {outgoing}.{MY_META}") from None
        raise RestoreError(f"{exc}; {live} was put back as it was") from None
    if incoming:
        _my_run(cnf, f"DROP DATABASE {_q(incoming)}", what=f"dropping the emptied {incoming}")


class _Trailer:
    """Passes chunks through, remembering the last bytes (a dump cut at a statement boundary still loads)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks, self.tail = chunks, b""

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.tail = (self.tail + chunk[-256:])[-256:]
            yield chunk


def mysql_restore_fresh(target: DbTarget, new_dbname: str, chunks: Iterable[bytes]) -> dict[str, int]:
    """CREATE DATABASE new_dbname (live's charset) and load the mariadb-dump SQL from chunks into it.

    The dump must end with mariadb-dump's "-- Dump completed" line: the client
    happily loads a dump cut between two statements. Returns row counts keyed by
    table name like sources.mysql_row_counts. On any failure the new database is dropped.
    """
    live = target.dbname
    if new_dbname == live:
        raise RestoreError(f"refusing to restore into the live database {live}; nothing was changed")
    with _my_admin_cnf(target) as admin, _my_cnf(target) as cnf:
        if _my_db_options(admin, new_dbname) is not None:
            raise RestoreError(f"database {new_dbname} already exists: refusing to restore over it; "
                               "nothing was changed")
        try:
            _my_run(admin, f"CREATE DATABASE {_q(new_dbname)} {_my_db_options(admin, live) or ''}",
                    what="CREATE DATABASE")
        except RestoreError as exc:
            grant = f"`{live}__kasa_%`.*" if live and new_dbname.startswith(f"{live}__kasa_") else f"`{new_dbname}`.*"
            error = CannotCreateDatabase if "denied" in str(exc).lower() and not target.maint else RestoreError
            raise error(f"cannot create database {new_dbname} ({exc}): user {(target.maint or target).user} needs "
                        f"ALL on {grant}; nothing was changed") from None
        if target.maint:
            try:
                _my_grant(target, admin, new_dbname)
            except RestoreError as exc:
                drop_after_failure(lambda: mysql_drop_database(target, new_dbname), exc, new_dbname, live)
        # The client obeys the dump's first line (/*M!999999\- enable the sandbox mode */): no shell escapes.
        trailer = _Trailer(chunks)
        try:
            feed_process(my_argv(cnf, f"--database={new_dbname}"), trailer, secrets_=[target.password])
            if b"-- Dump completed" not in trailer.tail:
                raise RestoreError("the dump ends early (no final '-- Dump completed' line): it is truncated")
            try:
                return sources.mysql_row_counts(cnf, new_dbname)
            except sources.SourceError as exc:
                raise RestoreError(str(exc)) from None
        except BaseException as exc:
            drop_after_failure(lambda: mysql_drop_database(target, new_dbname), exc, new_dbname, live)
            raise


def mysql_swap(target: DbTarget, new_dbname: str, *, tag: str | None = None) -> str | None:
    """Exchange the live database's tables and objects with new_dbname's; return where the old ones are kept.

    new_dbname is dropped once emptied. Returns None when there was no live
    database (it is created: a clone to a new name).
    """
    live = target.dbname
    with _my_admin_cnf(target) as cnf:
        options = _my_db_options(cnf, new_dbname)
        if options is None:
            raise RestoreError(f"database {new_dbname} does not exist: nothing to swap in; {live} was not touched")
        if _my_db_options(cnf, live) is None:
            _my_run(cnf, f"CREATE DATABASE {_q(live)} {options}", what="CREATE DATABASE")
            try:
                _my_exchange(cnf, live, new_dbname, None)
            except RestoreError:
                if not _my_list(cnf, live)[0]:  # only the empty database we just created
                    _my_run(cnf, f"DROP DATABASE IF EXISTS {_q(live)}")
                raise
            return None
        old = side_name(live, "old", tag, engine="mysql")
        if _my_db_options(cnf, old) is not None:
            raise RestoreError(f"database {old} already exists; {live} was not touched")
        _my_exchange(cnf, live, new_dbname, old)
        if target.maint:  # new_dbname is gone: so is the user's right to it
            _my_grant(target, cnf, new_dbname, revoke=True)
        return old


def mysql_unswap(target: DbTarget, old_dbname: str | None, new_dbname: str) -> None:
    """Undo mysql_swap: the restored tables and objects go back to new_dbname, old_dbname's return to live."""
    live = target.dbname
    with _my_admin_cnf(target) as cnf:
        if _my_db_options(cnf, new_dbname) is not None:
            raise RestoreError(f"database {new_dbname} already exists; {live} was not touched")
        if old_dbname and _my_db_options(cnf, old_dbname) is None:
            raise RestoreError(f"database {old_dbname} does not exist: nothing to swap back; {live} was not touched")
        _my_exchange(cnf, live, old_dbname, new_dbname)
        if not old_dbname:  # there was no live database before the swap
            _my_run(cnf, f"DROP DATABASE {_q(live)}", what=f"dropping {live}")


def mysql_drop_database(target: DbTarget, name: str) -> None:
    with _my_admin_cnf(target) as cnf:
        _my_run(cnf, f"DROP DATABASE IF EXISTS {_q(name)}", what=f"dropping database {name}")
        if target.maint:
            _my_grant(target, cnf, name, revoke=True)


def mysql_database_exists(target: DbTarget, name: str) -> bool:
    """Whether database `name` exists (and this user may see it: SCHEMATA lists only those it has rights on)."""
    with _my_admin_cnf(target) as cnf:
        return _my_db_options(cnf, name) is not None
