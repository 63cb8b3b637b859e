"""Issue 14: restores in place of customers on remote hosts (backups.remote_restore).

Real parts only: a simulated host is a network namespace with OpenSSH's sshd (tests/hosts.py) whose filesystem is
this machine's (so the test looks at the files directly, while the restore reaches them only through SSH); its
PostgreSQL listens on the namespace's own 127.0.0.1 (host_pg: the worker reaches it only through the session's
forward); PM2 runs inside the namespace (started over SSH), as the customer's user, serving a health URL that the
worker asks over the namespace's address."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import signal
import sqlite3
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import psycopg
import pytest
from django.conf import settings

from backups.models import Backup
from engines import hostrestore
from engines.procbase import REPO_ROOT
from tests.conftest import free_port, kill_pm2_under
from tests.remote_fixtures import in_thread, make_host, remote_customer, run_backup
from tests.restore_helpers import tree_state

pytestmark = pytest.mark.django_db(transaction=True)

SERVER_JS = r"""
const http = require("http"), fs = require("fs");
http.createServer((req, res) => {
  let text = "";
  try { text = fs.readFileSync("health.txt", "utf8").trim(); } catch (e) {}
  res.writeHead(text === "ok" ? 200 : 503); res.end(text + "\n");
}).listen(Number(process.argv[2]), "0.0.0.0");
"""


@pytest.fixture
def fast(settings):
    settings.KASA_REMOTE_PM2 = str(REPO_ROOT / "node_modules" / ".bin" / "pm2")
    settings.KASA_PM2_SETTLE = 0.5
    settings.KASA_HEALTH_STREAK = 1
    settings.KASA_HEALTH_TIMEOUT = 2.5
    settings.KASA_HEALTH_INTERVAL = 0.2
    return settings


def _rows(pg) -> int:
    server = pg["server"]
    with psycopg.connect(host=server.socket_dir, port=server.port, user="postgres", dbname="shop") as con:
        return con.execute("SELECT count(*) FROM orders").fetchone()[0]


def _sql(pg, sql: str) -> None:
    server = pg["server"]
    with psycopg.connect(host=server.socket_dir, port=server.port, user="postgres", dbname="shop",
                         autocommit=True) as con:
        con.execute(sql)


def _reset(pg) -> None:
    """The host's database as host_pg made it (123 orders), whatever an earlier test left."""
    _sql(pg, "DELETE FROM orders WHERE id > 123")
    _sql(pg, "INSERT INTO orders (id, total) SELECT g, g * 1.5 FROM generate_series(1, 123) g ON CONFLICT DO NOTHING")


def _customer(h, host, team, user: str, parents_open, *, databases=(), health: bool = True, sqlite: bool = False,
              loopback: bool = False):
    """A remote customer run by PM2 as `user`, its folders owned as Kasa's ownership model says; `loopback`: its
    health URL names the host's own 127.0.0.1 (asked there; the URL returned is the one the test reaches)."""
    from customers.models import Customer, Service

    customer = remote_customer(h, host, team, databases=databases, sqlite=sqlite)
    root = Path(customer.root)
    parents_open(root)  # pytest's folders are root's alone: the customer's user must reach its root
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
        health_url=f"http://{'127.0.0.1' if loopback else h.address}:{port}/health" if health else "")
    customer.refresh_from_db()
    return customer, f"http://{h.address}:{port}/health"


def _restore(bk: Backup, **kw):
    from backups.services import restore_start
    from operations.services import run_execute

    run = restore_start(bk, confirmed=True, via="cli", enqueue=False, **kw)
    run_execute(run.pk)
    run.refresh_from_db()
    return run


