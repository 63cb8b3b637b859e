"""Issue 14, points 2 and 7: a copy restored on a remote customer's host (backups.remote_copy), and a customer moved
to another host (backups.move): restored there, started, health-checked, switched, the old copy stopped and kept.

Real parts only (tests/hosts.py, as tests/test_remote_restore.py): simulated hosts are network namespaces with
OpenSSH's sshd sharing this machine's filesystem (each host has its own customers root), PM2 runs inside a host's
namespace as the customer's user, and the health URLs are asked over the namespaces' addresses."""

from __future__ import annotations

import os
import pwd
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from backups.models import Backup
from engines import hostrestore
from hosts.remote import RemoteHost
from tests.conftest import free_port, kill_pm2_under
from tests.remote_fixtures import NetnsPostgres, make_host, run_backup, seed_tree
from tests.restore_helpers import tree_state
from tests.test_remote_restore import SERVER_JS, _answers, _customer, _hostile, _journals

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fast(settings):
    """tests/test_remote_restore.py's short timings: PM2 from node_modules on the hosts, one healthy answer."""
    from engines.procbase import REPO_ROOT

    settings.KASA_REMOTE_PM2 = str(REPO_ROOT / "node_modules" / ".bin" / "pm2")
    settings.KASA_PM2_SETTLE = 0.5
    settings.KASA_HEALTH_STREAK = 1
    settings.KASA_HEALTH_TIMEOUT = 2.5
    settings.KASA_HEALTH_INTERVAL = 0.2
    return settings


def _latest(customer) -> Backup:
    run = run_backup(customer)
    assert run.status == "succeeded", run.error
    return Backup.objects.filter(customer=customer, status="succeeded").latest("pk")


def _wire(customer, root: str) -> list[dict]:
    return [{"name": s.name, "folder": os.path.join(root, s.path or "."), "manager": s.process_manager,
             "app_name": s.app_name, "start_command": list(s.start_command), "root": root}
            for s in customer.services.all()]


def _start_remote(customer) -> None:
    """The customer's PM2 services started on its host, as a restore would (engines.hostrestore.services there)."""
    with RemoteHost(customer.host) as remote:
        answer = remote.call("engines.hostrestore.services", "start", _wire(customer, customer.root),
                             customer.run_as, settings.KASA_REMOTE_PM2, settle=0.5)
    assert answer["ok"], answer


def _local_customer(team, user: str, parents_open):
    """A customer on `local` (the worker's machine) run by PM2 as `user`, serving its health URL on 127.0.0.1."""
    from customers.models import Customer, Service
    from customers.services import customer_create
    from engines import dburl

    root = Path(settings.KASA_CUSTOMERS_ROOT) / f"mv-{uuid.uuid4().hex[:6]}"
    root.mkdir(parents=True, mode=0o750)
    seed_tree(root)
    parents_open(root)
    customer = customer_create(domain=f"{root.name}.example.com", root=str(root), team=team,
                               services=[("backend", "backend")],
                               databases=[("cache", dburl.parse(f"sqlite:///{root}/data/cache.sqlite3"))])
    port = free_port()
    (root / "backend" / "server.js").write_text(SERVER_JS)
    (root / "backend" / "health.txt").write_text("ok\n")
    who = pwd.getpwnam(user)
    subprocess.run(["chown", "-R", f"{who.pw_uid}:{who.pw_gid}", str(root / "backend"), str(root / ".env"),
                    str(root / "data")], check=True)
    os.chown(root, 0, who.pw_gid)
    root.chmod(0o750)
    Customer.objects.filter(pk=customer.pk).update(run_as=user)
    Service.objects.filter(customer=customer, name="backend").update(
        process_manager="pm2", app_name=f"backend-{port}", start_command=["/usr/bin/node", "server.js", str(port)],
        health_url=f"http://127.0.0.1:{port}/health")
    customer.refresh_from_db()
    return customer, port


