"""Restores for least-privilege roles, on real servers: PostgreSQL in one transaction inside the live database
(engines.dbrestore_pginplace) and MariaDB through prefixed tables of the same database
(engines.dbrestore_mytables). The roles own their database and nothing more (no CREATEDB, no grant outside
their schema)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest

from engines import dbrestore, dbrestore_mysql
from engines import dbrestore_mytables as mytables
from engines import dbrestore_pginplace as inplace
from engines.dbrestore import DbTarget, RestoreError
from tests.conftest import MY_ADMIN, MY_HOST, MY_PORT, PG_ADMIN, PG_HOST, PG_PORT, mysql_admin
from tests.test_dbrestore import (  # noqa: F401
    MY_CHANGE,
    PG_CHANGE,
    REPO,
    my_admin_rows,
    my_as_user,
    my_databases,
    my_dump,
    my_live,
    my_state,
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


# --- MariaDB: prefixed tables of the same database -----------------------------------------------------------
MY_EXTRA = r"""
CREATE TABLE shelves (id INT PRIMARY KEY, label VARCHAR(20) CHECK (label <> ''), item_id INT,
                      CONSTRAINT shelf_item FOREIGN KEY (item_id) REFERENCES items (id) ON DELETE SET NULL);
INSERT INTO shelves VALUES (1, 'top', 1), (2, 'x;\n''y', 2);
CREATE SEQUENCE ticket START WITH 100;
SELECT NEXTVAL(ticket);
"""
MY_DRIFT = r"""
ALTER TABLE items ADD COLUMN exported TINYINT NOT NULL DEFAULT 0;
CREATE TABLE exports (id INT PRIMARY KEY, item_id INT, CONSTRAINT export_item FOREIGN KEY (item_id)
                      REFERENCES items (id));
INSERT INTO exports VALUES (1, 3);
CREATE VIEW recent AS SELECT id FROM items WHERE id > 290;
DROP TRIGGER items_audit;
CREATE TRIGGER items_audit BEFORE UPDATE ON items FOR EACH ROW SET NEW.price = NEW.price + 1;
SELECT NEXTVAL(ticket);
"""


@pytest.fixture
def my_owner(my_live):  # noqa: F811
    """A MariaDB user with ALL on its database and nothing else, with foreign keys, views, triggers, routines,
    an event and a sequence."""
    my_as_user(my_live, MY_EXTRA)
    grants = " ".join(my_admin_rows(f"SHOW GRANTS FOR '{my_live.user}'@'%'"))
    assert "__kasa" not in grants and "*.*" not in grants.replace("USAGE ON *.*", "")
    return my_live


def my_full_state(db: str, *, ours: bool = True) -> dict:
    """my_state plus the sequence and the table list; ours=False leaves Kasa's prefixed tables out."""
    state = my_state(db)
    state["sequence"] = my_admin_rows("SELECT next_not_cached_value FROM ticket", db)
    state["tables"] = my_admin_rows("SHOW FULL TABLES", db)
    if not ours:
        state = {k: v for k, v in state.items() if "__kasa_" not in k}
        state["tables"] = [t for t in state["tables"] if not t.startswith("__kasa_")]
    return state


def test_mysql_restore_through_prefixed_tables_swaps_in_exactly_and_finish_drops_the_old_ones(my_owner):
    live = my_owner
    backup_state = my_full_state(live.dbname)
    dump, manifest = my_dump(live)
    my_as_user(live, MY_CHANGE + MY_DRIFT)
    drifted = my_full_state(live.dbname)
    assert drifted != backup_state
    databases = my_databases()

    counts = mytables.load(live, "r7", pieces(dump))
    assert counts == manifest
    assert my_full_state(live.dbname, ours=False) == drifted
    mytables.prepare_swap(live, "r7")
    mytables.swap(live, "r7")
    assert my_full_state(live.dbname, ours=False) == backup_state
    kept = [t for t in my_admin_rows("SHOW TABLES", live.dbname) if t.startswith("__kasa_")]
    assert kept and all(t.startswith(("__kasa_old_r7_", "__kasa_meta_r7")) for t in kept)
    # The restored objects work on the restored tables, and the foreign keys hold under their own names.
    my_as_user(live, "CALL add_item('post-swap', 60);")
    assert my_admin_rows("SELECT msg FROM audit ORDER BY id DESC LIMIT 1", live.dbname) == ["new item\\tpost-swap"]
    with pytest.raises(subprocess.CalledProcessError):
        my_as_user(live, "INSERT INTO order_lines (item_id, qty) VALUES (99999, 1);")
    assert sorted(my_admin_rows("SELECT CONSTRAINT_NAME FROM information_schema.REFERENTIAL_CONSTRAINTS "
                                f"WHERE CONSTRAINT_SCHEMA = '{live.dbname}'")) == \
        sorted(["order_lines_ibfk_1", "shelf_item"])
    mytables.finish(live, "r7")
    assert not mytables.exists(live, "r7")
    assert my_full_state(live.dbname)["tables"] == backup_state["tables"]
    assert my_databases() == databases  # nothing outside the user's own database, ever


