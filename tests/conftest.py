"""Shared fixtures: real services, a real worker, a real ASGI server.

Nothing here mocks a part that exists on this machine. A test that needs a
service calls `require(...)`: it skips on a developer's machine without the
service, and fails in CI (CI=true), where a missing service is a broken setup.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

import pytest
from django.conf import settings

BASE_DIR = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
PG_HOST, PG_PORT, PG_ADMIN = "127.0.0.1", 5432, "postgres"
MY_HOST, MY_PORT, MY_ADMIN = "127.0.0.1", 3306, "root"
REDIS_TEST_URL = os.environ.get("KASA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

# Timing knobs, not behaviour: a PM2 start watches its app 0.8 s instead of 2 s and health URLs are polled every
# 0.2 s instead of 0.5 s, in this process and in the Kasa processes tests start (make run, workers). Every start
# and health check still happens; the suite has hundreds of them. Tests of the watching itself set their own.
TEST_TIMINGS = {"KASA_PM2_SETTLE": "0.4", "KASA_HEALTH_INTERVAL": "0.2", "KASA_HEALTH_STREAK": "2",
                "KASA_SSH_CONNECT_TIMEOUT": "2"}
for _name, _value in TEST_TIMINGS.items():
    os.environ.setdefault(_name, _value)


def pytest_configure(config):
    for name in TEST_TIMINGS:
        value = os.environ[name]
        setattr(settings, name, int(value) if value.isdigit() else float(value))
    _fast_postgresql_flush()


def _fast_postgresql_flush() -> None:
    """Empty the tables after a transactional test with DELETE instead of TRUNCATE, on PostgreSQL.

    Why: Django flushes every table after each transactional test (most of this suite: workers, threads and
    subprocesses need committed rows). PostgreSQL's TRUNCATE of Kasa's ~45 tables makes new files for each table
    and index: 0.2-0.4 s per test here, minutes over the suite; DELETE of the few rows a test leaves takes ~0.02 s.
    Triggers are off for the flush (`session_replication_role = replica`, the transaction only): the RunTally
    trigger must not count the deleted runs back in, and the foreign keys need no checking when everything goes.
    That setting needs a superuser (the suite's `postgres`); for another role the flush stays TRUNCATE."""
    from django.db.backends.postgresql.operations import DatabaseOperations

    truncate = DatabaseOperations.sql_flush

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if reset_sequences or not tables or not _is_superuser(self.connection):
            return truncate(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
        return ["SET LOCAL session_replication_role = replica",
                *(f"DELETE FROM {self.quote_name(t)}" for t in tables)]

    DatabaseOperations.sql_flush = sql_flush


def _is_superuser(connection) -> bool:
    cached = getattr(connection, "_kasa_superuser", None)
    if cached is None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            row = cursor.fetchone()
        cached = connection._kasa_superuser = bool(row and row[0])
    return cached


# `make test-sqlite` passes the smoke tests again on the default SQLite control database; those that never touch a
# database ran in the PostgreSQL pass already and would only repeat themselves (KASA_TEST_DATABASE_ONLY=1).
_DB_FIXTURES = {"db", "transactional_db", "django_db_setup", "client", "admin_client",
                "django_user_model"}


def _uses_database(item) -> bool:
    return bool(item.get_closest_marker("django_db")) or bool(_DB_FIXTURES & set(getattr(item, "fixturenames", ())))


# `make test` runs two passes side by side, one per core (Makefile: KASA_TEST_PASS). The PostgreSQL pass runs the
# suite but for the tests of other hosts (network namespaces, sshd, PM2 there), Redis, the random-tree round
# trips and the object-lock tests (SeaweedFS), which the SQLite pass runs beside it with the smoke tests: what they
# test is not the control database, and they mostly wait on their own servers. The PostgreSQL pass takes the
# end-to-end tests (Chromium, the demo, `make run`) last, when the SQLite pass has ended: they wait on a worker
# process that a loaded machine slows.
_SIDE_PASS = re.compile(r"test_(hosts?|host_\w+|remote_\w+|redis|tree_roundtrip|s3_lock|immutable|compromised_kasa)"
                        r"\.py$")
_END_TO_END = re.compile(r"test_(browser\w*|demo\w*|make_run)\.py$")


def _side_pass(item) -> bool:
    return bool(_SIDE_PASS.search(item.path.name))


def pytest_collection_modifyitems(config, items):
    which = os.environ.get("KASA_TEST_PASS")
    if which == "sqlite":
        kept = [item for item in items if _side_pass(item) or (item.get_closest_marker("smoke") and
                                                                _uses_database(item))]
    elif which == "pg":
        kept = sorted((item for item in items if not _side_pass(item)),
                      key=lambda item: bool(_END_TO_END.search(item.path.name)))  # stable: the rest keep their order
    elif os.environ.get("KASA_TEST_DATABASE_ONLY") == "1":
        kept = [item for item in items if _uses_database(item)]
    else:
        return
    if len(kept) != len(items):
        dropped = set(map(id, kept))
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in dropped])
    items[:] = kept


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI and is missing: .ci/run should have installed/started it")
    pytest.skip(f"{what} is not available here")


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    """Whether a listener could bind 127.0.0.1:port now. A connect() probe is not enough: a client socket's
    local port (a psql or redis connection) refuses a bind with EADDRINUSE although nothing listens there."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int = 3) -> int:
    """A base port with `count` free ports from it (the demo's backend, admin and store: KASA_DEMO_PORT).

    Chosen below the kernel's ephemeral range, so no outgoing connection can take one of them between this
    choice and the services' start (CI once lost the demo's admin port that way)."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    top = max(ephemeral_low, 12000) - count
    start = 10000 + (os.getpid() * 7) % max(top - 10000, 1)
    for base in [*range(start, top, 7), *range(10000, start, 7)]:
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise AssertionError("no free ports")