def _move(customer, host, backup):
    from backups.move_service import customer_move
    from operations.services import run_execute

    run = customer_move(customer, host=host, backup=backup, via="cli", enqueue=False)
    run_execute(run.pk)
    run.refresh_from_db()
    return run


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as con:
        return con.execute("SELECT count(*) FROM hits").fetchone()[0]


def test_a_copy_on_a_remote_host_holds_the_backup_and_leaves_the_live_customer_untouched(
        netns_hosts, team, customer_users, fast, parents_open):
    from backups.services import BackupInputError, restore_start
    from operations.services import run_execute

    h = netns_hosts.make()
    host = make_host(h, "web-copy")
    customer, _url = _customer(h, host, team, customer_users[0], parents_open, health=False, sqlite=True)
    root = Path(customer.root)
    bk = _latest(customer)
    (root / "backend" / "src" / "app.js").write_text("console.log('after the backup')\n")
    with sqlite3.connect(root / "data" / "cache.sqlite3") as con:
        con.execute("DELETE FROM hits WHERE id > 10")
    before = tree_state(root)
    with pytest.raises(BackupInputError, match="lies inside the customer's live root"):
        restore_start(bk, to_root=str(root / "copy"), confirmed=True, via="cli", enqueue=False)
    copy = h.customers_root / f"copy-{uuid.uuid4().hex[:6]}"

    run = restore_start(bk, to_root=str(copy), confirmed=True, via="cli", enqueue=False)
    run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert run.root == f"web-copy:{copy}" and run.result["clone"] and run.result["host"] == "web-copy"
    assert (copy / "backend" / "src" / "app.js").read_text() == "console.log('hi')\n"
    assert (copy / ".env").read_text() == "ROOT=1\n"
    assert _rows(copy / "data" / "cache.sqlite3") == 37
    who = pwd.getpwnam(customer_users[0])
    assert (copy / "backend").stat().st_uid == who.pw_uid and (copy / "data").stat().st_uid == who.pw_uid
    assert copy.stat().st_mode & 0o777 == 0o750 and copy.stat().st_gid == who.pw_gid
    assert not [n for n in os.listdir(copy) if n.startswith(".kasa-restore-")]
    assert tree_state(root) == before  # the live customer: not one file changed
    assert _journals(h) == []


def test_a_failed_copy_on_a_remote_host_removes_the_folder_it_made_and_empties_the_one_it_was_given(
        netns_hosts, team, customer_users, fast, parents_open):
    from backups.services import restore_start
    from operations.services import run_execute

    h = netns_hosts.make()
    customer, _url = _customer(h, make_host(h, "web-copy-fail"), team, customer_users[0], parents_open,
                               health=False)
    bk = _latest(customer)
    _hostile(bk)  # refused on the worker once the copy's folder exists on the host
    before = tree_state(Path(customer.root))
    new, given = h.customers_root / "copy-new", h.customers_root / "copy-given"
    given.mkdir()
    for folder in (new, given):
        run = restore_start(bk, to_root=str(folder), confirmed=True, via="cli", enqueue=False)
        run_execute(run.pk)
        run.refresh_from_db()
        assert run.status == "failed" and "../../escaped.txt" in run.error, run.error
        assert "the copy was removed from host web-copy-fail; the live customer was not touched" in run.error
    assert not new.exists()
    assert given.is_dir() and os.listdir(given) == []
    assert tree_state(Path(customer.root)) == before
    assert _journals(h) == []


