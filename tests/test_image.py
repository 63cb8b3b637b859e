"""The image `make image` builds, run as docker-compose.yml runs it: migrate and `kasa_setup --no-demo`, the web
server (ready, admin login page), the worker (a customer backed up and restored in place), and the worker stopped
by SIGTERM within the compose file's grace period with no run left "running". Also: no compiler, dev tool or
secret in any layer.

How the image runs here: `podman run` cannot start a container on this machine (its sandbox refuses the
runtime's setrlimit: crun and runc both fail), so each container is the image's own filesystem
(`podman image mount`, read-only) run under `unshare --pid --mount --fork` + `chroot`, with the user, working
directory, environment and command read from `podman image inspect`, the compose file's volumes bind-mounted
from this test's folder, and only environment variables from the compose file's list. It shares this machine's
network, so the containers reach this machine's PostgreSQL (a fresh database) and Redis (KASA_TEST_REDIS_URL)
at 127.0.0.1, as they would reach the compose file's `postgres` and `redis` services.

Runs in `make test-image` (KASA_TEST_IMAGE names the image; CI runs it after `make test`, .ci/run) and fails
there when podman or the image is missing; `make test` skips it (a build takes minutes)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REDIS_TEST_URL, _bindable, free_port, wait_until

BASE_DIR = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("KASA_TEST_IMAGE", "")
pytestmark = pytest.mark.skipif(not IMAGE, reason="runs in `make test-image` (KASA_TEST_IMAGE names the image)")
COMPOSE = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text()) if IMAGE else {}
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEV_TOOLS = ("pytest", "_pytest", "ruff", "playwright", "pip_audit", "import_linter", "importlinter")
COMPILERS = re.compile(r"^(usr/bin/(cc|c\+\+|gcc|g\+\+|clang|cpp)(-\d+)?|usr/bin/x86_64-linux-gnu-gcc.*"
                       r"|usr/lib/gcc/.*/cc1(plus)?|usr/bin/(make|ld|as))$")


def podman(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def image():
    """The image's config (`podman image inspect`) and its filesystem, mounted read-only for the test's module."""
    if not shutil.which("podman"):
        pytest.fail("podman is missing: `make test-image` installs it (scripts/system-deps.sh --image)")
    config = json.loads(podman("image", "inspect", IMAGE))[0]
    root = Path(podman("image", "mount", IMAGE).strip())
    yield {"config": config["Config"], "root": root, "size": config["Size"]}
    subprocess.run(["podman", "image", "unmount", IMAGE], capture_output=True, timeout=60)


def _user_ids(root: Path, user: str) -> tuple[int, int]:
    """The image's USER (a name or uid[:gid]) as numbers, from the image's own /etc/passwd."""
    name, _, group = user.partition(":")
    if name.isdigit():
        return int(name), int(group or name)
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"the image's user {user!r} is not in its /etc/passwd")


class Container:
    """One container of the compose file, as a process tree in its own PID and mount namespaces (see the module's
    docstring). `pid` is the container's first process as this machine sees it (PID 1 inside)."""

    def __init__(self, image: dict, volumes: dict[str, Path], env: dict[str, str], command: list[str], log: Path,
                 *, errors: Path | None = None):
        config, root = image["config"], image["root"]
        uid, gid = _user_ids(root, config.get("User") or "root")
        environment = dict(item.split("=", 1) for item in config.get("Env") or [])
        environment.update(env)  # compose's `environment:` over the image's ENV, as docker does
        mounts = "".join(f'mount --bind "{host}" "$r{inside}"; ' for inside, host in volumes.items())
        # Its own hostname too, as each compose container has: a worker's name (KASA_WORKER_NAME's default) and
        # the PIDs its runs record are judged per name, and these PIDs are per container.
        setup = ('set -e; r=$1; shift; hostname "kasa-$$-$(date +%N)"; mount --rbind /dev "$r/dev"; '
                 'mount -t proc proc "$r/proc"; '
                 'mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"; ' + mounts +
                 f'exec chroot --userspec={uid}:{gid} "$r" "$@"')
        workdir = config.get("WorkingDir") or "/"
        argv = ["unshare", "--pid", "--mount", "--uts", "--fork", "--propagation", "private", "sh", "-c", setup, "sh",
                str(root), "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in environment.items()],
                "sh", "-c", 'cd "$0" && exec "$@"', workdir, *(config.get("Entrypoint") or []), *command]
        self.log, self.errors = log, errors
        self._out = open(log, "wb")
        self._err = open(errors, "wb") if errors else None
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=self._err or subprocess.STDOUT,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        def child():
            with contextlib.suppress(OSError):
                kids = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text().split()
                return int(kids[0]) if kids else None
        return wait_until(child, 10, what="the container's first process")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)  # PID 1 inside dies: the kernel ends the rest
            self.popen.wait(timeout=30)
        self._out.close()
        if self._err:
            self._err.close()


