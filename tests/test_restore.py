"""Restores on real PostgreSQL, MariaDB, SQLite and local disk: the tree and every table come back exactly,
and every refusal or failure leaves the customer exactly as it was."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import pytest
from django.conf import settings

from backups.models import Backup
from operations.models import Run
from tests.restore_helpers import (
    command_json,
    my_drop_side_databases,
    my_grant_side_databases,
    my_state,
    pg_databases_like,
    pg_exec,
    pg_state,
    sqlite_state,
    tree_state,
)
from tests.test_backups import _backup_json, full_customer  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def restorable(full_customer, pg_database, mysql_database):  # noqa: F811
    """The full customer, its database users allowed to create the restore's side databases, one backup."""
    pg_exec(pg_database, f'ALTER ROLE "{pg_database["user"]}" CREATEDB', dbname="postgres")
    my_grant_side_databases(mysql_database)
    root = full_customer.root_path()
    lite = root / "store" / "cache.sqlite3"
    before = {"tree": tree_state(root), "pg": pg_state(pg_database), "my": my_state(mysql_database),
              "lite": sqlite_state(lite)}
    doc = _backup_json(full_customer.domain)
    yield full_customer, doc, before
    my_drop_side_databases(mysql_database)
    for name in pg_databases_like(pg_database, pg_database["name"] + "__kasa_%"):
        pg_exec(pg_database, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', dbname="postgres")


def _change_everything(customer, pg, my) -> None:
    """What happens to a customer after its backup: files edited, added, removed, modes and rows changed."""
    from tests.conftest import mysql_admin

    root = customer.root_path()
    (root / "backend" / "src" / "app.js").write_text("console.log('broken deploy')\n")
    (root / "backend" / "src" / "new-file.js").write_text("new\n")
    (root / "admin" / "run.sh").unlink()
    (root / "store" / "empty-dir").rmdir()
    (root / "backend" / "current").unlink()
    (root / "backend" / "current").symlink_to("elsewhere")
    os.chmod(root / "store" / "src" / "app.js", 0o600)
    (root / ".env").write_text("ADDED_LATER=1\n")
    pg_exec(pg, "DELETE FROM orders WHERE id % 2 = 0", as_owner=True)
    pg_exec(pg, "CREATE TABLE junk (x int)", as_owner=True)
    mysql_admin(f"DELETE FROM `{my['name']}`.carts WHERE id > 10")
    con = sqlite3.connect(root / "store" / "cache.sqlite3")
    con.execute("DELETE FROM hits")
    con.commit()
    con.close()


def _now(customer, pg, my) -> dict:
    root = customer.root_path()
    return {"tree": tree_state(root), "pg": pg_state(pg), "my": my_state(my),
            "lite": sqlite_state(root / "store" / "cache.sqlite3")}


def test_in_place_restore_brings_back_the_tree_and_every_table(restorable, pg_database, mysql_database):
    customer, doc, before = restorable
    _change_everything(customer, pg_database, mysql_database)
    (customer.root_path() / "backend" / "logs" / "today.log").write_text("today's log\n")
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 0, run
    assert run["status"] == "succeeded"
    after = _now(customer, pg_database, mysql_database)
    assert after["pg"] == before["pg"]
    assert after["my"] == before["my"]
    assert after["lite"] == before["lite"]
    expected_tree = dict(before["tree"])
    # The root .env did not exist at backup time: a restore puts back what the backup holds and leaves
    # files it never held; the log written after the backup survives (logs are not in backups).
    after_tree = {k: v for k, v in after["tree"].items() if k not in (".env", "backend/logs/today.log")}
    assert after_tree == expected_tree
    assert (customer.root_path() / "backend" / "logs" / "today.log").read_text() == "today's log\n"
    # The safety backup is the way back to what was there before, and retention may not delete it.
    safety = Backup.objects.get(pk=run["result"]["safety_backup"])
    assert safety.status == "succeeded" and safety.pinned and safety.trigger == "restore"
    # Nothing left behind: no staging folder, no kept-aside database.
    assert not [p for p in customer.root_path().iterdir() if p.name.startswith(".kasa-restore-")]
    assert pg_databases_like(pg_database, pg_database["name"] + "__kasa_%") == []


def test_restore_of_one_service_leaves_the_rest_alone(restorable, pg_database, mysql_database):
    customer, doc, before = restorable
    _change_everything(customer, pg_database, mysql_database)
    changed = _now(customer, pg_database, mysql_database)
    code, run = command_json("restore", str(doc["id"]), "--only", "backend", "--yes")
    assert code == 0, run
    after = _now(customer, pg_database, mysql_database)
    backend = {k: v for k, v in before["tree"].items() if k.startswith("backend")}
    assert {k: v for k, v in after["tree"].items() if k.startswith("backend")} == backend
    assert {k: v for k, v in after["tree"].items() if not k.startswith("backend")} == \
        {k: v for k, v in changed["tree"].items() if not k.startswith("backend")}
    assert after["pg"] == changed["pg"] and after["my"] == changed["my"] and after["lite"] == changed["lite"]


def test_restore_refuses_a_corrupt_artifact_and_touches_nothing(restorable, pg_database, mysql_database):
    customer, doc, _ = restorable
    _change_everything(customer, pg_database, mysql_database)
    changed = _now(customer, pg_database, mysql_database)
    art = Path(doc["location"]) / "store.tar.zst.enc"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0x01
    art.write_bytes(bytes(data))
    backups_before = Backup.objects.count()
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 1
    assert "store.tar.zst.enc" in run["error"] and "nothing was touched" in run["error"]
    assert _now(customer, pg_database, mysql_database) == changed
    assert Backup.objects.count() == backups_before  # refused before the safety backup


def test_restore_refuses_a_missing_artifact(restorable, pg_database, mysql_database):
    customer, doc, _ = restorable
    changed = _now(customer, pg_database, mysql_database)
    (Path(doc["location"]) / "db-main.pgdump.zst.enc").unlink()
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 1 and "db-main.pgdump.zst.enc" in run["error"] and "missing" in run["error"]
    assert _now(customer, pg_database, mysql_database) == changed


def test_restore_refuses_with_the_wrong_key(restorable, pg_database, mysql_database, settings):
    customer, doc, _ = restorable
    changed = _now(customer, pg_database, mysql_database)
    settings.KASA_BACKUP_KEYS = "k2:" + "z" * 43
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 1 and "KASA_BACKUP_KEYS" in run["error"]
    assert _now(customer, pg_database, mysql_database) == changed


def test_restore_needs_confirmation_and_a_good_backup(restorable):
    customer, doc, _ = restorable
    code, out = command_json("restore", str(doc["id"]))
    assert code == 2 and "--yes" in out["error"]
    code, out = command_json("restore", "999999", "--yes")
    assert code == 2 and "no backup" in out["error"]
    code, out = command_json("restore", str(doc["id"]), "--only", "nosuch", "--yes")
    assert code == 2 and "nosuch" in out["error"]


def test_a_failed_health_check_puts_the_previous_state_back(restorable, pg_database, mysql_database, settings):
    from tests.conftest import free_port

    customer, doc, _ = restorable
    svc = customer.services.get(name="admin")
    svc.health_url = f"http://127.0.0.1:{free_port()}/health"  # nothing listens: never healthy
    svc.save()
    settings.KASA_HEALTH_TIMEOUT = 1.0
    _change_everything(customer, pg_database, mysql_database)
    changed = _now(customer, pg_database, mysql_database)
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 1
    assert "health check failed" in run["error"] and "pre-restore state was put back" in run["error"]
    assert _now(customer, pg_database, mysql_database) == changed
    assert pg_databases_like(pg_database, pg_database["name"] + "__kasa_%") == []
    assert not [p for p in customer.root_path().iterdir() if p.name.startswith(".kasa-restore-")]
    assert not Run.objects.get(pk=run["id"]).result.get("journal")  # nothing left to undo


def test_a_database_that_cannot_be_swapped_in_puts_the_files_back(restorable, pg_database, mysql_database):
    """A superuser's session on the live database: the customer's role may not end it, so the swap fails after
    the folders were swapped in; they go back."""
    import psycopg

    customer, doc, _ = restorable
    _change_everything(customer, pg_database, mysql_database)
    changed = _now(customer, pg_database, mysql_database)
    with psycopg.connect(host=pg_database["host"], port=pg_database["port"], user="postgres",
                         dbname=pg_database["name"]):
        code, run = command_json("restore", str(doc["id"]), "--yes", "--no-safety-backup")
    assert code == 1 and "cannot end the other sessions" in run["error"], run
    assert _now(customer, pg_database, mysql_database) == changed


def test_clone_into_another_root_leaves_the_live_customer_alone(restorable, pg_database, mysql_database):
    customer, doc, before = restorable
    _change_everything(customer, pg_database, mysql_database)
    changed = _now(customer, pg_database, mysql_database)
    copy = Path(settings.KASA_CUSTOMERS_ROOT) / f"copy-{doc['id']}"
    try:
        code, run = command_json("restore", str(doc["id"]), "--to-root", str(copy), "--yes")
        assert code == 0, run
        assert _now(customer, pg_database, mysql_database) == changed
        services = ("backend", "admin", "store")
        expected = {k: v for k, v in before["tree"].items()
                    if k.split("/")[0] in services and "logs" not in k.split("/")}
        assert {k: v for k, v in tree_state(copy).items() if k.split("/")[0] in services} == expected
        assert sqlite_state(copy / "store" / "cache.sqlite3") == before["lite"]
    finally:
        import shutil

        shutil.rmtree(copy, ignore_errors=True)


def test_a_worker_killed_mid_restore_is_undone_by_the_reaper(restorable, pg_database, mysql_database, start_worker):
    """SIGKILL the worker while the restored services are being health-checked (everything already swapped
    in): the reaper's on_abandon hook undoes the journal, the customer is exactly as before the restore, and
    the service that was running before (a real process, "command" manager) runs and answers again."""
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
    from customers import runtime
    from engines import health
    from tests.conftest import free_port

    customer, doc, _ = restorable
    port = free_port()
    web = customer.services.get(name="admin")
    web.process_manager = "command"
    web.start_command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    web.health_url = f"http://127.0.0.1:{port}/"
    web.save()
    managers = runtime.managers()
    admin_spec = next(s for s in runtime.service_specs(customer) if s.name == "admin")
    managers["command"].start(admin_spec)
    try:
        svc = customer.services.get(name="store")
        svc.health_url = f"http://127.0.0.1:{server.server_address[1]}/health"
        svc.save()
        _change_everything(customer, pg_database, mysql_database)
        changed = _now(customer, pg_database, mysql_database)
        start_worker(KASA_HEALTH_TIMEOUT=120)
        run = restore_start(Backup.objects.get(pk=doc["id"]), confirmed=True, safety_backup=False, via="cli")
        wait_until(lambda: run.log_lines.filter(text__startswith="health checks:").exists(), 90,
                   what="the restore to reach its health checks")
        assert _now(customer, pg_database, mysql_database)["pg"] != changed["pg"]  # swapped in by now
        pid = int(Run.objects.get(pk=run.pk).worker.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        assert run.pk in runs_reap()
        run.refresh_from_db()
        assert run.status == "failed"
        assert _now(customer, pg_database, mysql_database) == changed
        assert "pre-restore state was put back" in " ".join(run.log_lines.values_list("text", flat=True))
        assert pg_databases_like(pg_database, pg_database["name"] + "__kasa_%") == []
        assert health.wait_healthy(web.health_url, consecutive=2, timeout=10).ok  # restarted by the reaper
    finally:
        server.shutdown()
        managers["command"].stop(admin_spec)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("point", ["replacing", "replaced"])
def test_a_worker_killed_inside_the_sqlite_swap_is_undone_by_its_journal(make_customer, customer_root, point):
    """The db_swap step of a SQLite database was journalled but never marked done: the worker died between
    (or right after) the renames of sqlite_swap. Undoing the journal puts the previous file and its -wal back."""
    import signal
    import subprocess

    from backups import dbswap
    from engines import dbrestore
    from operations.context import RunContext
    from tests.test_dbrestore import KILLED_SQLITE_SWAP, REPO, WAL_WRITER, make_sqlite, sqlite_backup, sqlite_state

    live = customer_root / "backend" / "data.db"
    live.parent.mkdir(parents=True, exist_ok=True)
    make_sqlite(live)
    customer = make_customer(databases=[("cache", f"sqlite:///{live}")])
    dump, _ = sqlite_backup(live, customer_root.parent)
    subprocess.run([sys.executable, "-c", WAL_WRITER, str(live)], check=True)
    before, files_before = sqlite_state(str(live)), sorted(os.listdir(live.parent))
    run = Run.objects.create(kind=Run.Kind.RESTORE, customer=customer, status=Run.Status.RUNNING, params={})
    new, _ = dbrestore.sqlite_restore_fresh(str(live), iter([dump]), tag=f"r{run.pk}")
    killed = subprocess.run([sys.executable, "-c", KILLED_SQLITE_SWAP, str(live), new, f"r{run.pk}", point],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()

    ctx = RunContext(run)
    dbswap.undo(ctx, {"type": "db_swap", "engine": "sqlite", "db": "cache", "new": new, "old": None, "done": False})
    dbswap.undo(ctx, {"type": "db_fresh", "engine": "sqlite", "db": "cache", "new": new})  # the journal's next step

    assert sorted(os.listdir(live.parent)) == files_before
    assert sqlite_state(str(live)) == before
    log = " ".join(run.log_lines.values_list("text", flat=True))
    assert ("the previous file is live" if point == "replacing" else "the previous database is live again") in log
