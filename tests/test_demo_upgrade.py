"""The demo of `make run` with the documented example release (docs/releases-example), end to end: set up as
`kasa_setup` does (its services started under a real PM2, as the demo's own user when Kasa runs as root), the
example synced, the demo upgraded through both example versions and rolled back, each step ending with every
service answering its health URL. And the preflight that refuses, before anything changes, a release Kasa would
not know how to start."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
from django.conf import settings

from tests.conftest import PG_HOST, PG_PORT, free_ports, kill_pm2_under, port_open, require
from tests.restore_helpers import tree_state

pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLE = Path(settings.BASE_DIR) / "docs" / "releases-example"


def cli(*args) -> tuple[int, dict]:
    from django.core.management import CommandError, call_command

    out = io.StringIO()
    try:
        call_command(*args, "--json", stdout=out, stderr=io.StringIO())
        code = 0
    except CommandError as exc:
        code = exc.returncode
    text = out.getvalue().strip()
    return code, (json.loads(text) if text else {})


def get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except OSError as exc:
        return 0, str(exc)


def build_example(out: Path) -> Path:
    subprocess.run([sys.executable, str(EXAMPLE / "build.py"), str(out)], check=True, capture_output=True,
                   timeout=60)
    shutil.copy(EXAMPLE / "releases.json", out / "releases.json")
    return out / "releases.json"


@contextlib.contextmanager
def kasa_demo_database():
    """The demo's PostgreSQL role and database `kasa_demo` are left as they were found."""
    import psycopg
    from psycopg import sql

    require(port_open(PG_HOST, PG_PORT), "PostgreSQL server")
    admin = dict(host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres", autocommit=True)
    with psycopg.connect(**admin) as con:
        role = con.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'kasa_demo'").fetchone()
        had_db = con.execute("SELECT 1 FROM pg_database WHERE datname = 'kasa_demo'").fetchone() is not None
    try:
        yield
    finally:
        with psycopg.connect(**admin) as con:
            if not had_db:
                con.execute("DROP DATABASE IF EXISTS kasa_demo WITH (FORCE)")
            if role is None:
                con.execute("DROP ROLE IF EXISTS kasa_demo")
            elif role[0]:
                con.execute(sql.SQL("ALTER ROLE kasa_demo PASSWORD {}").format(sql.Literal(role[0])))


@contextlib.contextmanager
def make_demo(settings, monkeypatch, *, sqlite: bool = True):
    """The demo customer as `make run` sets it up (`kasa_setup`: SQLite on a bare machine, else PostgreSQL), on
    free ports, its services running; its PM2 daemon and folder are removed afterwards."""
    from customers.demo import DEMO_DOMAIN
    from customers.models import Customer
    from engines import procman

    require(shutil.which("node") is not None and os.path.exists(procman.pm2_binary()), "Node.js and PM2")
    settings.KASA_HEALTH_STREAK = 2
    settings.KASA_HEALTH_INTERVAL = 0.2
    monkeypatch.setenv("KASA_DEMO_PORT", str(free_ports()))
    monkeypatch.delenv("KASA_DEMO_POSTGRES_URL", raising=False)
    folder = Path(settings.KASA_CUSTOMERS_ROOT) / DEMO_DOMAIN
    kill_pm2_under(folder)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        code, doc = cli("kasa_setup", *(["--sqlite-demo"] if sqlite else []))
        assert code == 0, doc
        assert doc["demo"]["created"] and "run under PM2" in doc["demo"]["services"], doc["demo"]
        assert doc["demo"]["database"].startswith("sqlite:" if sqlite else "postgresql:"), doc["demo"]
        yield Customer.objects.get(domain=DEMO_DOMAIN)
    finally:
        kill_pm2_under(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def demo(transactional_db, monkeypatch, settings):
    """The bare machine's demo (SQLite)."""
    with make_demo(settings, monkeypatch) as customer:
        yield customer


@pytest.fixture(params=["sqlite", "postgresql"])
def any_demo(request, transactional_db, monkeypatch, settings):
    """The demo on SQLite (a bare machine) and on PostgreSQL (role kasa_demo without CREATEDB)."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            stack.enter_context(kasa_demo_database())
        yield stack.enter_context(make_demo(settings, monkeypatch, sqlite=request.param == "sqlite"))


def answers(customer) -> dict[str, tuple[int, str]]:
    """service -> (status, body) of its health URL, and of its home page next to it."""
    out = {}
    for svc in customer.services.exclude(health_url=""):
        out[svc.name] = get(svc.health_url), get(svc.health_url.removesuffix("health"))
    return out


def assert_serving(customer, versions: dict[str, str]) -> None:
    got = answers(customer)
    assert set(got) == {"backend", "admin", "store"}, got
    for name, (health, home) in got.items():
        assert health == (200, "ok"), (name, health)
        assert home[0] == 200 and versions[name] in home[1], (name, home)


def test_the_demo_upgrades_through_the_example_releases_and_rolls_back_with_its_services_healthy(any_demo,
                                                                                                   tmp_path):
    from customers.models import Customer
    from releases.services import release_sync
    from upgrades.models import Upgrade

    customer = any_demo
    root = customer.root_path()
    # Started by kasa_setup, under PM2, answering on their health URLs (the demo's own servers, 1.0.0).
    assert_serving(customer, {"backend": "1.0.0", "admin": "1.0.0", "store": "1.0.0"})
    if os.geteuid() == 0 and customer.run_as:
        import pwd

        uid = pwd.getpwnam(customer.run_as).pw_uid
        assert (root / ".kasa-pm2").stat().st_uid == uid  # PM2's daemon and home are the demo user's

    release_sync(build_example(tmp_path / "example"))

    code, doc = cli("upgrade", customer.domain, "--to", "2.4.0")
    assert code == 0 and doc["status"] == "succeeded", doc.get("error") or doc
    assert doc["from"] == {"backend": "1.0.0", "admin": "1.0.0", "store": "1.0.0"}
    assert_serving(customer, {"backend": "backend 2.4.0", "admin": "admin 2.4.0", "store": "<h1>store</h1>"})
    assert os.readlink(root / "admin") == "releases/2.4.0/admin"
    if customer.databases.get().engine == "sqlite":
        assert (root / "data" / "demo.sqlite3").is_file()  # the SQLite database stays beside the services

    code, doc = cli("upgrade", customer.domain, "--to", "2.5 spring")
    assert code == 0 and doc["status"] == "succeeded", doc.get("error") or doc
    assert_serving(customer, {"backend": "backend 2.5.0", "admin": "admin 2.5.0", "store": "<h1>store</h1>"})
    assert Customer.objects.get(pk=customer.pk).versions == {"backend": "2.5.0", "admin": "2.5.0", "store": "2.5.0"}

    code, doc = cli("rollback", customer.domain)
    assert code == 0 and doc["status"] == "succeeded", doc.get("error") or doc
    assert_serving(customer, {"backend": "backend 2.4.0", "admin": "admin 2.4.0", "store": "<h1>store</h1>"})
    assert Customer.objects.get(pk=customer.pk).versions == {"backend": "2.4.0", "admin": "2.4.0", "store": "2.4.0"}
    assert os.readlink(root / "backend") == "releases/2.4.0/backend"
    assert not Upgrade.objects.filter(customer=customer, status__in=["failed", "rolled_back", "quarantined"]).exists()


def _unstartable_release(folder: Path) -> Path:
    """Release 3.0: an admin of static files only (no package.json, no server.js), which Kasa cannot start."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "admin-3.0.0.zip", "w") as zf:
        zf.writestr("admin/index.html", "<h1>admin</h1>\n")
        zf.writestr("admin/package.json", json.dumps({"name": "admin", "scripts": {"build": "vite build"}}))
    (folder / "releases.json").write_text(json.dumps({
        "admin": [{"version": "3.0.0", "file": "admin-3.0.0.zip"}],
        "compatMatrix": [{"release": "3.0", "admin": "3.0.0"}]}))
    return folder / "releases.json"


def test_the_preflight_refuses_a_release_kasa_would_not_know_how_to_start_before_anything_changes(demo, tmp_path):
    from backups.models import Backup
    from releases.services import release_sync
    from upgrades.models import Upgrade

    customer = demo
    root = customer.root_path()
    release_sync(_unstartable_release(tmp_path / "pkg"))
    before = tree_state(root)

    code, doc = cli("upgrade", customer.domain, "--to", "3.0", "--dry-run")
    assert code == 1, doc
    start = next(c for c in doc["preflight"]["checks"] if c["name"] == "start")
    assert not start["ok"] and "cannot tell how to start the app in admin 3.0.0" in start["detail"], start

    code, doc = cli("upgrade", customer.domain, "--to", "3.0")
    assert code == 1 and doc["status"] == "failed", doc
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [("preflight", "failed")]
    assert "cannot tell how to start" in doc["error"] and "nothing was touched" in doc["error"]
    assert tree_state(root) == before
    assert not Backup.objects.filter(customer=customer).exists()
    assert not Upgrade.objects.filter(customer=customer, status="succeeded").exists()
    assert_serving(customer, {"backend": "1.0.0", "admin": "1.0.0", "store": "1.0.0"})


def test_the_preflight_accepts_a_release_started_by_the_services_start_command(demo, tmp_path):
    from releases.services import release_sync

    customer = demo
    admin = customer.services.get(name="admin")
    admin.start_command = ["node", "-e", "require('http').createServer((q, s) => s.end('ok')).listen(process.env.PORT)"]
    admin.save(update_fields=["start_command"])
    release_sync(_unstartable_release(tmp_path / "pkg"))
    code, doc = cli("upgrade", customer.domain, "--to", "3.0", "--dry-run")
    start = next(c for c in doc["preflight"]["checks"] if c["name"] == "start")
    assert start["ok"] and "admin: node -e" in start["detail"], doc


@pytest.mark.parametrize("files, expected", [
    ({"package.json": '{"main": "app/start.js"}', "app/start.js": ""}, "app/start.js"),
    ({"package.json": '{"main": "missing.js", "scripts": {"start": "node srv.js --x"}}', "srv.js": ""}, "srv.js"),
    ({"package.json": '{"scripts": {"build": "vite build"}}', "index.js": ""}, "index.js"),
    ({"main.js": ""}, "main.js"),
    ({"index.html": "", "package.json": '{"scripts": {"start": "vite"}}'}, None),
])
def test_the_zip_is_read_as_the_staged_folder_would_be(tmp_path, files, expected):
    from engines import ecosystem

    folder = tmp_path / "web"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    zipped = {f"web/{name}": text.encode() for name, text in files.items()}
    if expected is None:
        with pytest.raises(ecosystem.EcosystemError, match="cannot tell how to start"):
            ecosystem.script_for(folder)
        with pytest.raises(ecosystem.EcosystemError, match="cannot tell how to start the app in web 1.0"):
            ecosystem.script_in_zip(list(zipped), zipped.get, top="web", where="web 1.0")
        return
    assert ecosystem.script_for(folder)["script"] == expected
    assert ecosystem.script_in_zip(list(zipped), zipped.get, top="web")["script"] == expected
    assert ecosystem.script_in_zip([n[4:] for n in zipped], {n[4:]: v for n, v in zipped.items()}.get)["script"] \
        == expected
