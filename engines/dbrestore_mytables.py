"""MySQL/MariaDB: restore through prefixed tables of the SAME database, for a user with no right outside it.

engines.dbrestore_mysql loads a dump into a side database (`<live>__kasa_new_<tag>`), which a user granted
only `<live>`.* may not create. This path needs nothing beyond the live database:

1. load (the application still runs): the dump is rewritten on its way to the client so that every table and
   sequence lands as `__kasa_new_<tag>_<n>`; foreign keys are left out of those tables (InnoDB constraint names
   are unique per DATABASE, and the live tables hold the same names) and kept, with the dump's views,
   triggers, routines and events, in the table `__kasa_meta_<tag>`. Row counts are read from the new tables.
2. swap (the application stopped): the live tables' foreign keys and objects are saved in the meta table
   (prepare_swap), then dropped; ONE `RENAME TABLE` moves every live table to `__kasa_old_<tag>_<n>` and every
   new one to its name; the restored foreign keys are added under their own names (checks off: the data is a
   consistent dump) and the dump's views, triggers, routines and events are created.
3. finish: the old tables and the meta table are dropped, once the restore holds.

unswap puts everything back from whatever state it finds (a failure half-way, a worker killed anywhere):
RENAME TABLE is atomic, so which tables exist tells which side of it we are on. Dropping the new tables and
the meta table (drop_new) undoes step 1.

What the rewriting relies on is mariadb-dump's own layout with Kasa's flags (see engines.sqlcount): every
statement starts a line, each section starts with a `-- Table structure for table` style comment, and a
CREATE TABLE lists one column, key or constraint per line. A statement it does not know refuses the dump
before anything live is touched.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

from .dberrors import RestoreError
from .dbrestore_mysql import (
    _lit,
    _my_cnf,
    _my_create_objects,
    _my_drop_objects,
    _my_list,
    _my_native_objects,
    _my_results,
    _my_run,
    _MyObject,
    _q,
    _Trailer,
    my_argv,
)
from .feed import feed_process

HELD_CHUNK = 1 << 20  # the held script is stored in rows of this size (under any max_allowed_packet)

_NAME = rb"`((?:[^`]|``)*)`"
_SECTION = re.compile(rb"-- (Table structure for table|Dumping data for table|Sequence structure for|"
                      rb"Temporary table structure for view|Final view structure for view|Dumping events for "
                      rb"database|Dumping routines for database)\b")
# Statements naming the table (or sequence) of their section: the name is rewritten.
_RENAMED = re.compile(rb"(DROP TABLE IF EXISTS |CREATE TABLE |LOCK TABLES |/\*!40000 ALTER TABLE |INSERT INTO |"
                      rb"DROP SEQUENCE IF EXISTS |CREATE SEQUENCE |DO SETVAL\()" + _NAME)
_FK = re.compile(rb"\s*CONSTRAINT " + _NAME + rb" FOREIGN KEY ")
_PASS = (b"/*!40101 SET ", b"/*!40103 SET ", b"/*!40014 SET ", b"/*!40111 SET ", b"UNLOCK TABLES;", b"--", b"(")


def names(tag: str) -> tuple[str, str, str]:
    """(new prefix, old prefix, meta table) of one restore."""
    return f"__kasa_new_{tag}_", f"__kasa_old_{tag}_", f"__kasa_meta_{tag}"


def _unq(raw: bytes) -> str:
    return raw.decode("utf-8").replace("``", "`")


class _Rewriter:
    """Turns the dump into the load script (tables under their new names, no foreign keys); collects the
    foreign keys, the held script (header + views, triggers, routines, events) and the table names."""

    def __init__(self, tag: str):
        self.prefix = names(tag)[0]
        self.tables: dict[str, int] = {}  # name -> n, in dump order
        self.kinds: dict[str, str] = {}  # name -> TABLE | SEQUENCE
        self.fks: list[tuple[str, str]] = []  # (table, "CONSTRAINT `x` FOREIGN KEY ...")
        self.held = bytearray()
        self.section = b""  # b"" before the first section: the header, which both scripts get
        self.after_unlock = False
        self.create: list[bytes] | None = None  # the lines of the CREATE TABLE being read
        self.create_table = ""
        self.closed = False

    def feed(self, line: bytes) -> bytes:
        """One whole line in, what the load script gets out."""
        if self.create is not None:
            return self._create_line(line)
        m = _SECTION.match(line)
        if m:
            self.section, self.after_unlock = m.group(1), False
        if not self.section:
            self.held += line
            return line
        if self.section in (b"Temporary table structure for view", b"Final view structure for view",
                            b"Dumping events for database", b"Dumping routines for database") or self.after_unlock:
            self.held += line
            return b"" if not line.startswith(b"--") else line
        if line.startswith(b"(") or not line.strip():
            return line
        r = _RENAMED.match(line)
        if r:
            table = _unq(r.group(2))
            new = self._new_name(table, kind="SEQUENCE" if b"SEQUENCE" in r.group(1) else "TABLE")
            line = line[:r.start(2) - 1] + _q(new).encode() + line[r.end(2) + 1:]
            if r.group(1) == b"CREATE TABLE ":
                self.create, self.create_table, self.closed = [line], table, False
                return b""
            return line
        if line.startswith(_PASS):
            if line.startswith(b"UNLOCK TABLES;") and self.section == b"Dumping data for table":
                self.after_unlock = True  # what follows in this section are the table's triggers
            return line
        raise RestoreError(f"the dump holds a statement Kasa cannot place in prefixed tables: "
                           f"{line[:120].decode('utf-8', 'replace')!r}; nothing was changed")

    def _create_line(self, line: bytes) -> bytes:
        """A line of the CREATE TABLE being read: it ends at the first line ending with ";" once the closing
        ")" line (items are indented, never start with ")") has been seen."""
        assert self.create is not None
        self.create.append(line)
        self.closed = self.closed or line.startswith(b")")
        return self._end_create() if self.closed and line.rstrip().endswith(b";") else b""

    def _end_create(self) -> bytes:
        lines, self.create = self.create or [], None
        first, rest = lines[0], lines[1:]
        close = next((i for i, x in enumerate(rest) if x.startswith(b")")), None)
        if close is None:
            return b"".join(lines)
        items, tail = rest[:close], rest[close:]
        kept = []
        for item in items:
            fk = _FK.match(item)
            if fk:
                self.fks.append((self.create_table, item.strip().rstrip(b",").decode("utf-8")))
            else:
                kept.append(item.rstrip(b"\n").rstrip(b","))
        return first + b",\n".join(kept) + b"\n" + b"".join(tail)

    def _new_name(self, table: str, *, kind: str) -> str:
        if table not in self.tables:
            self.tables[table] = len(self.tables)
            self.kinds[table] = kind
        return f"{self.prefix}{self.tables[table]}"


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        data = rest + bytes(chunk)
        end = data.rfind(b"\n")
        if end < 0:
            rest = data
            continue
        yield from data[: end + 1].splitlines(keepends=True)
        rest = data[end + 1:]
    if rest:
        yield rest


def _rewritten(chunks: Iterable[bytes], rw: _Rewriter) -> Iterator[bytes]:
    out = bytearray()
    for line in _lines(chunks):
        out += rw.feed(line)
        if len(out) >= HELD_CHUNK:
            yield bytes(out)
            out.clear()
    if rw.create is not None:
        out += rw._end_create()
    if out:
        yield bytes(out)


def _meta_create(meta: str) -> str:
    return (f"CREATE TABLE {_q(meta)} (seq INT AUTO_INCREMENT PRIMARY KEY, role VARCHAR(16) NOT NULL, "
            "n INT, kind VARCHAR(16), name VARCHAR(64), sql_mode TEXT, time_zone VARCHAR(64), "
            "character_set_client VARCHAR(64), collation_connection VARCHAR(64), definition LONGTEXT) "
            "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4")


def _meta_insert(meta: str, rows: list[tuple]) -> str:
    """rows: (role, n, kind, name, sql_mode, time_zone, charset, collation, definition)."""
    out = []
    for role, n, kind, name, *rest in rows:
        values = [_lit(role), "NULL" if n is None else str(int(n)), _lit(kind), _lit(name)] + [_lit(v) for v in rest]
        out.append(f"INSERT INTO {_q(meta)} (role, n, kind, name, sql_mode, time_zone, character_set_client, "
                   f"collation_connection, definition) VALUES ({', '.join(values)});\n")
    return "".join(out)


def _meta_rows(cnf: str, db: str, meta: str, role: str) -> list[dict]:
    return _my_results(cnf, f"SELECT n, kind, name, sql_mode, time_zone, character_set_client, "
                            f"collation_connection, definition FROM {_q(meta)} WHERE role = {_lit(role)} "
                            "ORDER BY seq", database=db)[0]


def _tables(cnf: str, db: str) -> dict[str, str]:
    """Every base table and sequence of db: name -> TABLE_TYPE."""
    rows = _my_results(cnf, "SELECT TABLE_NAME AS t, TABLE_TYPE AS k FROM information_schema.TABLES "
                            f"WHERE TABLE_SCHEMA = {_lit(db)} AND TABLE_TYPE <> 'VIEW'")[0]
    return {r["t"]: r["k"] for r in rows}


def _drop_tables(cnf: str, db: str, tables: list[str]) -> None:
    if tables:
        _my_run(cnf, "SET SESSION foreign_key_checks = 0; SET SESSION lock_wait_timeout = 60; DROP TABLE IF EXISTS "
                + ", ".join(_q(t) for t in tables) + ";", database=db, what=f"dropping tables of {db}")


# --- 1. load ------------------------------------------------------------------------------------------------
def load(target, tag: str, chunks: Iterable[bytes]) -> dict[str, int]:
    """Load the dump into `__kasa_new_<tag>_<n>` tables of the live database; return row counts by table name.

    On any failure what was created is dropped again and the live tables were never touched.
    """
    live = target.dbname
    new, _, meta = names(tag)
    rw = _Rewriter(tag)
    with _my_cnf(target) as cnf:
        if any(t.startswith(new) or t == meta for t in _tables(cnf, live)):
            raise RestoreError(f"tables {new}* already exist in {live}: refusing to restore over them; "
                               "nothing was changed")
        try:
            _my_run(cnf, _meta_create(meta) + ";", database=live, what=f"creating {meta}")
        except RestoreError as exc:
            raise RestoreError(f"{exc}; nothing was changed") from None
        trailer = _Trailer(chunks)
        try:
            feed_process(_my_argv_db(cnf, live), _rewritten(trailer, rw), secrets_=[target.password])
            if b"-- Dump completed" not in trailer.tail:
                raise RestoreError("the dump ends early (no final '-- Dump completed' line): it is truncated")
            held = bytes(rw.held)
            rows = [("new_table", n, rw.kinds[t], t, None, None, None, None, None) for t, n in rw.tables.items()]
            rows += [("new_fk", None, None, t, None, None, None, None, fk) for t, fk in rw.fks]
            rows += [("held", i, None, None, None, None, None, None, held[i:i + HELD_CHUNK].decode("utf-8"))
                     for i in range(0, len(held), HELD_CHUNK)]
            _my_run(cnf, _meta_insert(meta, rows), database=live, what=f"writing {meta}")
            return _counts(cnf, live, tag, rw.tables, rw.kinds)
        except BaseException as exc:
            try:
                drop_new(target, tag)
                left = "the prefixed tables were dropped"
            except Exception as drop_exc:  # noqa: BLE001
                left = f"dropping the prefixed tables failed too ({drop_exc}): drop {new}* and {meta} by hand"
            if not isinstance(exc, Exception):
                raise
            why = str(exc) if isinstance(exc, RestoreError) else f"reading the backup failed: {exc}"
            raise RestoreError(f"{why}; {left} and the live tables of {live} were not touched") from exc


def _my_argv_db(cnf: str, db: str) -> list[str]:
    return my_argv(cnf, f"--database={db}")


def _counts(cnf: str, db: str, tag: str, tables: dict[str, int], kinds: dict[str, str]) -> dict[str, int]:
    base = [t for t in tables if kinds[t] == "TABLE"]
    if not base:
        return {}
    new = names(tag)[0]
    parts = [f"SELECT {_lit(t)} AS t, COUNT(*) AS c FROM {_q(new + str(tables[t]))}" for t in base]
    rows = _my_results(cnf, " UNION ALL ".join(parts), database=db)[0]
    return {r["t"]: int(r["c"]) for r in rows}


def drop_new(target, tag: str) -> None:
    """Undo load: drop the `__kasa_new_<tag>_*` tables and the meta table (never a live table)."""
    new, _, meta = names(tag)
    with _my_cnf(target) as cnf:
        present = _tables(cnf, target.dbname)
        _drop_tables(cnf, target.dbname, [t for t in present if t.startswith(new) or t == meta])


# --- 2. swap ------------------------------------------------------------------------------------------------
def _live_tables(present: dict[str, str], tag: str) -> list[str]:
    new, old, meta = names(tag)
    return sorted(t for t in present if not (t.startswith(new) or t.startswith(old) or t == meta))


def _foreign_keys(cnf: str, db: str, tables: list[str] | None = None) -> dict[str, str]:
    """table -> SHOW CREATE TABLE of every table of db with a foreign key (or of `tables`)."""
    if tables is None:
        tables = [r["t"] for r in _my_results(cnf, "SELECT DISTINCT TABLE_NAME AS t FROM information_schema."
                                                   f"REFERENTIAL_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = {_lit(db)}")[0]]
    if not tables:
        return {}
    results = _my_results(cnf, "".join(f"SHOW CREATE TABLE {_q(t)};\n" for t in tables), database=db)
    return {table: rows[0].get("Create Table") or "" for table, rows in zip(tables, results, strict=True)}


def _fk_lines(create: str) -> list[str]:
    return [line.strip().rstrip(",") for line in create.splitlines() if _FK.match(line.encode())]


_KEY = re.compile(r"\s*((?:UNIQUE |FULLTEXT |SPATIAL )?KEY) `((?:[^`]|``)*)` (.*?),?$")


def _keys(create: str) -> dict[str, str]:
    """index name -> its kind and columns, from SHOW CREATE TABLE."""
    return {m.group(2): f"{m.group(1)} {m.group(3)}" for m in map(_KEY.match, create.splitlines()) if m}


def _fix_index_names(cnf: str, db: str, saved: dict[str, str]) -> None:
    """Give indexes back the names they had. Re-adding a foreign key whose index InnoDB had made by itself makes
    a new index named after the constraint (and drops the old one): same columns, another name."""
    now = _foreign_keys(cnf, db, list(saved))
    script = ""
    for table, create in saved.items():
        want, have = _keys(create), _keys(now.get(table, ""))
        for name, spec in want.items():
            if name in have:
                continue
            other = next((n for n, s in have.items() if s == spec and n not in want), None)
            if other is not None:
                script += f"ALTER TABLE {_q(table)} RENAME INDEX {_q(other)} TO {_q(name)};\n"
                have[name] = have.pop(other)
    if script:
        _my_run(cnf, script, database=db, what=f"naming the indexes of {db} as they were")


def prepare_swap(target, tag: str) -> None:
    """Save the live tables' names, foreign keys and objects in the meta table (nothing live changes)."""
    live = target.dbname
    _, _, meta = names(tag)
    with _my_cnf(target) as cnf:
        present = _tables(cnf, live)
        if meta not in present:
            raise RestoreError(f"{meta} is missing from {live}: the restored tables are gone; nothing was changed")
        _my_run(cnf, f"DELETE FROM {_q(meta)} WHERE role LIKE 'old\\_%';", database=live, what=f"clearing {meta}")
        tables = _live_tables(present, tag)
        _, listed = _my_list(cnf, live)
        objects = _my_native_objects(cnf, live, listed)
        rows = [("old_table", i, present[t], t, None, None, None, None, None) for i, t in enumerate(tables)]
        creates = _foreign_keys(cnf, live)
        rows += [("old_fk", None, None, t, None, None, None, None, fk)
                 for t, create in creates.items() for fk in _fk_lines(create)]
        rows += [("old_create", None, None, t, None, None, None, None, create) for t, create in creates.items()]
        rows += [("old_object", None, o.kind, o.name, o.sql_mode, o.time_zone, o.charset, o.collation, o.definition)
                 for o in objects]
        rows.append(("old_saved", None, None, None, None, None, None, None, None))
        _my_run(cnf, _meta_insert(meta, rows), database=live, what=f"saving the live definitions in {meta}")


