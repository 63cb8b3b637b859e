"""Issue 14: backups (and verification drills) of customers on remote hosts.

Real parts only: a simulated host is a network namespace with OpenSSH's sshd (tests/hosts.py), its customers'
files on the shared filesystem but reached only through SSH by the backup; PostgreSQL runs inside the host's
namespace on its own 127.0.0.1, so the worker reaches it only through the session's forward; the artifacts are
checked by decrypting them here and by the verification drill (every artifact restored into the worker's
scratch, row counts compared)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pwd
import sqlite3
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings

from backups.models import Backup
from customers.models import Customer, DatabaseConnection, Service
from engines.backupcrypto import KeyRing, decrypt_stream
from operations.models import Run
from tests.conftest import port_open, wait_until
from tests.remote_fixtures import (
    copy_dirs,
    in_thread,
    make_host,
    remote_customer,
    run_backup,
    run_verify,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def web(netns_hosts):
    return netns_hosts.make()


def _plain(path: Path) -> bytes:
    out = io.BytesIO()
    with open(path, "rb") as fh:
        decrypt_stream(fh, out, KeyRing(settings.KASA_BACKUP_KEYS))
    return subprocess.run(["zstd", "-d", "-q", "-c"], input=out.getvalue(), capture_output=True,
                          check=True).stdout


def _files(folder: Path) -> dict[str, str]:
    """relative path → sha256 of each file, the target of each link, "dir" for each folder (logs excluded)."""
    found = {folder.name: "dir"}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder.parent))
        if "logs" in p.relative_to(folder).parts:
            continue
        found[rel] = (f"-> {p.readlink()}" if p.is_symlink() else "dir" if p.is_dir()
                      else hashlib.sha256(p.read_bytes()).hexdigest())
    return found


def _members(data: bytes) -> dict[str, str]:
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            found[m.name.rstrip("/")] = (f"-> {m.linkname}" if m.issym() else "dir" if m.isdir()
                                         else hashlib.sha256(tar.extractfile(m).read()).hexdigest())
    return found


def test_a_remote_customers_files_and_sqlite_database_back_up_over_ssh_and_verify(web, team):
    host = make_host(web, "web-files")
    customer = remote_customer(web, host, team)
    root = Path(customer.root)
    before = copy_dirs()

    run = run_backup(customer)
    assert run.status == "succeeded", run.error
    bk = Backup.objects.get(run=run)
    folder = Path(bk.target.store().location(bk.prefix))
    assert sorted(p.name for p in folder.iterdir()) == ["backend.tar.zst.enc", "backup.json", "config.tar.zst.enc",
                                                        "db-cache.sqlite3.zst.enc"]
    # The files as they are on the host, member for member (logs excluded as locally), the config files, the rows.
    assert _members(_plain(folder / "backend.tar.zst.enc")) == _files(root / "backend")
    assert set(_members(_plain(folder / "config.tar.zst.enc"))) == {".env", "backend/.env"}
    copy = Path(settings.KASA_SCRATCH_DIR) / f"remote-{bk.pk}.sqlite3"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(_plain(folder / "db-cache.sqlite3.zst.enc"))
    try:
        rows = sqlite3.connect(copy).execute("SELECT count(*), max(what) FROM hits").fetchone()
    finally:
        copy.unlink()
    assert rows == (37, "hit 9")
    manifest = json.loads((folder / "backup.json").read_text())
    assert manifest["instance"]["root"] == customer.root
    db = next(a for a in manifest["artifacts"] if a["kind"] == "database")["database"]
    assert db["row_counts"] == {"hits": 37} and db["engine"] == "sqlite"
    assert copy_dirs() == before  # the host-side copy went with its stream

    drill = run_verify(bk)
    assert drill.status == "succeeded", drill.error
    assert drill.result["verified"] and {c["artifact"] for c in drill.result["checks"]} == {
        "backend.tar.zst.enc", "config.tar.zst.enc", "db-cache.sqlite3.zst.enc"}
    # A deep drill would start the customer's code on this worker: refused when asked for, before any work, and
    # the backup's verification stands.
    from operations.services import run_execute, run_start

    deep = run_start(customer, kind="verify", via="cli", params={"backup": bk.pk, "deep": True}, enqueue=False)
    run_execute(deep.pk)
    deep.refresh_from_db()
    assert deep.status == "failed" and "deep drill refused" in deep.error and "web-files" in deep.error
    bk.refresh_from_db()
    assert bk.verify_status == Backup.VerifyStatus.PASSED


def test_a_postgresql_database_only_the_host_can_reach_is_dumped_through_a_forward_with_kasas_own_pg_dump(
        host_pg, team):
    web, pg = host_pg
    host = make_host(web, "web-pg")
    # The database's address means the host's own loopback: from the worker nothing answers there.
    assert not port_open("127.0.0.1", pg["port"], 0.3)
    customer = remote_customer(web, host, team, databases=[("main", pg["url"])], sqlite=False)
    # The same server through its Unix socket folder on the host (a `host` starting with "/", as libpq reads it).
    DatabaseConnection.objects.create(customer=customer, name="sock", engine="postgresql",
                                      host=pg["server"].socket_dir, port=pg["port"], database="shop", user="shop",
                                      password=pg["password"])
    run = run_backup(customer, scope="database")
    assert run.status == "succeeded", run.error
    bk = Backup.objects.get(run=run)
    art, sock = bk.manifest["artifacts"]
    assert art["name"] == "db-main.pgdump.zst.enc" and sock["name"] == "db-sock.pgdump.zst.enc"
    assert art["database"]["row_counts"] == sock["database"]["row_counts"] == {"public.orders": 123,
                                                                              "shop.items": 0}
    # Kasa's own client (the worker's newest pg_dump), never the host's: client ≥ server holds.
    from engines import sources

    assert art["database"]["client_version"] == sources.pg_tools()[0][2]
    assert _plain(Path(bk.target.store().location(bk.prefix)) / art["name"]).startswith(b"PGDMP")

    drill = run_verify(bk)  # restores into the worker's scratch server: rows as in the manifest
    assert drill.status == "succeeded", drill.error
    assert drill.result["checks"] == [{"artifact": "db-main.pgdump.zst.enc", "tables": 2, "rows": 123},
                                      {"artifact": "db-sock.pgdump.zst.enc", "tables": 2, "rows": 123}]


def test_losing_the_host_mid_stream_fails_the_backup_naming_the_host_and_leaves_no_partial_objects(web, team):
    host = make_host(web, "web-cut")
    customer = remote_customer(web, host, team, big=24 << 20)
    before = copy_dirs()
    # 8 MB/s: the 24 MiB of random data stream for ~3 s, more than the pipes and the SSH window hold, so the cut
    # lands in the middle of tar's stream.
    thread, box = in_thread(run_backup, customer, bandwidth=8)
    wait_until(lambda: Run.objects.filter(customer=customer, progress_done__gt=1 << 20).exists(), 20,
               interval=0.05, what="the tar stream under way")
    assert web.kill_sessions()
    thread.join(60)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    run = box["result"]
    assert run.status == "failed"
    assert "backend.tar.zst.enc: host web-cut (root@" in run.error and "unreachable" in run.error, run.error
    bk = Backup.objects.get(run=run)
    assert bk.status == "failed" and "web-cut" in bk.error
    location = Path(bk.target.store().location(bk.prefix))
    assert not location.exists() or not any(location.iterdir())  # every partial object removed
    assert copy_dirs() == before  # the SQLite copy streamed before the cut and was removed
    time.sleep(0.2)
    assert run_backup(customer).status == "succeeded"  # the next backup reconnects


def test_a_remote_root_must_lie_in_its_hosts_customers_root_and_overlap_no_other_root_of_that_host(
        web, team, customer_root):
    from customers.services import CustomerInputError, customer_create

    host = make_host(web, "web-roots")
    other = make_host(web, "web-roots2")
    inside = web.customers_root / "alpha"
    inside.mkdir()
    customer_create(domain="alpha.example.com", root=str(inside), team=team, host=host)
    for root, why in [(str(customer_root), "is not inside"), (str(web.customers_root), "is not inside"),
                      (str(inside / "sub"), "lies inside another customer's root"),
                      (str(inside), "is another customer's root")]:
        with pytest.raises(CustomerInputError, match=why):
            customer_create(domain="beta.example.com", root=root, team=team, host=host)
    # The same path on another host is another folder: saved, and both may be backed up at once.
    gamma = customer_create(domain="gamma.example.com", root=str(inside), team=team, host=other)
    from backups.services import backup_start

    first, second = (backup_start(c, via="cli", enqueue=False) for c in (Customer.objects.get(host=host), gamma))
    assert (first.root, second.root) == (f"web-roots:{inside}", f"web-roots2:{inside}")
    # And a local customer is held to KASA_CUSTOMERS_ROOT as before.
    with pytest.raises(CustomerInputError, match="KASA_CUSTOMERS_ROOT"):
        customer_create(domain="delta.example.com", root=str(web.customers_root / "delta"), team=team)


def test_a_sqlite_copy_whose_connection_was_cut_is_removed_through_a_fresh_one(web, team):
    from backups import remote

    customer = remote_customer(web, make_host(web, "web-copy"), team)
    with remote.RemoteHost(customer.host) as host:
        folder = host.call("engines.hostside.private_copy_dir")
        assert Path(folder).is_dir()
        web.kill_sessions()  # the helper and the master go with the connection
        with pytest.raises(remote.RemoteError, match="web-copy"):
            host.call("os.getpid")
        remote._remove_copy(host, folder)
    assert not Path(folder).exists()


def test_a_mariadb_database_behind_a_socket_on_the_host_is_dumped_through_a_forward(web, team, mysql_database):
    from tests.conftest import mysql_admin, require

    sock = "/run/mysqld/mysqld.sock"  # the host's socket file (the simulated host shares this filesystem)
    require(Path(sock).is_socket(), f"MariaDB's socket at {sock}")
    name = mysql_database["name"]
    mysql_admin(f"CREATE TABLE `{name}`.carts (id INT PRIMARY KEY); "
                f"INSERT INTO `{name}`.carts VALUES (1), (2), (3), (4), (5), (6), (7);")
    customer = remote_customer(web, make_host(web, "web-my"), team, sqlite=False)
    DatabaseConnection.objects.create(customer=customer, name="shop", engine="mysql", host=sock, port=3306,
                                      database=name, user=mysql_database["user"], password=mysql_database["password"])
    run = run_backup(customer, scope="database")
    assert run.status == "succeeded", run.error
    bk = Backup.objects.get(run=run)
    (art,) = bk.manifest["artifacts"]
    assert art["name"] == "db-shop.sql.zst.enc" and art["database"]["row_counts"] == {"carts": 7}
    sql = _plain(Path(bk.target.store().location(bk.prefix)) / art["name"]).decode()
    assert "CREATE TABLE `carts`" in sql and "INSERT INTO `carts` VALUES" in sql and "(7)" in sql


def test_a_disabled_host_or_one_whose_key_is_not_trusted_refuses_its_customers_backups(web, team):
    from hosts.models import Host

    customer = remote_customer(web, make_host(web, "web-off"), team, sqlite=False)
    Host.objects.filter(name="web-off").update(enabled=False)
    run = run_backup(customer)
    assert run.status == "failed" and "host web-off is disabled" in run.error
    Host.objects.filter(name="web-off").update(enabled=True, host_key="")
    run = run_backup(customer)
    assert run.status == "failed" and "no host key is trusted yet" in run.error and "web-off" in run.error
    assert not Backup.objects.filter(customer=customer, status="succeeded").exists()


@contextlib.contextmanager
def _decoy():
    """An HTTP server on the worker's 127.0.0.1 answering 200 to everything; its URL."""
    import http.server

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health"
    finally:
        server.shutdown()
        server.server_close()


