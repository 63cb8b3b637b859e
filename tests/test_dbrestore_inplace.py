"""Restores for least-privilege roles, on real servers: PostgreSQL in one transaction inside the live database
(engines.dbrestore_pginplace) and MariaDB through prefixed tables of the same database
(engines.dbrestore_mytables). The roles own their database and nothing more (no CREATEDB, no grant outside
their schema)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from engines import dbrestore_pginplace as inplace
from engines.dbrestore import DbTarget, RestoreError
from tests.test_dbrestore import (
    PG_CHANGE,
    REPO,
    pg_admin,
    pg_connect,
    pg_dump,
    pg_live,  # noqa: F401 (fixture)
    pieces,
)
from tests.test_dbrestore import pg_state as pg_rows

EXTRA = """
CREATE SCHEMA reports;
CREATE TABLE reports.daily (day date PRIMARY KEY, total numeric);
INSERT INTO reports.daily VALUES ('2025-01-01', 10);
CREATE TYPE mood AS ENUM ('ok', 'sad');
CREATE FUNCTION total_of(c int) RETURNS numeric LANGUAGE sql AS $$ SELECT sum(amount) FROM orders
  WHERE customer_id = c $$;
SELECT lo_from_bytea(0, 'a large object');
COMMENT ON TABLE orders IS 'the orders';
"""
# What a failed migration leaves behind, and what the application did since the backup.
DRIFT = PG_CHANGE + """
ALTER TABLE orders ADD COLUMN exported boolean NOT NULL DEFAULT false;
CREATE TABLE exports (id serial PRIMARY KEY, note text);
INSERT INTO exports (note) VALUES ('first');
CREATE SCHEMA scratch;
CREATE TABLE scratch.t (x int);
CREATE FUNCTION added_later() RETURNS int LANGUAGE sql AS 'SELECT 1';
ALTER TYPE mood ADD VALUE 'happy';
DROP TABLE reports.daily;
SELECT lo_from_bytea(0, 'another');
"""


def pg_schema(t: DbTarget) -> dict:
    """Rows (tests.test_dbrestore.pg_state) plus the shape: schemas, columns, routines, types, large objects."""
    state = pg_rows(t)
    with pg_connect(t) as con:
        state["schemas"] = con.execute("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                                       "ORDER BY 1").fetchall()
        state["columns"] = con.execute("SELECT table_schema, table_name, column_name, data_type, column_default "
                                       "FROM information_schema.columns WHERE table_schema NOT IN "
                                       "('pg_catalog', 'information_schema') ORDER BY 1, 2, 3").fetchall()
        state["routines"] = con.execute("SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid) FROM pg_proc p "
                                        "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public' "
                                        "ORDER BY 1").fetchall()
        state["enum"] = con.execute("SELECT enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
                                    "WHERE t.typname = 'mood' ORDER BY enumsortorder").fetchall()
        state["blobs"] = con.execute("SELECT lo_get(oid) FROM pg_largeobject_metadata ORDER BY 1").fetchall()
        state["comment"] = con.execute("SELECT obj_description('public.orders'::regclass)").fetchone()
        state["owners"] = con.execute("SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c JOIN pg_namespace "
                                      "n ON n.oid = c.relnamespace WHERE n.nspname IN ('public', 'reports')"
                                      ).fetchall()
        if "reports.daily" not in state:
            state["reports.daily"] = None
    return state


@pytest.fixture
def pg_owner(pg_live):  # noqa: F811
    """The live database of a role that owns it and has no CREATEDB, with schemas, types, routines, a blob."""
    with pg_connect(pg_live) as con:
        con.execute(EXTRA)
    with pg_admin() as con:
        assert not con.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = %s",
                               [pg_live.user]).fetchone()[0]
    return pg_live


def test_pg_restore_in_place_brings_back_rows_and_shape_and_drops_what_came_after(pg_owner):
    live = pg_owner
    backup_state = pg_schema(live)
    dump, manifest = pg_dump(live)
    with pg_connect(live) as con:
        con.execute(DRIFT)
    assert pg_schema(live) != backup_state
    seen = []
    counts = inplace.pg_restore_in_place(live, pieces(dump), expected=manifest, on_begin=seen.append)
    assert counts == manifest
    assert pg_schema(live) == backup_state  # the added column, table, schema and function are gone
    assert len(seen) == 1 and inplace.pg_transaction_status(live, seen[0]) == "committed"


def test_pg_restore_in_place_checks_row_counts_before_commit_and_rolls_back(pg_owner):
    live = pg_owner
    dump, manifest = pg_dump(live)
    with pg_connect(live) as con:
        con.execute(DRIFT)
    drifted = pg_schema(live)
    seen = []
    wrong = {**manifest, "public.orders": manifest["public.orders"] + 1}
    with pytest.raises(RestoreError, match="does not match the manifest.*public.orders.*exactly as it was"):
        inplace.pg_restore_in_place(live, pieces(dump), expected=wrong, on_begin=seen.append)
    assert pg_schema(live) == drifted
    assert inplace.pg_transaction_status(live, seen[0]) == "aborted"


@pytest.mark.parametrize("damage", ["half", "tail", "garbage"])
def test_pg_restore_in_place_of_a_broken_archive_leaves_the_database_exactly_as_it_was(pg_owner, damage):
    live = pg_owner
    dump, manifest = pg_dump(live)
    with pg_connect(live) as con:
        con.execute(DRIFT)
    drifted = pg_schema(live)
    bad = {"half": dump[: len(dump) // 2], "tail": dump[:-20], "garbage": os.urandom(5000)}[damage]
    with pytest.raises(RestoreError) as err:
        inplace.pg_restore_in_place(live, pieces(bad), expected=manifest)
    assert "exactly as it was" in str(err.value) and live.password not in str(err.value)
    assert pg_schema(live) == drifted
    with pytest.raises(RestoreError):
        inplace.pg_verify_archive(pieces(bad))
    inplace.pg_verify_archive(pieces(dump))


def test_pg_restore_in_place_stops_when_reading_the_archive_fails_even_at_its_very_end(pg_owner):
    """The archive stream raises after its last byte (a checksum checked at the end): nothing is committed."""
    live = pg_owner
    dump, manifest = pg_dump(live)
    with pg_connect(live) as con:
        con.execute(DRIFT)
    drifted = pg_schema(live)

    def chunks():
        yield from pieces(dump)
        raise ValueError("sha256 mismatch")

    with pytest.raises(ValueError, match="sha256"):
        inplace.pg_restore_in_place(live, chunks(), expected=manifest)
    assert pg_schema(live) == drifted


def test_pg_restore_in_place_fails_on_a_lock_held_by_another_role_and_rolls_back(pg_owner):
    live = pg_owner
    dump, manifest = pg_dump(live)
    with pg_connect(live) as con:
        con.execute(DRIFT)
    drifted = pg_schema(live)
    import psycopg

    with psycopg.connect(host=live.host, port=live.port, user="postgres", dbname=live.dbname) as holder:
        holder.execute("LOCK TABLE public.exports IN ACCESS SHARE MODE")  # a transaction stays open
        with pytest.raises(RestoreError, match="holds a lock.*exactly as it was"):
            inplace.pg_restore_in_place(live, pieces(dump), expected=manifest, lock_timeout=0.5)
        holder.rollback()
    assert pg_schema(live) == drifted


def test_pg_restore_in_place_refuses_a_non_empty_database_for_a_copy(pg_owner):
    live = pg_owner
    dump, manifest = pg_dump(live)
    before = pg_schema(live)
    with pytest.raises(RestoreError, match="not empty"):
        inplace.pg_restore_in_place(live, pieces(dump), expected=manifest, require_empty=True)
    assert pg_schema(live) == before
    assert inplace.sweep(live) > 0  # what a copy's undo does
    inplace.pg_restore_in_place(live, pieces(dump), expected=manifest, require_empty=True, privileges=False)
    assert pg_schema(live) == before


KILLED_IN_PLACE = """
import json, os, signal, sys
from engines import dbrestore, dbrestore_pginplace as inplace

