"""A small fleet for rollout tests: customers of one component `app` (a Node server under real PM2, a health URL,
a migrate hook) on SQLite or PostgreSQL, installed at release 1.0; releases 1.1 (good) and 1.2 (its migration
changes the database, then fails). Light on purpose: a fleet of customers upgrades in seconds, not minutes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import sys
import uuid
from pathlib import Path

import pytest

from engines import ecosystem, procman
from tests.conftest import free_ports, kill_pm2_under, require
from tests.upgrade_fixtures import write_zip

APP_JS = r"""
const http = require("http");
const fs = require("fs");
const version = fs.readFileSync(__dirname + "/VERSION", "utf8").trim();
http.createServer((req, res) => {
  if (req.url === "/health") return res.end("ok");
  if (req.url === "/version") return res.end(version);
  res.statusCode = 404; res.end("no");
}).listen(Number(process.env.PORT), "127.0.0.1");
"""

# 1.1.0 adds a table; 1.2.0 adds one too, then fails (so does any version for a customer whose .env sets
# FAIL_MIGRATE): the upgrade must put the database back.
MIGRATE_PY = r"""
import os, sqlite3, sys
version = open("VERSION").read().strip()
url = os.environ["DATABASE_URL"]
sql = {"1.1.0": "CREATE TABLE IF NOT EXISTS v11 (id int)", "1.2.0": "CREATE TABLE IF NOT EXISTS v12 (id int)"}
if version in sql:
    if url.startswith("sqlite:///"):
        con = sqlite3.connect(url[len("sqlite://"):])
        con.execute(sql[version]); con.execute("UPDATE items SET note = note || ' " + version + "'"); con.commit()
    else:
        import psycopg
        with psycopg.connect(url, autocommit=True) as con:
            con.execute(sql[version]); con.execute("UPDATE items SET note = note || ' " + version + "'")
    print("migrated to", version, flush=True)
if version == "1.2.0" or os.environ.get("FAIL_MIGRATE"):
    print("migration " + version + " failed half way", file=sys.stderr)
    sys.exit(1)
"""

# Run once the new release answers: it asks the copy under test and the live service for their versions and
# writes down what it saw (blue-green: the new one beside the old, still live).
SMOKE_PY = r"""
import os, urllib.request
def version(base):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(base + "version", timeout=5).read().decode()
seen = f"smoke {version(os.environ['KASA_SMOKE_URL'])} beside live {version(os.environ['KASA_LIVE_URL'])}"
open("smoke-seen.txt", "a").write(seen + "\n")
print(seen)
if os.environ.get("FAIL_SMOKE"):
    raise SystemExit("smoke test failed: the new release answers wrong")