def test_a_customer_moves_between_remote_hosts_healthy_there_and_its_old_copy_stopped_and_kept(
        netns_hosts, team, customer_users, fast, parents_open):
    from backups.move_service import move_confirm
    from customers.models import Customer

    a, b = netns_hosts.make(), netns_hosts.make()
    host_a, _host_b = make_host(a, "web-a"), make_host(b, "web-b")
    customer, url_a = _customer(a, host_a, team, customer_users[0], parents_open, sqlite=True)
    old_root = Path(customer.root)
    new_root = b.customers_root / old_root.name
    parents_open(new_root)  # the customer's user reaches the new root's folder there, as on a real host
    try:
        bk = _latest(customer)
        _start_remote(customer)
        assert _answers(url_a) == 200

        run = _move(customer, "web-b", bk)
        log = "\n".join(line.text for line in run.log_lines.all())
        assert run.status == "succeeded", run.error + log
        customer = Customer.objects.get(pk=customer.pk)
        assert customer.host.name == "web-b" and customer.root == str(new_root)
        url_b = customer.services.get().health_url
        assert url_b == url_a.replace(a.address, b.address)
        assert _answers(url_b) == 200  # the new copy serves, run by PM2 on host b
        assert _answers(url_a) == 0  # the old one is stopped…
        assert tree_state(old_root) and (old_root / "backend" / "server.js").is_file()  # …and still there
        assert customer.old_copy["host"] == "web-a" and customer.old_copy["root"] == str(old_root)
        assert customer.old_copy["stopped"] is True
        assert _rows(new_root / "data" / "cache.sqlite3") == 37
        assert customer.databases.get().sqlite_path == str(new_root / "data" / "cache.sqlite3")
        assert (new_root / "backend").stat().st_uid == pwd.getpwnam(customer_users[0]).pw_uid
        assert _journals(b) == []
        from audit.models import AuditEntry

        assert AuditEntry.objects.filter(action="customer.moved", customer_id=customer.pk).exists()

        gone = move_confirm(customer, via="cli")  # the move is confirmed: the old copy goes
        assert gone == {"host": "web-a", "root": str(old_root)}
        assert not old_root.exists()
        assert Customer.objects.get(pk=customer.pk).old_copy == {}
    finally:
        kill_pm2_under(old_root)
        kill_pm2_under(new_root)


def test_a_customer_moves_from_local_to_a_remote_host(netns_hosts, team, customer_users, fast, parents_open):
    from backups.move_service import move_confirm
    from customers.models import Customer

    h = netns_hosts.make()
    make_host(h, "web-from-local")
    customer, port = _local_customer(team, customer_users[1], parents_open)
    old_root = Path(customer.root)
    new_root = h.customers_root / old_root.name
    parents_open(new_root)
    try:
        bk = _latest(customer)
        answer = hostrestore.services("start", _wire(customer, customer.root), customer.run_as,
                                      settings.KASA_REMOTE_PM2, settle=0.5)  # PM2 here, as the customer's user
        assert answer["ok"], answer
        assert _answers(f"http://127.0.0.1:{port}/health") == 200

        run = _move(customer, "web-from-local", bk)
        assert run.status == "succeeded", run.error
        customer = Customer.objects.get(pk=customer.pk)
        assert customer.host.name == "web-from-local" and customer.root == str(new_root)
        assert customer.services.get().health_url == f"http://127.0.0.1:{port}/health"  # asked on its host
        assert _answers(f"http://{h.address}:{port}/health") == 200
        assert _answers(f"http://127.0.0.1:{port}/health") == 0  # stopped here, its folders kept
        assert (old_root / "backend" / "server.js").is_file() and customer.old_copy["host"] == "local"
        assert _rows(new_root / "data" / "cache.sqlite3") == 37
        move_confirm(customer, via="cli")  # on `local`: its PM2 daemon stopped, its folders deleted
        assert not old_root.exists()
    finally:
        kill_pm2_under(old_root)
        kill_pm2_under(new_root)
        subprocess.run(["rm", "-rf", str(old_root)], check=False)