def test_a_check_of_a_remote_customer_looks_at_its_folders_user_and_databases_on_the_host(
        host_pg, team, customer_users):
    import os

    from operations.services import run_execute, run_start

    web, pg = host_pg
    user = customer_users[0]
    host = make_host(web, "web-check")
    customer = remote_customer(web, host, team, databases=[("main", pg["url"])])
    root = Path(customer.root)
    uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
    os.chown(root / "backend", uid, -1)
    os.chown(root, 0, gid)  # the ownership model: Kasa's (the login user's), the customer's group may enter
    root.chmod(0o750)
    Customer.objects.filter(pk=customer.pk).update(run_as=user)

    def check():
        run = run_start(customer, kind="check", via="cli", enqueue=False)
        run_execute(run.pk)
        run.refresh_from_db()
        return run

    # The user is the host's, looked up there; and it cannot reach the root yet (pytest's folders are 0700).
    run = check()
    assert run.status == "failed" and f"run as: {user} (uid {uid}) cannot enter the root folder" in run.error
    above = [p for p in root.parents if p.stat().st_mode & 0o001 == 0]
    modes = {p: p.stat().st_mode & 0o7777 for p in above}
    try:
        for p in above:
            p.chmod(modes[p] | 0o001)
        run = check()
        assert run.status == "succeeded", run.error
        assert run.result["host"] == "web-check" and run.result["root"] == {"path": str(root), "ok": True}
        assert run.result["run_as"] == {"user": user, "ok": True, "uid": uid}
        assert [(d["name"], d["ok"]) for d in run.result["databases"]] == [("cache", True), ("main", True)]
        main = next(d for d in run.result["databases"] if d["name"] == "main")
        assert main["server_version"] == pg["server_version"]  # the host-only server answered

        # A health URL names the service as its host sees it: asked on the host, where nothing listens on that
        # port — never on the worker, where a decoy answers 200 at the same address.
        with _decoy() as decoy_url:
            Service.objects.filter(customer=customer).update(health_url=decoy_url)
            run = check()
            Service.objects.filter(customer=customer).update(health_url="")
        assert run.status == "failed" and f"health URL {decoy_url} unreachable" in run.error, run.error

        # What is wrong on the host is found there: a folder open to all, a service folder gone, a server down
        # (nothing listens on the host's 127.0.0.1:9).
        root.chmod(0o755)
        (root / "backend").rename(root / "backend-gone")
        DatabaseConnection.objects.filter(customer=customer, name="main").update(port=9)
        run = check()
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert run.status == "failed"
    assert "is open to every user (mode 0755)" in run.error and "on host web-check" in run.error
    assert "service backend: folder backend does not exist on web-check" in run.error
    assert "database main:" in run.error and "(through web-check)" in run.error
    assert str(Path(settings.KASA_VAR_DIR)) not in run.error  # no path of the worker's in what the host refused

    # A root swapped for a link out of the host's customers root is found on the host, links followed there.
    root.rename(root.with_name(root.name + "-moved"))
    root.symlink_to("/etc")
    run = check()
    assert run.status == "failed" and "resolves to '/etc', outside" in run.error and "customers root" in run.error
    assert run.result["services"][0]["error"] == "not checked: the root folder has problems"