def swap(target, tag: str) -> None:
    """Put the prefixed tables live (see the module docstring); on failure everything is put back."""
    live = target.dbname
    new, old, meta = names(tag)
    with _my_cnf(target) as cnf:
        try:
            if not _meta_rows(cnf, live, meta, "old_saved"):
                raise RestoreError(f"the live definitions were not saved in {meta} (prepare_swap)")
            olds = _meta_rows(cnf, live, meta, "old_table")
            news = _meta_rows(cnf, live, meta, "new_table")
            old_fks = _group(_meta_rows(cnf, live, meta, "old_fk"))
            new_fks = _group(_meta_rows(cnf, live, meta, "new_fk"))
            objects = [_object(r) for r in _meta_rows(cnf, live, meta, "old_object")]
            held = "".join(r["definition"] or "" for r in _meta_rows(cnf, live, meta, "held"))
            _alter_fks(cnf, live, {t: [f"DROP FOREIGN KEY {_q(_fk_name(fk))}" for fk in fks]
                                   for t, fks in old_fks.items()})
            _my_drop_objects(cnf, live, objects)
            moves = [(r["name"], f"{old}{r['n']}") for r in olds] + [(f"{new}{r['n']}", r["name"]) for r in news]
            _rename(cnf, live, moves)
            _alter_fks(cnf, live, {t: [f"ADD {fk}" for fk in fks] for t, fks in new_fks.items()})
            if held.strip():
                _my_run(cnf, held, database=live, what=f"creating the restored views, triggers and routines in {live}")
        except RestoreError as exc:
            try:
                unswap(target, tag)
            except RestoreError as undo_exc:
                raise RestoreError(f"{exc}; putting the live tables back failed too ({undo_exc}): they are in "
                                   f"{old}* and their definitions in {meta}") from None
            raise RestoreError(f"{exc}; the live tables of {live} were put back as they were") from None


