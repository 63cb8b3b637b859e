"""Restores for customers whose database roles own their database and nothing more, on the real PostgreSQL and
MariaDB of this machine: no CREATEDB, no grant outside the customer's own schema, no maintenance connection —
then with one. Every refusal or failure leaves the customer exactly as it was, schema included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backups.models import Backup, BackupArtifact
from operations.models import Run
from tests.conftest import MY_ADMIN
from tests.restore_helpers import command_json, my_state, pg_databases_like, pg_exec, pg_state, sqlite_state, tree_state
from tests.test_backups import _backup_json, full_customer  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db(transaction=True)


def pg_shape(pg: dict) -> dict:
    """Every row (pg_state) and every column of every table: a column added since the backup shows."""
    import psycopg

    state = pg_state(pg)
    with psycopg.connect(host=pg["host"], port=pg["port"], user="postgres", dbname=pg["name"]) as con:
        state["columns"] = con.execute("SELECT table_schema, table_name, column_name, data_type FROM "
                                       "information_schema.columns WHERE table_schema NOT IN ('pg_catalog', "
                                       "'information_schema') ORDER BY 1, 2, 3").fetchall()
    return state


def my_shape(m: dict) -> dict:
    from tests.test_dbrestore import my_admin_rows

    state = my_state(m)
    for table in sorted(state):
        state[f"create {table}"] = my_admin_rows(f"SHOW CREATE TABLE `{table}`", m["name"])
    return state


def my_grants(m: dict) -> list[str]:
    from tests.test_dbrestore import my_admin_rows

    return sorted(my_admin_rows(f"SHOW GRANTS FOR '{m['user']}'@'%'") +
                  my_admin_rows(f"SHOW GRANTS FOR '{m['user']}'@'localhost'"))


@pytest.fixture
def least(full_customer, pg_database, mysql_database):  # noqa: F811
    """The full customer with roles that own their database and nothing more, and one backup of it."""
    from tests.test_dbrestore import my_admin_rows

    roles = pg_state_roles(pg_database)
    assert roles == (False, False), "the PostgreSQL role must have neither CREATEDB nor SUPERUSER"
    assert not [g for g in my_admin_rows(f"SHOW GRANTS FOR '{mysql_database['user']}'@'%'") if "__kasa" in g]
    root = full_customer.root_path()
    doc = _backup_json(full_customer.domain)
    before = {"tree": tree_state(root), "pg": pg_shape(pg_database), "my": my_shape(mysql_database),
              "lite": sqlite_state(root / "store" / "cache.sqlite3")}
    yield full_customer, doc, before


def pg_state_roles(pg: dict) -> tuple[bool, bool]:
    import psycopg

    with psycopg.connect(host=pg["host"], port=pg["port"], user="postgres", dbname="postgres") as con:
        return tuple(con.execute("SELECT rolcreatedb, rolsuper FROM pg_roles WHERE rolname = %s",
                                 [pg["user"]]).fetchone())


def drift(customer, pg: dict, my: dict) -> None:
    """After the backup: rows change, and what a failed migration leaves — a column and a table — appears."""
    root = customer.root_path()
    (root / "backend" / "src" / "app.js").write_text("console.log('broken deploy')\n")
    pg_exec(pg, "DELETE FROM orders WHERE id % 2 = 0; ALTER TABLE orders ADD COLUMN exported boolean DEFAULT false; "
                "CREATE TABLE exports (id serial PRIMARY KEY, note text); INSERT INTO exports (note) VALUES ('x'); "
                "CREATE SCHEMA later; CREATE TABLE later.t (x int)", as_owner=True)
    _my_as_user(my, "DELETE FROM carts WHERE id > 10; ALTER TABLE carts ADD COLUMN exported TINYINT DEFAULT 0; "
                    "CREATE TABLE exports (id INT PRIMARY KEY, cart_id INT, CONSTRAINT exports_cart FOREIGN KEY "
                    "(cart_id) REFERENCES carts (id)); INSERT INTO exports VALUES (1, 1);")


def _my_as_user(m: dict, script: str) -> None:
    from engines.dbrestore import DbTarget
    from tests.test_dbrestore import my_as_user

    my_as_user(DbTarget("mysql", m["host"], m["port"], m["user"], m["password"], m["name"]), script)


def now(customer, pg: dict, my: dict) -> dict:
    root = customer.root_path()
    return {"tree": tree_state(root), "pg": pg_shape(pg), "my": my_shape(my),
            "lite": sqlite_state(root / "store" / "cache.sqlite3")}


def log_of(run_id: int) -> str:
    return "\n".join(Run.objects.get(pk=run_id).log_lines.order_by("seq").values_list("text", flat=True))


def nothing_left(pg: dict, my: dict) -> None:
    from tests.test_dbrestore import my_admin_rows, my_databases

    assert pg_databases_like(pg, pg["name"] + "__kasa_%") == []
    assert not [d for d in my_databases() if d.startswith(my["name"] + "__kasa_")]
    assert not [t for t in my_admin_rows("SHOW TABLES", my["name"]) if t.startswith("__kasa_")]


def test_restore_in_place_without_createdb_or_side_grants_gives_identical_rows_and_schema(least, pg_database,
                                                                                           mysql_database):
    customer, doc, before = least
    grants = my_grants(mysql_database)
    drift(customer, pg_database, mysql_database)
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 0, run
    after = now(customer, pg_database, mysql_database)
    assert after["pg"] == before["pg"]  # the column and tables added after the backup are gone
    assert after["my"] == before["my"]
    assert after["lite"] == before["lite"] and after["tree"] == before["tree"]
    log = log_of(run["id"])
    user = pg_database["user"]
    assert (f"role {user} lacks CREATEDB and no maintenance connection is set for 127.0.0.1:5432: restoring into "
            "the live database in one transaction") in log
    assert f"user {mysql_database['user']} may not create databases beside" in log
    assert "loading into prefixed tables" in log and "swapped in with one RENAME TABLE" in log
    # The safety backup is the way back of the database restored in place: taken once the services stopped.
    assert log.index("stopping 3 service(s)") < log.index("safety backup of the current state")
    safety = Backup.objects.get(pk=run["result"]["safety_backup"])
    assert safety.status == "succeeded" and safety.pinned
    nothing_left(pg_database, mysql_database)
    assert my_grants(mysql_database) == grants  # never a right outside its own database


def test_restore_in_place_with_wrong_row_counts_rolls_back_and_leaves_everything_as_it_was(least, pg_database,
                                                                                        mysql_database):
    customer, doc, _ = least
    art = BackupArtifact.objects.get(backup_id=doc["id"], kind="database", source="main")
    counts = dict(art.details["row_counts"])
    counts["public.orders"] += 1
    BackupArtifact.objects.filter(pk=art.pk).update(details={**art.details, "row_counts": counts})
    drift(customer, pg_database, mysql_database)
    changed = now(customer, pg_database, mysql_database)
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 1, run
    assert "does not match the manifest" in run["error"] and "pre-restore state was put back" in run["error"]
    assert now(customer, pg_database, mysql_database) == changed
    nothing_left(pg_database, mysql_database)


def test_restore_in_place_of_a_corrupt_dump_is_refused_before_anything_stops(least, pg_database, mysql_database):
    customer, doc, _ = least
    drift(customer, pg_database, mysql_database)
    changed = now(customer, pg_database, mysql_database)
    art = Path(doc["location"]) / "db-main.pgdump.zst.enc"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0x01
    art.write_bytes(bytes(data))
    backups = Backup.objects.count()
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 1 and "db-main.pgdump.zst.enc" in run["error"] and "nothing was touched" in run["error"], run
    assert now(customer, pg_database, mysql_database) == changed
    assert Backup.objects.count() == backups  # refused before the safety backup
    nothing_left(pg_database, mysql_database)


def test_a_failed_health_check_after_an_in_place_restore_puts_the_databases_back(least, pg_database,
                                                                               mysql_database, settings):
    from tests.conftest import free_port

    customer, doc, _ = least
    svc = customer.services.get(name="admin")
    svc.health_url = f"http://127.0.0.1:{free_port()}/health"  # nothing listens: never healthy
    svc.save()
    settings.KASA_HEALTH_TIMEOUT = 1.0
    drift(customer, pg_database, mysql_database)
    changed = now(customer, pg_database, mysql_database)
    code, run = command_json("restore", str(doc["id"]), "--yes", "--no-safety-backup")
    assert code == 1 and "health check failed" in run["error"], run
    assert "pre-restore state was put back" in run["error"]
    assert now(customer, pg_database, mysql_database) == changed
    log = log_of(run["id"])
    assert "backing the databases up before restoring them in place" in log  # --no-safety-backup: still a way back
    assert "putting back its state from before the restore" in log
    nothing_left(pg_database, mysql_database)
    assert not Run.objects.get(pk=run["id"]).result.get("journal")


def test_a_worker_killed_after_the_in_place_commit_is_undone_by_the_reaper(least, pg_database, mysql_database,
                                                                           start_worker):
    import http.server
    import signal
    import threading

    from backups.services import restore_start
    from operations.services import runs_reap
    from tests.conftest import wait_dead, wait_until

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        customer, doc, _ = least
        svc = customer.services.get(name="store")
        svc.health_url = f"http://127.0.0.1:{server.server_address[1]}/health"
        svc.save()
        drift(customer, pg_database, mysql_database)
        changed = now(customer, pg_database, mysql_database)
        start_worker(KASA_HEALTH_TIMEOUT=120)
        run = restore_start(Backup.objects.get(pk=doc["id"]), confirmed=True, via="cli")
        wait_until(lambda: run.log_lines.filter(text__startswith="health checks:").exists(), 120,
                   what="the restore to reach its health checks")
        assert now(customer, pg_database, mysql_database)["pg"] != changed["pg"]  # committed by now
        pid = int(Run.objects.get(pk=run.pk).worker.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        assert run.pk in runs_reap()
        run.refresh_from_db()
        assert run.status == "failed"
        assert now(customer, pg_database, mysql_database) == changed
        assert "pre-restore state was put back" in log_of(run.pk)
        nothing_left(pg_database, mysql_database)
    finally:
        server.shutdown()


def test_with_a_maintenance_connection_the_fresh_database_path_is_used(least, pg_database, mysql_database):
    from customers.models import MaintenanceConnection

    customer, doc, before = least
    MaintenanceConnection.objects.create(engine="postgresql", host="127.0.0.1", port=5432, user="postgres",
                                         password="", database="postgres")
    MaintenanceConnection.objects.create(engine="mysql", host="127.0.0.1", port=3306, user=MY_ADMIN, password="")
    grants = my_grants(mysql_database)
    drift(customer, pg_database, mysql_database)
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 0, run
    after = now(customer, pg_database, mysql_database)
    assert after["pg"] == before["pg"] and after["my"] == before["my"]
    log = log_of(run["id"])
    assert "through the maintenance connection postgres@127.0.0.1:5432" in log
    assert f"through the maintenance connection {MY_ADMIN}@127.0.0.1:3306" in log
    assert "in one transaction" not in log and "prefixed tables" not in log
    assert "swapped in" in log
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres") as con:
        owner = con.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                            [pg_database["name"]]).fetchone()[0]
    assert owner == pg_database["user"]  # the swapped-in database belongs to the application's role
    nothing_left(pg_database, mysql_database)
    assert my_grants(mysql_database) == grants


def test_a_copy_goes_into_a_database_the_role_owns_without_createdb(least, pg_database, mysql_database):
    """restore --to-database into an empty database owned by a role without CREATEDB; the live one untouched."""
    import uuid

    import psycopg
    from psycopg import sql

    customer, doc, before = least
    name = f"kasa_t_copy_{uuid.uuid4().hex[:8]}"
    admin = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
    with psycopg.connect(**admin) as con:
        con.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'copy-pw'").format(sql.Identifier(name)))
        con.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
    try:
        drift(customer, pg_database, mysql_database)
        changed = now(customer, pg_database, mysql_database)
        url = f"postgresql://{name}:copy-pw@127.0.0.1:5432/{name}"
        code, run = command_json("restore", str(doc["id"]), "--only", "main", "--to-database", f"main={url}", "--yes")
        assert code == 0, run
        assert pg_state({**pg_database, "name": name}) == {k: v for k, v in before["pg"].items() if k != "columns"}
        assert now(customer, pg_database, mysql_database) == changed
        assert "restoring into the live database in one transaction" in log_of(run["id"])
        # Into a database that is not empty: refused, nothing changed there.
        copied = pg_state({**pg_database, "name": name})
        code, run = command_json("restore", str(doc["id"]), "--only", "main", "--to-database", f"main={url}", "--yes")
        assert code == 1 and "not empty" in run["error"], run
        assert pg_state({**pg_database, "name": name}) == copied
    finally:
        with psycopg.connect(**admin) as con:
            con.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            con.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