@pytest.fixture(scope="module")
def deployment(image, tmp_path_factory):
    """What the compose file's `.env` and services give Kasa's containers: a fresh control database, a Redis
    database, the two volumes, and the compose file's environment variables (names only from there)."""
    import psycopg
    import redis

    folder = tmp_path_factory.mktemp("image")
    volumes = {"/var/lib/kasa": folder / "kasa-var", "/srv/customers": folder / "kasa-customers"}
    uid, gid = _user_ids(image["root"], image["config"].get("User") or "root")
    for path in volumes.values():
        path.mkdir(mode=0o750)
        os.chown(path, uid, gid)  # a named volume starts with the image's folder's owner (10001)
    os.chmod(folder, 0o755)
    control = f"kasa_image_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{control}"')
    redis.Redis.from_url(REDIS_TEST_URL).flushdb()
    key = lambda: uuid.uuid4().hex + uuid.uuid4().hex  # noqa: E731
    values = {
        "KASA_ENV": "production",
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{control}",
        "REDIS_URL": REDIS_TEST_URL,
        "SECRET_KEY": key(), "KASA_SECRET_KEYS": key(), "KASA_BACKUP_KEYS": key(),
        "ALLOWED_HOSTS": "localhost,127.0.0.1", "CSRF_TRUSTED_ORIGINS": "", "SENTRY_DSN": "", "LOG_LEVEL": "INFO",
        "KASA_METRICS_TOKEN": "", "KASA_WORKERS": "2",
        "KASA_VAR_DIR": "/var/lib/kasa", "KASA_CUSTOMERS_ROOT": "/srv/customers",
    }
    services = COMPOSE["services"]
    names = set(services["web"]["environment"])
    assert set(values) == names, f"the compose file's variables changed: {sorted(names ^ set(values))}"
    yield {"image": image, "volumes": volumes, "env": values, "folder": folder, "control": control,
           "services": services}
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{control}" WITH (FORCE)')
    shutil.rmtree(folder, ignore_errors=True)  # the volumes: backups of 160 MB of test data


def start(deployment, service: str, command: list[str] | None = None, errors: bool = False, **extra_env) -> Container:
    """The compose service's container: its own environment (the shared one plus the service's additions)."""
    spec = deployment["services"][service]
    # The service's own additions (migrate's KASA_ADMIN_USER...) with their defaults from the compose file.
    own = {k: (re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(v)) or re.fullmatch("(.*)", str(v))).group(1)
           for k, v in spec.get("environment", {}).items() if k not in deployment["env"]}
    env = {**deployment["env"], **own, **extra_env}
    argv = command if command is not None else spec.get("command") or deployment["image"]["config"]["Cmd"]
    log = deployment["folder"] / f"{service}-{uuid.uuid4().hex[:6]}.log"
    return Container(deployment["image"], deployment["volumes"], env, list(argv), log,
                     errors=log.with_suffix(".err") if errors else None)


def one_shot(deployment, argv: list[str], timeout: float = 300, **extra_env) -> str:
    """`docker compose run --rm migrate ARGV...`: a command in a fresh container of Kasa's image; its stdout."""
    box = start(deployment, "migrate", ["python", "manage.py", *argv], errors=True, **extra_env)
    try:
        code = box.wait(timeout)
    finally:
        box.kill()
    stderr = box.errors.read_text(errors="replace")
    assert code == 0, f"{' '.join(argv)} exited {code}:\n{box.output()[-2000:]}\n{stderr[-4000:]}"
    return box.output()


