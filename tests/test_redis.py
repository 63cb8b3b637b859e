"""Redis as a database engine, against a real redis-server with a password (started here, one per session).

Backup (the snapshot streamed through engines/rdbstream.py, keys counted per logical database), drill (a scratch
redis-server loads it), restore in place (a spare logical database, then SWAPDB), and every refusal or failure
leaving the target exactly as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from backups.models import Backup
from backups.services import backup_start
from engines import dburl, redisdump
from engines.dbbase import DbTarget
from engines.streams import ChainError, ProcessChain
from operations.models import Run, RunLogLine
from operations.services import run_execute
from tests.conftest import free_port, port_open, require, wait_until
from tests.restore_helpers import command_json

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "Rd-" + secrets.token_urlsafe(12)


def _start_server(folder: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    program = shutil.which("redis-server")
    require(program is not None, "redis-server (Debian package redis-server)")
    port = free_port()
    proc = subprocess.Popen([program, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
                             "--save", "", "--appendonly", "no", "--dir", str(folder), "--daemonize", "no",
                             "--logfile", str(folder / "server.log"), *extra],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: port_open("127.0.0.1", port), 20, what="redis-server to listen")
    return proc, port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("redis")
    # No 5 s wait for more replicas before a diskless snapshot (7.0's default): the tests take many.
    proc, port = _start_server(folder, "--repl-diskless-sync-delay", "0", "--unixsocket", str(folder / "redis.sock"),
                               "--unixsocketperm", "700")
    yield {"port": port, "socket": str(folder / "redis.sock")}
    proc.terminate()
    proc.wait(timeout=20)


def _client(port: int, db: int = 0) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, db=db)


@pytest.fixture
def live(redis_server):
    port = redis_server["port"]
    _client(port).flushall()
    _client(port).function_flush()
    yield port
    _client(port).flushall()
    _client(port).function_flush()


def _seed(port: int) -> None:
    """Every kind of value, in the customer's logical database 1 and another application's 2."""
    c = _client(port, 1)
    c.set("greeting", "hello")
    c.set("counter", 12345)
    c.set("blob", os.urandom(200_000))
    c.set("compressible", "x" * 5000)  # stored LZF-compressed in the RDB
    c.set(b"\x00bin\xff", b"\x01\x02")
    c.set("session", "soon gone", ex=3600)
    c.rpush("queue", *[f"job-{i}" for i in range(500)])
    c.hset("user:1", mapping={"name": "Ann", "age": "41"})
    c.hset("big-hash", mapping={f"f{i}": f"v{i}" for i in range(600)})
    c.sadd("ints", 1, 2, 3, 99)
    c.sadd("tags", "red", "green")
    c.zadd("scores", {"a": 1.5, "b": -2, "c": 1e9})
    c.zadd("big-zset", {f"m{i}": i / 3 for i in range(200)})
    c.xadd("events", {"kind": "signup"})
    c.xadd("events", {"kind": "login"})
    c.xgroup_create("events", "mailer", id="0")
    c.xreadgroup("mailer", "worker-1", {"events": ">"}, count=1)
    for i in range(300):  # more than one batch of DUMP/RESTORE
        c.set(f"page:{i}", f"<html>{i}</html>")
    o = _client(port, 2)
    o.set("other-app", "theirs")
    o.lpush("other-list", "x", "y")


def _state(port: int) -> dict:
    """Every logical database's keys: type, value, whether it expires."""
    out = {}
    for db in range(16):
        c = _client(port, db)
        keys = {}
        for k in c.scan_iter(count=1000):
            kind = c.type(k).decode()
            if kind == "string":
                value = c.get(k)
            elif kind == "list":
                value = c.lrange(k, 0, -1)
            elif kind == "hash":
                value = sorted(c.hgetall(k).items())
            elif kind == "set":
                value = sorted(c.smembers(k))
            elif kind == "zset":
                value = c.zrange(k, 0, -1, withscores=True)
            else:
                value = (c.xrange(k), [(g["name"], g["pending"], g["last-delivered-id"]) for g in c.xinfo_groups(k)])
            keys[k] = (kind, value, c.ttl(k) > 0)
        if keys:
            out[db] = keys
    return out


