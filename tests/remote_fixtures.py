"""Helpers for the remote backup tests: a Host row for a simulated host (tests/hosts.py), a customer there, a
backup run executed in this process, and a private PostgreSQL server inside a host's network namespace (listening
on *its* 127.0.0.1: the worker reaches it only through a forward of the SSH session)."""

from __future__ import annotations

import contextlib
import os
import pwd
import sqlite3
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from engines import scratchdb, scratchmysql
from engines.dbrestore import DbTarget


def make_host(h, name: str):
    from hosts.models import Host

    return Host.objects.create(name=name, ssh_user="root", address=h.address, port=h.port, host_key=h.host_public,
                               private_key=h.client_private, customers_root=str(h.customers_root))


def seed_tree(root: Path, *, big: int = 0) -> None:
    """A small service tree with the kinds of entries a backup carries, a config file, a SQLite database."""
    (root / "backend" / "src" / "deep").mkdir(parents=True)
    (root / "backend" / "src" / "app.js").write_text("console.log('hi')\n")
    (root / "backend" / "src" / "deep" / "data.bin").write_bytes(os.urandom(64 << 10))
    (root / "backend" / "run.sh").write_text("#!/bin/sh\n")
    (root / "backend" / "run.sh").chmod(0o755)
    (root / "backend" / "current").symlink_to("src")
    (root / "backend" / "empty").mkdir()
    (root / "backend" / "logs").mkdir()
    (root / "backend" / "logs" / "x.log").write_text("log\n")
    (root / "backend" / ".env").write_text("SECRET=backend\n")
    (root / ".env").write_text("ROOT=1\n")
    if big:
        (root / "backend" / "big.bin").write_bytes(os.urandom(big))
    (root / "data").mkdir()
    con = sqlite3.connect(root / "data" / "cache.sqlite3")
    con.execute("CREATE TABLE hits (id INTEGER PRIMARY KEY, what TEXT)")
    con.executemany("INSERT INTO hits (what) VALUES (?)", [(f"hit {i}",) for i in range(37)])
    con.commit()
    con.close()


def remote_customer(h, host, team, *, databases=(), big: int = 0, sqlite: bool = True, name: str = ""):
    from customers.services import customer_create
    from engines import dburl

    root = h.customers_root / (name or f"shop-{uuid.uuid4().hex[:6]}")
    root.mkdir(mode=0o750)
    seed_tree(root, big=big)
    dbs = [(n, dburl.parse(u)) for n, u in databases]
    if sqlite:
        dbs.append(("cache", dburl.parse(f"sqlite:///{root}/data/cache.sqlite3")))
    return customer_create(domain=f"{root.name}.example.com", root=str(root), team=team,
                           services=[("backend", "backend")], databases=dbs, host=host)


def run_backup(customer, *, scope=None, bandwidth: float | None = None):
    """Start and execute a backup run here; the run, refreshed."""
    from backups.services import backup_start
    from operations.models import Run
    from operations.services import run_execute

    run = backup_start(customer, scope=scope, via="cli", enqueue=False)
    if bandwidth:
        Run.objects.filter(pk=run.pk).update(params={**run.params, "bandwidth_limit_mbps": bandwidth})
    run_execute(run.pk)
    run.refresh_from_db()
    return run


def run_verify(backup):
    from backups.services import verify_start
    from operations.services import run_execute

    run = verify_start(backup, via="cli", enqueue=False)
    run_execute(run.pk)
    run.refresh_from_db()
    return run


def in_thread(fn, *args, **kwargs):
    """Run fn in a thread (its own database connection); returns (thread, box) with box["result"/"error"]."""
    from django.db import connection

    box: dict = {}

    def body():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test
            box["error"] = exc
        finally:
            connection.close()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


def copy_dirs() -> set[str]:
    """The host-side private SQLite copies that exist now (the simulated hosts share this filesystem)."""
    found = set()
    for base in ("/var/tmp", "/tmp"):
        with contextlib.suppress(OSError):
            found |= {os.path.join(base, n) for n in os.listdir(base) if n.startswith("kasa-sqlite-")}
    return found


class NetnsPostgres(scratchdb.ScratchPostgres):
    """A throwaway PostgreSQL server started inside a network namespace, listening on the namespace's own
    127.0.0.1 (plus a Unix socket in its folder, for this test's own setup only)."""

    def __init__(self, netns: str):
        super().__init__()
        self.netns = netns

    def _launch(self, postgres: str, data: str) -> bool:
        settings = {**scratchdb.SERVER_SETTINGS, "port": str(self.port), "unix_socket_directories": self.socket_dir}
        argv = [postgres, "-D", data] + [a for k, v in settings.items() for a in ("-c", f"{k}={v}")]
        drop = []
        if self._ids:  # `ip netns exec` needs root; the server itself runs as the unprivileged user
            drop = ["setpriv", f"--reuid={self._ids[0]}", f"--regid={self._ids[1]}", "--clear-groups"]
        with open(os.path.join(self.folder, "server.log"), "ab") as log:
            self._proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *drop, *argv],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                                       "LC_ALL": "C", "TZ": "UTC"})
        import time

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres in {self.netns} did not start: {self._log_tail()}")
            if self._ready():
                return True
            time.sleep(0.1)
        raise RuntimeError(f"postgres in {self.netns} was not ready: {self._log_tail()}")