def test_mysql_unswap_puts_the_live_tables_back_after_the_swap(my_owner):
    live = my_owner
    dump, _ = my_dump(live)
    my_as_user(live, MY_CHANGE + MY_DRIFT)
    drifted = my_full_state(live.dbname)
    mytables.load(live, "r8", pieces(dump))
    mytables.prepare_swap(live, "r8")
    mytables.swap(live, "r8")
    assert "unswap" and mytables.unswap(live, "r8").startswith("the restored tables had gone live")
    mytables.drop_new(live, "r8")
    assert my_full_state(live.dbname) == drifted
    assert not mytables.exists(live, "r8")


def test_mysql_swap_failing_half_way_puts_the_live_tables_back(my_owner):
    """The dump's view is defined by another account: creating it after the tables moved fails."""
    live = my_owner
    mysql_admin(f"CREATE DEFINER=`{MY_ADMIN}`@`localhost` VIEW `{live.dbname}`.`zz_admin_view` AS SELECT 1 AS x")
    dump, _ = my_dump(live)
    mysql_admin(f"DROP VIEW `{live.dbname}`.`zz_admin_view`")
    my_as_user(live, MY_CHANGE + MY_DRIFT)
    drifted = my_full_state(live.dbname)
    mytables.load(live, "r9", pieces(dump))
    mytables.prepare_swap(live, "r9")
    with pytest.raises(RestoreError, match="put back as they were"):
        mytables.swap(live, "r9")
    mytables.drop_new(live, "r9")
    assert my_full_state(live.dbname) == drifted


