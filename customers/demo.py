"""A demo customer made of real parts, for `make run` and the browser tests (README: "The demo, end to end").

A folder with backend/admin/store services (a tiny Node HTTP server each, a
.env, a logs folder), a PM2 ecosystem file, and a real database: PostgreSQL
when one is reachable (KASA_DEMO_POSTGRES_URL, default the local server as
`postgres`), SQLite inside the root otherwise.

As root (`make run` on a bare machine), the demo's code runs as its own OS
user `kasa-demo` (a system user without login, created here), who owns the
demo's service folders, in a root that stays Kasa's (engines.ownership);
otherwise it falls back to Kasa's own user, as development may.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import sqlite3
import subprocess
from pathlib import Path

from django.conf import settings

from engines import dburl, ownership, procman, runas

from . import runtime
from .models import Customer, Team, run_as_identity
from .services import customer_create

DEMO_DOMAIN = "demo.localhost"
DEMO_USER = "kasa-demo"
SERVICES = {"backend": 4101, "admin": 4102, "store": 4103}  # default ports (KASA_DEMO_PORT moves them)
DATA = "data"  # the SQLite demo's database folder: a service of its own (no process), which upgrades never replace


def service_ports() -> dict[str, int]:
    """Each demo service's port: KASA_DEMO_PORT (default 4101) for the backend, the next two for admin and store."""
    base = int(os.environ.get("KASA_DEMO_PORT") or 4101)
    return {name: base + i for i, name in enumerate(SERVICES)}

SERVER_JS = """// Demo service: answers /health with 200 and / with its name and version.
const http = require("http");
const port = Number(process.env.PORT || 3000);
http.createServer((req, res) => {
  if (req.url === "/health") { res.writeHead(200); return res.end("ok"); }
  res.writeHead(200, {"content-type": "text/plain"});
  res.end(`${process.env.SERVICE_NAME} ${process.env.APP_VERSION}\\n`);
}).listen(port, "127.0.0.1");
"""


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _make_folder(root: Path, db_env: dict[str, str]) -> None:
    apps = []
    for name, port in service_ports().items():
        folder = root / name
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        _write(folder / "server.js", SERVER_JS)
        _write(folder / "package.json", f'{{"name": "demo-{name}", "version": "1.0.0", "main": "server.js"}}\n')
        env_lines = [f"SERVICE_NAME={name}", "APP_VERSION=1.0.0", f"PORT={port}"]
        if name == "backend":
            env_lines += [f"{k}={v}" for k, v in db_env.items()]
        _write(folder / ".env", "\n".join(env_lines) + "\n", 0o600)
        _write(folder / ".env.example", "\n".join(line.split("=")[0] + "=" for line in env_lines) + "\n")
        apps.append(
            f'    {{ name: "demo-{name}", cwd: "{folder}", script: "server.js", '
            f'env: {{ PORT: "{port}", SERVICE_NAME: "{name}", APP_VERSION: "1.0.0" }}, '
            f'out_file: "{folder}/logs/out.log", error_file: "{folder}/logs/error.log" }},'
        )
    _write(root / "ecosystem.config.js", "module.exports = {\n  apps: [\n" + "\n".join(apps) + "\n  ],\n};\n")