def test_a_remote_customers_extra_config_paths_are_matched_on_the_host_and_fifos_named(web, team):
    """Issue 15: the policy's extra config paths are globbed on the host, by the same rules as locally (a symlink
    or a symlinked folder there is never taken); a FIFO there is named at backup time like a local one."""
    import os

    from backups.models import BackupPolicy
    from backups.services import default_target

    host = make_host(web, "web-config-paths")
    customer = remote_customer(web, host, team, sqlite=False)
    root = Path(customer.root)
    (root / "station_info.json").write_text('{"station": 7}\n')
    (root / "nginx").mkdir()
    (root / "nginx" / "site.conf").write_text("server {}\n")
    (root / "nginx" / "host.conf").symlink_to("/etc/hostname")
    (root / "elsewhere").symlink_to("/etc")
    os.mkfifo(root / "backend" / "queue")
    BackupPolicy.objects.create(customer=customer, target=default_target(),
                                config_paths=["station_info.json", "nginx/*.conf", "elsewhere/*.conf"])

    run = run_backup(customer)
    assert run.status == "succeeded", run.error
    bk = Backup.objects.get(run=run)
    config = bk.artifacts.get(kind="config")
    assert config.details["files"] == [".env", "backend/.env", "station_info.json", "nginx/site.conf"]
    folder = Path(bk.target.store().location(bk.prefix))
    members = _members(_plain(folder / config.name))
    assert set(members) == {".env", "backend/.env", "station_info.json", "nginx/site.conf"}
    assert members["station_info.json"] == hashlib.sha256(b'{"station": 7}\n').hexdigest()
    assert bk.artifacts.get(kind="service").details["unrestorable"] == {
        "count": 1, "examples": ["backend/queue (a FIFO)"]}
    assert "1 file(s) a restore never creates (backend/queue (a FIFO))" in " ".join(
        run.log_lines.filter(level="warning").values_list("text", flat=True))