def wait_until(predicate, timeout: float = 30, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- processes, from /proc ---------------------------------------------------
def processes() -> dict[int, tuple[str, int, int]]:
    """Every process: pid -> (state, ppid, process group). State "Z" is a zombie not yet reaped."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            found[int(entry)] = (fields[0], int(fields[1]), int(fields[2]))
    return found


def wait_dead(pid: int, timeout: float = 30) -> None:
    """Until `pid` is gone or a zombie with no thread left. A SIGKILL takes effect only once each thread leaves an
    uninterruptible sleep (a write to disk, say), so a killed worker may still look alive for a moment; and its
    main thread shows as a zombie while another thread is still dying, holding the open files (and their
    locks) they share."""

    def dead() -> bool:
        if processes().get(pid, ("X",))[0] not in ("Z", "X"):
            return False
        try:
            return os.listdir(f"/proc/{pid}/task") in ([], [str(pid)])
        except OSError:
            return True  # gone altogether

    wait_until(dead, timeout, what=f"process {pid} and its threads to die")


# --- real database servers for customer databases -----------------------------
@pytest.fixture
def pg_server():
    require(port_open(PG_HOST, PG_PORT) and shutil.which("psql"), "PostgreSQL server and psql")
    return {"host": PG_HOST, "port": PG_PORT}


@pytest.fixture
def pg_database(pg_server):
    """A fresh database and a role with a password; dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"kasa_t_{uuid.uuid4().hex[:10]}"
    password = f"pw-{uuid.uuid4().hex}"
    admin = dict(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, dbname="postgres", autocommit=True)
    with psycopg.connect(**admin) as con:
        con.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        con.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
    yield {"host": PG_HOST, "port": PG_PORT, "name": name, "user": name, "password": password,
           "url": f"postgresql://{name}:{password}@{PG_HOST}:{PG_PORT}/{name}"}
    with psycopg.connect(**admin) as con:
        con.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        con.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def mysql_admin(sql: str) -> None:
    client = shutil.which("mariadb") or shutil.which("mysql")
    subprocess.run([client, "--protocol=TCP", "-h", MY_HOST, "-P", str(MY_PORT), "-u", MY_ADMIN, "-e", sql],
                   check=True, capture_output=True, timeout=30)


@pytest.fixture
def mysql_database():
    require(port_open(MY_HOST, MY_PORT) and (shutil.which("mariadb") or shutil.which("mysql")),
            "MariaDB server and client")
    name = f"kasa_t_{uuid.uuid4().hex[:10]}"
    password = f"pw'\"-{uuid.uuid4().hex}"  # quotes: the defaults file must escape them
    esc = password.replace("\\", "\\\\").replace("'", "\\'")
    mysql_admin(f"CREATE DATABASE `{name}`; CREATE USER '{name}'@'%' IDENTIFIED BY '{esc}'; "
                f"CREATE USER '{name}'@'localhost' IDENTIFIED BY '{esc}'; "
                f"GRANT ALL ON `{name}`.* TO '{name}'@'%'; GRANT ALL ON `{name}`.* TO '{name}'@'localhost';")
    yield {"host": MY_HOST, "port": MY_PORT, "name": name, "user": name, "password": password}
    mysql_admin(f"DROP DATABASE IF EXISTS `{name}`; DROP USER IF EXISTS '{name}'@'%'; "
                f"DROP USER IF EXISTS '{name}'@'localhost';")


@pytest.fixture
def redis_url():
    require(port_open("127.0.0.1", 6379), "Redis server")
    return REDIS_TEST_URL


# --- customers ----------------------------------------------------------------
@pytest.fixture
def customer_root():
    root = Path(settings.KASA_CUSTOMERS_ROOT) / f"c-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    yield root
    kill_pm2_under(root)  # each customer's PM2 daemon lives in its root
    shutil.rmtree(root, ignore_errors=True)


NOBODY = 65534  # uid and gid of Debian's nobody/nogroup


def as_unprivileged(fn, *args, timeout: float = 120, **kwargs) -> None:
    """Run fn(*args, **kwargs) in a forked child as uid/gid 65534, as Kasa's worker runs in production
    (systemd `User=kasa`, the image's uid 10001); here everything else runs as root, which no folder
    permission stops. A failure in the child fails the test with the child's traceback. The child may only
    use modules already imported: the interpreter's own files are not readable by that user here."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        code = 0
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn(*args, **kwargs)
        except BaseException:
            os.write(write_end, traceback.format_exc().encode()[-8000:])
            code = 1
        os._exit(code)
    os.close(write_end)
    report, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([read_end], [], [], 0.5)[0]:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break  # the child exited (or closed its end on the way out)
                report += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (f"as uid {NOBODY} (exit status {status}):\n"
                                                    + report.decode(errors="replace"))


@pytest.fixture
def unprivileged_dir():
    """A folder that uid 65534 owns, reachable by it (pytest's tmp_path lies under a 0700 folder of root)."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="kasa-unprivileged-", dir="/tmp"))
    top.chmod(0o755)
    os.chown(top, NOBODY, NOBODY)
    yield top
    shutil.rmtree(top)  # as root: no folder permission stops it


CUSTOMER_USERS = ("kasa-t-alpha", "kasa-t-beta")  # customers' OS users (run_as) in the tests


def ensure_os_user(name: str) -> str:
    """A system user without a home or login shell, with its own group; created once per machine (tests run as
    root, as Kasa's worker does when it runs customer code as each customer's user)."""
    import pwd

    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        pass
    require(os.geteuid() == 0 and bool(shutil.which("useradd")), "root and useradd (customer OS users)")
    done = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True, check=False)
    if done.returncode not in (0, 9):  # 9: created meanwhile by another test session
        pytest.fail(f"useradd {name}: {done.stderr.strip()}")
    return name


@pytest.fixture(scope="session")
def customer_users() -> tuple[str, str]:
    """Two customer OS users, neither root nor Kasa's own."""
    return tuple(ensure_os_user(n) for n in CUSTOMER_USERS)


@pytest.fixture
def team(db):
    from customers.models import Team

    return Team.objects.create(name=f"team-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def make_customer(db, customer_root, team):
    from customers.services import customer_create

    used: list[Path] = []

    def make(domain=None, *, services=("backend",), databases=(), team_=None, root=None):
        from engines import dburl

        if root is None:  # the first customer gets `customer_root`; each later one a root of its own (never shared)
            root = customer_root if not used else customer_root.with_name(f"{customer_root.name}-{len(used)}")
        root = Path(root)
        used.append(root)
        for s in services:
            (root / s).mkdir(parents=True, exist_ok=True)
        return customer_create(
            domain=domain or f"{uuid.uuid4().hex[:8]}.example.com", root=str(root), team=team_ or team,
            services=[(s, s) for s in services],
            databases=[(n, dburl.parse(u) if isinstance(u, str) else u) for n, u in databases],
        )

    yield make
    for root in used[1:]:
        if root.parent == customer_root.parent and root.name.startswith(customer_root.name):
            kill_pm2_under(root)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def staff_user(db):
    """Factory for staff users in the operators group, members of the given teams."""
    from django.contrib.auth import get_user_model

    from console.setup import ensure_operator_group

    group = ensure_operator_group()

    def make(*teams, username=None, password="pw-Secret-123"):
        user = get_user_model().objects.create_user(
            username=username or f"staff-{uuid.uuid4().hex[:6]}", password=password, is_staff=True
        )
        user.groups.add(group)
        for t in teams:
            t.members.add(user)
        user.plain_password = password
        return user

    return make


# --- subprocesses: worker and ASGI server on the test database ----------------------
def _database_url() -> str:
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture
def subprocess_env(transactional_db):
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DATABASE_URL=_database_url(),
        KASA_VAR_DIR=str(settings.KASA_VAR_DIR),
        KASA_CUSTOMERS_ROOT=str(settings.KASA_CUSTOMERS_ROOT),
        KASA_SECRET_KEYS=settings.KASA_SECRET_KEYS,
        SECRET_KEY=settings.SECRET_KEY,
        KASA_WORKERS="1",
        KASA_HEARTBEAT_SECONDS=str(settings.KASA_HEARTBEAT_SECONDS),
        # A worker's own reaper pass (qcluster) only where a test asks for it: others make and reap runs themselves.
        KASA_REAP_SECONDS="3600",
        PYTHONUNBUFFERED="1",
    )
    if settings.REDIS_URL:
        env["REDIS_URL"] = settings.REDIS_URL
    else:
        env.pop("REDIS_URL", None)
    return env


class Proc:
    def __init__(self, argv, env, log_path: Path):
        self.log_path = log_path
        self.env = env
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, cwd=BASE_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    @property
    def pid(self):
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15):
        if self.popen.poll() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)  # the group may outlive its leader
        else:
            try:
                os.killpg(self.popen.pid, sig)
                self.popen.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait()
        self._log.close()


