"""Issue 14: upgrades and rollbacks of customers on remote hosts (upgrades.remote).

Real parts only, as tests/test_remote_restore.py: the host is a network namespace with OpenSSH's sshd whose
filesystem is this machine's (the test looks at the files directly; the upgrade reaches them only through SSH),
its PostgreSQL listens on the namespace's own 127.0.0.1 (host_pg: the hook reaches it there, the way back through
the session's forward), PM2 runs inside the namespace as the customer's user, and the worker asks the health URL
over the namespace's address."""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import subprocess
import urllib.request
import uuid
import zipfile
from pathlib import Path

import psycopg
import pytest
from django.utils import timezone

from engines import hostrestore
from engines.procbase import REPO_ROOT
from tests.conftest import free_port, kill_pm2_under
from tests.remote_fixtures import make_host, remote_customer
from tests.restore_helpers import tree_state

pytestmark = pytest.mark.django_db(transaction=True)

SERVER_JS = r"""
const http = require("http"), fs = require("fs");
const version = fs.readFileSync("VERSION", "utf8").trim();
http.createServer((req, res) => {
  if (req.url === "/version") return res.end(version);
  res.writeHead(process.env.BREAK === "health@" + version ? 500 : 200); res.end("ok\n");
}).listen(Number(process.argv[2]), "0.0.0.0");
"""

# 2.0.0 adds a column and a table and deletes rows (with the host's psql, as the customer's user: the hook runs
# on the host), and leaves a file saying who ran it; BREAK=migrate@2.0.0 fails it half way.
MIGRATE_PY = r"""
import os, subprocess, sys
version = open("VERSION").read().strip()
if version == "2.0.0" and os.environ["DATABASE_URL"].startswith("postgresql://"):
    for sql in ("ALTER TABLE orders ADD COLUMN exported boolean NOT NULL DEFAULT false",
                "CREATE TABLE exports (id serial PRIMARY KEY, note text)", "DELETE FROM orders WHERE id > 100"):
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", os.environ["DATABASE_URL"], "-c", sql],
                       check=True)
    print("applied 2.0.0 as uid", os.getuid(), flush=True)
if version == "2.0.0" and os.environ.get("MY_DB"):  # MariaDB through its socket file, as the customer's user
    subprocess.run(["mariadb", "-S", os.environ["MY_SOCKET"], "-u", os.environ["MY_DB"], os.environ["MY_DB"], "-e",
                    "DELETE FROM carts WHERE id > 10"], check=True,
                   env={**os.environ, "MYSQL_PWD": os.environ["MY_PW"]})
if version == "2.0.0" and os.environ.get("CACHE_DB"):
    import sqlite3
    with sqlite3.connect(os.environ["CACHE_DB"]) as con:
        con.execute("DELETE FROM hits WHERE id > 30")
open("migrated-by", "w").write(str(os.getuid()))
if os.environ.get("BREAK") == "migrate@" + version:
    print("migration half done, then failing", file=sys.stderr, flush=True)
    sys.exit(1)
"""


@pytest.fixture
def fast(settings):
    settings.KASA_REMOTE_PM2 = str(REPO_ROOT / "node_modules" / ".bin" / "pm2")
    settings.KASA_PM2_SETTLE = 0.5
    settings.KASA_HEALTH_STREAK = 1
    settings.KASA_HEALTH_TIMEOUT = 2.5
    settings.KASA_HEALTH_INTERVAL = 0.2
    return settings


def _files(version: str) -> dict[str, str]:
    return {"server.js": SERVER_JS, "migrate.py": MIGRATE_PY, "VERSION": f"{version}\n",
            ".env.example": "PORT=\nDATABASE_URL=\nAPI_SECRET=\nEXPORT_DIR=exports\n"}