def control_query(deployment, sql: str, *params) -> list[tuple]:
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{deployment['control']}", autocommit=True) as con:
        return con.execute(sql, params).fetchall()


def grace_seconds(spec: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", str(spec))
    assert match, spec
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


# --- what is in the image ----------------------------------------------------------------------------

def test_the_image_has_no_compiler_dev_tool_or_secret_in_any_layer(image):
    root = image["root"]
    files = [str(p.relative_to(root)) for p in root.rglob("*")]
    compilers = [f for f in files if COMPILERS.match(f)]
    assert not compilers, compilers
    site = next((root / "opt" / "venv" / "lib").glob("python3.*")) / "site-packages"
    dev = sorted({p.name for p in site.iterdir() if p.name.split("-")[0].lower() in DEV_TOOLS})
    assert not dev, f"dev tools in the image's virtualenv: {dev}"
    assert not [f for f in files if re.search(r"(^|/)\.env(\.|$)", f) and not f.startswith(("usr/", "opt/venv/"))]
    assert not (root / "app" / "var").exists() and not (root / "app" / "tests").exists()
    # The build's CA bundle is mounted, never copied: what is left is podman's empty mount point.
    ca = root / "run" / "kasa-build-ca.crt"
    assert not ca.exists() or ca.stat().st_size == 0
    private = []
    for top in ("app", "etc", "root", "var/lib/kasa", "srv"):
        for path in (root / top).rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
                with contextlib.suppress(OSError):
                    if b"PRIVATE KEY-----" in path.read_bytes():
                        private.append(str(path.relative_to(root)))
    assert not private, f"private keys in the image: {private}"
    env = dict(item.split("=", 1) for item in image["config"]["Env"])
    assert not [k for k in env if re.search(r"SECRET|PASSWORD|TOKEN|_KEYS?$|DSN", k)], env
    history = json.loads(podman("image", "history", "--no-trunc", "--format", "json", IMAGE))
    steps = " ".join(step.get("CreatedBy") or step.get("created_by") or "" for step in history)
    assert steps and "collectstatic" in steps  # the runtime stage's own steps are there to read
    for forbidden in ("pytest", "ruff", "playwright", "build-essential", "gcc", "PASSWORD=", "KASA_BACKUP_KEYS",
                      "BUILD_CA_FILE", "--extra dev"):
        assert forbidden not in steps, forbidden
    # Debian's Python 3.11 (the same as the tests') or the public image's 3.11.
    # (The venv's python is a symlink to an absolute path inside the image: read, not followed from here.)
    assert os.path.lexists(root / "opt" / "venv" / "bin" / "python") and "python3.11" in str(site)
    assert (root / "usr" / "bin" / "python3.11").exists() or (root / "usr" / "local" / "bin" / "python3.11").exists()


# --- the image run as docker-compose.yml runs it ----------------------------------------------------

def test_the_image_migrates_serves_backs_up_restores_and_stops_on_sigterm(deployment, image):
    import psycopg

    # migrate: the compose file's one-shot service, with its own command and variables.
    migrate = start(deployment, "migrate", KASA_ADMIN_USER="admin", KASA_ADMIN_PASSWORD="pw-" + uuid.uuid4().hex)
    try:
        assert migrate.wait(300) == 0, migrate.output()[-4000:]
    finally:
        migrate.kill()
    assert "admin" in migrate.output()

    worker = start(deployment, "worker")
    web_command = list(deployment["services"]["web"]["command"])
    port = 8000
    if not _bindable(port):  # another server on this machine has compose's port: the same command on another
        port = free_port()
        web_command[-1] = web_command[-1].replace("--port 8000", f"--port {port}")
    web = start(deployment, "web", web_command)
    try:
        def ready():
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready/", timeout=5) as answer:
                    return answer.status == 200
            assert web.popen.poll() is None, web.output()[-4000:]
        wait_until(ready, 120, interval=0.5, what="/health/ready/ to answer 200")
        # The reverse proxy's header (production redirects plain HTTP to HTTPS).
        login = urllib.request.Request(f"http://127.0.0.1:{port}/login/", headers={"X-Forwarded-Proto": "https"})
        with urllib.request.urlopen(login, timeout=10) as answer:
            page = answer.read().decode()
        assert answer.status == 200 and 'name="password"' in page and "csrfmiddlewaretoken" in page, page[:2000]

        # A customer: a service folder and a PostgreSQL database, on the customers' volume.
        cust_db = f"kasa_image_c_{uuid.uuid4().hex[:8]}"
        cust_url = f"postgresql://postgres@127.0.0.1:5432/{cust_db}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{cust_db}"')
        try:
            with psycopg.connect(cust_url, autocommit=True) as con:
                con.execute("CREATE TABLE orders (id int primary key, what text)")
                con.execute("INSERT INTO orders VALUES (1, 'before the backup')")
            shop = deployment["volumes"]["/srv/customers"] / "shop"
            (shop / "backend").mkdir(parents=True)
            (shop / "backend" / "app.txt").write_text("version one\n")
            uid, gid = _user_ids(image["root"], image["config"]["User"])
            for path in (shop, shop / "backend", shop / "backend" / "app.txt"):
                os.chown(path, uid, gid)
            one_shot(deployment, ["customer_add", "shop.example.com", "--root", "/srv/customers/shop",
                                  "--service", "backend", "--database", f"main={cust_url}"])

            # The worker backs it up (the command only queues the run and follows it).
            out = one_shot(deployment, ["backup", "shop.example.com", "--enqueue", "--wait", "--json"])
            backup = json.loads(out)
            assert backup["status"] == "succeeded" and backup["encrypted"] is True, backup
            worker_runs = control_query(deployment, "SELECT worker FROM operations_run WHERE id = %s", backup["run"])
            assert worker_runs[0][0], "the backup ran in the command, not in the worker"

            # Changed after the backup, then restored in place by the worker.
            (shop / "backend" / "app.txt").write_text("version two\n")
            with psycopg.connect(cust_url, autocommit=True) as con:
                con.execute("UPDATE orders SET what = 'after the backup'")
            one_shot(deployment, ["restore", str(backup["id"]), "--yes", "--enqueue", "--wait"])
            assert (shop / "backend" / "app.txt").read_text() == "version one\n"
            with psycopg.connect(cust_url, autocommit=True) as con:
                assert con.execute("SELECT what FROM orders").fetchall() == [("before the backup",)]

            # SIGTERM (docker stop) while a backup is under way: the worker lets it finish and stops within compose's
            # grace period. Incompressible data makes the backup last long enough to be caught running.
            with open(shop / "backend" / "media.bin", "wb") as media:
                for _ in range(160):
                    media.write(os.urandom(1 << 20))
            os.chown(shop / "backend" / "media.bin", uid, gid)
            queued = one_shot(deployment, ["backup", "shop.example.com", "--enqueue", "--json"])
            run_id = json.loads(queued)["id"]
            status = lambda: control_query(deployment, "SELECT status FROM operations_run WHERE id = %s",  # noqa: E731
                                           run_id)[0][0]
            wait_until(lambda: status() != "pending", 60, interval=0.05, what="the worker to take the run")
            caught_running = status() == "running"
            grace = grace_seconds(deployment["services"]["worker"]["stop_grace_period"])
            stopping = time.monotonic()
            os.kill(worker.pid, signal.SIGTERM)
            code = worker.wait(grace)
            took = time.monotonic() - stopping
            assert code == 0, worker.output()[-4000:]
            running = control_query(deployment, "SELECT id FROM operations_run WHERE status = 'running'")
            assert running == [], (running, worker.output()[-4000:])
            assert caught_running, "the backup ended before the SIGTERM: give it more data"
            assert "running tasks finish first" in worker.output() and status() == "succeeded", worker.output()[-4000:]
            print(f"the worker stopped {took:.1f} s after SIGTERM (grace {grace:g} s), its backup finished")
        finally:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as con:
                con.execute(f'DROP DATABASE IF EXISTS "{cust_db}" WITH (FORCE)')
    finally:
        worker.kill()
        web.kill()