@pytest.fixture
def start_worker(subprocess_env, tmp_path):
    procs = []

    def start(**extra_env):
        env = {**subprocess_env, **{k: str(v) for k, v in extra_env.items()}}
        p = Proc([sys.executable, "manage.py", "qcluster"], env, tmp_path / f"worker-{len(procs)}.log")
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()  # SIGTERM to the whole group: Kasa's qcluster exits at once (tests/test_operations.py)


@pytest.fixture
def worker(start_worker):
    return start_worker()


@contextlib.contextmanager
def serving_asgi(env: dict, log_path: Path):
    """daphne serving config.asgi on a free port with `env`, as in production; `.url` is its address."""
    port = free_port()
    p = Proc([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"],
             env, log_path)
    try:
        wait_until(lambda: port_open("127.0.0.1", port, 0.2) or p.popen.poll() is not None, 30, what="daphne")
        assert p.popen.poll() is None, p.output()
        p.url = f"http://127.0.0.1:{port}"
        yield p
    finally:
        p.stop()


@pytest.fixture
def asgi_server(subprocess_env, tmp_path):
    """daphne serving config.asgi on a free port, as in production."""
    with serving_asgi(subprocess_env, tmp_path / "daphne.log") as p:
        yield p


@contextlib.contextmanager
def holding_host_slots(customer, count: int = 1):
    """Hold `count` backup slots of the customer's host (operations.slots) from the test, as another worker's
    backups would: a running run of the test's own holds them, released on exit."""
    from django.utils import timezone

    from operations import slots
    from operations.models import Run

    holder = Run.objects.create(customer=customer, kind="check", mutating=False, status=Run.Status.RUNNING,
                                started_at=timezone.now(), heartbeat_at=timezone.now(), worker=slots.worker_id())
    try:
        with contextlib.ExitStack() as stack:
            for _ in range(count):
                stack.enter_context(slots.hold(slots.host_slot(customer), count, holder.pk, wait=False))
            yield holder
    finally:
        Run.objects.filter(pk=holder.pk).update(status=Run.Status.SUCCEEDED, finished_at=timezone.now())


def wait_for_run(run_id: int, timeout: float = 60, statuses=("succeeded", "failed", "cancelled")):
    from operations.models import Run

    def done():
        run = Run.objects.get(pk=run_id)
        return run if run.status in statuses else None

    return wait_until(done, timeout, 0.1, what=f"run {run_id} to reach {statuses}")


# --- PM2: the services Kasa starts in tests must not outlive them ----------------------------
def _pm2_daemons() -> dict[int, str]:
    """pid -> PM2 home of every PM2 daemon on this machine. Its process title names its home but is cut to the
    length of its original command line; its environment's PM2_HOME is whole (we are root: we may read it)."""
    found = {}
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "God Daemon (" not in cmdline:
                continue
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        home = next((v[len(b"PM2_HOME="):].decode(errors="replace") for v in environ if v.startswith(b"PM2_HOME=")),
                    cmdline.split("God Daemon (", 1)[1].rsplit(")", 1)[0])
        found[int(proc_dir.name)] = home
    return found


def _kill_pm2_daemon(daemon: int) -> None:
    subprocess.run(["pkill", "-KILL", "-P", str(daemon)], check=False)  # its apps
    try:
        os.kill(daemon, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_pm2_under(folder) -> None:
    """Stop every PM2 daemon whose home lies in `folder` (a customer's root: its own PM2 home, run as its user),
    and their apps: `pm2 kill` as the home's owner while it still has its files, else (its home was deleted
    under it) by its process title."""
    from engines import procman, runas

    folder = os.path.abspath(folder)
    for daemon, home in _pm2_daemons().items():
        if home != folder and not home.startswith(folder + "/"):
            continue
        try:
            owner = Path(home).stat().st_uid
            identity = None if owner in (0, os.geteuid()) else runas.lookup(pwd.getpwuid(owner).pw_name)
            procman.pm2_kill(home, identity=identity)
        except Exception:  # noqa: BLE001 — fall through to the process table
            pass
        if daemon in _pm2_daemons():
            _kill_pm2_daemon(daemon)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_pm2():
    """Every customer's PM2 daemon lives in its root's .kasa-pm2: those under this run's customers folder (left by an
    earlier, interrupted run, or by a test that did not stop them) are stopped before and after the session."""
    kill_pm2_under(settings.KASA_CUSTOMERS_ROOT)
    yield
    kill_pm2_under(settings.KASA_CUSTOMERS_ROOT)


# Fixtures of real servers (imported last: these modules use the helpers above).
from tests.hosts import netns_hosts  # noqa: E402, F401  (simulated hosts: network namespaces with a real sshd)
from tests.remote_fixtures import host_pg, parents_open  # noqa: E402, F401  (a host with a PostgreSQL only it reaches)
from tests.s3 import locked_s3, s3_server, seaweed  # noqa: E402, F401  (SeaweedFS: a real S3 server)
from tests.sftp import sshd  # noqa: E402, F401  (a real OpenSSH sftp server)
