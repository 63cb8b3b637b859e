"""Upgrades that fail after their migration, for customers whose database role owns its database and nothing
more (no CREATEDB; on MariaDB no grant outside its own database): the rollback puts the database back — the
migration's column and table gone — and the upgrade ends rolled_back, not quarantined."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from django.conf import settings

from tests.restore_helpers import pg_databases_like, pg_exec, pg_state, tree_state
from tests.test_upgrades import _cli, _get, _snapshot, customer_factory, fast_health, releases  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def _no_createdb(pg: dict) -> None:
    import psycopg

    with psycopg.connect(host=pg["host"], port=pg["port"], user="postgres", dbname="postgres") as con:
        assert con.execute("SELECT NOT rolcreatedb AND NOT rolsuper FROM pg_roles WHERE rolname = %s",
                           [pg["user"]]).fetchone()[0]


def _columns(pg: dict) -> list:
    import psycopg

    with psycopg.connect(host=pg["host"], port=pg["port"], user="postgres", dbname=pg["name"]) as con:
        return con.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
                           "'public' ORDER BY 1, 2").fetchall()


def test_a_failed_migration_without_createdb_is_rolled_back_with_the_column_gone(
        customer_factory, releases, pg_database):  # noqa: F811
    from upgrades.models import Upgrade

    customer = customer_factory("BREAK=migrate@2.5.0\n", createdb=False)
    _no_createdb(pg_database)
    before, columns = _snapshot(customer, pg_database), _columns(pg_database)
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 1 and doc["status"] == "rolled_back", doc
    check = next(c for c in doc["preflight"]["checks"] if c["name"] == "rollback of database main")
    assert check["ok"] and "restoring into the live database in one transaction" in check["detail"]
    assert {s["name"]: s["status"] for s in doc["steps"]}["rollback: database"] == "succeeded"
    assert _columns(pg_database) == columns  # orders.exported is gone, and so is the exports table
    assert _snapshot(customer, pg_database) == before
    assert pg_databases_like(pg_database, pg_database["name"] + "__kasa_%") == []
    assert _get(f"http://127.0.0.1:{customer.port}/health") == "ok"
    log = " ".join(Upgrade.objects.get(pk=doc["id"]).run.log_lines.values_list("text", flat=True))
    assert f"role {pg_database['user']} lacks CREATEDB and no maintenance connection is set" in log


def test_a_manual_rollback_without_createdb_puts_the_database_back(customer_factory, releases,  # noqa: F811
                                                                   pg_database):
    from backups.models import Backup
    from upgrades.models import Upgrade

    customer = customer_factory(createdb=False)
    before = _snapshot(customer, pg_database)
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 0, doc
    assert "public.exports" in pg_state(pg_database)
    code, rb = _cli("rollback", customer.domain)
    assert code == 0 and rb["status"] == "succeeded", rb
    assert pg_state(pg_database) == before["pg"]
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.4.0"
    # The backup taken as the in-place restore's way back goes to retention once the rollback holds.
    way_back = Backup.objects.get(customer=customer, trigger="upgrade", created_at__gt=Upgrade.objects.get(
        pk=rb["id"]).created_at, scope="database")
    assert way_back.status == "succeeded" and not way_back.pinned


def test_a_manual_rollback_failing_after_its_in_place_restore_is_undone_from_its_way_back(
        customer_factory, releases, pg_database, settings):  # noqa: F811
    """The rolled-back release's server refuses to answer its health check: the rollback is undone, and the
    database restored in place goes back to its upgraded state from the backup taken before the restore."""
    from upgrades.models import Upgrade

    customer = customer_factory(createdb=False)
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 0, doc
    pg_exec(pg_database, "INSERT INTO exports (note) VALUES ('written on 2.5')", as_owner=True)
    upgraded = pg_state(pg_database)
    env = customer.root_path() / "releases" / "2.4.0" / "backend" / ".env"
    env.write_text(env.read_text() + "BREAK=health@2.4.0\n")  # the way back's own release now fails its health
    settings.KASA_HEALTH_TIMEOUT = 3
    code, rb = _cli("rollback", customer.domain)
    assert code == 1 and rb["status"] == "rolled_back", rb  # the rollback itself was rolled back
    assert pg_state(pg_database) == upgraded
    log = " ".join(Upgrade.objects.get(pk=rb["id"]).run.log_lines.values_list("text", flat=True))
    assert "the way back" in log and "putting back its state from before the restore" in log
    assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.5.0"


@pytest.fixture
def mysql_customer(transactional_db, team, mysql_database, fast_health):  # noqa: F811
    from engines import procman
    from tests.conftest import require
    from tests.upgrade_fixtures import make_running_customer, seed_mysql, stop_app

    require(os.path.exists(procman.pm2_binary()), "PM2 from npm (make install)")
    db = seed_mysql(mysql_database)
    root = Path(settings.KASA_CUSTOMERS_ROOT) / f"u-{os.urandom(4).hex()}"
    customer = make_running_customer(team, root, db, extra_env="BREAK=migrate@2.5.0\n")
    yield customer
    stop_app(customer)
    shutil.rmtree(customer.root, ignore_errors=True)


def test_a_failed_migration_on_mariadb_without_grants_outside_its_database_is_rolled_back(
        mysql_customer, releases, mysql_database):  # noqa: F811
    from tests.restore_helpers import my_state
    from tests.test_dbrestore import my_admin_rows
    from upgrades.models import Upgrade

    customer = mysql_customer
    columns = my_admin_rows("SHOW CREATE TABLE orders", mysql_database["name"])
    before = {"tree": tree_state(customer.root_path()), "my": my_state(mysql_database)}
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 1 and doc["status"] == "rolled_back", doc
    assert my_admin_rows("SHOW CREATE TABLE orders", mysql_database["name"]) == columns  # the column is gone
    assert {"tree": tree_state(customer.root_path()), "my": my_state(mysql_database)} == before
    assert not [t for t in my_admin_rows("SHOW TABLES", mysql_database["name"]) if t.startswith("__kasa_")]
    assert _get(f"http://127.0.0.1:{customer.port}/health") == "ok"
    log = " ".join(Upgrade.objects.get(pk=doc["id"]).run.log_lines.values_list("text", flat=True))
    assert "applied: ALTER TABLE orders ADD COLUMN exported" in log  # the migration did change the schema
    assert "loading into prefixed tables" in log
