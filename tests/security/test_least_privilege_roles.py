"""Attack (issue 11, last bullet): restore in place and the automatic rollback of a failed upgrade needed the
customer's database role to have CREATEDB (or, on MariaDB, rights on `<db>__kasa_%` databases). An
application role that owns its database and nothing more — the usual kind, the `make run` demo's included —
could not be restored in place, and a failed upgrade ended quarantined with the migration's schema change
left in the database. Each test here failed on the code before the fix."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.restore_helpers import command_json, my_state, pg_exec, pg_state
from tests.test_upgrades import _cli, _snapshot, customer_factory, fast_health, releases  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def test_restore_in_place_works_for_a_postgresql_role_without_createdb(make_customer, pg_database):
    pg_exec(pg_database, "CREATE TABLE orders (id serial PRIMARY KEY, note text); "
                         "INSERT INTO orders (note) SELECT 'o' || g FROM generate_series(1, 40) g", as_owner=True)
    customer = make_customer(databases=[("main", pg_database["url"])])
    code, bk = command_json("backup", customer.domain, "--scope", "database")
    assert code == 0, bk
    before = pg_state(pg_database)
    pg_exec(pg_database, "DELETE FROM orders WHERE id > 10; ALTER TABLE orders ADD COLUMN exported boolean; "
                         "CREATE TABLE exports (id int)", as_owner=True)
    code, run = command_json("restore", str(bk["id"]), "--yes")
    assert code == 0, run.get("error")
    assert pg_state(pg_database) == before  # rows back, the added column and table gone


def test_restore_in_place_works_for_a_mariadb_user_without_rights_outside_its_database(make_customer,
                                                                                        mysql_database):
    from tests.conftest import mysql_admin

    m = mysql_database
    mysql_admin(f"CREATE TABLE `{m['name']}`.carts (id INT PRIMARY KEY, v VARCHAR(9)); "
                f"INSERT INTO `{m['name']}`.carts VALUES (1, 'a'), (2, 'b'), (3, 'c');")
    url = f"mysql://{m['user']}:{quote(m['password'], safe='')}@{m['host']}:{m['port']}/{m['name']}"
    customer = make_customer(databases=[("shop", url)])
    code, bk = command_json("backup", customer.domain, "--scope", "database")
    assert code == 0, bk
    before = my_state(m)
    mysql_admin(f"DELETE FROM `{m['name']}`.carts WHERE id > 1; ALTER TABLE `{m['name']}`.carts ADD COLUMN x INT;")
    code, run = command_json("restore", str(bk["id"]), "--yes")
    assert code == 0, run.get("error")
    assert my_state(m) == before


def test_a_failed_upgrade_of_a_role_without_createdb_is_rolled_back_not_quarantined(customer_factory, releases,  # noqa: F811
                                                                                    pg_database):
    customer = customer_factory("BREAK=migrate@2.5.0\n", createdb=False)
    before = _snapshot(customer, pg_database)
    code, doc = _cli("upgrade", customer.domain, "--to", "2.5")
    assert doc["status"] == "rolled_back", doc.get("error")
    assert _snapshot(customer, pg_database) == before  # the migration's column and table are gone
