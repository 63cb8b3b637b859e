"""A private, throwaway MariaDB server: what a deep drill restores a MySQL/MariaDB dump into.

The copy's application must never reach the live server (the drill's side database there would be one grant
away from the live data, and the app would hold the live credentials). So, like engines.scratchdb for
PostgreSQL: `mariadb-install-db` into a fresh 0700 folder under base_dir, then `mariadbd --no-defaults` with
its own datadir, a unix socket in that folder and TCP on 127.0.0.1:<free port> only, tuned for data that is
thrown away (no flushing, no doublewrite, a small buffer pool, no binary log).

Logins: the system tables are created with one administrative account, `kasa_admin`@`127.0.0.1`, whose
password never leaves this process except through the client's defaults file (engines.credentials): the
install script receives only its mysql_native_password hash. Installing the accounts during the bootstrap
means the server never listens without a password. root@localhost is mariadb-install-db's own: unix_socket
authentication, on a socket inside the 0700 folder. `app_user` gives the application an account of its own
with ALL on its database alone.

Running as root: mariadbd refuses root, so the server runs as `nobody` (no supplementary groups; override with
KASA_SCRATCH_MYSQL_USER), which must reach the binaries and base_dir (o+x on every folder above them; a clear
error names the one that blocks). Not root: the server runs as the current user.

On exit the server gets SIGTERM (then SIGKILL after 20 s) and the folder is removed, even after an error. If
the worker itself is killed the server outlives it: the folder's name (kasa-scratch-my-*) tells what to remove.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time

from . import credentials, scratchsweep, sources
from .dbbase import DbTarget
from .dberrors import RestoreError
from .dbrestore_mysql import my_argv
from .scratchdb import SOCKET_PATH_MAX, ScratchServer, blocked_for, free_port

ADMIN = "kasa_admin"
APP_USER = "kasa_drill_app"
HOST = "127.0.0.1"
# The same settings for the bootstrap (which creates the InnoDB files) and the server.
INNODB_SETTINGS = [
    "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M", "--innodb-doublewrite=0",
    "--innodb-flush-log-at-trx-commit=0", "--innodb-use-native-aio=0",  # no AIO contexts: many drills at once
]
SERVER_SETTINGS = [  # a drill's data is thrown away: durability buys nothing and costs seconds
    *INNODB_SETTINGS, "--innodb-flush-method=nosync", "--innodb-fast-shutdown=2", "--skip-log-bin",
    "--skip-name-resolve", "--performance-schema=OFF", "--max-connections=30",
    "--character-set-server=utf8mb4", "--collation-server=utf8mb4_unicode_ci",  # --no-defaults would give latin1
]
SERVER_NAMES = ("mariadbd", "mysqld")
INSTALL_NAMES = ("mariadb-install-db", "mysql_install_db")
# Where packages put them; a worker's PATH often lacks the sbin folders.
SEARCH_PATH = "/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin:/usr/libexec"
# JSON of mysql.global_priv: every privilege (the bootstrap's own root rows use this very value).
ALL_PRIVILEGES = 18446744073709551615


def server_programs() -> tuple[str, str]:
    """(install script, server) of the installed MariaDB; RestoreError with what to install when missing."""
    def find(names) -> str | None:
        for name in names:
            path = shutil.which(name) or shutil.which(name, path=SEARCH_PATH)
            if path:
                return path
        return None

    install, server = find(INSTALL_NAMES), find(SERVER_NAMES)
    if not install or not server:
        raise RestoreError("no MariaDB server programs (mariadbd, mariadb-install-db) are installed on this worker: "
                           "install the Debian package mariadb-server (its own service may stay disabled)")
    try:
        sources.mysql_client_program()
    except sources.SourceError as exc:
        raise RestoreError(str(exc)) from None
    return install, server


def native_hash(password: str) -> str:
    """The mysql_native_password hash of a password: what the server stores (it does not log in by itself)."""
    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()


class ScratchMariaDB(ScratchServer):
    """A throwaway MariaDB server; the context yields the admin's DbTarget on 127.0.0.1:<free port>."""

    user_env = "KASA_SCRATCH_MYSQL_USER"
    password = ""  # the admin's, made at the start

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # --- start ---------------------------------------------------------------------
    def _start(self) -> DbTarget:
        install, server = server_programs()
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(self.run_as)
            except KeyError:
                raise RestoreError(f"user {self.run_as} does not exist: the scratch MariaDB server cannot run as "
                                   "root; set KASA_SCRATCH_MYSQL_USER to an unprivileged user") from None
            self._ids = (entry.pw_uid, entry.pw_gid)
        base = os.path.abspath(self.base_dir or tempfile.gettempdir())
        for path in (install, server, os.path.join(base, "x")):
            blocked = self._ids and blocked_for(path, *self._ids)
            if blocked:
                raise RestoreError(f"user {self.run_as} cannot reach {os.path.dirname(path)} ({blocked} lacks o+x): "
                                   "choose a base folder such as /tmp")
        os.makedirs(base, exist_ok=True)
        scratchsweep.sweep(base, "kasa-scratch-my-")  # servers a dead worker left running
        self.folder = tempfile.mkdtemp(prefix="kasa-scratch-my-", dir=base)  # 0700
        self._chown(self.folder)
        self.socket_dir = self.folder
        if len(self.folder) > SOCKET_PATH_MAX - 12:  # "/mysqld.sock" must fit in sockaddr_un
            self.socket_dir = tempfile.mkdtemp(prefix="kasa-my-", dir="/tmp")
            self._own_socket_dir = True
            self._chown(self.socket_dir)
        scratchsweep.claim(self.folder, socket_dir=self.socket_dir if self._own_socket_dir else None)
        tmp = os.path.join(self.folder, "tmp")
        os.mkdir(tmp, 0o700)
        self._chown(tmp)
        self.password = secrets.token_urlsafe(24)
        self._install(install, os.path.join(self.folder, "data"))
        for _attempt in range(3):  # another process may take the free port before mariadbd binds it
            self.port = free_port()
            if self._launch(server):
                return DbTarget(engine="mysql", host=HOST, port=self.port, user=ADMIN, password=self.password)
        raise RestoreError(f"the scratch MariaDB server could not bind a port: {self._log_tail()}")

    def _install(self, install: str, data: str) -> None:
        """The system tables, with the admin account in them (a hash, no password) before the server ever listens."""
        extra = os.path.join(self.folder, "accounts.sql")
        priv = json.dumps({"access": ALL_PRIVILEGES, "plugin": "mysql_native_password",
                           "authentication_string": native_hash(self.password)})
        fd = os.open(extra, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"INSERT INTO mysql.global_priv VALUES ('{HOST}', '{ADMIN}', '{priv}');\n")
        self._chown(extra)
        argv = [install, "--no-defaults", f"--datadir={data}", "--skip-test-db", "--skip-name-resolve",
                "--auth-root-authentication-method=socket", f"--extra-file={extra}", *INNODB_SETTINGS]
        try:
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                                 cwd=self.folder, **self._child_kwargs())
        except subprocess.TimeoutExpired:
            raise RestoreError("mariadb-install-db of the scratch MariaDB server did not finish within 120 s") from None
        finally:
            os.unlink(extra)
        if res.returncode != 0:
            lines = [x for x in (res.stdout + res.stderr).splitlines() if "ERROR" in x] or \
                (res.stderr.strip() or res.stdout.strip() or f"exit code {res.returncode}").splitlines()
            raise RestoreError(f"mariadb-install-db of the scratch MariaDB server failed: {lines[0].strip()}")

    def _launch(self, server: str) -> bool:
        """Start the server and wait until the admin can log in; False when its port was taken."""
        argv = [server, "--no-defaults", f"--datadir={os.path.join(self.folder, 'data')}",
                f"--socket={os.path.join(self.socket_dir, 'mysqld.sock')}",
                f"--pid-file={os.path.join(self.folder, 'mysqld.pid')}",
                f"--log-error={os.path.join(self.folder, 'server.log')}",
                f"--tmpdir={os.path.join(self.folder, 'tmp')}",
                f"--secure-file-priv={os.path.join(self.folder, 'tmp')}",  # LOAD DATA/SELECT INTO OUTFILE stay inside
                f"--port={self.port}", f"--bind-address={HOST}", *SERVER_SETTINGS]
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, cwd=self.folder, start_new_session=True,
                                      **self._child_kwargs())
        scratchsweep.note_server(self.folder, self._proc.pid)
        deadline = time.monotonic() + self.start_timeout
        with credentials.mysql_defaults_file(host=HOST, port=self.port, user=ADMIN, password=self.password) as cnf:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    self._proc = None
                    tail = self._log_tail(20)
                    if "Address already in use" in tail or "Can't start server: Bind" in tail:
                        return False
                    raise RestoreError(f"the scratch MariaDB server did not start: {self._log_tail()}")
                if self._ready(cnf):
                    return True
                time.sleep(0.1)
        raise RestoreError(f"the scratch MariaDB server was not ready within {self.start_timeout:g} s: "
                           f"{self._log_tail()}")

    def _ready(self, cnf: str) -> bool:
        try:
            res = subprocess.run(my_argv(cnf, "--execute=SELECT 1"), stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 20 s) and remove its folder; never raises for a dead server."""
        self._stop()

    # --- helpers -----------------------------------------------------------------------
    def _log_tail(self, n: int = 3) -> str:
        try:
            with open(os.path.join(self.folder or "", "server.log"), errors="replace") as fh:
                lines = [x.strip() for x in fh.read().splitlines() if x.strip() and "[Note]" not in x][-n:]
        except OSError:
            return "no server log"
        return " / ".join(lines) or "empty server log"


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _s(value: str) -> str:
    """A string literal no sql_mode can misread (hex)."""
    return "_utf8mb4 0x" + value.encode().hex() if value else "''"


def _only(name: str) -> str:
    """A database name as a GRANT pattern matching it alone (`_` and `%` are wildcards there)."""
    return _q(name.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%"))


def _run(server: DbTarget, script: str, what: str) -> str:
    """A script on the client's stdin (never argv), as the server's admin; its stdout."""
    with credentials.mysql_defaults_file(host=server.host, port=server.port, user=server.user,
                                         password=server.password) as cnf:
        try:
            res = subprocess.run(my_argv(cnf, "--skip-column-names"), input=script.encode(), capture_output=True,
                                 timeout=120)
        except subprocess.TimeoutExpired:
            raise RestoreError(f"{what} on the scratch MariaDB server did not finish within 120 s") from None
    if res.returncode != 0:
        lines = res.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RestoreError(f"{what} on the scratch MariaDB server failed: "
                           f"{lines[-1] if lines else f'exit code {res.returncode}'}")
    return res.stdout.decode("utf-8", "replace")


def app_user(server: DbTarget, dbname: str) -> DbTarget:
    """An account for an application started against database `dbname` of a scratch server (a deep drill): ALL on
    that database alone, a random password (only its hash is sent). The definers the dump's views, triggers,
    routines and events name get a locked account with ALL on it too, so they run as they do on the live server
    (a missing definer makes them fail). Returns the app's DbTarget (127.0.0.1, the server's port)."""
    password = secrets.token_urlsafe(24)
    definers = _run(server, (
        "SELECT DISTINCT d FROM ("
        f"SELECT DEFINER AS d FROM information_schema.VIEWS WHERE TABLE_SCHEMA = {_s(dbname)} UNION "
        f"SELECT DEFINER FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {_s(dbname)} UNION "
        f"SELECT DEFINER FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = {_s(dbname)} UNION "
        f"SELECT DEFINER FROM information_schema.EVENTS WHERE EVENT_SCHEMA = {_s(dbname)}) AS x;\n"),
        "listing the definers").splitlines()
    script = [f"CREATE OR REPLACE USER {_q(APP_USER)}@{_q(HOST)} IDENTIFIED BY PASSWORD '{native_hash(password)}';",
              f"GRANT ALL PRIVILEGES ON {_only(dbname)}.* TO {_q(APP_USER)}@{_q(HOST)};"]
    for definer in definers:
        user, _, host = definer.rpartition("@")
        if not user or (user, host) in ((APP_USER, HOST), (ADMIN, HOST), ("root", "localhost")):
            continue
        script += [f"CREATE USER IF NOT EXISTS {_q(user)}@{_q(host)} ACCOUNT LOCK;",
                   f"GRANT ALL PRIVILEGES ON {_only(dbname)}.* TO {_q(user)}@{_q(host)};"]
    _run(server, "\n".join(script) + "\n", f"giving database {dbname} to an application account")
    return DbTarget(engine="mysql", host=server.host, port=server.port, user=APP_USER, password=password,
                    dbname=dbname)