def _group(rows: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["name"], []).append(r["definition"])
    return out


def _object(r: dict) -> _MyObject:
    return _MyObject(r["kind"], r["name"], r["definition"], r["sql_mode"], r["time_zone"], r["character_set_client"],
                     r["collation_connection"])


def _fk_name(fk: str) -> str:
    m = _FK.match(fk.encode())
    return _unq(m.group(1)) if m else ""


def _alter_fks(cnf: str, db: str, changes: dict[str, list[str]]) -> None:
    script = "".join(f"ALTER TABLE {_q(t)} {', '.join(parts)};\n" for t, parts in changes.items() if parts)
    if script:
        _my_run(cnf, "SET SESSION foreign_key_checks = 0; SET SESSION lock_wait_timeout = 60;\n" + script,
                database=db, what=f"changing foreign keys in {db}")


def _rename(cnf: str, db: str, moves: list[tuple[str, str]]) -> None:
    """Every move in ONE RENAME TABLE: all tables move, or none (the moves run in order within it)."""
    if moves:
        pairs = ", ".join(f"{_q(src)} TO {_q(dst)}" for src, dst in moves)
        _my_run(cnf, f"SET SESSION lock_wait_timeout = 60; RENAME TABLE {pairs};", database=db, what="RENAME TABLE")


