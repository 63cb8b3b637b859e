"""Hand database passwords to client programs through 0600 files, never argv.

PostgreSQL clients read PGPASSFILE; MySQL/MariaDB clients read
--defaults-extra-file (which must be their first argument). The files live in
a private 0700 folder and are removed when the context exits, even on error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def private_dir(prefix: str = "kasa-cred-") -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=prefix)  # mkdtemp creates it 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_0600(path: str, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def pgpass_line(*, user: str, password: str, dbname: str = "*") -> str:
    """One PGPASSFILE line for any host and port ("" without a password): what pg_env writes, and what a host's
    own tools get through engines.hostpgtools.LAUNCHER."""
    if not password:
        return ""
    return ":".join(_pgpass_escape(x) for x in ("*", "*", dbname or "*", user or "*", password)) + "\n"


@contextlib.contextmanager
def pg_env(*, host: str, port: int, user: str, password: str, dbname: str = "*") -> Iterator[dict[str, str]]:
    """Environment for libpq tools: connection facts plus a PGPASSFILE."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PG")
    }  # an inherited PGPASSWORD would bypass the file
    env.update(PGHOST=host, PGPORT=str(port), PGUSER=user, PGCONNECT_TIMEOUT="10", PGAPPNAME="kasa")
    with private_dir() as d:
        # Without a password: an empty file of ours, not /dev/null (libpq warns that /dev/null "is not a plain
        # file"), and never the default ~/.pgpass, which would hand Kasa's own passwords to a customer's server.
        path = os.path.join(d, "pgpass")
        _write_0600(path, pgpass_line(user=user, password=password, dbname=dbname))
        env["PGPASSFILE"] = path
        yield env


def _mycnf_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@contextlib.contextmanager
def mysql_defaults_file(*, host: str, port: int, user: str, password: str, socket: str = "") -> Iterator[str]:
    """Path of a [client] option file; pass it as `--defaults-extra-file=PATH`, first. With `socket`: through
    that Unix socket instead of host and port (a remote host's database, through an SSH forward)."""
    with private_dir() as d:
        path = os.path.join(d, "my.cnf")
        if socket:
            lines = ["[client]", f'socket="{_mycnf_escape(socket)}"', f'user="{_mycnf_escape(user)}"']
        else:
            lines = ["[client]", f'host="{_mycnf_escape(host)}"', f"port={int(port)}",
                     f'user="{_mycnf_escape(user)}"']
        if password:
            lines.append(f'password="{_mycnf_escape(password)}"')
        # Over TCP even for "localhost": the socket would ignore host/port.
        lines.append("protocol=SOCKET" if socket else "protocol=TCP")
        # Only the interactive client knows connect-timeout; in [client] it would make mariadb-dump refuse to start.
        lines += ["[mysql]", "connect-timeout=10"]
        _write_0600(path, "\n".join(lines) + "\n")
        yield path
