"""Deep drills: the drill's scratch copy runs its services on free ports, as the customer's user, against scratch
databases, and must answer its health URLs; nothing of it outlives the drill, and the live customer is untouched.
Real PM2 (node_modules), real PostgreSQL and MariaDB (the customer's), a real scratch PostgreSQL cluster and a
real private MariaDB server, real OS users."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from backups.models import Backup, BackupPolicy
from backups.services import default_target
from customers import runtime
from customers.models import Service
from engines import dbrestore, drillcopy, ownership, procman, runas, scratchmysql
from tests.conftest import MY_ADMIN, MY_HOST, MY_PORT, _pm2_daemons, free_port, mysql_admin, port_open, require
from tests.restore_helpers import command_json, my_drop_side_databases, my_grant_side_databases
from tests.test_backups import _backup_json

pytestmark = pytest.mark.django_db(transaction=True)

# A demo-like service (customers/demo.py): PORT from its environment, /health answers 200. The backend's health
# also proves where its database points: not the live server's port, and a server that accepts connections
# there. The admin's proves its SQLite file is the copy's (below the folder it runs in). EXPECTED_PORT lets a
# test make the copy crash at once (its PORT moved, EXPECTED_PORT a plain value the drill does not touch).
SERVER_JS = r"""
const http = require("http"), net = require("net"), fs = require("fs"), path = require("path");
const port = Number(process.env.PORT);
if (process.env.EXPECTED && process.env.EXPECTED !== process.env.PORT) { console.error("wrong port"); process.exit(3); }
http.createServer((req, res) => {
  const answer = (code, text) => { res.writeHead(code); res.end(text); };
  if (req.url !== "/health") return answer(200, `${process.env.SERVICE_NAME}\n`);
  if (process.env.CACHE_DB) {
    const file = process.env.CACHE_DB.replace("sqlite://", "");
    return fs.existsSync(file) && file.startsWith(path.dirname(process.cwd()) + "/")
      ? answer(200, "ok") : answer(503, "not my cache");
  }
  if (!process.env.DATABASE_URL) return answer(200, "ok");
  const db = new URL(process.env.DATABASE_URL);
  if (db.port === process.env.LIVE_DB_AT) return answer(503, "the live database");
  if (db.protocol === "mysql:") {  // reads the rows: EXPECTED_ROWS are the backup's, the live table has fewer
    const argv = ["--no-defaults", "--protocol=TCP", "-h", db.hostname, "-P", db.port, "-u",
      decodeURIComponent(db.username), "-N", "-B", "-e", "SELECT COUNT(*) FROM products",
      decodeURIComponent(db.pathname.slice(1))];
    const env = { PATH: "/usr/bin:/bin", MYSQL_PWD: decodeURIComponent(db.password) };
    return require("child_process").execFile(process.env.MYSQL_CLIENT, argv, { env, timeout: 4000 }, (err, out) =>
      err ? answer(503, "query failed") : answer(out.trim() === process.env.EXPECTED_ROWS ? 200 : 503, out));
  }
  const s = net.connect(Number(db.port), db.hostname, () => { s.end(); answer(200, "ok"); });
  s.on("error", () => answer(503, "database unreachable"));
}).listen(port, "127.0.0.1");
"""


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def _demo_like(make_customer, user: runas.Identity, *, databases=(), health_path="/health", env_extra=None,
               services=("backend", "admin")):
    """A customer made like the demo: PM2 apps from an ecosystem file with the live folders and ports, a .env
    with PORT (and DATABASE_URL), health URLs on those ports, its root by the ownership model, run as `user`."""
    customer = make_customer(services=services, databases=databases)
    root = Path(customer.root)
    apps, ports = [], {}
    for name in services:
        port = ports[name] = free_port()
        folder = root / name
        (folder / "server.js").write_text(SERVER_JS)
        (folder / "package.json").write_text(f'{{"name": "{name}", "main": "server.js"}}\n')
        lines = [f"SERVICE_NAME={name}", f"PORT={port}", *((env_extra or {}).get(name, []))]
        (folder / ".env").write_text("# the demo's settings\n" + "\n".join(lines) + "\n")
        (folder / ".env").chmod(0o600)
        apps.append(f'{{ name: "{customer.domain}-{name}", cwd: "{folder}", script: "server.js", '
                    f'env: {{ PORT: "{port}", SERVICE_NAME: "{name}" }} }}')
    (root / "ecosystem.config.js").write_text("module.exports = { apps: [" + ", ".join(apps) + "] };\n")
    for name in services:
        Service.objects.filter(customer=customer, name=name).update(
            process_manager="pm2", app_name=f"{customer.domain}-{name}",
            health_url=f"http://127.0.0.1:{ports[name]}{health_path}")
    ownership.hand_over(root, user, service_paths=list(services), files=["ecosystem.config.js"])
    customer.run_as = user.user
    customer.save()
    customer.refresh_from_db()
    return customer, ports


def _live_processes(customer) -> dict:
    specs = runtime.service_specs(customer)
    home = Path(specs[0].pm2_home)
    apps = procman.Pm2Manager(settle=0.5).apps(specs[0])
    return {"daemon": int((home / "pm2.pid").read_text()), **{a["name"]: a["pid"] for a in apps}}


def _nothing_left(customer) -> None:
    parent = str(Path(customer.root).parent)
    assert not [p.name for p in Path(parent).glob(".kasa-drill-*")]
    assert not [h for h in _pm2_daemons().values() if "/.kasa-drill-" in h]
    in_copy = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and "/.kasa-drill-" in os.readlink(f"/proc/{entry}/cwd"):
                in_copy.append(entry)
        except OSError:
            continue
    assert not in_copy


def _deep(customer) -> None:
    BackupPolicy.objects.create(customer=customer, target=default_target(), deep_drill=True)


@pytest.fixture
def alpha(customer_users):
    require(os.geteuid() == 0, "root (the customer's own user)")
    require(os.path.exists(procman.pm2_binary()), "PM2 from npm (make install)")
    return runas.lookup(customer_users[0])


def test_a_deep_drill_of_a_demo_like_customer_runs_the_copy_on_free_ports_and_leaves_the_live_one_alone(
        make_customer, alpha, pg_database):
    import psycopg

    with psycopg.connect(pg_database["url"]) as con:
        con.execute("CREATE TABLE products (id serial PRIMARY KEY, name text)")
        con.execute("INSERT INTO products (name) SELECT 'product ' || g FROM generate_series(1, 50) g")
    customer, ports = _demo_like(make_customer, alpha, databases=[("main", pg_database["url"])], env_extra={
        "backend": [f"DATABASE_URL={pg_database['url']}", f"LIVE_DB_AT={pg_database['port']}"],
        "admin": ["CACHE_DB=sqlite://{root}/admin/cache.sqlite3"]})
    root = Path(customer.root)
    admin_env = root / "admin" / ".env"
    admin_env.write_text(admin_env.read_text().replace("{root}", str(root)))
    con = sqlite3.connect(root / "admin" / "cache.sqlite3")
    con.execute("CREATE TABLE hits (n INTEGER)")
    con.executemany("INSERT INTO hits VALUES (?)", [(i,) for i in range(7)])
    con.commit()
    con.close()
    os.chown(root / "admin" / "cache.sqlite3", alpha.uid, alpha.gid)
    from customers.models import DatabaseConnection
    from engines import dburl

    DatabaseConnection.objects.create(customer=customer, name="cache", engine="sqlite",
                                      sqlite_path="admin/cache.sqlite3")
    assert dburl.parse(pg_database["url"]).port == pg_database["port"]
    procman.start_all(runtime.service_specs(customer), runtime.managers())
    before = _live_processes(customer)
    doc = _backup_json(customer.domain)
    _deep(customer)

    code, run = command_json("verify", str(doc["id"]))

    assert code == 0, run
    deep = run["result"]["deep"]
    assert sorted(deep["services"]) == ["admin", "backend"]
    checked = {c["service"]: c["url"] for c in deep["checked"]}
    assert set(checked) == {"admin", "backend"}
    for name, url in checked.items():  # on a free port, not the live one
        assert drillcopy.health_port(url) != ports[name] and url.endswith("/health")
    from operations.models import Run

    log = "\n".join(Run.objects.get(pk=run["id"]).log_lines.order_by("seq").values_list("text", flat=True))
    assert "health checks of the copy" in log and all(url in log for url in checked.values())
    assert f"as {alpha}" in log and "pointed DATABASE_URL at the copy's database" in log
    assert Backup.objects.get(pk=doc["id"]).verify_status == "passed"
    # The live customer: the same PM2 daemon and apps (same pids), still answering on its own ports.
    assert _live_processes(customer) == before
    for port in ports.values():
        assert _get(f"http://127.0.0.1:{port}/")[0] == 200
    _nothing_left(customer)
    procman.stop_all(runtime.service_specs(customer), runtime.managers())


def _live_mysql(sql: str) -> str:
    return subprocess.run([shutil.which("mariadb"), "--protocol=TCP", "-h", MY_HOST, "-P", str(MY_PORT), "-u",
                           MY_ADMIN, "-N", "-B", "-e", sql], capture_output=True, text=True, check=True).stdout


def test_a_deep_drill_of_a_mariadb_customer_runs_against_a_private_server_not_the_live_one(
        make_customer, alpha, mysql_database):
    try:
        scratchmysql.server_programs()
    except dbrestore.RestoreError:
        require(False, "MariaDB server programs (mariadbd, mariadb-install-db)")
    m = mysql_database
    db = f"`{m['name']}`"
    mysql_admin(f"CREATE TABLE {db}.products (id INT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(40)); "
                f"INSERT INTO {db}.products (name) SELECT CONCAT('product ', seq) FROM {db}.seq_1_to_50;")
    my_grant_side_databases(m)  # the drill's own check restores into `<name>__kasa_verify_…` on the live server
    url = f"mysql://{m['user']}:{quote(m['password'], safe='')}@{m['host']}:{m['port']}/{m['name']}"
    customer, ports = _demo_like(make_customer, alpha, services=("backend",), databases=[("main", url)],
                                 env_extra={"backend": [f"DATABASE_URL={url}", f"LIVE_DB_AT={m['port']}",
                                                        "EXPECTED_ROWS=50", f"MYSQL_CLIENT={shutil.which('mariadb')}"]})
    procman.start_all(runtime.service_specs(customer), runtime.managers())
    try:
        doc = _backup_json(customer.domain)
        mysql_admin(f"DELETE FROM `{m['name']}`.products WHERE id > 10")  # the live rows differ from the backup's
        _deep(customer)

        code, run = command_json("verify", str(doc["id"]))

        assert code == 0, run
        assert [c["service"] for c in run["result"]["deep"]["checked"]] == ["backend"]
        from operations.models import Run

        log = "\n".join(Run.objects.get(pk=run["id"]).log_lines.order_by("seq").values_list("text", flat=True))
        assert "pointed DATABASE_URL at the copy's database" in log
        started = re.search(r"a private MariaDB server started on 127\.0\.0\.1:(\d+) \(folder (\S+), pid (\d+)\)",
                            log)
        assert started, log
        port, folder, pid = int(started[1]), started[2], int(started[3])
        assert port != m["port"] and f"main restored into the private MariaDB server on 127.0.0.1:{port}" in log
        assert m["password"] not in log and quote(m["password"], safe="") not in log
        # Gone afterwards: the server, its folder, its port; nothing of the copy was created on the live server.
        assert not os.path.exists(folder) and not os.path.exists(f"/proc/{pid}") and not port_open("127.0.0.1", port)
        assert _live_mysql("SELECT COUNT(*) FROM mysql.user WHERE user = 'kasa_drill_app'").strip() == "0"
        assert _live_mysql(f"SELECT COUNT(*) FROM `{m['name']}`.products").strip() == "10"
        _nothing_left(customer)
    finally:
        procman.stop_all(runtime.service_specs(customer), runtime.managers())
        my_drop_side_databases(m)


def test_a_copy_that_cannot_start_fails_the_deep_drill_and_leaves_nothing_behind(make_customer, alpha):
    customer, ports = _demo_like(make_customer, alpha, services=("backend",))
    env = Path(customer.root) / "backend" / ".env"
    env.write_text(env.read_text() + f"EXPECTED={ports['backend']}\n")  # the copy, on another port, exits at once
    procman.start_all(runtime.service_specs(customer), runtime.managers())
    before = _live_processes(customer)
    doc = _backup_json(customer.domain)
    _deep(customer)

    code, run = command_json("verify", str(doc["id"]))

    assert code == 1
    assert "deep drill: the copy did not start" in run["error"] and "backend" in run["error"], run["error"]
    bk = Backup.objects.get(pk=doc["id"])
    assert bk.verify_status == "failed" and "the copy did not start" in bk.verify_error
    assert _live_processes(customer) == before
    _nothing_left(customer)
    procman.stop_all(runtime.service_specs(customer), runtime.managers())


def test_a_copy_whose_health_url_never_answers_fails_the_deep_drill_and_leaves_nothing_behind(
        make_customer, alpha, settings):
    settings.KASA_HEALTH_TIMEOUT = 3.0
    customer, ports = _demo_like(make_customer, alpha, services=("backend",), health_path="/health",
                                 env_extra={"backend": ["DATABASE_URL=postgresql://x:y@127.0.0.1:9/none",
                                                        "LIVE_DB_AT=0"]})
    procman.start_all(runtime.service_specs(customer), runtime.managers())
    before = _live_processes(customer)
    doc = _backup_json(customer.domain)
    _deep(customer)

    code, run = command_json("verify", str(doc["id"]))

    assert code == 1
    assert "did not answer their health URLs" in run["error"] and "HTTP 503" in run["error"], run["error"]
    assert _live_processes(customer) == before
    _nothing_left(customer)
    procman.stop_all(runtime.service_specs(customer), runtime.managers())


def test_a_drill_without_the_option_starts_nothing(make_customer, alpha):
    customer, _ports = _demo_like(make_customer, alpha, services=("backend",))
    doc = _backup_json(customer.domain)
    code, run = command_json("verify", str(doc["id"]))
    assert code == 0, run
    assert "deep" not in run["result"]
    assert not [h for h in _pm2_daemons().values() if h.startswith(str(Path(customer.root).parent))]


# --- the copy's .env, pure ------------------------------------------------------------------------------------
def test_the_copys_env_moves_ports_and_live_paths_and_keeps_database_ports():
    values = {"PORT": "4101", "API_URL": "http://127.0.0.1:4102/api", "DB_PORT": "4101", "OTHER": "4101",
              "UPLOADS": "/srv/c/shop/backend/uploads", "NAME": "shop", "REMOTE": "https://example.com:4101/"}
    updates = drillcopy.updates_for(values, ports={4101: 50001, 4102: 50002}, live_root="/srv/c/shop",
                                    copy_root="/srv/c/.kasa-drill-7", skip={"DB_PORT"})
    assert updates == {"PORT": "50001", "API_URL": "http://127.0.0.1:50002/api",
                       "UPLOADS": "/srv/c/.kasa-drill-7/backend/uploads"}
    text = "# keep me\nexport PORT=4101\nNAME=shop\n"
    assert drillcopy.rewrite(text, {"PORT": "50001"}) == "# keep me\nexport PORT=50001\nNAME=shop\n"


def test_a_health_url_that_is_not_on_this_host_cannot_be_drilled_deep():
    assert drillcopy.health_port("http://localhost/health") == 80
    assert drillcopy.with_port("http://127.0.0.1:4101/health?x=1", 5000) == "http://127.0.0.1:5000/health?x=1"
    with pytest.raises(drillcopy.CopyError, match="not an http.s. URL on this host"):
        drillcopy.health_port("https://shop.example.com/health")


def test_the_deep_drill_option_is_in_the_policy_admin(client, staff_user, make_customer, db):
    from django.contrib.auth import get_user_model

    admin = get_user_model().objects.create_superuser(f"root-{uuid.uuid4().hex[:6]}", password="pw-Secret-123")
    client.force_login(admin)
    customer = make_customer()
    policy = BackupPolicy.objects.create(customer=customer, target=default_target())
    page = client.get(f"/backups/backuppolicy/{policy.pk}/change/")
    assert page.status_code == 200 and b'name="deep_drill"' in page.content
    # A staff member of another team does not see the customer's policy at all.
    outsider = staff_user()
    client.force_login(outsider)
    assert client.get(f"/backups/backuppolicy/{policy.pk}/change/").status_code in (302, 403, 404)


def test_a_copy_left_by_a_killed_worker_is_swept_by_the_next_deep_drill(make_customer):
    import subprocess

    from backups import deepdrill

    customer = make_customer()
    stale = Path(customer.root).parent / f"{deepdrill.COPY_PREFIX}987654"
    (stale / "backend").mkdir(parents=True)
    leftover = subprocess.Popen(["sleep", "300"], cwd=stale / "backend")
    warnings = []

    class Log:  # the run's log: only what the sweep writes to it
        def warning(self, text):
            warnings.append(text)

    try:
        deepdrill.sweep_stale(Log(), stale.parent)
        assert leftover.wait(timeout=10) == -9
    finally:
        leftover.kill()
    assert not stale.exists() and "left by run #987654" in warnings[0]


# --- the private MariaDB server, engine ----------------------------------------------------------------------------
def test_the_private_mariadb_server_is_stopped_and_its_folder_removed_when_the_drill_fails():
    try:
        scratchmysql.server_programs()
    except dbrestore.RestoreError:
        require(False, "MariaDB server programs (mariadbd, mariadb-install-db)")
    server = scratchmysql.ScratchMariaDB()
    with pytest.raises(RuntimeError, match="the copy failed"), server as target:
        folder, pid = server.folder, server.pid
        assert os.stat(folder).st_mode & 0o777 == 0o700 and port_open(target.host, target.port)
        raise RuntimeError("the copy failed")
    assert not os.path.exists(folder) and not os.path.exists(f"/proc/{pid}") and not port_open(target.host, target.port)


def test_a_worker_without_a_mariadb_server_is_told_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(scratchmysql, "SEARCH_PATH", str(tmp_path))
    with pytest.raises(dbrestore.RestoreError, match="install the Debian package mariadb-server"), \
            scratchmysql.ScratchMariaDB(base_dir=str(tmp_path)):
        pass
    assert not list(tmp_path.iterdir())  # nothing was built