def _change(port: int) -> None:
    c = _client(port, 1)
    c.delete("greeting", "queue", "page:7")
    c.set("counter", 0)
    c.set("added-later", "x")
    c.hset("user:1", "age", "42")
    _client(port, 2).set("other-app-new", "still theirs")


@pytest.fixture
def customer(make_customer, live):
    return make_customer(databases=[("cache", f"redis://:{PASSWORD}@127.0.0.1:{live}/1")])


def _backup(customer) -> tuple[Backup, Run]:
    run = backup_start(customer, via="cli", enqueue=False)
    run_execute(run.pk)
    run.refresh_from_db()
    return Backup.objects.get(run=run), run


@pytest.fixture
def backed_up(customer, live):
    _seed(live)
    before = _state(live)
    bk, run = _backup(customer)
    assert bk.status == "succeeded", bk.error
    return customer, bk, before


# --- backup, drill, restore ---------------------------------------------------------------------------------------
def test_backup_drill_and_restore_round_trip_bring_back_the_logical_database(customer, live):
    _seed(live)
    before = _state(live)
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:  # every process's argv and (where readable) environment while the backup runs
        while not done.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                for what in ("cmdline", "environ"):
                    try:
                        seen.add(Path(f"/proc/{pid}/{what}").read_bytes().decode("utf-8", "replace"))
                    except OSError:
                        pass
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        bk, run = _backup(customer)
    finally:
        done.set()
        watcher.join()
    assert bk.status == "succeeded", bk.error
    art = bk.artifacts.get(kind="database")
    assert art.name == "db-cache.rdb.zst.enc"
    assert any("rdbstream.py" in text for text in seen)  # the watcher saw the snapshot stage
    assert not [text for text in seen if PASSWORD in text]
    assert not RunLogLine.objects.filter(run=run, text__contains=PASSWORD).exists()
    assert PASSWORD not in (Path(bk.target.path) / bk.prefix / "backup.json").read_text()
    details = art.details
    assert details["engine"] == "redis" and details["database"] == "1" and details["format"] == "rdb"
    assert details["key_counts"] == {"1": len(before[1]), "2": len(before[2])}
    assert details["expiring_counts"] == {"1": 1}
    assert details["server_version"].startswith("7.")

    code, drill = command_json("verify", str(bk.pk))
    assert code == 0 and drill["status"] == "succeeded", drill
    checks = drill["result"]["checks"]
    assert {"artifact": art.name, "keys": len(before[1]) + len(before[2]), "logical_databases": 2} in checks

    _change(live)
    changed = _state(live)
    code, run = command_json("restore", str(bk.pk), "--yes")
    assert code == 0, run
    after = _state(live)
    assert after[1] == before[1]  # the customer's logical database, exactly as it was backed up
    assert after[2] == changed[2]  # another application's logical database is not the restore's business
    assert set(after) == {1, 2}  # the spare (the previous keys) was emptied once the restore held
    log = "\n".join(RunLogLine.objects.filter(run_id=run["id"]).values_list("text", flat=True))
    assert "SWAPDB" in log and PASSWORD not in log


def test_drill_finds_a_snapshot_that_lost_keys_against_its_manifest(backed_up):
    customer, bk, before = backed_up
    art = bk.artifacts.get(kind="database")
    art.details = {**art.details, "key_counts": {**art.details["key_counts"], "1": len(before[1]) + 5}}
    art.save()
    code, drill = command_json("verify", str(bk.pk))
    assert code == 1 and "logical database 1" in drill["error"] and "differs from the manifest" in drill["error"]


def test_a_deep_drill_policy_drills_a_redis_customer_plainly_with_a_warning(backed_up):
    from backups.services import global_policy

    customer, bk, _ = backed_up
    policy = global_policy()
    policy.deep_drill = True
    policy.save()
    code, drill = command_json("verify", str(bk.pk))
    assert code == 0 and "deep" not in drill["result"], drill
    assert RunLogLine.objects.filter(run_id=drill["id"], level="warning", text__contains="Redis").exists()