def test_a_move_whose_new_copy_is_unhealthy_leaves_the_customer_on_its_host_running_and_removes_the_copy(
        netns_hosts, team, customer_users, fast, parents_open):
    from customers.models import Customer

    fast.KASA_HEALTH_TIMEOUT = 1.5  # the copy answers 503 at once
    a, b = netns_hosts.make(), netns_hosts.make()
    host_a, _host_b = make_host(a, "web-stay"), make_host(b, "web-never")
    customer, url_a = _customer(a, host_a, team, customer_users[0], parents_open, sqlite=True)
    old_root = Path(customer.root)
    new_root = b.customers_root / old_root.name
    parents_open(new_root)  # the customer's user reaches the new root's folder there, as on a real host
    try:
        (old_root / "backend" / "health.txt").write_text("broken\n")  # the backup holds an unhealthy service
        bk = _latest(customer)
        (old_root / "backend" / "health.txt").write_text("ok\n")
        _start_remote(customer)
        before = tree_state(old_root)
        new_root.mkdir()  # the path is taken on the target: refused there before anything is made
        refused = _move(customer, "web-never", bk)
        assert refused.status == "failed" and "move refused before touching anything on host web-never" in \
            refused.error and "exists already on this host" in refused.error
        assert new_root.is_dir() and os.listdir(new_root) == []
        new_root.rmdir()

        run = _move(customer, "web-never", bk)
        assert run.status == "failed"
        assert "move to host web-never failed: health check failed" in run.error
        assert "still on host web-stay, running as before; the copy on web-never was removed" in run.error
        customer = Customer.objects.get(pk=customer.pk)
        assert customer.host.name == "web-stay" and customer.root == str(old_root) and customer.old_copy == {}
        assert customer.services.get().health_url == url_a
        assert _answers(url_a) == 200  # never stopped
        assert tree_state(old_root) == before
        assert not new_root.exists()  # the copy is gone, its PM2 daemon with it
        assert _answers(url_a.replace(a.address, b.address)) == 0
        assert _journals(b) == []
    finally:
        kill_pm2_under(old_root)
        kill_pm2_under(new_root)



def _count(server, dbname: str = "shop") -> int:
    import psycopg

    with psycopg.connect(host=server.socket_dir, port=server.port, user="postgres", dbname=dbname) as con:
        return con.execute("SELECT count(*) FROM orders").fetchone()[0]


def test_a_moved_customers_host_local_postgresql_comes_to_the_new_hosts_server_and_the_old_one_is_left_alone(
        host_pg, netns_hosts, team, customer_users, fast, parents_open):
    import psycopg

    from customers.models import Customer

    a, pg = host_pg
    b = netns_hosts.make()
    host_a, _ = make_host(a, "web-pg-a"), make_host(b, "web-pg-b")

    class SamePort(NetnsPostgres):  # the new host's own server, at the address the customer's URL names
        def _launch(self, postgres, data):
            self.port = pg["port"]
            return super()._launch(postgres, data)

    customer, _url = _customer(a, host_a, team, customer_users[0], parents_open, health=False,
                               databases=[("main", pg["url"])])
    old_root = Path(customer.root)
    new_root = b.customers_root / old_root.name
    parents_open(new_root)
    server_b = SamePort(b.name)
    try:
        with server_b:
            with psycopg.connect(host=server_b.socket_dir, port=server_b.port, user="postgres", dbname="postgres",
                                 autocommit=True) as con:  # the role exists there (a move creates no role)
                con.execute(f"CREATE ROLE shop LOGIN CREATEDB PASSWORD '{pg['password']}'")
                con.execute("CREATE DATABASE shop")  # someone's, there already: never replaced
            bk = _latest(customer)
            rows = _count(pg["server"])
            refused = _move(customer, "web-pg-b", bk)
            assert refused.status == "failed" and "a database named shop exists already on host web-pg-b's" in \
                refused.error and not new_root.exists()
            with psycopg.connect(host=server_b.socket_dir, port=server_b.port, user="postgres", dbname="postgres",
                                 autocommit=True) as con:
                con.execute("DROP DATABASE shop")

            run = _move(customer, "web-pg-b", bk)
            log = "\n".join(line.text for line in run.log_lines.all())
            assert run.status == "succeeded", run.error + log
            assert Customer.objects.get(pk=customer.pk).host.name == "web-pg-b"
            assert _count(server_b) == rows  # restored into the new host's server, same name
            assert _count(pg["server"]) == rows  # the old host's server: left as it was
            assert pg["password"] not in log
    finally:
        kill_pm2_under(old_root)
        kill_pm2_under(new_root)


