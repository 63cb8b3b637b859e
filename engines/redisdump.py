"""Redis as a database engine: the snapshot stage, key counts, a scratch redis-server, moving keys, SWAPDB.

- **Backup**: engines/rdbstream.py, a stage of its own, takes the snapshot through the replication protocol
  (SYNC: the server forks and writes every logical database as of one instant) and counts the keys of each
  logical database in the snapshot itself as it streams (see that module for why not redis-cli or DBSIZE).
  The password reaches it on stdin, never argv or the environment.
- **Drill and restore**: a ScratchRedis, Debian's redis-server on a unix socket in a private 0700 folder (no
  TCP port, no persistence), loads the artifact's RDB, which it checks as it loads (its CRC64 included); its
  INFO keyspace is compared with the counts of the backup. Keys that carry an expiry may have expired since the
  backup (a server drops them when it loads): those, and only those, may be missing.
- **Restore in place** moves the keys of one logical database from the scratch server (DUMP, PTTL) into an empty
  spare logical database of the target (RESTORE), then exchanges the two with one SWAPDB: clients see the old
  data or the restored data, never a mix. The spare then holds the previous data until the restore holds.

Connections go through redis-py (a dependency of Kasa's own broker); the password is handed to it in memory
(a protocol AUTH), never to a program's argv.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

import redis

from . import scratchsweep
from .dbbase import DbTarget
from .dberrors import RestoreError
from .scratchdb import SOCKET_PATH_MAX, ScratchServer, blocked_for
from .streams import Stage

SEARCH_PATH = "/usr/bin:/usr/sbin:/usr/local/bin:/bin"
SCRATCH_PREFIX = "kasa-scratch-redis-"
MOVE_BATCH = 200  # keys per DUMP/RESTORE round trip: bounded memory (a key's value is held whole meanwhile)


class RedisError(RestoreError):
    pass


# --- backup -------------------------------------------------------------------------------------------------------
def stream_settings(target: DbTarget) -> dict:
    """What engines/rdbstream.py reads on its stdin (the password among them: never argv)."""
    cfg = {"user": target.user, "password": target.password, "tls": target.tls, "ca_file": target.tls_ca}
    if target.host.startswith("/"):
        cfg["socket"] = target.host
    else:
        cfg.update(host=target.host, port=target.port or 6379)
    return cfg


def snapshot_stage(target: DbTarget, counts_path: str) -> Stage:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rdbstream.py")
    return Stage([sys.executable, "-I", "-S", script, counts_path], name="redis snapshot",
                 input=json.dumps(stream_settings(target)).encode())


def read_counts(counts_path: str) -> dict:
    """The manifest's part of what rdbstream counted: key_counts and expiring_counts per logical database ("0",
    "1"…), the RDB and server versions; counts_problem when the keys could not be counted."""
    try:
        with open(counts_path) as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as exc:
        raise RedisError(f"the key counts of the snapshot are missing ({exc})") from None
    out = {"server_version": str(raw.get("redis_version") or "")[:100] or None,
           "rdb_version": raw.get("rdb_version"), "key_counts": None, "expiring_counts": None}
    if raw.get("keys") is not None:
        out["key_counts"] = {str(k): int(v) for k, v in raw["keys"].items()}
        out["expiring_counts"] = {str(k): int(v) for k, v in (raw.get("expiring") or {}).items()}
    if raw.get("problem"):
        out["counts_problem"] = str(raw["problem"])[:300]
    return out


def compare_counts(expected: dict[str, int], expiring: dict[str, int], got: dict[str, int]) -> list[str]:
    """Human lines for each logical database whose key count is wrong; empty when it matches. Exact for keys
    without an expiry; a key with one may have expired since the backup (a loading server drops it)."""
    lines = []
    for db in sorted(set(expected) | set(got), key=lambda d: int(d) if d.isdigit() else -1):
        want, have, volatile = expected.get(db, 0), got.get(db, 0), expiring.get(db, 0)
        if have > want:
            lines.append(f"logical database {db}: the backup has {want} keys, the scratch server holds {have}")
        elif have < want - volatile:
            lines.append(f"logical database {db}: the backup has {want} keys ({volatile} with an expiry), the "
                         f"scratch server holds {have}")
    return lines


# --- connections --------------------------------------------------------------------------------------------------
def connect(target: DbTarget, db: int | None = None) -> redis.Redis:
    """One connection to `target` (its own logical database unless `db`), checked with a PING."""
    where = f"{target.host}:{target.port}"
    kwargs = dict(username=target.user or None, password=target.password or None,
                  db=int(target.dbname or 0) if db is None else db, socket_timeout=120, socket_connect_timeout=10,
                  single_connection_client=True)
    con = None
    try:  # a single-connection client connects (and logs in) as it is made
        if target.host.startswith("/"):
            where = target.host
            con = redis.Redis(unix_socket_path=target.host, **kwargs)
        else:
            tls = dict(ssl=True, ssl_ca_certs=target.tls_ca or None, ssl_check_hostname=True) if target.tls else {}
            con = redis.Redis(host=target.host, port=target.port or 6379, **tls, **kwargs)
        con.ping()
    except redis.RedisError as exc:
        if con is not None:
            con.close()
        raise RedisError(f"cannot connect to Redis at {where}: {_said(exc)}") from None
    return con


def _said(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def version_of(text: str) -> tuple[int, int]:
    m = re.search(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def server_version(con: redis.Redis) -> str:
    return str(con.info("server").get("redis_version", ""))


def keyspace(con: redis.Redis) -> dict[str, int]:
    """Keys per non-empty logical database ("0", "1"…), from INFO keyspace."""
    return {name[2:]: int(v["keys"]) for name, v in con.info("keyspace").items()
            if name.startswith("db") and isinstance(v, dict)}


def database_count(con: redis.Redis) -> int:
    """How many logical databases the server has: CONFIG GET databases, or (CONFIG denied by an ACL) probed with
    SELECT on this connection (give it one of its own: it is left on another logical database)."""
    try:
        return int(con.config_get("databases")["databases"])
    except (redis.RedisError, KeyError, ValueError):
        pass
    count = 0
    for n in range(0, 1024):
        try:
            con.execute_command("SELECT", n)
        except redis.ResponseError:
            break
        count = n + 1
    return count


def find_spare(target: DbTarget, live: int, *, taken: set[int] = frozenset()) -> int | None:
    """The highest-numbered empty logical database other than `live` and `taken` (the least likely to be in use),
    or None."""
    con = connect(target, db=0)
    try:
        used = set(keyspace(con))
        count = database_count(con)
    finally:
        con.close()
    for n in range(count - 1, -1, -1):
        if n != live and n not in taken and str(n) not in used:
            return n
    return None


def dbsize(target: DbTarget, db: int) -> int:
    """Keys in logical database `db` (a connection of its own: redis-py binds a client's pool to one database)."""
    con = connect(target, db=db)
    try:
        return int(con.dbsize())
    finally:
        con.close()


def copy_keys(src: redis.Redis, dst: redis.Redis, *, on_batch=None) -> int:
    """Every key of src's logical database into dst's (DUMP + PTTL, then RESTORE with the remaining TTL); the
    number restored. Each client must have been made for its logical database (never SELECT on it: a pipeline
    takes another connection of the client's pool, opened on the client's own database). A key SCAN returns
    twice (allowed while the dictionary rehashes) is restored once."""
    restored = 0
    batch: list[bytes] = []

    def flush() -> None:
        nonlocal restored
        pipe = src.pipeline(transaction=False)
        for key in batch:
            pipe.dump(key)
            pipe.pttl(key)
        values = pipe.execute()
        put = dst.pipeline(transaction=False)
        sent = 0
        for i, key in enumerate(batch):
            payload, ttl = values[2 * i], values[2 * i + 1]
            if payload is None or ttl == -2:  # expired meanwhile
                continue
            put.restore(key, ttl if ttl > 0 else 0, payload)
            sent += 1
        for result in put.execute(raise_on_error=False):
            if isinstance(result, Exception):
                if "BUSYKEY" in str(result):
                    continue
                raise RedisError(f"RESTORE failed on the target: {_said(result)}")
            restored += 1
        batch.clear()
        if on_batch is not None:
            on_batch(restored)

    for key in src.scan_iter(count=1000):
        batch.append(key)
        if len(batch) >= MOVE_BATCH:
            flush()
    if batch:
        flush()
    return restored


# --- the scratch server -------------------------------------------------------------------------------------------
def server_program() -> str:
    path = shutil.which("redis-server") or shutil.which("redis-server", path=SEARCH_PATH)
    if not path:
        raise RedisError("redis-server is not installed on this worker (Debian package redis-server; its own "
                         "service may stay disabled)")
    return path


def program_version(program: str) -> str:
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else ""


class ScratchRedis(ScratchServer):
    """A throwaway redis-server loading one RDB: `with ScratchRedis() as s: counts = s.load(chunks)`.

    Unix socket only (`--port 0`) in a 0700 folder, no persistence (`--save ""`, `--appendonly no`), a clean
    environment; as root it runs as `nobody` (KASA_SCRATCH_REDIS_USER). Stopped (SIGTERM, SIGKILL after 20 s)
    and its folder removed on exit, even after an error; a dead worker's is swept by the next one."""

    user_env = "KASA_SCRATCH_REDIS_USER"

    def __init__(self, base_dir: str | None = None, *, databases: int = 16, start_timeout: float = 900, **kw):
        # A large RDB takes a while to load; a server that refuses it exits at once (seen by the poll below).
        super().__init__(base_dir, start_timeout=start_timeout, **kw)
        self.databases = max(16, databases)
        self.socket = ""
        self.version = ""

    def _start(self) -> ScratchRedis:
        program = server_program()
        self.version = program_version(program)
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(self.run_as)
            except KeyError:
                raise RedisError(f"user {self.run_as} does not exist: the scratch redis-server does not run as "
                                 "root; set KASA_SCRATCH_REDIS_USER to an unprivileged user") from None
            self._ids = (entry.pw_uid, entry.pw_gid)
        base = os.path.abspath(self.base_dir or tempfile.gettempdir())
        for path in (program, os.path.join(base, "x")):
            blocked = self._ids and blocked_for(path, *self._ids)
            if blocked:
                raise RedisError(f"user {self.run_as} cannot reach {os.path.dirname(path)} ({blocked} lacks o+x): "
                                 "choose a base folder such as /tmp")
        os.makedirs(base, exist_ok=True)
        scratchsweep.sweep(base, SCRATCH_PREFIX)
        self.folder = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=base)  # 0700
        self._chown(self.folder)
        self.socket_dir = self.folder
        if len(self.folder) > SOCKET_PATH_MAX - 11:  # "/redis.sock" must fit in sockaddr_un
            self.socket_dir = tempfile.mkdtemp(prefix="kasa-rd-", dir="/tmp")
            self._own_socket_dir = True
            self._chown(self.socket_dir)
        scratchsweep.claim(self.folder, socket_dir=self.socket_dir if self._own_socket_dir else None)
        self.socket = os.path.join(self.socket_dir, "redis.sock")
        self._program = program
        return self

    def load(self, chunks: Iterable[bytes]) -> dict[str, int]:
        """Write the RDB (chunk by chunk) into the folder, start the server on it, wait until it has loaded;
        its keys per logical database. RedisError with the server's own words when it refuses the file."""
        path = os.path.join(self.folder, "dump.rdb")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        self._chown(path)
        argv = [self._program, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
                "--dir", self.folder, "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--databases", str(self.databases), "--logfile",
                os.path.join(self.folder, "server.log"), "--loglevel", "notice", "--protected-mode", "yes"]
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, cwd=self.folder, start_new_session=True,
                                      **self._child_kwargs())
        scratchsweep.note_server(self.folder, self._proc.pid)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RedisError(f"the scratch redis-server refused the snapshot: {self._log_tail()}")
            if os.path.exists(self.socket):
                try:
                    with self.client() as con:
                        # INFO answers while the server still loads (with the keys so far): wait for loading:0.
                        if not int(con.info("persistence").get("loading", 1)):
                            return keyspace(con)
                except (redis.BusyLoadingError, redis.ConnectionError):
                    pass
            time.sleep(0.05)
        raise RedisError(f"the scratch redis-server had not loaded the snapshot within {self.start_timeout:g} s: "
                         f"{self._log_tail()}")

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket, db=db, socket_timeout=120, single_connection_client=True)

    def _log_tail(self, n: int = 3) -> str:
        try:
            with open(os.path.join(self.folder or "", "server.log"), errors="replace") as fh:
                lines = [line.split(" # ", 1)[-1].strip() for line in fh.read().splitlines() if " # " in line]
        except OSError:
            return "no server log"
        return " / ".join(lines[-n:]) or "the server stopped without a word"