def _answers(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as res:
            return res.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _journals(h) -> list[str]:
    folder = h.customers_root / hostrestore.JOURNALS
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_a_remote_customer_restores_in_place_files_databases_and_services_healthy(host_pg, team, customer_users, fast,
                                                                                  parents_open):
    h, pg = host_pg
    user = customer_users[0]
    _reset(pg)
    host = make_host(h, "web-restore")
    # Its health URL is the host's 127.0.0.1: asked on the host (nothing listens there on the worker).
    customer, url = _customer(h, host, team, user, parents_open, databases=[("main", pg["url"])], sqlite=True,
                              loopback=True)
    root = Path(customer.root)
    cache = root / "data" / "cache.sqlite3"
    try:
        assert _backup_ok(customer)
        bk = Backup.objects.filter(customer=customer, status="succeeded").latest("pk")
        before, rows = tree_state(root), _rows(pg)
        # What happens after the backup: files changed, added and removed, a config file changed, rows deleted.
        (root / "backend" / "src" / "app.js").write_text("console.log('changed')\n")
        (root / "backend" / "src" / "new.js").write_text("new\n")
        (root / "backend" / "run.sh").unlink()
        (root / ".env").write_text("ROOT=2\n")
        (root / "backend" / "logs" / "today.log").write_text("kept\n")
        _sql(pg, "DELETE FROM orders WHERE id > 100")
        assert _rows(pg) == 100
        with sqlite3.connect(cache) as con:
            con.execute("DELETE FROM hits WHERE id > 30")

        run = _restore(bk)
        log = "\n".join(line.text for line in run.log_lines.all())
        assert run.status == "succeeded", log
        assert "unpacked into staging on web-restore as " + user in log and "in one transaction" in log
        after = tree_state(root)
        today = after.pop(os.path.join("backend", "logs", "today.log"))  # today's logs are carried over, kept
        assert today[0] == "file"
        assert after == before
        assert _rows(pg) == rows == 123
        with sqlite3.connect(cache) as con:  # put back on the host, through the swap, with its owner
            assert con.execute("SELECT count(*) FROM hits").fetchone()[0] == 37
        assert cache.stat().st_uid == pwd.getpwnam(user).pw_uid
        assert not [n for n in os.listdir(cache.parent) if n.startswith(".cache.sqlite3.kasa-")]
        uid = pwd.getpwnam(user).pw_uid
        for p in (root / "backend").rglob("*"):
            if "logs" in p.parts:
                continue  # today's logs, carried over as they were (this test wrote them as root)
            st = p.lstat()
            assert st.st_uid == uid and not st.st_mode & 0o6000, p
        assert (root / "backend").stat().st_uid == uid
        assert _answers(url) == 200  # started on the host by PM2, as the customer's user
        apps = subprocess.run(["ps", "-o", "user=", "-C", "node"], capture_output=True, text=True).stdout.split()
        assert user in apps or str(uid) in apps
        assert not [n for n in os.listdir(root) if n.startswith(".kasa-restore-")]
        assert _journals(h) == []  # the host's journal goes once the restore holds
        assert run.result["host"] == "web-restore" and run.result["safety_backup"]
    finally:
        kill_pm2_under(root)
        _reset(pg)


def test_a_remote_customer_whose_service_runs_by_start_command_is_restored_and_started_on_the_host_as_its_user(
        netns_hosts, team, customer_users, fast, parents_open):
    """Process control on a host for a service that is not PM2's: its start command is launched there by Kasa's
    launcher program run by the host's python3 (nothing installed), as the customer's user, its pid file in the
    root's .kasa-services (the login user's), stopped before the swap and started after it."""
    from customers.models import Service

    h = netns_hosts.make()
    user = customer_users[1]
    customer, _url = _customer(h, make_host(h, "web-command"), team, user, parents_open, loopback=True)
    svc = Service.objects.get(customer=customer, name="backend")
    Service.objects.filter(pk=svc.pk).update(process_manager="command", app_name="")
    customer.refresh_from_db()
    root = Path(customer.root)
    port = svc.start_command[-1]
    pidfile = root / hostrestore.service_state_dir("") / "backend.pid"
    try:
        assert _backup_ok(customer)
        bk = Backup.objects.filter(customer=customer, status="succeeded").latest("pk")
        before = tree_state(root)
        (root / "backend" / "src" / "app.js").write_text("console.log('changed')\n")

        run = _restore(bk)
        log = "\n".join(line.text for line in run.log_lines.all())
        assert run.status == "succeeded", log
        after = tree_state(root)
        assert {k: v for k, v in after.items() if not k.startswith(".kasa-services")} == before
        assert _answers(f"http://{h.address}:{port}/health") == 200  # started on the host by its command
        pid = int(pidfile.read_text().split()[0])
        assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam(user).pw_uid  # as the customer's user
        assert (pidfile.parent.stat().st_mode & 0o777) == 0o700 and pidfile.parent.stat().st_uid == 0
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pidfile.read_text().split()[0]), signal.SIGKILL)


def _backup_ok(customer) -> bool:
    run = run_backup(customer)
    assert run.status == "succeeded", run.error
    return True