def test_a_copy_on_a_remote_host_gets_its_postgresql_database_through_the_forward_and_never_replaces_one(
        host_pg, team, customer_users, fast, parents_open):
    import psycopg

    from backups.services import restore_start
    from operations.services import run_execute

    a, pg = host_pg
    server = pg["server"]
    customer, _url = _customer(a, make_host(a, "web-copy-pg"), team, customer_users[0], parents_open, health=False,
                               databases=[("main", pg["url"])])
    bk = _latest(customer)
    rows = _count(server)
    copy = a.customers_root / f"copy-{uuid.uuid4().hex[:6]}"

    def admin(sql: str) -> None:
        with psycopg.connect(host=server.socket_dir, port=server.port, user="postgres", dbname="postgres",
                             autocommit=True) as con:
            con.execute(sql)

    def restore(**kw):
        run = restore_start(bk, confirmed=True, via="cli", enqueue=False, **kw)
        run_execute(run.pk)
        run.refresh_from_db()
        return run

    admin("ALTER ROLE shop CREATEDB")  # the session's server is shared: put back below
    try:
        taken = restore(to_databases={"main": pg["url"]})  # the live database's own URL: never replaced
        assert taken.status == "failed" and "database shop exists already" in taken.error, taken.error
        run = restore(to_root=str(copy), to_databases={"main": pg["url"].rsplit("/", 1)[0] + "/shop_copy"})
        assert run.status == "succeeded", run.error
        assert _count(server, "shop_copy") == rows and _count(server) == rows
        assert (copy / "backend" / "src" / "app.js").is_file()
        assert pg["password"] not in "\n".join(line.text for line in run.log_lines.all())
    finally:
        admin("DROP DATABASE IF EXISTS shop_copy")
        admin("ALTER ROLE shop NOCREATEDB")


def test_a_customer_moves_from_a_remote_host_onto_local_with_its_postgresql_healthy_here_and_its_old_copy_kept(
        host_pg, team, customer_users, fast, parents_open):
    """Onto `local`: the files unpacked here as the customer's user, PM2 here, the health URL (the old host's
    address) asked on 127.0.0.1 here; the host-local PostgreSQL of the old host (its 127.0.0.1:PORT) into the
    server this machine has at that same address. A role that may not create the database there fails the move
    after the new root was made: removed, the customer untouched on its host."""
    import psycopg

    from customers.models import Customer
    from engines import scratchdb

    a, pg = host_pg
    host_a = make_host(a, "web-to-local")

    class HereAtTheSamePort(scratchdb.ScratchPostgres):  # this machine's server at the address the URL names
        def _launch(self, postgres, data):
            self.port = pg["port"]
            return super()._launch(postgres, data)

    customer, url_a = _customer(a, host_a, team, customer_users[0], parents_open, sqlite=True,
                                databases=[("main", pg["url"])])
    old_root = Path(customer.root)
    new_root = Path(settings.KASA_CUSTOMERS_ROOT) / old_root.name
    new_root.parent.mkdir(parents=True, exist_ok=True)
    parents_open(new_root)
    here = HereAtTheSamePort()
    try:
        with here:
            def admin(sql: str) -> None:
                with psycopg.connect(host=here.socket_dir, port=here.port, user="postgres", dbname="postgres",
                                     autocommit=True) as con:
                    con.execute(sql)

            admin(f"CREATE ROLE shop LOGIN PASSWORD '{pg['password']}'")  # no CREATEDB yet
            bk = _latest(customer)
            _start_remote(customer)
            before = tree_state(old_root)

            failed = _move(customer, "local", bk)
            assert failed.status == "failed" and "move to host local failed: " in failed.error, failed.error
            assert "may not create it" in failed.error
            assert "still on host web-to-local, running as before; the copy on local was removed" in failed.error
            assert not new_root.exists() and tree_state(old_root) == before and _answers(url_a) == 200
            assert Customer.objects.get(pk=customer.pk).host.name == "web-to-local"

            admin("ALTER ROLE shop CREATEDB")
            run = _move(customer, "local", bk)
            log = "\n".join(line.text for line in run.log_lines.all())
            assert run.status == "succeeded", run.error + log
            customer = Customer.objects.get(pk=customer.pk)
            assert customer.host.name == "local" and customer.root == str(new_root)
            url_here = customer.services.get().health_url
            assert url_here == url_a.replace(a.address, "127.0.0.1")
            assert _answers(url_here) == 200  # run by PM2 here, as the customer's user
            assert _answers(url_a) == 0  # the old copy is stopped…
            assert tree_state(old_root) == before  # …and kept
            assert customer.old_copy["host"] == "web-to-local" and customer.old_copy["stopped"] is True
            assert (new_root / "backend").stat().st_uid == pwd.getpwnam(customer_users[0]).pw_uid
            assert _rows(new_root / "data" / "cache.sqlite3") == 37
            assert customer.databases.get(name="cache").sqlite_path == str(new_root / "data" / "cache.sqlite3")
            assert _count(here) == _count(pg["server"])  # the same rows, in this machine's server
            assert customer.databases.get(name="main").host == "127.0.0.1"  # as written: now read here
            assert pg["password"] not in log
    finally:
        kill_pm2_under(old_root)
        kill_pm2_under(new_root)
        subprocess.run(["rm", "-rf", str(new_root)], check=False)


