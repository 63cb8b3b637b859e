"""`make run`, step by step, on the embedded defaults: what a newcomer gets on a bare machine.

The same steps as the Makefile's `run` target (migrate, kasa_setup, scripts/run.sh),
each in a subprocess with its own KASA_VAR_DIR, so the control database is the
default SQLite file inside it and nothing touches the suite's own database.
Then: the health endpoint answers, the admin login page loads, the admin login
works and shows the demo customer, and Ctrl-C (SIGINT to the process group,
as a terminal sends it) stops both daphne and the qcluster worker.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, free_ports, kill_pm2_under, port_open, wait_until

BASE_DIR = Path(__file__).resolve().parent.parent
VENV_BIN = BASE_DIR / ".venv" / "bin"

# The calling environment (the suite's own) must not leak into the `make run` under test.
SCRUBBED = (
    "DATABASE_URL", "REDIS_URL", "SECRET_KEY", "KASA_SECRET_KEYS", "KASA_ENV", "DEBUG", "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS", "SENTRY_DSN", "KASA_CUSTOMERS_ROOT", "KASA_STORAGE_DIR", "KASA_DEMO_POSTGRES_URL",
    "KASA_ADMIN_USER", "KASA_ADMIN_PASSWORD", "KASA_HOST", "KASA_PORT", "DJANGO_SETTINGS_MODULE",
)
ADMIN_PASSWORD = "make-run-Secret-42"


def _kill_session(sid: int, proc: subprocess.Popen) -> None:
    """run.sh puts weed, daphne and the worker in process groups of their own: kill every process of the session,
    not only its first group, or a failed assertion leaves them running."""
    for pid in _session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(timeout=10)


def _session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session `sid` (zombies excluded)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found[int(entry.name)] = cmdline
    return found


def _get(opener, url: str, data: dict | None = None, headers: dict | None = None):
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, resp.geturl(), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, url, exc.read().decode(errors="replace")


@pytest.fixture
def run_env(tmp_path):
    if not (VENV_BIN / "daphne").exists():
        pytest.fail("scripts/run.sh needs .venv (make install)")
    var = tmp_path / "var"
    # The customers' folders where the demo's own user (kasa-demo, as root) can reach them: pytest's tmp_path
    # lies under a folder only root may enter.
    customers = Path(tempfile.mkdtemp(prefix="kasa-make-run-", dir="/tmp"))
    customers.chmod(0o711)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(
        KASA_VAR_DIR=str(var / "kasa"),
        KASA_CUSTOMERS_ROOT=str(customers / "customers"),
        KASA_HOST="127.0.0.1",
        KASA_PORT=str(free_port()),
        KASA_ADMIN_PASSWORD=ADMIN_PASSWORD,
        # Never touch the shared PostgreSQL: the demo database is SQLite here.
        KASA_DEMO_POSTGRES_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        KASA_DEMO_PORT=str(free_ports()),
        KASA_WORKERS="1",
        PYTHONUNBUFFERED="1",
    )
    yield env
    kill_pm2_under(customers)  # kasa_setup started the demo's services: they outlive Kasa, as they should
    shutil.rmtree(customers, ignore_errors=True)


def test_make_run_serves_the_admin_with_the_demo_customer_and_ctrl_c_stops_everything(run_env, tmp_path):
    manage = [sys.executable, "manage.py"]
    migrate = subprocess.run([*manage, "migrate", "--noinput"], cwd=BASE_DIR, env=run_env,
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    setup = subprocess.run([*manage, "kasa_setup", "--json"], cwd=BASE_DIR, env=run_env,
                           capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr[-3000:]
    doc = json.loads(setup.stdout)
    assert doc["admin"]["username"] == "admin" and doc["admin"]["created"] is True
    assert doc["admin"]["password"] is None  # came from KASA_ADMIN_PASSWORD: not printed
    assert doc["demo"]["domain"] == "demo.localhost"
    var = Path(run_env["KASA_VAR_DIR"])
    assert (var / "kasa.sqlite3").is_file()
    assert doc["demo"]["database"].startswith("sqlite:")
    assert (Path(run_env["KASA_CUSTOMERS_ROOT"]) / "demo.localhost" / "ecosystem.config.js").is_file()
    if os.geteuid() == 0:  # as root, the demo's code runs as its own user, who owns its services' folders
        import pwd

        assert doc["demo"]["run_as"] == "kasa-demo", doc["demo"]
        demo = Path(run_env["KASA_CUSTOMERS_ROOT"]) / "demo.localhost"
        user = pwd.getpwnam("kasa-demo")
        # The root stays Kasa's (the ownership model: README, "Security model"): group kasa-demo, 0750.
        assert (demo.stat().st_uid, demo.stat().st_gid, demo.stat().st_mode & 0o777) == (0, user.pw_gid, 0o750)
        for owned in ("backend", "backend/.env", "data/demo.sqlite3", "store", "ecosystem.config.js"):
            assert (demo / owned).stat().st_uid == user.pw_uid, owned
        assert (var / "kasa_backup_keys").stat().st_mode & 0o777 == 0o600 and var.stat().st_mode & 0o777 == 0o700
    else:
        assert doc["demo"]["run_as"] is None

    # The demo's services run under PM2 and answer their health URLs.
    demo_port = int(run_env["KASA_DEMO_PORT"])
    demo_health = [f"http://127.0.0.1:{demo_port + i}/health" for i in range(3)]
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    assert [_get(direct, url)[::2] for url in demo_health] == [(200, "ok")] * 3

    port = int(run_env["KASA_PORT"])
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["scripts/run.sh"], cwd=BASE_DIR, env=run_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    sid = proc.pid  # start_new_session: the script leads its own session and process group

    def output() -> str:
        return log_path.read_text(errors="replace")

    try:
        wait_until(lambda: port_open("127.0.0.1", port, 0.2) or proc.poll() is not None, 60, what="daphne")
        assert proc.poll() is None, output()

        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        status, _, body = _get(opener, f"{base}/health/live/")
        assert status == 200 and json.loads(body) == {"status": "ok"}

        status, _, body = _get(opener, f"{base}/login/")
        assert status == 200, body[:2000]
        assert "Kasa" in body and 'name="password"' in body
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1)

        # The admin's own stylesheet is served (whitenoise under daphne).
        status, _, _ = _get(opener, f"{base}/static/admin/css/base.css")
        assert status == 200

        status, url, body = _get(opener, f"{base}/login/?next=/",
                                 {"username": "admin", "password": ADMIN_PASSWORD,
                                  "csrfmiddlewaretoken": csrf, "next": "/"},
                                 headers={"Referer": f"{base}/login/"})
        assert status == 200 and not url.endswith("/login/?next=/"), body[:2000]
        status, _, body = _get(opener, f"{base}/customers/customer/")
        assert status == 200 and "demo.localhost" in body, body[:2000]

        # Both servers are up, in the script's session.
        procs = _session_processes(sid)
        assert any("daphne" in c for c in procs.values()), procs
        assert any("qcluster" in c for c in procs.values()), procs
        assert f"admin at http://127.0.0.1:{port}/" in output()

        # Ctrl-C: the terminal sends SIGINT to the whole foreground process group.
        os.killpg(sid, signal.SIGINT)
        started = time.monotonic()
        # A bound, not a speed goal: the worker finishes the task in hand first, which takes longer when
        # `make test`'s other lanes load the machine.
        assert proc.wait(timeout=60) == 0, output()  # a requested stop is a clean exit
        try:
            wait_until(lambda: not _session_processes(sid), 60, 0.1)
        except AssertionError:
            raise AssertionError(f"still running 60 s after Ctrl-C: {_session_processes(sid)}\n{output()}") from None
        elapsed = time.monotonic() - started
        assert elapsed < 60, elapsed
        assert not port_open("127.0.0.1", port, 0.2)
        assert "stopping Kasa" in output()
        # The customer's services keep running when Kasa stops; the README's command stops them.
        assert [_get(direct, url)[::2] for url in demo_health] == [(200, "ok")] * 3
        home = f"PM2_HOME={run_env['KASA_CUSTOMERS_ROOT']}/demo.localhost/.kasa-pm2"
        stop = ["env", home, "node_modules/.bin/pm2", "kill"]
        if doc["demo"]["run_as"]:
            stop = ["runuser", "-u", doc["demo"]["run_as"], "--", *stop]
        done = subprocess.run(stop, cwd=BASE_DIR, env=run_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not any(port_open("127.0.0.1", demo_port + i, 0.2) for i in range(3))
    finally:
        _kill_session(sid, proc)


def test_run_script_exits_when_the_web_server_cannot_start(run_env, tmp_path):
    """A taken port ends the session instead of leaving a worker running alone."""
    import socket

    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=BASE_DIR, env=run_env,
                   capture_output=True, check=True, timeout=300)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        env = {**run_env, "KASA_PORT": str(blocker.getsockname()[1])}
        log_path = tmp_path / "run.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(["scripts/run.sh"], cwd=BASE_DIR, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=60)
            assert rc != 0, log_path.read_text(errors="replace")
            wait_until(lambda: not _session_processes(proc.pid), 20, 0.1, what="the worker to be stopped too")
        finally:
            if proc.poll() is None or _session_processes(proc.pid):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)


def test_make_run_with_s3_runs_seaweedfs_with_a_locked_target_and_ctrl_c_stops_it(run_env, tmp_path):
    """`make run S3=1` (KASA_S3=1 for scripts/run.sh): SeaweedFS in the var folder, its secret in a 0600 file and
    never printed, the storage target demo-s3 under a governance lock, one line saying where; Ctrl-C stops weed."""
    env = {**run_env, "KASA_S3": "1"}
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=BASE_DIR, env=env,
                   capture_output=True, check=True, timeout=300)
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["scripts/run.sh"], cwd=BASE_DIR, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    sid = proc.pid

    def output() -> str:
        return log_path.read_text(errors="replace")

    folder = Path(env["KASA_VAR_DIR"]) / "seaweedfs"
    try:
        port = int(env["KASA_PORT"])
        wait_until(lambda: port_open("127.0.0.1", port, 0.2) or proc.poll() is not None, 120, what="daphne")
        assert proc.poll() is None, output()
        line = next(x for x in output().splitlines() if x.startswith("S3 (SeaweedFS) at http://127.0.0.1:"))
        assert "bucket kasa-demo (governance lock, 1 day)" in line and "storage target demo-s3" in line, line
        assert (folder / "identities.json").stat().st_mode & 0o777 == 0o600
        assert folder.stat().st_mode & 0o777 == 0o700 and (folder / "data").is_dir()
        secret = json.loads((folder / "identities.json").read_text())["identities"][0]["credentials"][0]["secretKey"]
        assert secret not in output() and secret not in (folder / "weed.log").read_text(errors="replace")
        assert any(" server " in c and f"-s3.config={folder}/identities.json" in c
                   for c in _session_processes(sid).values()), _session_processes(sid)
        shown = subprocess.run([sys.executable, "manage.py", "shell", "-c",
                                "from backups.models import StorageTarget as T; t = T.objects.get(name='demo-s3'); "
                                "print(t.kind, t.lock_mode, t.lock_days, t.endpoint_url); print(t.store().check())"],
                               cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr[-3000:]
        assert f"\ns3 governance 1 {line.split()[3].rstrip(',')}\n" in shown.stdout, shown.stdout
        assert "Object Lock and versioning enabled" in shown.stdout, shown.stdout

        os.killpg(sid, signal.SIGINT)
        assert proc.wait(timeout=90) == 0, output()
        wait_until(lambda: not _session_processes(sid), 60, 0.1, what="weed, daphne and the worker to stop")
        assert "still running" not in output()
    finally:
        _kill_session(sid, proc)
