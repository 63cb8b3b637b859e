"""Issue 14: a remote restore in place of a MariaDB database and of a service kept behind a release link
(backups.remote_parts).

Real parts only, as tests/test_remote_restore.py: the simulated host (a network namespace with sshd) shares this
machine's filesystem, so its MariaDB is the machine's, reached by the host through its socket file and by the worker
only through the session's forward to that socket; the release layout is engines.layout's (`releases/<version>/
<name>` and the service's path a relative link to it), as an upgrade leaves it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backups.models import Backup
from engines.procbase import REPO_ROOT
from tests.conftest import MY_ADMIN, MY_HOST, MY_PORT, kill_pm2_under, mysql_admin, require
from tests.remote_fixtures import make_host
from tests.restore_helpers import tree_state
from tests.test_remote_restore import _answers, _backup_ok, _customer, _journals, _restore

pytestmark = pytest.mark.django_db(transaction=True)

SOCKET = "/run/mysqld/mysqld.sock"  # the host's socket file (the simulated host shares this filesystem)


@pytest.fixture
def quick(settings):
    settings.KASA_REMOTE_PM2 = str(REPO_ROOT / "node_modules" / ".bin" / "pm2")
    settings.KASA_PM2_SETTLE = 0.5
    settings.KASA_HEALTH_STREAK = 1
    settings.KASA_HEALTH_TIMEOUT = 1.5  # a restored service that answers 503 fails at once
    settings.KASA_HEALTH_INTERVAL = 0.2
    return settings


def _my(sql: str) -> list[str]:
    client = shutil.which("mariadb") or shutil.which("mysql")
    out = subprocess.run([client, "--protocol=TCP", "-h", MY_HOST, "-P", str(MY_PORT), "-u", MY_ADMIN, "-N", "-B",
                          "-e", sql], check=True, capture_output=True, text=True, timeout=30).stdout
    return out.split()


def _carts(name: str) -> int:
    return int(_my(f"SELECT count(*) FROM `{name}`.carts")[0])


def _side_databases(name: str) -> list[str]:
    return _my(f"SHOW DATABASES LIKE '{name}\\_\\_kasa%'")


def _released(customer) -> Path:
    """The customer's backend as an upgrade leaves it: releases/1/backend, its path a link there."""
    root = Path(customer.root)
    (root / "releases" / "1").mkdir(parents=True)  # releases/ and releases/<v>/ are Kasa's (engines.ownership)
    os.chmod(root / "releases", 0o755)
    os.chmod(root / "releases" / "1", 0o755)
    (root / "backend").rename(root / "releases" / "1" / "backend")
    (root / "backend").symlink_to("releases/1/backend")
    return root


def _upgrade(root: Path, health: str) -> None:
    """An upgrade to version 2 after the backup: a copy of release 1, the link switched to it."""
    subprocess.run(["cp", "-a", str(root / "releases" / "1"), str(root / "releases" / "2")], check=True)
    (root / "releases" / "2" / "backend" / "health.txt").write_text(health)
    (root / "releases" / "2" / "backend" / "src" / "app.js").write_text("console.log('v2')\n")
    tmp = root / "backend.new"
    tmp.symlink_to("releases/2/backend")
    tmp.rename(root / "backend")


def _mariadb_customer(h, host, team, user, parents_open, db: dict, *, health: bool):
    from customers.models import DatabaseConnection

    require(Path(SOCKET).is_socket(), f"MariaDB's socket at {SOCKET}")
    name = db["name"]
    mysql_admin(f"CREATE TABLE `{name}`.carts (id INT PRIMARY KEY, total INT); "
                f"INSERT INTO `{name}`.carts WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                "WHERE i < 40) SELECT i, i * 3 FROM n;")
    customer, url = _customer(h, host, team, user, parents_open, health=health)
    DatabaseConnection.objects.create(customer=customer, name="shop", engine="mysql", host=SOCKET, port=3306,
                                      database=name, user=db["user"], password=db["password"])
    return customer, url


