"""Helpers for the restore tests: the exact state of a tree and of every table, before and after."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

from django.core.management import call_command

from tests.conftest import MY_ADMIN, MY_HOST, MY_PORT, mysql_admin


def tree_state(root: Path, *, skip=(".kasa-restore-", ".kasa-trash-", ".kasa-pm2")) -> dict:
    """path -> (type, mode, content sha256 | link target) for every entry, empty folders included.

    SQLite files are compared by their rows (sqlite_state): an online copy holds the same data in other bytes.
    The customer's PM2 home (.kasa-pm2: its daemon's sockets, pid files and logs) is runtime state, not files.
    """
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(skip)]
        filenames = [f for f in filenames if ".sqlite3" not in f]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", mode)
            else:
                with open(path, "rb") as fh:
                    state[rel] = ("file", mode, hashlib.sha256(fh.read()).hexdigest())
    return state


def pg_state(pg: dict, dbname: str | None = None) -> dict:
    import psycopg

    with psycopg.connect(host=pg["host"], port=pg["port"], user="postgres", dbname=dbname or pg["name"]) as con:
        tables = con.execute("SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN "
                             "('pg_catalog', 'information_schema') ORDER BY 1, 2").fetchall()
        return {f"{s}.{t}": con.execute(f'SELECT * FROM "{s}"."{t}" ORDER BY 1').fetchall() for s, t in tables}


def pg_exec(pg: dict, sql: str, params=None, *, dbname=None, as_owner=False) -> None:
    """As the superuser, or (as_owner) as the customer's role, like the application would."""
    import psycopg

    auth = {"user": pg["user"], "password": pg["password"]} if as_owner else {"user": "postgres"}
    with psycopg.connect(host=pg["host"], port=pg["port"], dbname=dbname or pg["name"], autocommit=True,
                         **auth) as con:
        con.execute(sql, params)


def pg_databases_like(pg: dict, pattern: str) -> list[str]:
    import psycopg

    with psycopg.connect(host=pg["host"], port=pg["port"], user="postgres", dbname="postgres") as con:
        return [r[0] for r in con.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", [pattern])]


def my_state(m: dict) -> dict:
    client = "mariadb"
    out = subprocess.run([client, "--protocol=TCP", "-h", MY_HOST, "-P", str(MY_PORT), "-u", MY_ADMIN, "-N", "-B",
                          "-e", f"SELECT table_name FROM information_schema.tables WHERE table_schema='{m['name']}' "
                                "ORDER BY 1"], capture_output=True, text=True, check=True).stdout.split()
    state = {}
    for t in out:
        rows = subprocess.run([client, "--protocol=TCP", "-h", MY_HOST, "-P", str(MY_PORT), "-u", MY_ADMIN, "-N",
                               "-B", "-e", f"SELECT * FROM `{m['name']}`.`{t}` ORDER BY 1"],
                              capture_output=True, text=True, check=True).stdout
        state[t] = rows
    return state


def my_grant_side_databases(m: dict) -> None:
    """The restore's fresh and kept-aside databases are `<name>__kasa_…`: the customer user needs them."""
    pattern = m["name"].replace("_", "\\_") + "\\_\\_kasa\\_%"
    mysql_admin(f"GRANT ALL ON `{pattern}`.* TO '{m['user']}'@'%'; GRANT ALL ON `{pattern}`.* TO "
                f"'{m['user']}'@'localhost';")


def my_drop_side_databases(m: dict) -> None:
    out = subprocess.run(["mariadb", "--protocol=TCP", "-h", MY_HOST, "-P", str(MY_PORT), "-u", MY_ADMIN, "-N", "-B",
                          "-e", "SHOW DATABASES"], capture_output=True, text=True, check=True).stdout.split()
    for db in out:
        if db.startswith(m["name"] + "__kasa_"):
            mysql_admin(f"DROP DATABASE `{db}`")


def sqlite_state(path: Path) -> list:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT * FROM hits ORDER BY n").fetchall()
    finally:
        con.close()


def command_json(name: str, *args) -> tuple[int, dict]:
    """Run a management command with --json; (exit code, document)."""
    from django.core.management import CommandError

    out = io.StringIO()
    try:
        call_command(name, *args, "--json", stdout=out, stderr=io.StringIO())
        code = 0
    except CommandError as exc:
        code = exc.returncode
    text = out.getvalue().strip()
    return code, (json.loads(text) if text else {})