def _try_postgres() -> dburl.DatabaseURL | None:
    """Create role and database kasa_demo on a reachable PostgreSQL, or return None."""
    admin_url = os.environ.get("KASA_DEMO_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        import psycopg  # here, inside the try: no usable psycopg means the SQLite demo, not a failed setup
        from psycopg import sql

        admin = dburl.parse(admin_url)
        conninfo = dict(host=admin.host, port=admin.port, user=admin.user, password=admin.password or None,
                        dbname=admin.name, connect_timeout=2)
        password = secrets.token_urlsafe(18)
        with psycopg.connect(**conninfo, autocommit=True) as con:
            exists = con.execute("SELECT 1 FROM pg_roles WHERE rolname = 'kasa_demo'").fetchone()
            stmt = "ALTER ROLE kasa_demo LOGIN PASSWORD {}" if exists else "CREATE ROLE kasa_demo LOGIN PASSWORD {}"
            con.execute(sql.SQL(stmt).format(sql.Literal(password)))
            if not con.execute("SELECT 1 FROM pg_database WHERE datname = 'kasa_demo'").fetchone():
                con.execute("CREATE DATABASE kasa_demo OWNER kasa_demo")
        with psycopg.connect(**{**conninfo, "dbname": "kasa_demo", "user": "kasa_demo", "password": password}) as con:
            con.execute("CREATE TABLE IF NOT EXISTS products (id serial PRIMARY KEY, name text NOT NULL, "
                        "price_cents integer NOT NULL)")
            if not con.execute("SELECT 1 FROM products LIMIT 1").fetchone():
                con.execute("INSERT INTO products (name, price_cents) SELECT 'product ' || g, g * 100 "
                            "FROM generate_series(1, 50) g")
        return dburl.DatabaseURL(engine="postgresql", host=admin.host, port=admin.port, name="kasa_demo",
                                 user="kasa_demo", password=password)
    except Exception:
        return None


def _make_sqlite(path: Path) -> dburl.DatabaseURL:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    with con:
        con.execute("CREATE TABLE IF NOT EXISTS products (id INTEGER PRIMARY KEY, name TEXT, price_cents INTEGER)")
        if not con.execute("SELECT 1 FROM products LIMIT 1").fetchone():
            con.executemany("INSERT INTO products (name, price_cents) VALUES (?, ?)",
                            [(f"product {i}", i * 100) for i in range(1, 51)])
    con.close()
    return dburl.DatabaseURL(engine="sqlite", path=str(path))


def demo_user() -> runas.Identity | None:
    """As root: the demo's own OS user, created when missing (system user, own group, no home, no login).
    None when we are not root (the development fallback)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(DEMO_USER)
        missing = False
    except KeyError:
        missing = True
    if missing:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        done = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/usr/sbin/nologin", DEMO_USER], capture_output=True, text=True, timeout=60,
                              check=False)
        if done.returncode not in (0, 9):  # 9: created meanwhile
            raise RuntimeError(f"useradd {DEMO_USER}: {done.stderr.strip() or done.returncode}")
    return run_as_identity(DEMO_USER)


def _hand_over(root: Path, folders: list[str]) -> tuple[str, str]:
    """Give the demo's service folders and ecosystem file to kasa-demo, in a root that stays Kasa's (root, group
    kasa-demo, 0750: engines.ownership). Returns (run_as to set, "" for Kasa's own user; a note saying why not),
    after checking that user can reach the folder and PM2 (a checkout under a closed folder such as /root
    cannot)."""
    identity = demo_user()
    if identity is None:
        return "", "not root: the demo's code runs as Kasa's own user (development fallback)"
    ownership.hand_over(root, identity, service_paths=folders, files=["ecosystem.config.js"])
    pm2 = os.path.realpath(procman.pm2_binary())
    if not runas.may_access(root, identity, os.R_OK | os.X_OK):
        return "", f"{identity} cannot reach {root}: the demo's code runs as Kasa's own user"
    if os.path.exists(pm2) and not runas.may_access(pm2, identity, os.R_OK | os.X_OK):
        return "", f"{identity} cannot run {pm2}: the demo's code runs as Kasa's own user"
    return identity.user, (f"the demo's code runs as {identity}, who owns its services' folders in {root} (Kasa's, "
                           f"group {identity.user}, 0750)")


def demo_seed(*, prefer_postgres: bool = True) -> tuple[Customer, bool]:
    """Create the demo customer if missing. Returns (customer, created)."""
    existing = Customer.objects.filter(domain=DEMO_DOMAIN).first()
    if existing:
        return existing, False
    root = Path(settings.KASA_CUSTOMERS_ROOT) / DEMO_DOMAIN
    root.mkdir(parents=True, exist_ok=True)
    db = _try_postgres() if prefer_postgres else None
    folders = list(SERVICES)
    if db is None:
        # Beside the services, not inside one: an upgrade replaces a service's folder with the release's.
        db = _make_sqlite(root / DATA / "demo.sqlite3")
        db_env = {"DATABASE_URL": f"sqlite:///{db.path}"}
        folders.append(DATA)
    else:
        db_env = {"DATABASE_URL": f"postgresql://{db.user}:{db.password}@{db.host}:{db.port}/{db.name}"}
    _make_folder(root, db_env)
    team, _ = Team.objects.get_or_create(name="Demo")
    customer = customer_create(
        domain=DEMO_DOMAIN, root=str(root), name="Demo shop", team=team,
        services=[(n, n) for n in folders], databases=[("main", db)],
        versions={n: "1.0.0" for n in SERVICES}, via="system",
    )
    ports = service_ports()
    for svc in customer.services.filter(name__in=list(SERVICES)):
        svc.process_manager = svc.ProcessManager.PM2
        svc.app_name = f"demo-{svc.name}"
        svc.health_url = f"http://127.0.0.1:{ports[svc.name]}/health"
        svc.save(update_fields=["process_manager", "app_name", "health_url"])
    customer.run_as, customer.demo_note = _hand_over(root, folders)
    if customer.run_as:
        customer.save(update_fields=["run_as", "updated_at"])
    return customer, True


def demo_start(customer: Customer) -> str:
    """Start the demo's services under PM2 (as its run_as user) unless every health URL answers already; they
    keep running when Kasa stops (README: "The demo, end to end"). Returns a note for kasa_setup's output."""
    specs = runtime.service_specs(customer)
    checked = [s.name for s in specs if s.health_url]
    if checked and sorted(checked) == runtime.healthy_now(specs):
        return f"its services answer already ({', '.join(checked)})"
    try:
        procman.start_all(specs, runtime.managers())
    except procman.ProcessError as exc:
        return f"its services could not be started: {exc}"
    urls = ", ".join(s.health_url for s in specs if s.health_url)
    return f"its services run under PM2 ({urls})"