def test_a_remote_mariadb_database_and_a_release_link_come_back_as_the_backup_says(
        netns_hosts, team, customer_users, quick, parents_open, mysql_database):
    h = netns_hosts.make()
    name = mysql_database["name"]  # its user may not create databases: the restore goes through prefixed tables
    customer, _url = _mariadb_customer(h, make_host(h, "web-mylink"), team, customer_users[0], parents_open,
                                       mysql_database, health=False)
    root = _released(customer)
    try:
        assert _backup_ok(customer)
        bk = Backup.objects.filter(customer=customer, status="succeeded").latest("pk")
        assert bk.artifacts.get(kind="service").details["link"] == {"path": "backend",
                                                                    "target": "releases/1/backend"}
        before = tree_state(root)
        (root / "releases" / "1" / "backend" / "src" / "app.js").write_text("console.log('changed')\n")
        _upgrade(root, "ok\n")
        mysql_admin(f"DELETE FROM `{name}`.carts WHERE id > 10")
        assert _carts(name) == 10

        run = _restore(bk, safety_backup=False)
        log = "\n".join(line.text for line in run.log_lines.all())
        assert run.status == "succeeded", log
        assert "prefixed tables" in log and "backend points at releases/1/backend again on web-mylink" in log
        assert _carts(name) == 40
        assert os.readlink(root / "backend") == "releases/1/backend"
        after = tree_state(root)
        v2 = {k: after.pop(k) for k in list(after) if k == "releases/2" or k.startswith("releases/2/")}
        assert v2[os.path.join("releases", "2", "backend", "health.txt")][0] == "file"  # the later release stays
        assert after == before
        assert not [n for n in os.listdir(root) if ".kasa-link-" in n or n.startswith(".kasa-restore-")]
        assert _side_databases(name) == [] and _journals(h) == []
        assert not [t for t in _my(f"SHOW TABLES FROM `{name}`") if t.startswith("__kasa")]
    finally:
        kill_pm2_under(root)


def test_a_failing_remote_restore_puts_back_the_mariadb_database_and_the_later_release_link(
        netns_hosts, team, customer_users, quick, parents_open, mysql_database):
    h = netns_hosts.make()
    name = mysql_database["name"]
    for account in ("'%'", "'localhost'"):  # may create its side databases: a fresh database swapped in
        mysql_admin(f"GRANT ALL ON `{name}\\_\\_kasa\\_%`.* TO '{name}'@{account}")
    customer, url = _mariadb_customer(h, make_host(h, "web-myundo"), team, customer_users[0], parents_open,
                                      mysql_database, health=True)
    root = _released(customer)
    try:
        (root / "backend" / "health.txt").write_text("broken\n")  # the backup holds a service that is unhealthy
        assert _backup_ok(customer)
        bk = Backup.objects.filter(customer=customer, status="succeeded").latest("pk")
        _upgrade(root, "ok\n")
        mysql_admin(f"DELETE FROM `{name}`.carts WHERE id > 25; UPDATE `{name}`.carts SET total = 0 WHERE id = 1")
        before, rows = tree_state(root), _my(f"SELECT id, total FROM `{name}`.carts ORDER BY id")

        run = _restore(bk, safety_backup=False)
        log = "\n".join(line.text for line in run.log_lines.all())
        assert run.status == "failed", log
        assert run.error.startswith("restore on host web-myundo failed:"), run.error
        assert "health check failed" in run.error and "the pre-restore state was put back" in run.error, log
        assert "fresh database" in log and "backend points at releases/1/backend again" in log  # it got that far
        assert os.readlink(root / "backend") == "releases/2/backend"
        assert tree_state(root) == before
        assert _my(f"SELECT id, total FROM `{name}`.carts ORDER BY id") == rows  # exactly as before
        assert _side_databases(name) == []
        assert _answers(url) == 200  # release 2 runs again
        assert not [n for n in os.listdir(root) if ".kasa-link-" in n or n.startswith(".kasa-restore-")]
        assert _journals(h) == []
    finally:
        kill_pm2_under(root)
        for side in _side_databases(name):
            mysql_admin(f"DROP DATABASE IF EXISTS `{side}`")
