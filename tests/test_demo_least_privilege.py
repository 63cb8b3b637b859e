"""The demo customer of `make run`, with its real PostgreSQL database: role `kasa_demo` owns database `kasa_demo`
and has no CREATEDB — the usual application role. Out of the box, with no maintenance connection, it restores
in place and a failed upgrade is rolled back with the migration's column gone."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from django.conf import settings

from customers.demo import DEMO_DOMAIN, SERVER_JS, demo_seed
from tests.conftest import PG_HOST, PG_PORT, free_ports, port_open, require
from tests.restore_helpers import command_json

pytestmark = pytest.mark.django_db(transaction=True)

# 1.1.0's migration adds a column to the demo's products and changes rows, then fails (as a broken release would).
# It runs as the demo's OS user (kasa-demo when Kasa runs as root), so it uses tools that user may run: sh and psql.
MIGRATE = ["/bin/sh", "-c", 'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -q '
           '-c "ALTER TABLE products ADD COLUMN discontinued boolean NOT NULL DEFAULT false" '
           '-c "UPDATE products SET price_cents = price_cents * 2" '
           '&& echo "migration half done, then failing" >&2; exit 1']


def _admin():
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres", autocommit=True)


@pytest.fixture
def pg_demo(monkeypatch):
    """The demo customer on PostgreSQL; the kasa_demo role and database are left as they were found."""
    from engines import procman

    require(port_open(PG_HOST, PG_PORT), "PostgreSQL server")
    require(shutil.which("node") is not None and Path(procman.pm2_binary()).exists(), "Node.js and PM2")
    monkeypatch.setenv("KASA_DEMO_PORT", str(free_ports()))  # its health URLs: never another demo's ports
    with _admin() as con:
        role = con.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'kasa_demo'").fetchone()
        had_db = con.execute("SELECT 1 FROM pg_database WHERE datname = 'kasa_demo'").fetchone() is not None
    folder = Path(settings.KASA_CUSTOMERS_ROOT) / DEMO_DOMAIN
    shutil.rmtree(folder, ignore_errors=True)
    customer, created = demo_seed(prefer_postgres=True)
    try:
        assert created and customer.databases.get().engine == "postgresql"
        yield customer
    finally:
        _stop_demo(customer)
        shutil.rmtree(folder, ignore_errors=True)
        with _admin() as con:
            if not had_db:
                con.execute("DROP DATABASE IF EXISTS kasa_demo WITH (FORCE)")
            if role is None:
                con.execute("DROP ROLE IF EXISTS kasa_demo")
            elif role[0]:  # the password it had (a SCRAM verifier is accepted as it is)
                from psycopg import sql

                con.execute(sql.SQL("ALTER ROLE kasa_demo PASSWORD {}").format(sql.Literal(role[0])))


def _stop_demo(customer) -> None:
    from customers import runtime

    managers = runtime.managers()
    for spec in runtime.service_specs(customer):
        try:
            managers[spec.manager].stop(spec)
        except Exception:  # noqa: BLE001 — already stopped
            pass


def _products() -> tuple[list, list]:
    import psycopg

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="kasa_demo") as con:
        columns = con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'products' "
                              "ORDER BY 1").fetchall()
        return columns, con.execute("SELECT * FROM products ORDER BY id").fetchall()


def _release(tmp_path: Path) -> Path:
    folder = tmp_path / "pkg"
    folder.mkdir()
    files = {"server.js": SERVER_JS, "package.json": json.dumps({"name": "demo-backend", "version": "1.1.0",
                                                                  "main": "server.js"}),
             ".env.example": "SERVICE_NAME=\nAPP_VERSION=\nPORT=\nDATABASE_URL=\n"}
    with zipfile.ZipFile(folder / "backend-1.1.0.zip", "w") as zf:
        for name, text in files.items():
            zf.writestr(f"backend/{name}", text)
    (folder / "releases.json").write_text(json.dumps({
        "backend": [{"version": "1.1.0", "file": "backend-1.1.0.zip", "requires": {"from": ">=1.0.0 <2"},
                     "hooks": {"migrate": MIGRATE}}],
        "compatMatrix": [{"release": "1.1", "backend": "1.1.0"}]}))
    return folder


def test_the_demo_restores_in_place_and_rolls_back_a_failed_upgrade_out_of_the_box(pg_demo, tmp_path):
    from customers.models import MaintenanceConnection
    from releases.services import release_sync
    from upgrades.models import Upgrade

    with _admin() as con:
        assert not con.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = 'kasa_demo'"
                               ).fetchone()[0]
    assert not MaintenanceConnection.objects.exists()
    customer = pg_demo
    before = _products()

    # Restore in place.
    code, bk = command_json("backup", customer.domain)
    assert code == 0, bk
    import psycopg

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="kasa_demo", autocommit=True) as con:
        con.execute("SET ROLE kasa_demo")
        con.execute("DELETE FROM products WHERE id > 5; ALTER TABLE products ADD COLUMN color text")
    code, run = command_json("restore", str(bk["id"]), "--yes")
    assert code == 0, run.get("error")
    assert _products() == before

    # A failed upgrade: its migration's column goes with the rollback.
    release_sync(_release(tmp_path))
    code, doc = command_json("upgrade", customer.domain, "--to", "1.1")
    assert code == 1 and doc["status"] == "rolled_back", doc
    upgrade = Upgrade.objects.get(pk=doc["id"])
    assert "failed at migrate" in upgrade.error
    # The migration really changed the database before it failed: the rollback is what took it away.
    assert upgrade.run.log_lines.filter(text__contains="migration half done").exists()
    assert _products() == before
