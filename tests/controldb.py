"""Kasa's control database on a PostgreSQL cluster of its own, which a test can stop and start again.

The suite's control database is the machine's PostgreSQL on 5432, which also serves the customers' databases:
stopping it would stop those too. This cluster (engines.scratchdb's throwaway server: the newest installed
PostgreSQL, run as `nobody` when the tests run as root) holds only Kasa's tables; Kasa runs against it in
subprocesses (`manage.py …` with DATABASE_URL pointing at it), migrated first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
from django.conf import settings

from engines.scratchdb import ScratchPostgres, _server_bin_dir

REPO = Path(__file__).resolve().parent.parent


class ControlCluster(ScratchPostgres):
    def __enter__(self) -> ControlCluster:
        target = super().__enter__()
        self.password = target.password
        with psycopg.connect(**self.connect_kwargs("postgres"), autocommit=True) as con:
            con.execute("CREATE DATABASE kasa")
        self.url = f"postgres://postgres:{self.password}@127.0.0.1:{self.port}/kasa"
        return self

    def connect_kwargs(self, dbname: str = "kasa") -> dict:
        return {"host": "127.0.0.1", "port": self.port, "user": "postgres", "password": self.password,
                "dbname": dbname, "connect_timeout": 5}

    def query(self, sql: str, params=()) -> list[tuple]:
        with psycopg.connect(**self.connect_kwargs()) as con:
            return con.execute(sql, params).fetchall()

    def stop_server(self) -> None:
        """A fast shutdown (SIGINT to the postmaster): every client is cut off at once; the data stays."""
        self._proc.send_signal(signal.SIGINT)
        self._proc.wait(timeout=60)

    def start_server(self) -> None:
        if not self._launch(os.path.join(_server_bin_dir(), "postgres"), os.path.join(self.folder, "data")):
            raise RuntimeError(f"the control cluster could not bind port {self.port} again")


def kasa_env(cluster: ControlCluster, var_dir: Path, **extra) -> dict[str, str]:
    """The environment of a Kasa process on the cluster, with a var folder of its own (local journals included)
    and the suite's customers folder and keys."""
    var_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DJANGO_SETTINGS_MODULE="config.settings", DATABASE_URL=cluster.url, KASA_VAR_DIR=str(var_dir),
               KASA_CUSTOMERS_ROOT=str(settings.KASA_CUSTOMERS_ROOT), KASA_SECRET_KEYS=settings.KASA_SECRET_KEYS,
               KASA_BACKUP_KEYS=settings.KASA_BACKUP_KEYS, SECRET_KEY=settings.SECRET_KEY, PYTHONUNBUFFERED="1",
               KASA_DB_CONN_MAX_AGE="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def manage(env: dict, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"manage.py {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}"
                             f"\n{done.stdout[-2000:]}")
    return done