@contextlib.contextmanager
def host_only_postgres(netns: str, rows: int = 123):
    """A database with `rows` rows in public.orders on a server only the namespace reaches; yields its URL as the
    host sees it (postgresql://user:password@127.0.0.1:PORT/db) and the password."""
    import psycopg

    server = NetnsPostgres(netns)
    with server as admin:
        assert isinstance(admin, DbTarget)
        password = f"pw-{uuid.uuid4().hex}"
        with psycopg.connect(host=server.socket_dir, port=server.port, user="postgres", dbname="postgres",
                             autocommit=True) as con:
            con.execute(f"CREATE ROLE shop LOGIN PASSWORD '{password}'")
            con.execute("CREATE DATABASE shop OWNER shop")
        with psycopg.connect(host=server.socket_dir, port=server.port, user="shop", dbname="shop") as con:
            con.execute("CREATE TABLE orders (id serial PRIMARY KEY, total numeric)")
            con.execute("INSERT INTO orders (total) SELECT g * 1.5 FROM generate_series(1, %s) g", (rows,))
            con.execute("CREATE SCHEMA shop")
            con.execute("CREATE TABLE shop.items (id int)")
        with psycopg.connect(host=server.socket_dir, port=server.port, user="postgres", dbname="postgres") as con:
            version = con.execute("SHOW server_version").fetchone()[0]
        yield {"url": f"postgresql://shop:{password}@127.0.0.1:{server.port}/shop", "password": password,
               "port": server.port, "server": server, "server_version": version}


@pytest.fixture
def parents_open():
    """A function that lets every user through the folders above a root (pytest's are root's alone, 0700) so a
    customer's user reaches its root, as on a real host; their modes are put back when the test ends (the hosts of
    one session share those folders, and other tests expect them closed)."""
    changed: dict[Path, int] = {}

    def open_(root: Path) -> None:
        for up in Path(root).parents:
            if up == Path("/tmp") or up == Path("/"):
                break
            mode = up.stat().st_mode & 0o7777
            if not mode & 0o001:
                changed.setdefault(up, mode)
                up.chmod(mode | 0o001)

    yield open_
    for path, mode in changed.items():
        if path.name.startswith("pytest-of-"):
            continue  # shared by every test session of this user (pytest's own): another one may be inside it now
        with contextlib.suppress(OSError):
            path.chmod(mode)


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


@pytest.fixture(scope="session")
def host_pg(netns_hosts):
    """(simulated host, its host-only PostgreSQL as host_only_postgres yields it: 123 rows), one per session: the
    remote backup, check and security tests share its server (an initdb is 1.5 s)."""
    h = netns_hosts.make()
    with host_only_postgres(h.name, rows=123) as pg:
        yield h, pg


class NetnsMariaDB(scratchmysql.ScratchMariaDB):
    """A throwaway MariaDB server inside a network namespace, listening on the namespace's own 127.0.0.1:`port`
    (the address a customer's URL names there; the worker reaches it only through a forward of the SSH session),
    plus a socket file in its folder, through which this test, as root (unix_socket), sets it up."""

    def __init__(self, netns: str, port: int):
        super().__init__()
        self.netns, self.wanted = netns, port

    @property
    def socket(self) -> str:
        return os.path.join(self.socket_dir, "mysqld.sock")

    def _launch(self, server: str) -> bool:
        import time

        self.port = self.wanted
        argv = [server, "--no-defaults", f"--datadir={os.path.join(self.folder, 'data')}", f"--socket={self.socket}",
                f"--pid-file={os.path.join(self.folder, 'mysqld.pid')}",
                f"--log-error={os.path.join(self.folder, 'server.log')}",
                f"--tmpdir={os.path.join(self.folder, 'tmp')}", f"--port={self.port}",
                f"--bind-address={scratchmysql.HOST}", *scratchmysql.SERVER_SETTINGS]
        drop = ["setpriv", f"--reuid={self._ids[0]}", f"--regid={self._ids[1]}", "--clear-groups"] if self._ids else []
        self._proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *drop, *argv], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.folder,
                                      start_new_session=True, env={"PATH": scratchmysql.SEARCH_PATH, "LC_ALL": "C",
                                                                   "TZ": "UTC"})
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mariadbd in {self.netns} did not start: {self._log_tail()}")
            if self.sql("SELECT 1", check=False).returncode == 0:
                return True
            time.sleep(0.1)
        raise RuntimeError(f"mariadbd in {self.netns} was not ready: {self._log_tail()}")

    def sql(self, script: str, *, check: bool = True) -> subprocess.CompletedProcess:
        import shutil

        client = shutil.which("mariadb") or shutil.which("mysql")
        return subprocess.run([client, "--no-defaults", f"--socket={self.socket}", "-uroot", "--skip-column-names"],
                              input=script, capture_output=True, text=True, check=check, timeout=30)