def _hostile(bk: Backup) -> None:
    """Replace the backup's backend archive with one holding a member that climbs out of its folder (re-signed:
    its checksum and size in the control database say it is the real one)."""
    import hashlib

    from engines.backupcrypto import EncryptingWriter, KeyRing

    art = bk.artifacts.get(kind="service")
    path = Path(bk.target.store().location(bk.prefix)) / art.name
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("backend/ok.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"ok\n"))
        evil = tarfile.TarInfo("../../escaped.txt")
        evil.size = 5
        tar.addfile(evil, io.BytesIO(b"evil\n"))
    packed = subprocess.run(["zstd", "-q", "-c"], input=raw.getvalue(), capture_output=True, check=True).stdout
    out = io.BytesIO()
    with EncryptingWriter(out, KeyRing(settings.KASA_BACKUP_KEYS)) as w:
        w.write(packed)
    data = out.getvalue()
    path.write_bytes(data)
    type(art).objects.filter(pk=art.pk).update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def test_a_hostile_archive_is_refused_on_the_worker_before_anything_reaches_the_host(netns_hosts, team,
                                                                                     customer_users, fast,
                                                                                     parents_open):
    h = netns_hosts.make()
    host = make_host(h, "web-hostile")
    customer, _url = _customer(h, host, team, customer_users[0], parents_open, health=False)
    root = Path(customer.root)
    assert _backup_ok(customer)
    bk = Backup.objects.filter(customer=customer, status="succeeded").latest("pk")
    _hostile(bk)
    before = tree_state(root, skip=())
    run = _restore(bk, safety_backup=False)
    assert run.status == "failed"
    assert "refused on the worker, nothing reached host web-hostile" in run.error and "../../escaped.txt" in run.error
    assert tree_state(root, skip=()) == before  # no staging folder was ever made there
    assert not (h.customers_root.parent / "escaped.txt").exists()
    assert _journals(h) == []


def test_a_failure_after_the_swap_on_a_remote_host_is_undone_there_and_the_customer_is_left_as_it_was(
        host_pg, team, customer_users, fast, parents_open):
    h, pg = host_pg
    fast.KASA_HEALTH_TIMEOUT = 1.5  # the restored service answers 503 at once: no need to wait longer
    _reset(pg)
    host = make_host(h, "web-undo")
    customer, url = _customer(h, host, team, customer_users[0], parents_open, databases=[("main", pg["url"])],
                              sqlite=True)
    root = Path(customer.root)
    cache = root / "data" / "cache.sqlite3"
    try:
        (root / "backend" / "health.txt").write_text("broken\n")  # the backup holds a service that is unhealthy
        assert _backup_ok(customer)
        bk = Backup.objects.filter(customer=customer, status="succeeded").latest("pk")
        (root / "backend" / "health.txt").write_text("ok\n")
        (root / "backend" / "src" / "app.js").write_text("console.log('now')\n")
        _sql(pg, "DELETE FROM orders WHERE id > 120")
        with sqlite3.connect(cache) as con:
            con.execute("DELETE FROM hits WHERE id > 20")
        before, rows = tree_state(root), _rows(pg)
        assert rows == 120

        run = _restore(bk)
        assert run.status == "failed"
        assert "health check failed" in run.error and "the pre-restore state was put back" in run.error
        assert tree_state(root) == before
        assert _rows(pg) == 120
        with sqlite3.connect(cache) as con:  # swapped in on the host, then swapped back there
            assert con.execute("SELECT count(*) FROM hits").fetchone()[0] == 20
        assert not [n for n in os.listdir(cache.parent) if n.startswith(".cache.sqlite3.kasa-")]
        assert _answers(url) == 200  # the previous service is running again
        assert not [n for n in os.listdir(root) if n.startswith(".kasa-restore-")]
        assert _journals(h) == []
    finally:
        kill_pm2_under(root)
        _reset(pg)


def test_losing_the_host_mid_restore_fails_the_run_naming_the_host_and_leaves_the_journal_on_the_host(
        netns_hosts, team, customer_users, fast, monkeypatch, parents_open):
    from backups import host_journals, remote_restore

    fast.KASA_SSH_CONNECT_TIMEOUT = 2

    h = netns_hosts.make()
    host = make_host(h, "web-lost")
    customer, _url = _customer(h, host, team, customer_users[0], parents_open, health=False)
    root = Path(customer.root)
    try:
        assert _backup_ok(customer)
        bk = Backup.objects.filter(customer=customer, status="succeeded").latest("pk")
        (root / "backend" / "src" / "app.js").write_text("console.log('now')\n")
        before = tree_state(root)
        swapped = []
        real = remote_restore._swap_files

        def cut_after_the_swap(ctx, plan, remote, staging, journal):
            real(ctx, plan, remote, staging, journal)
            swapped.append(True)
            h.kill_sessions()  # the session's sshd child dies, and the host drops off the network
            h.cut()

        monkeypatch.setattr(remote_restore, "_swap_files", cut_after_the_swap)
        t, box = in_thread(_restore, bk, safety_backup=False)
        t.join(120)
        run = box.get("result")
        assert run is not None, box.get("error")
        assert swapped and run.status == "failed"
        assert "web-lost" in run.error and "ROLLBACK INCOMPLETE on host web-lost" in run.error
        names = _journals(h)
        assert names == [f"run-{run.pk}.json"]
        doc = json.loads((h.customers_root / hostrestore.JOURNALS / names[0]).read_text())
        assert {s["type"] for s in doc["body"]["steps"]} >= {"staging", "services_stopped", "files"}
        folder = (h.customers_root / hostrestore.JOURNALS).stat()
        assert folder.st_mode & 0o777 == 0o700 and folder.st_uid == 0
        # The host is back: its journal is what puts the customer back (backups.host_journals; the ways it is
        # called — probe, reaper, next restore — are tests/test_host_journals.py's).
        h.restore()
        assert [o.what for o in host_journals.replay_host(host)] == ["replayed"]
        assert tree_state(root) == before
        assert _journals(h) == []
    finally:
        h.restore() if not h.answers() else None
        kill_pm2_under(root)