@pytest.mark.parametrize("damage", ["mid-statement", "statement-boundary", "garbage"])
def test_mysql_prefixed_load_of_a_broken_dump_leaves_nothing_and_touches_no_live_table(my_owner, damage):
    live = my_owner
    dump, _ = my_dump(live)
    boundary = dump.index(b"\nINSERT INTO `order_lines`")
    bad = {"mid-statement": dump[: len(dump) // 2], "statement-boundary": dump[: boundary + 1],
           "garbage": b"this is not SQL;\n" + os.urandom(200)}[damage]
    before = my_full_state(live.dbname)
    with pytest.raises(RestoreError) as err:
        mytables.load(live, "r10", pieces(bad))
    assert "live tables" in str(err.value) and live.password not in str(err.value)
    assert my_full_state(live.dbname) == before


@pytest.mark.parametrize("point", ["drop_objects", "rename", "add_fks", "held"])
def test_mysql_swap_of_a_killed_worker_is_put_back_by_unswap(my_owner, tmp_path, point):
    live = my_owner
    dump, _ = my_dump(live)
    my_as_user(live, MY_CHANGE + MY_DRIFT)
    drifted = my_full_state(live.dbname)
    mytables.load(live, "r11", pieces(dump))
    mytables.prepare_swap(live, "r11")
    env = {**os.environ, "PYTHONPATH": str(REPO), "KASA_TEST_TARGET": json.dumps(live.__dict__)}
    res = subprocess.run([sys.executable, "-c", KILLED_MY_SWAP, point], cwd=REPO, env=env, capture_output=True,
                         timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()
    mytables.unswap(live, "r11")
    mytables.drop_new(live, "r11")
    assert my_full_state(live.dbname) == drifted


KILLED_MY_SWAP = """
import json, os, signal, sys
from engines import dbrestore, dbrestore_mytables as mytables

point = sys.argv[1]
def after(real):
    def call(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies right after this step: nothing else runs
    return call
calls = {"drop_objects": "_my_drop_objects", "rename": "_rename", "add_fks": "_alter_fks", "held": "_my_run"}
name = calls[point]
if point == "add_fks":  # the second call (the first drops the live foreign keys)
    real, seen = mytables._alter_fks, []
    def second(*args, **kwargs):
        real(*args, **kwargs)
        seen.append(1)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    mytables._alter_fks = second
elif point == "held":
    real = mytables._my_run
    def held(cnf, script, **kwargs):
        real(cnf, script, **kwargs)
        if "restored views" in kwargs.get("what", ""):
            os.kill(os.getpid(), signal.SIGKILL)
    mytables._my_run = held
else:
    setattr(mytables, name, after(getattr(mytables, name)))
mytables.swap(dbrestore.DbTarget(**json.loads(os.environ["KASA_TEST_TARGET"])), "r11")
"""


# --- a maintenance connection: fresh database, swap, with the role still loading the dump ---------------------
def test_pg_maintenance_connection_creates_renames_and_drops_while_the_role_loads_and_owns(pg_owner):
    live = dataclasses.replace(pg_owner, maint=DbTarget("postgresql", PG_HOST, PG_PORT, PG_ADMIN, "", "postgres"))
    backup_state = pg_schema(live)
    dump, manifest = pg_dump(live)
    with pg_connect(live) as con:
        con.execute(DRIFT)
    assert not dbrestore.pg_role(live).can_swap
    new = dbrestore.side_name(live.dbname, "new", "r5")
    assert dbrestore.pg_restore_fresh(live, new, pieces(dump)) == manifest
    old = dbrestore.pg_swap(live, new, tag="r5")
    assert pg_schema(live) == backup_state
    with pg_admin() as con:
        owner = con.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                            [live.dbname]).fetchone()[0]
    assert owner == live.user  # the application's role owns its database, as before
    dbrestore.drop_database(live, old)
    assert not dbrestore.database_exists(live, old)


def test_mysql_maintenance_connection_creates_and_drops_and_the_grant_goes_away(my_owner):
    live = dataclasses.replace(my_owner, maint=DbTarget("mysql", MY_HOST, MY_PORT, MY_ADMIN, "", ""))
    backup_state = my_full_state(live.dbname)
    dump, manifest = my_dump(live)
    my_as_user(live, MY_CHANGE + MY_DRIFT)
    grants = my_admin_rows(f"SHOW GRANTS FOR '{live.user}'@'%'")
    new = dbrestore.side_name(live.dbname, "new", "r5", engine="mysql")
    assert dbrestore.mysql_restore_fresh(live, new, pieces(dump)) == manifest
    old = dbrestore.mysql_swap(live, new, tag="r5")
    assert my_full_state(live.dbname) == backup_state
    dbrestore.drop_database(live, old)
    assert my_admin_rows(f"SHOW GRANTS FOR '{live.user}'@'%'") == grants
    assert not [d for d in my_databases() if d.startswith(live.dbname + "__kasa_")]


def test_mysql_without_rights_outside_its_database_is_told_apart_from_other_failures(my_owner):
    dump, _ = my_dump(my_owner)
    with pytest.raises(dbrestore_mysql.CannotCreateDatabase, match="nothing was changed"):
        dbrestore.mysql_restore_fresh(my_owner, dbrestore.side_name(my_owner.dbname, "new", engine="mysql"),
                                      pieces(dump))


def test_pg_transaction_still_running_is_ended_and_counts_as_aborted(pg_owner):
    """A dead worker's transaction the server has not noticed yet: its backend is found by application_name,
    terminated, and nothing it wrote stays."""
    import psycopg

    live = pg_owner
    before = pg_schema(live)
    con = psycopg.connect(host=live.host, port=live.port, user=live.user, password=live.password,
                          dbname=live.dbname, application_name="kasa-restore r42")
    xid = con.execute("SELECT txid_current()::text").fetchone()[0]
    con.execute("DROP TABLE orders CASCADE; CREATE TABLE half_done (x int)")
    assert inplace.pg_transaction_status(live, xid, application_name="kasa-restore r42") == "aborted"
    assert pg_schema(live) == before
    with pytest.raises(psycopg.OperationalError):
        con.execute("SELECT 1")
    con.close()