def test_wrong_backup_key_fails_the_drill_and_the_restore_and_touches_nothing(backed_up, live, settings):
    customer, bk, _ = backed_up
    _change(live)
    changed = _state(live)
    settings.KASA_BACKUP_KEYS = "k2:" + "z" * 43
    code, drill = command_json("verify", str(bk.pk))
    assert code == 1 and "KASA_BACKUP_KEYS" in drill["error"]
    code, run = command_json("restore", str(bk.pk), "--yes")
    assert code == 1 and "KASA_BACKUP_KEYS" in run["error"]
    assert _state(live) == changed


def test_corrupt_artifact_fails_the_drill_and_the_restore_and_touches_nothing(backed_up, live):
    customer, bk, _ = backed_up
    art = bk.artifacts.get(kind="database")
    path = Path(bk.target.path) / bk.prefix / art.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _change(live)
    changed = _state(live)
    code, drill = command_json("verify", str(bk.pk))
    assert code == 1 and art.name in drill["error"]
    code, run = command_json("restore", str(bk.pk), "--yes")
    assert code == 1 and art.name in run["error"] and "nothing was touched" in run["error"]
    assert _state(live) == changed


def test_scratch_server_refuses_a_damaged_rdb_in_its_own_words_and_leaves_nothing(live, tmp_path):
    _seed(live)
    target = DbTarget(engine="redis", host="127.0.0.1", port=live, password=PASSWORD)
    with ProcessChain([redisdump.snapshot_stage(target, str(tmp_path / "counts.json"))]) as chain:
        rdb = bytearray(b"".join(chain.chunks()))
        chain.finish()
    rdb[len(rdb) // 2] ^= 0xFF
    server = redisdump.ScratchRedis()  # under /tmp: as root it runs as nobody, who must reach its folder
    folders = []
    with pytest.raises(redisdump.RedisError) as err, server:
        folders.append(server.folder)
        server.load([bytes(rdb[:len(rdb) // 2]), bytes(rdb[len(rdb) // 2:])])
    assert "refused the snapshot" in str(err.value)
    assert folders[0] and not os.path.exists(folders[0])


def test_snapshot_counts_equal_the_servers_and_a_wrong_password_fails_cleanly(live, tmp_path):
    _seed(live)
    _client(live).function_load("#!lua name=kasa_test\nredis.register_function('one', function() return 1 end)",
                                replace=True)  # a library: an RDB opcode of its own, not a key
    counts = tmp_path / "counts.json"
    target = DbTarget(engine="redis", host="127.0.0.1", port=live, password=PASSWORD)
    with ProcessChain([redisdump.snapshot_stage(target, str(counts))]) as chain:
        rdb = b"".join(chain.chunks())
        chain.finish()
    assert rdb.startswith(b"REDIS")
    got = redisdump.read_counts(str(counts))
    assert got["key_counts"] == redisdump.keyspace(_client(live))
    (tmp_path / "dump.rdb").write_bytes(rdb)
    check = subprocess.run(["redis-check-rdb", str(tmp_path / "dump.rdb")], capture_output=True, text=True)
    assert "RDB looks OK" in check.stdout, check.stdout[-500:]

    wrong = DbTarget(engine="redis", host="127.0.0.1", port=live, password="not-" + PASSWORD)
    with pytest.raises(ChainError) as err, ProcessChain([redisdump.snapshot_stage(wrong, str(counts))]) as chain:
        b"".join(chain.chunks())
        chain.finish()
    assert "WRONGPASS" in str(err.value) and PASSWORD not in str(err.value)


def test_a_scratch_server_counts_only_once_the_whole_snapshot_is_loaded(tmp_path):
    proc, port = _start_server(tmp_path, "--enable-debug-command", "yes", "--repl-diskless-sync-delay", "0")
    try:
        _client(port).execute_command("DEBUG", "POPULATE", 600_000, "key", 20)
        target = DbTarget(engine="redis", host="127.0.0.1", port=port, password=PASSWORD)
        counts = tmp_path / "counts.json"
        with ProcessChain([redisdump.snapshot_stage(target, str(counts))]) as chain, \
                redisdump.ScratchRedis() as scratch:
            got = scratch.load(chain.chunks())  # INFO answers during the load: the count must wait for its end
            chain.finish()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert got == {"0": 600_000} == redisdump.read_counts(str(counts))["key_counts"]


def test_the_snapshot_parser_counts_what_it_knows_and_says_what_it_does_not():
    from engines import rdbstream

    def parsed(raw: bytes) -> dict:
        out: list[bytes] = []
        chunks = [raw[i:i + 3] for i in range(0, len(raw), 3)]  # values cut across chunk boundaries
        result = rdbstream.parse(rdbstream.Reader(chunks, out.append))
        assert b"".join(out) == raw  # every byte passed through, unchanged
        return result

    head = b"REDIS0010" + b"\xfa\x09redis-ver\x067.0.15"
    good = head + b"\xfe\x03" + b"\x00\x01a\x01b" + b"\xfc" + b"\x00" * 8 + b"\x00\x01c\xc0\x07" + b"\xff" + b"\x00" * 8
    assert parsed(good) == {"rdb_version": 10, "redis_version": "7.0.15", "keys": {"3": 2}, "expiring": {"3": 1}}
    with pytest.raises(rdbstream.Unsupported):
        parsed(head + b"\xfe\x00\x63\x01k\x01v\xff" + b"\x00" * 8)  # value type 99: a newer Redis's
    with pytest.raises(rdbstream.RdbError, match="truncated"):
        parsed(good[:-12])


def test_redis_that_disappears_mid_backup_fails_the_run_and_stores_nothing(make_customer, tmp_path):
    proc, port = _start_server(tmp_path)
    try:
        c = _client(port, 0)
        # 3000 keys at 1 ms each: the snapshot streams for about 3 s, time to kill the server during it.
        c.config_set("rdb-key-save-delay", 1000)
        c.config_set("repl-diskless-sync", "yes")
        c.config_set("repl-diskless-sync-delay", 0)
        pipe = c.pipeline(transaction=False)
        for i in range(3000):
            pipe.set(f"k{i}", "v" * 100)
        pipe.execute()
        customer = make_customer(databases=[("cache", f"redis://:{PASSWORD}@127.0.0.1:{port}/0")])

        def kill_when_streaming() -> None:
            # The server's child is streaming the snapshot to the stage: kill the server in the middle of it.
            wait_until(lambda: _client(port).info("persistence")["rdb_bgsave_in_progress"] == 1, 60, interval=0.02,
                       what="the snapshot to stream")
            time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_streaming)
        killer.start()
        bk, run = _backup(customer)
        killer.join()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert run.status == "failed" and bk.status == "failed"
    assert "db-cache.rdb" in bk.error and "closed the connection" in bk.error, bk.error
    folder = Path(bk.target.path) / bk.prefix
    assert not (folder.exists() and [p for p in folder.rglob("*") if p.is_file()])


def test_a_redis_backup_is_imported_from_storage_alone_with_its_connection_and_key_counts(backed_up, tmp_path):
    from backups.models import StorageTarget
    from customers.models import Customer
    from tests.test_backup_import import fresh_install

    customer, _, before = backed_up
    StorageTarget.objects.create(name="dr", kind="local", path=str(tmp_path / "dr"))
    code, doc = command_json("backup", customer.domain, "--target", "dr")
    assert code == 0, doc
    fresh_install(customer)
    code, doc = command_json("backup_import", "--target", "dr")
    assert code == 0 and len(doc["imported"]) == 1, doc
    db = Customer.objects.get(domain=customer.domain).databases.get()
    assert (db.engine, db.database, db.tls, db.password) == ("redis", "1", False, "")  # set before restoring
    art = Backup.objects.get().artifacts.get(kind="database")
    assert art.details["key_counts"] == {"1": len(before[1]), "2": len(before[2])}


# --- restore refusals and failures --------------------------------------------------------------------------------
def test_restore_is_refused_when_no_logical_database_is_spare(backed_up, live):
    customer, bk, _ = backed_up
    for db in [0, *range(3, 16)]:
        _client(live, db).set("occupied", db)
    _change(live)
    changed = _state(live)
    code, run = command_json("restore", str(bk.pk), "--yes")
    assert code == 1 and "no empty logical database" in run["error"] and "nothing was touched" in run["error"]
    assert _state(live) == changed
    assert not Backup.objects.filter(customer=customer, trigger="restore").exists()  # before the safety backup


def test_a_restore_that_fails_after_the_swap_puts_the_target_back_exactly(backed_up, live, settings):
    customer, bk, _ = backed_up
    svc = customer.services.get()
    svc.health_url = f"http://127.0.0.1:{free_port()}/health"  # nothing listens: never healthy
    svc.save()
    settings.KASA_HEALTH_TIMEOUT = 1.0
    _change(live)
    changed = _state(live)
    code, run = command_json("restore", str(bk.pk), "--yes")
    assert code == 1 and "pre-restore state was put back" in run["error"], run["error"]
    assert _state(live) == changed
    log = "\n".join(RunLogLine.objects.filter(run_id=run["id"]).values_list("text", flat=True))
    assert "SWAPDB again" in log


def test_a_remote_customers_redis_is_snapshotted_through_the_ssh_forward_and_its_restore_refused(
        netns_hosts, team, redis_server, live):
    from customers.models import DatabaseConnection
    from tests.remote_fixtures import make_host, remote_customer, run_backup

    web = netns_hosts.make()
    _seed(live)
    before = _state(live)
    customer = remote_customer(web, make_host(web, "web-redis"), team, sqlite=False)
    # The server's socket file on the host (the simulated host shares this filesystem): reached only through the
    # session's forward.
    DatabaseConnection.objects.create(customer=customer, name="cache", engine="redis", host=redis_server["socket"],
                                      port=6379, database="1", password=PASSWORD)
    run = run_backup(customer, scope="database")
    assert run.status == "succeeded", run.error
    bk = Backup.objects.get(run=run)
    art = bk.artifacts.get(kind="database")
    assert art.details["key_counts"] == {"1": len(before[1]), "2": len(before[2])}
    assert not RunLogLine.objects.filter(run=run, text__contains=PASSWORD).exists()
    code, drill = command_json("verify", str(bk.pk))
    assert code == 0, drill
    _change(live)
    changed = _state(live)
    code, out = command_json("restore", str(bk.pk), "--yes")
    assert code == 1 and "refused before touching anything" in out["error"] and "web-redis" in out["error"]
    assert _state(live) == changed


def test_a_remote_customers_redis_over_tls_is_refused_before_the_host_is_contacted(db, team):
    from customers.services import customer_create
    from hosts.models import Host

    host = Host.objects.create(name="web7", ssh_user="root", address="10.9.9.9", customers_root="/srv/customers")
    customer = customer_create(domain="far.example.com", root="/srv/customers/far", team=team, host=host,
                               databases=[("cache", dburl.parse(f"rediss://:{PASSWORD}@127.0.0.1:6379/1"))])
    bk, run = _backup(customer)
    assert run.status == "failed" and "refused before touching anything" in run.error
    assert "web7" in run.error and "TLS" in run.error
    # In Python, case-sensitive on every control database (SQLite's LIKE is not): no ssh command was logged.
    assert not [t for t in RunLogLine.objects.filter(run=run).values_list("text", flat=True) if "ssh" in t]


# --- TLS ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def tls_redis(tmp_path, settings):
    """A redis-server speaking TLS only, its certificate (for 127.0.0.1) signed by a CA of the test's own."""
    require(shutil.which("openssl") is not None, "openssl")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=Kasa test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "ext")
    program = shutil.which("redis-server")
    require(program is not None, "redis-server (Debian package redis-server)")
    port = free_port()
    proc = subprocess.Popen([program, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
                             "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--tls-replication", "yes",
                             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                             "--repl-diskless-sync-delay", "0", "--logfile", str(tmp_path / "server.log")],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: port_open("127.0.0.1", port), 20, what="redis-server (TLS) to listen")
    settings.KASA_REDIS_CA_FILE = str(tmp_path / "ca.crt")
    yield port, redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, db=1, ssl=True,
                            ssl_ca_certs=str(tmp_path / "ca.crt"))
    proc.terminate()
    proc.wait(timeout=20)


def test_backup_drill_and_restore_over_tls_check_the_servers_certificate(make_customer, tls_redis, settings):
    port, c = tls_redis
    c.set("greeting", "over TLS")
    c.hset("user:1", mapping={"name": "Ann"})
    customer = make_customer(databases=[("cache", f"rediss://:{PASSWORD}@127.0.0.1:{port}/1")])
    bk, _ = _backup(customer)
    assert bk.status == "succeeded", bk.error
    assert bk.artifacts.get(kind="database").details["key_counts"] == {"1": 2}
    code, drill = command_json("verify", str(bk.pk))
    assert code == 0, drill
    c.delete("greeting")
    code, run = command_json("restore", str(bk.pk), "--yes")
    assert code == 0, run
    assert c.get("greeting") == b"over TLS" and c.hgetall("user:1") == {b"name": b"Ann"}

    settings.KASA_REDIS_CA_FILE = ""  # the system's CAs do not know the test's CA: refused, nothing stored
    bk, _ = _backup(customer)
    assert bk.status == "failed" and "certificate verify failed" in bk.error, bk.error


def test_a_check_pings_redis_and_reports_a_wrong_password_without_showing_it(customer, live, make_customer):
    code, doc = command_json("customer_check", customer.domain)
    (entry,) = doc["result"]["databases"]
    assert entry["ok"] and entry["server_version"].startswith("Redis 7."), doc
    wrong = make_customer(databases=[("cache", f"redis://:not-{PASSWORD}@127.0.0.1:{live}/1")])
    code, doc = command_json("customer_check", wrong.domain)
    (entry,) = doc["result"]["databases"]
    assert code == 1 and not entry["ok"] and "invalid username-password pair" in entry["error"], doc
    assert f"127.0.0.1:{live}" in entry["error"]
    assert PASSWORD not in str(doc)


# --- URLs and the admin -------------------------------------------------------------------------------------------
def test_redis_urls_parse_and_never_show_the_password():
    url = dburl.parse("redis://:p%40ss@cache.internal:6380/3")
    assert (url.engine, url.host, url.port, url.name, url.user, url.password, url.tls) == \
        ("redis", "cache.internal", 6380, "3", "", "p@ss", False)
    assert url.display() == "redis://:********@cache.internal:6380/3"
    tls = dburl.parse("rediss://app:pw@cache.internal")
    assert (tls.tls, tls.port, tls.name, tls.user) == (True, 6379, "0", "app")
    for bad in ("redis://cache/x", "redis:///1", "redis://h/1?ssl=1"):
        with pytest.raises(dburl.DatabaseURLError):
            dburl.parse(bad)


def test_admin_offers_redis_and_masks_its_password(client, admin_user, customer):
    db = customer.databases.get()
    assert db.engine == "redis" and db.database == "1" and db.port and db.password.reveal() == PASSWORD
    assert PASSWORD not in db.display_url()
    client.force_login(admin_user)
    html = client.get(f"/customers/customer/{customer.pk}/change/").content.decode()
    assert '<option value="redis" selected>Redis</option>' in html
    assert PASSWORD not in html and 'type="password"' in html and "tls" in html


def test_the_documented_by_hand_restore_loads_the_snapshot_into_a_plain_redis_server(backed_up, tmp_path):
    """docs/FORMAT.md: decrypt with its Python recipe, `zstd -d`, and `redis-server --dir D --dbfilename dump.rdb`
    loads the artifact: every key of the customer's logical database is there, nothing from Kasa reads it."""
    from django.conf import settings

    customer, bk, before = backed_up
    doc = (Path(settings.BASE_DIR) / "docs" / "FORMAT.md").read_text()
    assert "redis-server --dir D\n--dbfilename dump.rdb" in doc or "redis-server --dir D --dbfilename dump.rdb" in \
        " ".join(doc.split())
    recipe = next(b for b in doc.split("```python\n")[1:] if "def decrypt_artifact" in b).split("```")[0]
    namespace: dict = {}
    exec(compile(recipe, "FORMAT.md", "exec"), namespace)  # our own documentation, run as written
    art = bk.artifacts.get(kind="database")
    key = settings.KASA_BACKUP_KEYS.split(",")[0].strip()
    namespace["decrypt_artifact"](str(Path(bk.target.path) / bk.prefix / art.name), str(tmp_path / "rdb.zst"), key)
    folder = tmp_path / "by-hand"
    folder.mkdir()
    subprocess.run(["zstd", "-d", "-q", "-o", str(folder / "dump.rdb"), str(tmp_path / "rdb.zst")], check=True)
    proc, port = _start_server(folder, "--dbfilename", "dump.rdb")
    try:
        wait_until(lambda: _client(port).info("persistence")["loading"] == 0, 30, what="the snapshot to load")
        assert _state(port)[1] == before[1]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