where = sys.argv[2]
def on_begin(xid):
    open(sys.argv[3], "w").write(xid)
def killed(*args, **kwargs):  # the worker dies here: no except or finally block runs
    os.kill(os.getpid(), signal.SIGKILL)
if where == "copy":
    inplace._copy = killed
else:
    inplace.sources.pg_count_rows = killed
inplace.pg_restore_in_place(dbrestore.DbTarget(**json.loads(os.environ["KASA_TEST_TARGET"])),
                            iter([open(sys.argv[1], "rb").read()]), on_begin=on_begin,
                            application_name="kasa-restore r1")
"""


@pytest.mark.parametrize("where", ["copy", "count"])
def test_pg_transaction_of_a_killed_worker_is_aborted_and_the_database_is_as_it_was(pg_owner, tmp_path, where):
    live = pg_owner
    dump, _ = pg_dump(live)
    with pg_connect(live) as con:
        con.execute(DRIFT)
    drifted = pg_schema(live)
    (tmp_path / "dump").write_bytes(dump)
    env = {**os.environ, "PYTHONPATH": str(REPO), "KASA_TEST_TARGET": json.dumps(live.__dict__)}
    res = subprocess.run([sys.executable, "-c", KILLED_IN_PLACE, str(tmp_path / "dump"), where,
                          str(tmp_path / "xid")], cwd=REPO, env=env, capture_output=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()
    xid = (tmp_path / "xid").read_text()
    assert inplace.pg_transaction_status(live, xid, application_name="kasa-restore r1") == "aborted"
    assert pg_schema(live) == drifted
