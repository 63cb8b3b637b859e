"""Test releases and a running customer for the upgrade tests.

A release package with two components:
- backend: a small node HTTP server run by a real PM2 (answers /health, /version from its VERSION file and
  /env with its environment), a `migrate` hook (the venv's Python with psycopg) that changes the real
  PostgreSQL schema, and a `build` hook that writes dist/;
- store: static files (process manager "none").

Failures are injected the way a broken release would fail, chosen per customer by a BREAK key in the
backend's live .env (`BREAK=migrate@2.5.0`): the 2.5.0 migrate changes the schema and then exits 1, its
build exits 1, its server exits at start, or its /health answers 500. The old release ignores it.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
import zipfile
from pathlib import Path

from engines import ecosystem, procman

VERSIONS = ("2.4.0", "2.5.0", "2.6.0")

SERVER_JS = r"""
const http = require("http");
const fs = require("fs");
const version = fs.readFileSync(__dirname + "/VERSION", "utf8").trim();
const brk = process.env.BREAK || "";
if (brk === "start@" + version) { console.error("refusing to start: BREAK=" + brk); process.exit(3); }
http.createServer((req, res) => {
  if (req.url === "/health") {
    res.statusCode = brk === "health@" + version ? 500 : 200;
    return res.end(res.statusCode === 200 ? "ok" : "broken");
  }
  if (req.url === "/version") return res.end(version);
  if (req.url === "/env") return res.end(JSON.stringify(process.env));
  res.statusCode = 404; res.end("no");
}).listen(Number(process.env.PORT), "127.0.0.1");
"""

# Each version's migration (run by the venv's Python), on PostgreSQL (psycopg) or MariaDB (the mariadb client).
# 2.5.0 adds a column and a table and changes rows.
MIGRATE_PY = r"""
import os, shutil, subprocess, sys, tempfile
from urllib.parse import unquote, urlsplit
version = open("VERSION").read().strip()
url = os.environ["DATABASE_URL"]
steps = {
    "2.5.0": ["ALTER TABLE orders ADD COLUMN exported boolean NOT NULL DEFAULT false",
              "CREATE TABLE exports (id serial PRIMARY KEY, note text)",
              "INSERT INTO exports (note) VALUES ('first export')",
              "UPDATE orders SET note = CONCAT(note, ' (2.5)')"],
    "2.6.0": ["CREATE TABLE IF NOT EXISTS audit26 (id int)"],
}
if url.startswith("mysql://"):
    u = urlsplit(url)
    quoted = lambda v: '"' + unquote(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    with tempfile.NamedTemporaryFile("w", suffix=".cnf") as cnf:
        cnf.write(f"[client]\nhost={u.hostname}\nport={u.port}\nuser={quoted(u.username)}\n"
                  f"password={quoted(u.password)}\nprotocol=TCP\n")
        cnf.flush()
        client = shutil.which("mariadb") or "/usr/bin/mariadb"
        for sql in steps.get(version, []):
            subprocess.run([client, f"--defaults-extra-file={cnf.name}", "--database", u.path[1:], "-e", sql],
                           check=True)
            print("applied:", sql, flush=True)
else:
    import psycopg
    with psycopg.connect(url, autocommit=True) as con:
        for sql in steps.get(version, []):
            con.execute(sql)
            print("applied:", sql, flush=True)
if os.environ.get("BREAK") == "migrate@" + version:
    print("migration half done, then failing", file=sys.stderr)
    sys.exit(1)
if os.environ.get("BREAK") == "hang@" + version:  # the worker is killed meanwhile
    import time
    print("hanging", flush=True)
    time.sleep(30)
"""

BUILD_PY = r"""
import os, sys
version = open("VERSION").read().strip()
if os.environ.get("BREAK") == "build@" + version:
    print("build failed: out of coffee", file=sys.stderr)
    sys.exit(1)
os.makedirs("dist", exist_ok=True)
open("dist/index.html", "w").write("<h1>backend " + version + "</h1>\n")
print("built", version)
"""

ENV_EXAMPLES = {
    "2.4.0": "PORT=\nDATABASE_URL=\nAPI_SECRET=\nOLD_SETTING=1\n",
    # 2.5.0 drops OLD_SETTING, adds EXPORT_DIR (a default) and keeps the three required keys.
    "2.5.0": "# required\nPORT=\nDATABASE_URL=\nAPI_SECRET=\n# new in 2.5\nEXPORT_DIR=exports\n",
    "2.6.0": "PORT=\nDATABASE_URL=\nAPI_SECRET=\nEXPORT_DIR=exports\nCACHE_TTL=60\n",
}


def backend_files(version: str) -> dict[str, str]:
    return {
        "package.json": json.dumps({"name": "backend", "version": version, "main": "server.js"}),
        "server.js": SERVER_JS,
        "migrate.py": MIGRATE_PY,
        "build.py": BUILD_PY,
        "VERSION": f"{version}\n",
        ".env.example": ENV_EXAMPLES[version],
    }


def store_files(version: str) -> dict[str, str]:
    return {"index.html": f"<h1>store {version}</h1>\n", "VERSION": f"{version}\n"}


def write_zip(path: Path, component: str, files: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in sorted(files.items()):
            info = zipfile.ZipInfo(f"{component}/{name}", date_time=(2025, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            zf.writestr(info, text)


def build_package(folder: Path, *, break_requires: bool = False) -> Path:
    """releases.json and the zips; releases "2.4", "2.5" and "2.6" (store stays at 2.5.0 in 2.6)."""
    folder.mkdir(parents=True, exist_ok=True)
    hooks = {"migrate": [sys.executable, "migrate.py"], "build": [sys.executable, "build.py"]}
    data: dict = {"backend": [], "store": []}
    for v in VERSIONS:
        write_zip(folder / f"backend-{v}.zip", "backend", backend_files(v))
        entry = {"version": v, "file": f"backend-{v}.zip", "hooks": hooks}
        if v != "2.4.0":
            entry["requires"] = {"from": ">=2.4.0 <3"}
        data["backend"].append(entry)
    for v in VERSIONS[:2]:
        write_zip(folder / f"store-{v}.zip", "store", store_files(v))
        data["store"].append({"version": v, "file": f"store-{v}.zip"})
    data["compatMatrix"] = [
        {"release": "2.4", "backend": "2.4.0", "store": "2.4.0"},
        {"release": "2.5", "backend": "2.5.0", "store": "2.5.0"},
        {"release": "2.6", "backend": "2.6.0", "store": "2.5.0"},
    ]
    (folder / "releases.json").write_text(json.dumps(data, indent=2))
    return folder


def sync_releases(tmp_path: Path) -> dict:
    """Build and import the package; {name: Release}."""
    from releases.models import Release
    from releases.services import release_sync

    release_sync(build_package(tmp_path / "pkg"))
    return {r.name: r for r in Release.objects.all()}


def lay_out_customer(root: Path, *, port: int, pg_url: str, extra_env: str = "") -> None:
    """The customer as installed by hand at 2.4.0: plain folders, a .env per service."""
    backend, store = root / "backend", root / "store"
    backend.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    for name, text in backend_files("2.4.0").items():
        (backend / name).write_text(text)
    env = backend / ".env"
    env.write_text(f"# backend settings\nPORT={port}\nDATABASE_URL={pg_url}\nAPI_SECRET=s3cr3t-{uuid.uuid4().hex[:8]}\n"
                   f"OLD_SETTING=1\n{extra_env}")
    os.chmod(env, 0o600)
    for name, text in store_files("2.4.0").items():
        (store / name).write_text(text)


def make_running_customer(team, root: Path, pg: dict, *, extra_env: str = "", versions=None):
    """A customer at 2.4.0 (backend under PM2, answering its health URL) with its PostgreSQL database.
    versions={}: a customer to install, with only the backend's .env in place."""
    from customers.models import Service
    from customers.services import customer_create
    from engines import dburl

    port = _free_port()
    if versions == {}:
        (root / "backend").mkdir(parents=True)
        (root / "backend" / ".env").write_text(f"PORT={port}\nDATABASE_URL={pg['url']}\nAPI_SECRET=install-1\n")
    else:
        lay_out_customer(root, port=port, pg_url=pg["url"], extra_env=extra_env)
    customer = customer_create(
        domain=f"{uuid.uuid4().hex[:8]}.example.com", root=str(root), team=team,
        services=[("backend", "backend"), ("store", "store")], databases=[("main", dburl.parse(pg["url"]))],
        versions={"backend": "2.4.0", "store": "2.4.0"} if versions is None else versions)
    app = f"up-{uuid.uuid4().hex[:8]}"
    Service.objects.filter(customer=customer, name="backend").update(
        process_manager="pm2", app_name=app, health_url=f"http://127.0.0.1:{port}/health")
    customer.port, customer.app = port, app
    if versions is None or versions:
        start_as_installed(customer)
    return customer


def start_as_installed(customer) -> None:
    """Start the backend as Kasa would have after an install: from Kasa's ecosystem file at the root."""
    root = customer.root_path()
    svc = customer.services.get(name="backend")
    eco = root / ecosystem.FILE_NAME
    ecosystem.write(eco, [ecosystem.app(svc.app_name, cwd=root / "backend", folder=root / "backend",
                                        env=_env(root / "backend" / ".env"))])
    spec = procman.ServiceSpec(name="backend", folder=str(root / "backend"), manager="pm2", app_name=svc.app_name,
                               ecosystem=str(eco), root=str(root), pm2_home=procman.pm2_home_for(root))
    procman.Pm2Manager(settle=0.5).start(spec)


def stop_app(customer) -> None:
    """Stop the customer's PM2 daemon and its apps (test teardown)."""
    from tests.conftest import kill_pm2_under

    kill_pm2_under(customer.root)


def _env(path: Path) -> dict[str, str]:
    from engines import envfile

    return envfile.read(path)


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


def seed_database(pg: dict) -> None:
    import psycopg

    with psycopg.connect(pg["url"], autocommit=True) as con:
        con.execute("CREATE TABLE orders (id serial PRIMARY KEY, note text)")
        con.execute("INSERT INTO orders (note) SELECT 'order ' || g FROM generate_series(1, 50) g")


def one_component_release(folder: Path, component: str, files: dict[str, str], *, version: str = "1.0.0",
                          release: str = "1.0", hooks: dict | None = None):
    """Build and import a release `release` of one component (its zip holds `files`); the Release."""
    from releases.models import Release
    from releases.services import release_sync

    folder.mkdir(parents=True, exist_ok=True)
    write_zip(folder / f"{component}-{version}.zip", component, files)
    entry = {"version": version, "file": f"{component}-{version}.zip", **({"hooks": hooks} if hooks else {})}
    (folder / "releases.json").write_text(json.dumps({component: [entry],
                                                      "compatMatrix": [{"release": release, component: version}]}))
    release_sync(folder)
    return Release.objects.get(name=release)
def seed_mysql(m: dict) -> dict:
    """The same orders table in a MariaDB database; returns the database as make_running_customer takes it."""
    from urllib.parse import quote

    from tests.conftest import mysql_admin

    mysql_admin(f"CREATE TABLE `{m['name']}`.orders (id INT AUTO_INCREMENT PRIMARY KEY, note TEXT); "
                f"INSERT INTO `{m['name']}`.orders (note) WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL "
                "SELECT n + 1 FROM s WHERE n < 50) SELECT CONCAT('order ', n) FROM s;")
    return {**m, "url": f"mysql://{m['user']}:{quote(m['password'], safe='')}@{m['host']}:{m['port']}/{m['name']}"}
