"""Issue 11, point 12: an undo that outlives the control database.

Kasa runs in subprocesses against a control database of its own (tests/controldb.py), so that it can be stopped
in the middle of an undo without stopping the customers' database servers. A restore fails after it changed the
live customer (a health check that never answers); its undo is held at a known point — the service's stop command
writes a marker and waits — and the control database is stopped right there. The undo must still complete (the
customer's files and its SQLite database exactly as before the restore), and once the database is back the run
must end failed, with the undo's outcome in its error, every log line in order and the local journal gone.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from engines import localjournal, secretbox
from tests.conftest import free_port, wait_until
from tests.controldb import REPO, ControlCluster, kasa_env, manage
from tests.restore_helpers import sqlite_state, tree_state

# The service's stop command: the first call (the restore stopping the services) returns at once; the second
# (the undo stopping them again before putting the previous state back) says so and waits to be released.
STOP_PY = r"""
import sys, time
from pathlib import Path
markers = Path(sys.argv[1])
n = len(list(markers.glob("stop-*"))) + 1
(markers / f"stop-{n}").touch()
if n == 2:
    deadline = time.monotonic() + 120
    while not (markers / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
print(f"stopped ({n})")
"""


@pytest.fixture
def control_db(tmp_path):
    try:
        cluster = ControlCluster(base_dir="/tmp")
        cluster.__enter__()
    except Exception as exc:  # noqa: BLE001
        from tests.conftest import require

        require(False, f"a throwaway PostgreSQL cluster ({exc})")
    try:
        env = kasa_env(cluster, tmp_path / "kasa")
        manage(env, "migrate", "--noinput")
        yield cluster, env
    finally:
        cluster.__exit__(None, None, None)


@pytest.fixture
def new_root():
    import shutil

    root = Path(settings.KASA_CUSTOMERS_ROOT) / f"undo-{uuid.uuid4().hex[:8]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _pg(pg: dict, sql: str, fetch: bool = False):
    import psycopg

    with psycopg.connect(pg["url"].replace("postgresql://", "postgres://"), autocommit=True) as con:
        cur = con.execute(sql)
        return cur.fetchall() if fetch else None


def _customer(env: dict, tmp_path: Path, root: Path, pg: dict | None = None) -> dict:
    """A customer with one service folder (files + a SQLite database inside it), backed up, then changed. With
    `pg`: also a PostgreSQL database whose role owns it and may not create databases (restored in place, in one
    transaction, with a backup taken as its way back)."""
    web = root / "web"
    (web / "src").mkdir(parents=True)
    (web / "src" / "app.js").write_text("console.log('v1')\n")
    (web / "README").write_text("the customer's own file\n")
    db = web / "cache.sqlite3"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE hits (n INTEGER PRIMARY KEY, page TEXT)")
    con.executemany("INSERT INTO hits VALUES (?, ?)", [(i, f"/page/{i}") for i in range(1, 51)])
    con.commit()
    con.close()
    domain = f"undo-{uuid.uuid4().hex[:6]}.example.com"
    databases = ["--database", f"cache=sqlite:///{db}"]
    if pg:
        _pg(pg, "CREATE TABLE orders (id int PRIMARY KEY, note text); "
                "INSERT INTO orders SELECT n, 'order ' || n FROM generate_series(1, 40) n")
        databases += ["--database", f"main={pg['url']}"]
    manage(env, "customer_add", domain, "--root", str(root), "--service", "web=web", *databases)
    markers = tmp_path / "markers"
    markers.mkdir()
    markers.chmod(0o1777)
    stop = tmp_path / "stop.py"
    stop.write_text(STOP_PY)
    stop.chmod(0o755)
    service = {"process_manager": "command", "start_command": [sys.executable, "-c", "pass"],
               "stop_command": [sys.executable, str(stop), str(markers)],
               # Nothing listens there: the restored service never answers, so the restore fails after the swap.
               "health_url": f"http://127.0.0.1:{free_port()}/health"}
    manage(env, "shell", "-c", "from customers.models import Service; "
           f"Service.objects.filter(customer__domain={domain!r}, name='web').update(**{service!r})")
    backup = json.loads(manage(env, "backup", domain, "--json").stdout)
    assert backup["status"] == "succeeded", backup
    # What happens after the backup: the state the failed restore must leave exactly as it is.
    (web / "src" / "app.js").write_text("console.log('v2, edited after the backup')\n")
    (web / "src" / "new.js").write_text("added after the backup\n")
    (web / "README").unlink()
    con = sqlite3.connect(db)
    con.execute("DELETE FROM hits WHERE n > 30")
    con.execute("INSERT INTO hits VALUES (99, '/late')")
    con.commit()
    con.close()
    if pg:
        _pg(pg, "DELETE FROM orders WHERE id > 25; ALTER TABLE orders ADD COLUMN paid boolean DEFAULT true; "
                "CREATE TABLE added_since (x int)")
    return {"root": root, "db": db, "domain": domain, "backup": backup["id"], "markers": markers, "pg": pg}


def _state(c: dict) -> dict:
    state = {"tree": tree_state(c["root"]), "rows": sqlite_state(c["db"])}
    if c["pg"]:
        state["pg"] = (_pg(c["pg"], "SELECT table_name, column_name FROM information_schema.columns WHERE "
                                    "table_schema = 'public' ORDER BY 1, 2", fetch=True),
                       _pg(c["pg"], "SELECT * FROM orders ORDER BY id", fetch=True))
    return state


def _local_journal(env: dict, run_id: int) -> dict | None:
    keys = localjournal.derive_keys(secretbox.parse_keys(env["KASA_SECRET_KEYS"]))
    return localjournal.read(Path(env["KASA_VAR_DIR"]) / "journals", run_id, keys)


def _the_run(env: dict) -> int:
    found = localjournal.listed(Path(env["KASA_VAR_DIR"]) / "journals")
    return found[0] if found else 0


@pytest.mark.parametrize("who, databases", [("qcluster", "sqlite"), ("command", "sqlite"), ("reaper", "sqlite"),
                                            ("command", "sqlite+postgresql in place")])
def test_a_restore_undone_while_the_control_database_is_down_completes_and_is_reconciled(
        control_db, tmp_path, who, databases, new_root, request):
    """who records the run once the database is back: the worker (`qcluster`) that executed it, which waits for
    the database; `manage.py restore --yes` executing it in the foreground, which does the same; or, when that
    process gave up waiting and exited, the reaper's next pass, from the local journal it left. With a
    PostgreSQL role that may not create databases, its database was restored in place: the undo restores it
    from the way-back backup taken during the run, which the worker holds in memory."""
    cluster, env = control_db
    pg = request.getfixturevalue("pg_database") if "postgresql" in databases else None
    c = _customer(env, tmp_path, new_root, pg)
    before = _state(c)
    env = {**env, "KASA_HEALTH_TIMEOUT": "1", "KASA_RECONCILE_PATIENCE": "1" if who == "reaper" else "300"}
    argv = [sys.executable, "manage.py", "restore", str(c["backup"]), "--yes", "--no-safety-backup", "--json"]
    log = open(tmp_path / "kasa.log", "wb")
    if who == "qcluster":  # django-q2's ORM broker: the queue itself is in the control database
        proc = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=REPO, env={**env, "KASA_WORKERS": "1"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        manage(env, *argv[2:], "--enqueue")
    else:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    try:
        wait_until(lambda: (c["markers"] / "stop-2").exists() or proc.poll() is not None, 120,
                   what="the undo to stop the service (the second stop command)")
        assert proc.poll() is None, (tmp_path / "kasa.log").read_text()
        assert _state(c) != before  # the backup's files and rows are live: the undo has not put anything back yet
        run_id = _the_run(env)
        assert run_id and _local_journal(env, run_id)["doc"]["journal"]  # the way back, on local disk

        cluster.stop_server()  # in the middle of the undo
        (c["markers"] / "release").touch()

        body = wait_until(lambda: (_local_journal(env, run_id) or {}).get("outcome") and _local_journal(env, run_id),
                          120, what="the undo to end, recorded in the local journal")
        # The undo completed without the control database: the customer is exactly as before the restore.
        assert _state(c) == before
        assert not [p for p in c["root"].iterdir() if p.name.startswith(".kasa-")]
        assert body["offline_since"] and body["outcome"]["status"] == "failed"
        assert "pre-restore state was put back" in body["outcome"]["error"]
        texts = [ln["text"] for ln in body["lines"]]
        assert f"put back {c['root'] / 'web'}" in texts
        assert any("previous database is live" in t for t in texts)
        assert [ln["seq"] for ln in body["lines"]] == sorted(ln["seq"] for ln in body["lines"])
        assert "password" not in json.dumps(body).lower()

        journal = localjournal.path_for(Path(env["KASA_VAR_DIR"]) / "journals", run_id)
        if who == "reaper":
            proc.wait(timeout=120)  # gave up waiting for the database; its journal stays
            assert journal.exists()
        else:
            time.sleep(2)
            assert proc.poll() is None and journal.exists()  # waiting for the database, the run's end in hand
        cluster.start_server()
        if who == "reaper":
            reaped = json.loads(manage(env, "reap_runs", "--json").stdout)
            assert run_id in reaped["reaped"]
        elif who == "command":
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 1
            assert json.loads(out)["status"] == "failed"
        else:
            wait_until(lambda: not journal.exists(), 120, what="the worker to reconcile the run")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()

    status, error = cluster.query("SELECT status, error FROM operations_run WHERE id = %s", [run_id])[0]
    assert status == "failed"
    assert "health check failed" in error and "pre-restore state was put back" in error
    assert "control database did not answer" in error
    seqs_texts = cluster.query("SELECT seq, text FROM operations_runlogline WHERE run_id = %s ORDER BY seq",
                               [run_id])
    seqs = [s for s, _ in seqs_texts]
    assert seqs == list(range(1, len(seqs) + 1))  # every line, in order, none lost, none twice
    texts = [t for _, t in seqs_texts]
    # The undo's lines, logged offline, come after those logged before the database went and in the order they
    # happened (the database swapped back first: the journal is undone newest change first).
    at = {key: next(i for i, t in enumerate(texts) if key in t)
          for key in ("health checks: web", "the control database does not answer", "previous database is live",
                      "put back /", "failed: restore failed", "reconciled:")}
    assert at["health checks: web"] < at["the control database does not answer"] < at["previous database is live"] \
        < at["put back /"] < at["failed: restore failed"] < at["reconciled:"]
    # The commands the undo ran offline are rows of the run, their output lines attached to them.
    argv = [a for (a,) in cluster.query("SELECT argv FROM operations_runcommand WHERE run_id = %s ORDER BY id",
                                        [run_id])]
    assert sum(1 for a in argv if "stop.py" in " ".join(a)) == 2 and all(a for a in argv)
    assert cluster.query("SELECT count(*) FROM operations_runlogline WHERE run_id = %s AND text LIKE 'stopped (2)%%' "
                         "AND command_id IS NOT NULL", [run_id])[0][0] == 1
    assert cluster.query("SELECT count(*) FROM audit_auditentry WHERE action = 'run.restore.finished' AND "
                         "object_id = %s", [str(run_id)])[0][0] == 1
    assert not (Path(env["KASA_VAR_DIR"]) / "journals" / f"run-{run_id}.json").exists()
    assert _state(c) == before


# --- an upgrade's automatic rollback ------------------------------------------------------------------------
MIGRATE_PY = r"""
import os, sqlite3
con = sqlite3.connect(os.environ["DB_PATH"])
con.execute("ALTER TABLE hits ADD COLUMN exported INTEGER NOT NULL DEFAULT 0")
con.execute("UPDATE hits SET page = page || ' (1.1)'")
con.commit()
print("migrated")
"""


def _release_package(folder: Path) -> Path:
    from tests.upgrade_fixtures import write_zip

    folder.mkdir()
    for version in ("1.0.0", "1.1.0"):
        write_zip(folder / f"web-{version}.zip", "web",
                  {"VERSION": f"{version}\n", "index.html": f"<h1>web {version}</h1>\n", "migrate.py": MIGRATE_PY,
                   ".env.example": "DB_PATH=\n"})
    (folder / "releases.json").write_text(json.dumps({
        "web": [{"version": "1.0.0", "file": "web-1.0.0.zip"},
                {"version": "1.1.0", "file": "web-1.1.0.zip", "requires": {"from": ">=1.0.0 <2"},
                 "hooks": {"migrate": [sys.executable, "migrate.py"]}}],
        "compatMatrix": [{"release": "1.0", "web": "1.0.0"}, {"release": "1.1", "web": "1.1.0"}]}))
    return folder / "releases.json"


@pytest.fixture
def versioned_health():
    """A health URL that answers 200 while the customer's live web folder is version 1.0.0, 500 otherwise (the
    1.1.0 release is broken): served here, it reads the live folder on every request."""
    import http.server
    import threading

    roots: list[Path] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            try:
                ok = (roots[0] / "web" / "VERSION").read_text().strip() == "1.0.0"
            except OSError:
                ok = False
            self.send_response(200 if ok else 500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health", roots
    server.shutdown()


def test_an_upgrade_rolled_back_while_the_control_database_is_down_completes_and_is_reconciled(
        control_db, tmp_path, versioned_health, new_root):
    """The upgrade's migrate hook changes the customer's SQLite database, then its health check fails: the automatic
    rollback (stop, switch back, the database restored from the pre-upgrade backup, env, start, health) goes on
    after the control database is stopped at its first step, and the upgrade ends rolled_back once it is back."""
    cluster, env = control_db
    health_url, roots = versioned_health
    root = new_root
    roots.append(root)
    (root / "web").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "web" / "VERSION").write_text("1.0.0\n")
    (root / "web" / "index.html").write_text("<h1>web 1.0.0, as installed by hand</h1>\n")
    db = root / "data" / "cache.sqlite3"
    (root / "web" / ".env").write_text(f"DB_PATH={db}\n")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE hits (n INTEGER PRIMARY KEY, page TEXT)")
    con.executemany("INSERT INTO hits VALUES (?, ?)", [(i, f"/page/{i}") for i in range(1, 41)])
    con.commit()
    con.close()
    domain = f"up-{uuid.uuid4().hex[:6]}.example.com"
    manage(env, "release_sync", str(_release_package(tmp_path / "pkg")))
    manage(env, "customer_add", domain, "--root", str(root), "--service", "web=web", "--database",
           f"cache=sqlite:///{db}", "--version", "web=1.0.0")
    markers = tmp_path / "markers"
    markers.mkdir()
    markers.chmod(0o1777)
    (tmp_path / "stop.py").write_text(STOP_PY)
    service = {"process_manager": "command", "start_command": [sys.executable, "-c", "pass"],
               "stop_command": [sys.executable, str(tmp_path / "stop.py"), str(markers)], "health_url": health_url}
    manage(env, "shell", "-c", "from customers.models import Service; "
           f"Service.objects.filter(customer__domain={domain!r}, name='web').update(**{service!r})")
    before = {"tree": tree_state(root), "rows": sqlite_state(db)}

    upgrade = subprocess.Popen(
        [sys.executable, "manage.py", "upgrade", domain, "--to", "1.1", "--json"], cwd=REPO,
        env={**env, "KASA_HEALTH_TIMEOUT": "2", "KASA_HEALTH_INTERVAL": "0.2", "KASA_HEALTH_STREAK": "2"},
        stdout=subprocess.PIPE, stderr=open(tmp_path / "upgrade.log", "wb"), text=True)
    try:
        wait_until(lambda: (markers / "stop-2").exists() or upgrade.poll() is not None, 180,
                   what="the rollback to stop the service")
        assert upgrade.poll() is None, (tmp_path / "upgrade.log").read_text()
        migrated = sqlite3.connect(db).execute("SELECT page FROM hits WHERE n = 1").fetchone()[0]
        assert migrated == "/page/1 (1.1)"  # the migration ran: the rollback must restore the database
        run_id = _the_run(env)
        cluster.stop_server()
        (markers / "release").touch()
        body = wait_until(lambda: (_local_journal(env, run_id) or {}).get("outcome") and _local_journal(env, run_id),
                          180, what="the rollback to end, recorded in the local journal")
        assert {"tree": tree_state(root), "rows": sqlite_state(db)} == before  # with no control database
        assert "rolled back" in body["outcome"]["error"]
        assert {d["op"] for d in body["deferred"]} >= {"upgrade_step", "upgrade_outcome"}
        cluster.start_server()
        upgrade.communicate(timeout=120)
        assert upgrade.returncode == 1
    finally:
        if upgrade.poll() is None:
            upgrade.kill()
            upgrade.wait()

    status, error = cluster.query("SELECT status, error FROM operations_run WHERE id = %s", [run_id])[0]
    assert status == "failed" and "failed at health" in error and "rolled back" in error
    assert "control database did not answer" in error
    up_status, up_error = cluster.query("SELECT status, error FROM upgrades_upgrade WHERE run_id = %s", [run_id])[0]
    assert up_status == "rolled_back" and "rolled back" in up_error
    steps = cluster.query("SELECT s.name, s.status FROM upgrades_upgradestep s JOIN upgrades_upgrade u ON "
                          "s.upgrade_id = u.id WHERE u.run_id = %s ORDER BY s.position", [run_id])
    assert [n for n, _ in steps if n.startswith("rollback:")] == [
        "rollback: stop", "rollback: switch", "rollback: database", "rollback: env", "rollback: start",
        "rollback: health", "rollback: cleanup"]
    assert all(s == "succeeded" for n, s in steps if n.startswith("rollback:"))
    assert cluster.query("SELECT count(*) FROM upgrades_badrelease")[0][0] == 1
    seqs = [s for (s,) in cluster.query("SELECT seq FROM operations_runlogline WHERE run_id = %s ORDER BY seq",
                                        [run_id])]
    assert seqs == list(range(1, len(seqs) + 1))
    assert not localjournal.path_for(Path(env["KASA_VAR_DIR"]) / "journals", run_id).exists()
    assert {"tree": tree_state(root), "rows": sqlite_state(db)} == before