def test_a_moved_customers_host_local_mariadb_comes_to_the_new_hosts_server_with_its_rows(
        netns_hosts, team, customer_users, fast, parents_open, mysql_database):
    """From `local`, whose MariaDB listens on 127.0.0.1:3306, to a host with a server of its own at that address
    (a private one in its namespace: the simulated hosts share this machine's socket files): restored there through
    the session's forward into a fresh database of the same name; a name already taken there is refused."""
    from customers.models import Customer, DatabaseConnection
    from tests.conftest import MY_HOST, MY_PORT, mysql_admin
    from tests.remote_fixtures import NetnsMariaDB

    b = netns_hosts.make()
    make_host(b, "web-my-b")
    customer, _port = _local_customer(team, customer_users[1], parents_open)
    name, user, password = mysql_database["name"], mysql_database["user"], mysql_database["password"]
    rows = ",".join(f"({i})" for i in range(1, 42))
    mysql_admin(f"CREATE TABLE `{name}`.carts (id INT PRIMARY KEY); INSERT INTO `{name}`.carts VALUES {rows};")
    DatabaseConnection.objects.create(customer=customer, name="shop", engine="mysql", host=MY_HOST, port=MY_PORT,
                                      database=name, user=user, password=password)
    old_root = Path(customer.root)
    new_root = b.customers_root / old_root.name
    parents_open(new_root)
    esc = password.replace("\\", "\\\\").replace("'", "\\'")
    pattern = name.replace("_", "\\_") + "\\_\\_kasa\\_%"
    try:
        server_b = NetnsMariaDB(b.name, MY_PORT)  # the new host's own server, at 127.0.0.1:3306 as it sees it
        with server_b:
            server_b.sql(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{esc}'; "
                         f"GRANT ALL ON `{name}`.* TO '{user}'@'127.0.0.1'; "
                         f"GRANT ALL ON `{pattern}`.* TO '{user}'@'127.0.0.1'; CREATE DATABASE `{name}`;")
            bk = _latest(customer)
            refused = _move(customer, "web-my-b", bk)
            assert refused.status == "failed" and f"a database named {name} exists already on host web-my-b's" in \
                refused.error, refused.error
            assert not new_root.exists()
            server_b.sql(f"DROP DATABASE `{name}`;")

            run = _move(customer, "web-my-b", bk)
            log = "\n".join(line.text for line in run.log_lines.all())
            assert run.status == "succeeded", run.error + log
            assert Customer.objects.get(pk=customer.pk).host.name == "web-my-b"
            assert server_b.sql(f"SELECT count(*) FROM `{name}`.carts;").stdout.strip() == "41"  # there now
            assert password not in log
    finally:
        kill_pm2_under(old_root)
        kill_pm2_under(new_root)
        subprocess.run(["rm", "-rf", str(old_root)], check=False)