def unswap(target, tag: str) -> str:
    """Put the live tables, their foreign keys and objects back from any state swap may have left; the
    restored tables go back under their prefixed names (drop_new removes them). Returns what it found."""
    live = target.dbname
    new, old, meta = names(tag)
    with _my_cnf(target) as cnf:
        present = _tables(cnf, live)
        if meta not in present:
            return "nothing to put back (no saved definitions)"
        olds = _meta_rows(cnf, live, meta, "old_table")
        news = _meta_rows(cnf, live, meta, "new_table")
        if not _meta_rows(cnf, live, meta, "old_saved"):
            return "the live tables were never touched"
        renamed = (any(f"{old}{r['n']}" in present for r in olds) if olds else
                   bool(news) and not any(f"{new}{r['n']}" in present for r in news))
        if renamed:
            _, listed = _my_list(cnf, live)
            _my_drop_objects(cnf, live, [_MyObject(k, n, "") for k, n in listed])
            back = [(r["name"], f"{new}{r['n']}") for r in news if r["name"] in present]
            back += [(f"{old}{r['n']}", r["name"]) for r in olds if f"{old}{r['n']}" in present]
            _rename(cnf, live, back)
            present = _tables(cnf, live)
            _drop_tables(cnf, live, [t for t in present if t.startswith(new)])
        have = {(r["t"], r["c"]) for r in _my_results(cnf, "SELECT TABLE_NAME AS t, CONSTRAINT_NAME AS c FROM "
                                                           "information_schema.REFERENTIAL_CONSTRAINTS WHERE "
                                                           f"CONSTRAINT_SCHEMA = {_lit(live)}")[0]}
        missing: dict[str, list[str]] = {}
        for t, fks in _group(_meta_rows(cnf, live, meta, "old_fk")).items():
            missing[t] = [f"ADD {fk}" for fk in fks if (t, _fk_name(fk)) not in have]
        _alter_fks(cnf, live, missing)
        _fix_index_names(cnf, live, {r["name"]: r["definition"] for r in _meta_rows(cnf, live, meta, "old_create")
                                     if r["name"] in missing})
        _my_create_objects(cnf, live, [_object(r) for r in _meta_rows(cnf, live, meta, "old_object")])
        return "the restored tables had gone live: the previous ones are back" if renamed else \
            "the previous tables had not moved: their foreign keys and objects are back"


# --- 3. finish ----------------------------------------------------------------------------------------------
def finish(target, tag: str) -> None:
    """The restore holds: drop the previous tables (`__kasa_old_<tag>_*`) and the meta table."""
    _, old, meta = names(tag)
    with _my_cnf(target) as cnf:
        present = _tables(cnf, target.dbname)
        _drop_tables(cnf, target.dbname, [t for t in present if t.startswith(old) or t == meta])


def exists(target, tag: str) -> bool:
    """Whether anything of restore `tag` is left in the database (prefixed tables or the meta table)."""
    new, old, meta = names(tag)
    with contextlib.suppress(RestoreError), _my_cnf(target) as cnf:
        return any(t.startswith((new, old)) or t == meta for t in _tables(cnf, target.dbname))
    return False