def _zip(path: Path, files: dict[str, str], extra: tuple[str, str] | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in sorted(files.items()):
            info = zipfile.ZipInfo(f"backend/{name}", date_time=(2025, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            zf.writestr(info, text)
        if extra:
            zf.writestr(zipfile.ZipInfo(extra[0], date_time=(2025, 1, 1, 0, 0, 0)), extra[1])


@pytest.fixture
def releases(tmp_path):
    """Releases "1.0" (backend 1.0.0, what the customer runs) and "2.0" (2.0.0, with a migrate hook)."""
    from releases.models import Release
    from releases.services import release_sync

    folder = tmp_path / "pkg"
    folder.mkdir()
    hooks = {"migrate": ["/usr/bin/python3", "migrate.py"]}  # the host's own Python (no Kasa venv there)
    data = {"backend": [], "compatMatrix": []}
    for v in ("1.0.0", "2.0.0"):
        _zip(folder / f"backend-{v}.zip", _files(v))
        data["backend"].append({"version": v, "file": f"backend-{v}.zip", "hooks": hooks})
        data["compatMatrix"].append({"release": v[:3], "backend": v})
    (folder / "releases.json").write_text(json.dumps(data))
    release_sync(folder)
    return {r.name: r for r in Release.objects.all()}


def _customer(h, host, team, user: str, parents_open, pg, *, extra_env: str = "", sqlite: bool = False):
    """A remote customer at backend 1.0.0, run by PM2 on the host as `user`, answering its health URL; its
    database host_pg's (None: no database)."""
    from customers.models import Customer, Service

    customer = remote_customer(h, host, team, databases=[("main", pg["url"])] if pg else [], sqlite=sqlite)
    root = Path(customer.root)
    parents_open(root)
    port = free_port()
    for name, text in _files("1.0.0").items():
        (root / "backend" / name).write_text(text)
    url = pg["url"] if pg else "none"  # without a database the migrate hook changes none
    secret = f"s3cr3t-{uuid.uuid4().hex[:8]}"
    if sqlite:
        extra_env += f"CACHE_DB={root / 'data' / 'cache.sqlite3'}\n"
    (root / "backend" / ".env").write_text(f"PORT={port}\nDATABASE_URL={url}\nAPI_SECRET={secret}\n{extra_env}")
    (root / "backend" / ".env").chmod(0o600)
    who = pwd.getpwnam(user)
    subprocess.run(["chown", "-R", f"{who.pw_uid}:{who.pw_gid}", str(root / "backend"), str(root / ".env"),
                    str(root / "data")], check=True)
    os.chown(root, 0, who.pw_gid)
    root.chmod(0o750)
    Customer.objects.filter(pk=customer.pk).update(run_as=user, versions={"backend": "1.0.0"})
    Service.objects.filter(customer=customer, name="backend").update(
        process_manager="pm2", app_name=f"backend-{port}", start_command=["/usr/bin/node", "server.js", str(port)],
        health_url=f"http://{h.address}:{port}/health")
    customer.refresh_from_db()
    _start(host, customer)
    return customer, f"http://{h.address}:{port}"


def _start(host, customer) -> None:
    """Start the service on the host as the customer's user, as an earlier run of Kasa would have."""
    from django.conf import settings

    from hosts.remote import RemoteHost

    svc = customer.services.get(name="backend")
    wire = [{"name": svc.name, "folder": os.path.join(customer.root, "backend"), "manager": "pm2",
             "app_name": svc.app_name, "start_command": list(svc.start_command), "root": customer.root}]
    with RemoteHost(host) as remote:
        answer = remote.call("engines.hostrestore.services", "start", wire, customer.run_as, settings.KASA_REMOTE_PM2,
                             settle=0.5)
    assert answer["ok"], answer


def _upgrade(customer, release, **kw):
    from operations.services import run_execute
    from upgrades.services import upgrade_start

    run = upgrade_start(customer, release, via="cli", enqueue=False, **kw)
    run_execute(run.pk)
    run.refresh_from_db()
    return run


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def _db(pg) -> tuple[int, list[str], bool]:
    """(rows in orders, its columns, whether the table exports exists), from the server's own socket."""
    server = pg["server"]
    with psycopg.connect(host=server.socket_dir, port=server.port, user="postgres", dbname="shop") as con:
        rows = con.execute("SELECT count(*) FROM orders").fetchone()[0]
        cols = [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = "
                                          "'orders' ORDER BY ordinal_position")]
        exports = con.execute("SELECT count(*) > 0 FROM information_schema.tables WHERE table_name = 'exports'"
                              ).fetchone()[0]
    return rows, cols, exports


def _reset(pg) -> None:
    """The host's database as host_pg made it, whatever this test did to it (other tests share it)."""
    server = pg["server"]
    with psycopg.connect(host=server.socket_dir, port=server.port, user="postgres", dbname="shop",
                         autocommit=True) as con:
        con.execute("DROP TABLE IF EXISTS shop.exports, public.exports")
        con.execute("ALTER TABLE orders DROP COLUMN IF EXISTS exported")
        con.execute("DELETE FROM orders WHERE id > 123")
        con.execute("INSERT INTO orders (id, total) SELECT g, g * 1.5 FROM generate_series(1, 123) g "
                    "ON CONFLICT DO NOTHING")


def _journals(h) -> list[str]:
    folder = h.customers_root / hostrestore.JOURNALS
    return sorted(os.listdir(folder)) if folder.exists() else []


def _log(run) -> str:
    return "\n".join(line.text for line in run.log_lines.all())


def test_a_remote_upgrade_serves_the_new_release_after_its_hook_ran_on_the_host_as_the_customers_user(
        host_pg, team, customer_users, fast, parents_open, releases):
    from upgrades.models import Upgrade

    h, pg = host_pg
    user = customer_users[0]
    _reset(pg)
    host = make_host(h, "web-upgrade")
    customer, base = _customer(h, host, team, user, parents_open, pg)
    root = Path(customer.root)
    try:
        assert _get(base + "/version") == (200, "1.0.0")
        before = tree_state(root)
        dry = _upgrade(customer, releases["2.0"], dry_run=True)  # the preflight only, asked from the host
        assert dry.status == "succeeded", dry.error
        checks = {c["name"]: c for c in Upgrade.objects.get(run=dry).preflight["checks"]}
        assert all(c["ok"] for c in checks.values()) and "web-upgrade" in checks["disk"]["detail"]
        assert tree_state(root) == before and _journals(h) == []
        run = _upgrade(customer, releases["2.0"])
        log = _log(run)
        assert run.status == "succeeded", (run.error, log)
        up = Upgrade.objects.get(run=run)
        assert up.status == "succeeded" and up.backup_id
        assert _get(base + "/version") == (200, "2.0.0")  # started by PM2 on the host from Kasa's ecosystem file
        assert os.readlink(root / "backend") == "releases/2.0.0/backend"
        release = root / "releases" / "2.0.0" / "backend"
        uid = pwd.getpwnam(user).pw_uid
        assert (release / "migrated-by").read_text() == str(uid)  # the hook ran on the host as the customer's user
        assert all(p.lstat().st_uid == uid for p in release.rglob("*"))
        assert f"applied 2.0.0 as uid {uid}" in log  # its output, line by line in the run's log
        assert "EXPORT_DIR=exports" in (release / ".env").read_text()  # merged from the release's .env.example
        assert (root / "releases" / "1.0.0" / "backend" / "VERSION").read_text() == "1.0.0\n"  # the way back
        rows, cols, exports = _db(pg)
        assert rows == 100 and "exported" in cols and exports  # the migration reached the host's database
        customer.refresh_from_db()
        assert customer.versions == {"backend": "2.0.0"}
        assert _journals(h) == []
        assert "s3cr3t-" not in log
    finally:
        kill_pm2_under(root)
        _reset(pg)


def test_a_remote_upgrade_whose_migration_fails_puts_files_database_and_services_back(
        host_pg, team, customer_users, fast, parents_open, releases):
    from upgrades.models import BadRelease, Upgrade

    h, pg = host_pg
    _reset(pg)
    host = make_host(h, "web-upfail")
    customer, base = _customer(h, host, team, customer_users[0], parents_open, pg, extra_env="BREAK=migrate@2.0.0\n",
                               sqlite=True)
    root = Path(customer.root)
    cache = root / "data" / "cache.sqlite3"
    try:
        before, db_before = tree_state(root), _db(pg)
        run = _upgrade(customer, releases["2.0"])
        assert run.status == "failed"
        up = Upgrade.objects.get(run=run)
        assert up.status == "rolled_back", (up.error, _log(run))
        assert "web-upfail" in run.error and "migrate hook" in run.error and "rolled back" in run.error
        log = _log(run)
        assert "migration half done" in log and "row counts match the manifest; swapped in on web-upfail" in log
        assert tree_state(root) == before  # the staged release gone, the plain folder back, the .env untouched
        assert _db(pg) == db_before == (123, ["id", "total"], False)  # restored through the session's forward
        with sqlite3.connect(cache) as con:  # the hook deleted rows; put back on the host, with its owner
            assert con.execute("SELECT count(*) FROM hits").fetchone()[0] == 37
        assert cache.stat().st_uid == pwd.getpwnam(customer_users[0]).pw_uid
        assert not [n for n in os.listdir(cache.parent) if n.startswith(".cache.sqlite3.kasa-")]
        assert _get(base + "/version") == (200, "1.0.0")
        assert BadRelease.objects.filter(customer=customer, release=releases["2.0"]).exists()
        assert _journals(h) == []
    finally:
        kill_pm2_under(root)
        _reset(pg)


def test_a_remote_upgrade_whose_migration_fails_puts_a_mariadb_database_back_through_the_forward(
        netns_hosts, team, customer_users, fast, parents_open, releases, mysql_database):
    from customers.models import DatabaseConnection
    from tests.conftest import mysql_admin
    from upgrades.models import Upgrade

    socket = "/run/mysqld/mysqld.sock"  # the host's socket file (the simulated host shares this filesystem)
    name = mysql_database["name"]
    for account in ("'%'", "'localhost'"):  # may create its side databases: a fresh database swapped in
        mysql_admin(f"GRANT ALL ON `{name}\\_\\_kasa\\_%`.* TO '{name}'@{account}")
    mysql_admin(f"CREATE TABLE `{name}`.carts (id INT PRIMARY KEY, total INT); "
                f"INSERT INTO `{name}`.carts WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                "WHERE i < 40) SELECT i, i * 3 FROM n;")
    password = f"pw{uuid.uuid4().hex}"  # one a .env line carries as it is (the fixture's has quotes in it)
    for account in ("'%'", "'localhost'"):
        mysql_admin(f"ALTER USER '{name}'@{account} IDENTIFIED BY '{password}'")
    h = netns_hosts.make()
    host = make_host(h, "web-upmy")
    # The test hook's own login reaches it through the customer's .env (Kasa passes the .env on stdin).
    env = f"BREAK=migrate@2.0.0\nMY_DB={name}\nMY_SOCKET={socket}\nMY_PW={password}\n"
    customer, base = _customer(h, host, team, customer_users[0], parents_open, None, extra_env=env)
    DatabaseConnection.objects.create(customer=customer, name="shop", engine="mysql", host=socket, port=3306,
                                      database=name, user=mysql_database["user"], password=password)
    root = Path(customer.root)
    try:
        before = tree_state(root)
        run = _upgrade(customer, releases["2.0"])
        up = Upgrade.objects.get(run=run)
        assert run.status == "failed" and up.status == "rolled_back", (up.error, _log(run))
        assert "migration half done" in _log(run), _log(run)
        from tests.test_remote_restore_parts import _carts, _side_databases

        assert _carts(name) == 40  # the hook deleted 30 rows; the pre-upgrade backup's came back through the forward
        assert _side_databases(name) == []
        assert tree_state(root) == before
        assert _get(base + "/version") == (200, "1.0.0")
    finally:
        kill_pm2_under(root)


def test_a_hostile_release_zip_is_refused_on_the_worker_before_anything_reaches_the_host(
        host_pg, team, customer_users, fast, parents_open, releases):
    import hashlib

    from django.core.files.storage import default_storage

    from releases.models import ComponentVersion
    from upgrades.models import Upgrade

    h, pg = host_pg
    host = make_host(h, "web-uphostile")
    customer, base = _customer(h, host, team, customer_users[0], parents_open, pg)
    root = Path(customer.root)
    try:
        # The stored zip replaced after its import by one with a member that climbs out (its sha256 re-recorded:
        # storage and control database agree, only the checks on the worker stand in the way).
        cv = ComponentVersion.objects.get(component="backend", version="2.0.0")
        path = Path(default_storage.path(cv.file))
        path.unlink()  # a new file, not the one other tests' imports may share
        _zip(path, _files("2.0.0"), extra=("backend/../../escaped.txt", "evil\n"))
        data = path.read_bytes()
        ComponentVersion.objects.filter(pk=cv.pk).update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        before = tree_state(root, skip=(".kasa-pm2",))
        run = _upgrade(customer, releases["2.0"])
        assert run.status == "failed"
        up = Upgrade.objects.get(run=run)
        assert up.status == "failed" and up.backup_id is None, up.error
        assert "nothing of it reached host web-uphostile" in run.error and "nothing was touched" in run.error
        assert tree_state(root, skip=(".kasa-pm2",)) == before
        assert not (root.parent / "escaped.txt").exists() and not (root / "escaped.txt").exists()
        assert _get(base + "/version") == (200, "1.0.0")
        assert _journals(h) == []
    finally:
        kill_pm2_under(root)


def test_a_manual_rollback_of_a_remote_upgrade_puts_the_previous_release_and_database_back(
        host_pg, team, customer_users, fast, parents_open, releases):
    from operations.services import run_execute
    from upgrades.admin_selectors import rollback_plan
    from upgrades.models import BadRelease, Upgrade
    from upgrades.services import rollback_start

    h, pg = host_pg
    _reset(pg)
    host = make_host(h, "web-uprollback")
    customer, base = _customer(h, host, team, customer_users[0], parents_open, pg)
    root = Path(customer.root)
    try:
        db_before = _db(pg)
        run = _upgrade(customer, releases["2.0"])
        assert run.status == "succeeded", run.error
        assert _get(base + "/version") == (200, "2.0.0")
        customer.refresh_from_db()
        plan = rollback_plan(customer)  # the admin's page: nothing of the host's folders read on this machine
        assert [(c["component"], c["to"], c["env"], c["before_exists"]) for c in plan["components"]] == [
            ("backend", "1.0.0", [], True)]
        back = rollback_start(customer, via="cli", enqueue=False)
        run_execute(back.pk)
        back.refresh_from_db()
        assert back.status == "succeeded", (back.error, _log(back))
        assert Upgrade.objects.get(run=back).status == "succeeded"
        assert _get(base + "/version") == (200, "1.0.0")
        assert os.readlink(root / "backend") == "releases/1.0.0/backend"
        assert _db(pg) == db_before  # the pre-upgrade backup, restored through the session's forward
        customer.refresh_from_db()
        assert customer.versions == {"backend": "1.0.0"}
        assert BadRelease.objects.filter(customer=customer, release=releases["2.0"]).exists()
        assert _journals(h) == []
    finally:
        kill_pm2_under(root)
        _reset(pg)



def test_losing_the_host_mid_upgrade_fails_it_naming_the_host_and_leaves_the_journal_there(
        netns_hosts, team, customer_users, fast, monkeypatch, parents_open, releases):
    from backups.remote_restore import host_journal_key
    from engines import hostupgrade
    from upgrades import remote_files
    from upgrades.models import Upgrade

    fast.KASA_SSH_CONNECT_TIMEOUT = 2
    h = netns_hosts.make()  # a host of its own to cut; a customer without a database
    host = make_host(h, "web-uplost")
    customer, _base = _customer(h, host, team, customer_users[0], parents_open, None)
    root = Path(customer.root)
    real = remote_files.switch

    def cut_after_the_switch(job, slog):
        real(job, slog)
        h.kill_sessions()  # the session's sshd child dies, and the host drops off the network
        h.cut()

    monkeypatch.setattr(remote_files, "switch", cut_after_the_switch)
    try:
        before = tree_state(root)
        run = _upgrade(customer, releases["2.0"])
        assert run.status == "failed"
        up = Upgrade.objects.get(run=run)
        assert up.status == "quarantined", up.error
        assert "on host web-uplost failed at" in run.error and "the journal stays on host web-uplost" in run.error
        names = _journals(h)
        assert names == [f"run-{run.pk}.json"]
        h.restore()
        body = hostrestore.journal_read(str(h.customers_root), run.pk, host_journal_key("web-uplost"))
        assert {s["type"] for s in body["steps"]} >= {"staged", "hooks", "services_stopped", "switch"}
        # The host is back: its journal is what puts the customer back (here by hand).
        hostupgrade.undo_files(body["root"], body["steps"])
        hostupgrade.after_undo(body["root"], body["steps"])
        assert tree_state(root) == before
    finally:
        h.restore() if not h.answers() else None
        kill_pm2_under(root)


def test_a_worker_that_dies_mid_remote_upgrade_is_put_back_by_the_reaper_from_the_journal_on_the_host(
        host_pg, team, customer_users, fast, monkeypatch, parents_open, releases):
    from operations.context import RunLost
    from operations.models import Run
    from operations.services import runs_reap
    from upgrades import remote
    from upgrades.models import Upgrade

    h, pg = host_pg
    _reset(pg)
    host = make_host(h, "web-updead")
    customer, base = _customer(h, host, team, customer_users[0], parents_open, pg)
    root = Path(customer.root)
    real = remote._hooks

    def dies_after_the_migration(job, phase, slog):
        real(job, phase, slog)
        raise RunLost("the worker was killed (test)")  # run_execute leaves the run `running`, as a dead worker

    monkeypatch.setattr(remote, "_hooks", dies_after_the_migration)
    try:
        before, db_before = tree_state(root), _db(pg)
        run = _upgrade(customer, releases["2.0"])
        assert run.status == "running" and _db(pg)[0] == 100  # the migration ran before the "kill"
        assert _journals(h) == [f"run-{run.pk}.json"]
        Run.objects.filter(pk=run.pk).update(heartbeat_at=run.heartbeat_at - timezone.timedelta(hours=1))
        assert runs_reap() == [run.pk]
        up = Upgrade.objects.get(run=run)
        assert up.status == "rolled_back", up.error
        assert "the worker died" in up.error and "rolled back" in up.error
        assert up.steps.get(name="rollback: database").status == "succeeded"
        assert tree_state(root) == before
        assert _db(pg) == db_before
        assert _get(base + "/version") == (200, "1.0.0")
        assert _journals(h) == []
    finally:
        kill_pm2_under(root)
        _reset(pg)


def test_a_blue_green_upgrade_of_a_remote_customer_is_refused_before_anything_is_touched(
        netns_hosts, team, customer_users, releases):
    from customers.models import Customer
    from operations.services import run_execute
    from upgrades.admin_selectors import upgrade_plan
    from upgrades.models import Upgrade
    from upgrades.services import upgrade_start

    h = netns_hosts.make()
    customer = remote_customer(h, make_host(h, "web-bluegreen"), team, sqlite=False)
    Customer.objects.filter(pk=customer.pk).update(run_as=customer_users[0], versions={"backend": "1.0.0"})
    customer.refresh_from_db()
    before = tree_state(Path(customer.root))
    page = upgrade_plan(customer, releases["2.0"])  # the admin's page: the host's folders are checked on the host
    assert page["ok"] and page["env"] == [] and "web-bluegreen" in {c.name: c for c in page["checks"]}["host"].detail
    run = upgrade_start(customer, releases["2.0"], via="cli", enqueue=False, strategy=Upgrade.Strategy.BLUE_GREEN)
    run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and Upgrade.objects.get(run=run).status == "failed"
    assert "blue-green upgrade" in run.error and "host web-bluegreen" in run.error and "upgrade in place" in run.error
    assert tree_state(Path(customer.root)) == before