"""

VERSIONS = ("1.0.0", "1.1.0", "1.2.0")


def app_files(version: str) -> dict[str, str]:
    return {"server.js": APP_JS, "migrate.py": MIGRATE_PY, "smoke.py": SMOKE_PY, "VERSION": f"{version}\n",
            "package.json": json.dumps({"name": "app", "version": version, "main": "server.js"}),
            ".env.example": "PORT=\nDATABASE_URL=\n"}


def sync_fleet_releases(folder: Path) -> dict:
    from releases.models import Release
    from releases.services import release_sync

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for v in VERSIONS:
        write_zip(folder / f"app-{v}.zip", "app", app_files(v))
        entries.append({"version": v, "file": f"app-{v}.zip", "hooks": {"migrate": [sys.executable, "migrate.py"],
                                                                        "smoke": [sys.executable, "smoke.py"]}})
    matrix = [{"release": v.rsplit(".", 1)[0], "app": v} for v in VERSIONS]
    (folder / "releases.json").write_text(json.dumps({"app": entries, "compatMatrix": matrix}))
    release_sync(folder)
    return {r.name: r for r in Release.objects.all()}


def make_fleet_customer(team, root: Path, *, port: int, pg: dict | None = None, tags: str = ""):
    """A customer at 1.0 with its app running under PM2 (its own PM2 home), SQLite unless `pg` is given."""
    from customers.models import Customer, Service
    from customers.services import customer_create
    from engines import dburl

    app = root / "app"
    app.mkdir(parents=True)
    for name, text in app_files("1.0.0").items():
        (app / name).write_text(text)
    if pg is None:
        (root / "data").mkdir()
        db_path = root / "data" / "app.sqlite3"
        con = sqlite3.connect(db_path)
        con.execute("CREATE TABLE items (id integer PRIMARY KEY, note text)")
        con.executemany("INSERT INTO items (note) VALUES (?)", [(f"item {i}",) for i in range(20)])
        con.commit()
        con.close()
        url = f"sqlite:///{db_path}"
    else:
        import psycopg

        with psycopg.connect(pg["url"], autocommit=True) as con:
            con.execute("CREATE TABLE items (id serial PRIMARY KEY, note text)")
            con.execute("INSERT INTO items (note) SELECT 'item ' || g FROM generate_series(1, 20) g")
        url = pg["url"]
    env = app / ".env"
    env.write_text(f"PORT={port}\nDATABASE_URL={url}\n")
    os.chmod(env, 0o600)
    customer = customer_create(domain=f"f{uuid.uuid4().hex[:8]}.example.com", root=str(root), team=team,
                               services=[("app", "app")], databases=[("main", dburl.parse(url))],
                               versions={"app": "1.0.0"})
    Customer.objects.filter(pk=customer.pk).update(tags=tags)
    name = f"fl-{uuid.uuid4().hex[:8]}"
    Service.objects.filter(customer=customer, name="app").update(
        process_manager="pm2", app_name=name, health_url=f"http://127.0.0.1:{port}/health")
    eco = root / ecosystem.FILE_NAME
    ecosystem.write(eco, [ecosystem.app(name, cwd=app, folder=app, env={"PORT": str(port), "DATABASE_URL": url})])
    spec = procman.ServiceSpec(name="app", folder=str(app), manager="pm2", app_name=name, ecosystem=str(eco),
                               root=str(root), pm2_home=procman.pm2_home_for(root))
    procman.Pm2Manager(settle=0.3).start(spec)
    customer.refresh_from_db()
    customer.port = port
    return customer


def files_state(root: Path) -> dict[str, str]:
    """Every file's sha256 (SQLite files too: bytes, not rows) and every link's target; PM2's runtime left out."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != procman.PM2_HOME_NAME]
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                state[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                state[rel] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                state[rel] = "dir"
    return state


# --- the `fleet` fixture (tests/test_rollouts.py, tests/test_browser_rollouts.py import it) -------------------
@pytest.fixture
def fleet(transactional_db, team, settings, tmp_path):
    """make(sqlite=N, pg=M, tags={i: "canary"}) -> customers at 1.0, running; `releases` {name: Release}."""
    from engines import procman

    require(os.path.exists(procman.pm2_binary()), "PM2 from npm (make install)")
    settings.KASA_HEALTH_STREAK, settings.KASA_HEALTH_INTERVAL, settings.KASA_HEALTH_TIMEOUT = 1, 0.2, 8
    settings.KASA_PM2_SETTLE, settings.KASA_ROLLOUT_HEALTH_TIMEOUT = 0.3, 3
    made, databases = [], []

    class Fleet:
        releases = sync_fleet_releases(tmp_path / "pkg")

        def make(self, *, sqlite: int = 0, pg: int = 0, tags: dict | None = None):
            out = []
            for i in range(sqlite + pg):
                db = _pg_database(databases) if i >= sqlite else None
                root = Path(settings.KASA_CUSTOMERS_ROOT) / f"fl-{os.urandom(3).hex()}"
                c = make_fleet_customer(team, root, port=free_ports(1), pg=db, tags=(tags or {}).get(i, ""))
                c.pg = db
                made.append(c)
                out.append(c)
            return out

    yield Fleet()
    for c in made:
        kill_pm2_under(c.root)
        shutil.rmtree(c.root, ignore_errors=True)
    for name in databases:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        _pg_admin(f'DROP ROLE IF EXISTS "{name}"')


def _pg_admin(sql: str) -> None:
    import psycopg

    from tests.conftest import PG_ADMIN, PG_HOST, PG_PORT

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, dbname="postgres", autocommit=True) as con:
        con.execute(sql)


def _pg_database(created: list) -> dict:
    from tests.conftest import PG_HOST, PG_PORT

    name, password = f"kasa_t_{os.urandom(5).hex()}", f"pw-{os.urandom(8).hex()}"
    _pg_admin(f"CREATE ROLE \"{name}\" LOGIN CREATEDB PASSWORD '{password}'")
    _pg_admin(f'CREATE DATABASE "{name}" OWNER "{name}"')
    created.append(name)
    return {"host": PG_HOST, "port": PG_PORT, "name": name, "user": name, "password": password,
            "url": f"postgresql://{name}:{password}@{PG_HOST}:{PG_PORT}/{name}"}
