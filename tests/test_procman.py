"""Process managers and health checks (engines/procman.py, engines/health.py), with a real PM2 from npm.

The services are a small Python HTTP server written to a temporary customer root. PM2 runs
with a private PM2_HOME (short, under /tmp: PM2's socket paths are limited) and is killed at
teardown, so no daemon outlives a test. systemd cannot run here: its tests put a stub
`systemctl` first on PATH, the one stand-in in this file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from engines import health, proc, procman
from engines.procman import CommandManager, Pm2Manager, ProcessError, ServiceSpec, SystemdManager
from tests.conftest import free_port, port_open, require, wait_until

SERVER = r'''
import http.server, json, os, sys
port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["PORT"])
# HEALTH_SEQ: statuses /health answers first, then 200 for ever.
seq = [int(x) for x in os.environ.get("HEALTH_SEQ", "").split(",") if x]
print(f"listening on {port}", flush=True)

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            code, body = (seq.pop(0) if seq else 200), b"health"
        elif self.path == "/env":
            code, body = 200, json.dumps(dict(os.environ)).encode()
        elif self.path == "/away":
            self.send_response(302)
            self.send_header("Location", "http://kasa-elsewhere.invalid/health")
            self.end_headers()
            return
        elif self.path == "/file":
            code, body = 200, open("index.html", "rb").read()
        else:
            code, body = 404, b"no"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''

FAIL = 'import sys\nprint("starting", flush=True)\nsys.stderr.write("boom: port 1 is taken\\n")\nsys.exit(3)\n'


def _get(url: str) -> bytes:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as resp:
        return resp.read()


@pytest.fixture
def root(tmp_path):
    """A customer root with a service folder `web` holding the server and a page."""
    web = tmp_path / "root" / "web"
    web.mkdir(parents=True)
    (web / "server.py").write_text(SERVER)
    (web / "fail.py").write_text(FAIL)
    (web / "index.html").write_text("<h1>kasa</h1>")
    return tmp_path / "root"


@pytest.fixture
def pm2_home():
    require(os.path.exists(procman.pm2_binary()), "PM2 from npm (make install)")
    home = tempfile.mkdtemp(prefix="kpm2-", dir="/tmp")
    yield home
    procman.pm2_kill(home)
    shutil.rmtree(home, ignore_errors=True)


def _server_spec(root: Path, port: int, manager: str, **kw) -> ServiceSpec:
    kw.setdefault("start_command", [sys.executable, "-u", "server.py", str(port)])
    return ServiceSpec(name="web", folder=str(root / "web"), manager=manager, app_name=kw.pop("app_name", "web"),
                       health_url=f"http://127.0.0.1:{port}/health", **kw)


# --- PM2 ------------------------------------------------------------------------------------
def test_pm2_start_serves_and_is_healthy_and_stop_closes_the_port(root, pm2_home):
    port = free_port()
    spec = _server_spec(root, port, "pm2")
    pm2 = Pm2Manager(pm2_home, settle=1.0)
    assert not pm2.is_running(spec)
    pm2.stop(spec)  # a missing app is fine
    pm2.start(spec)
    assert pm2.is_running(spec)
    result = health.wait_healthy(spec.health_url, consecutive=3, timeout=15, interval=0.1)
    assert result.ok and result.attempts == 3 and result.last_status == 200, result
    assert _get(f"http://127.0.0.1:{port}/file") == b"<h1>kasa</h1>"
    assert "PM2 app 'web'" in pm2.describe(spec)

    pm2.stop(spec)
    assert not pm2.is_running(spec)
    assert pm2.app(spec) is None  # deleted, not merely stopped: the next start reads its config afresh
    wait_until(lambda: not port_open("127.0.0.1", port, 0.2), 5, what="the port to close")


def test_pm2_ecosystem_env_reaches_the_process_and_a_removed_key_is_gone_after_stop_and_start(
        root, pm2_home, monkeypatch):
    monkeypatch.setenv("KASA_TEST_LEAK", "kasa-own-secret")  # Kasa's environment must not reach apps
    port = free_port()
    eco = root / "ecosystem.config.js"  # in the customer's root, found from the service folder

    def write(env: dict) -> None:
        app = {"name": "web", "script": sys.executable, "args": ["-u", "server.py"], "interpreter": "none",
               "cwd": str(root / "web"), "env": {"PORT": str(port), **env}}
        eco.write_text(f"module.exports = {{ apps: [{json.dumps(app)}] }};\n")

    write({"MARK_A": "alpha", "MARK_B": "beta"})
    spec = _server_spec(root, port, "pm2", start_command=())
    pm2 = Pm2Manager(pm2_home, settle=1.0)
    assert procman.find_ecosystem(spec) == str(eco)
    assert procman.find_ecosystem(ServiceSpec("web", str(root / "web"), "pm2", "web", root=str(root / "web"))) is None
    pm2.start(spec)
    assert health.wait_healthy(spec.health_url, timeout=15, interval=0.1).ok
    seen = json.loads(_get(f"http://127.0.0.1:{port}/env"))
    assert (seen["MARK_A"], seen["MARK_B"], seen["PM2_HOME"]) == ("alpha", "beta", pm2_home)
    assert "KASA_TEST_LEAK" not in seen

    write({"MARK_A": "alpha2"})
    pm2.stop(spec)
    pm2.start(spec)
    assert health.wait_healthy(spec.health_url, timeout=15, interval=0.1).ok
    seen = json.loads(_get(f"http://127.0.0.1:{port}/env"))
    assert seen["MARK_A"] == "alpha2" and "MARK_B" not in seen


def test_pm2_start_of_a_failing_command_raises_with_its_stderr_and_leaves_no_app(root, pm2_home):
    spec = ServiceSpec(name="web", folder=str(root / "web"), manager="pm2", app_name="web-fail",
                       start_command=[sys.executable, "fail.py"])
    pm2 = Pm2Manager(pm2_home, settle=1.0)
    with pytest.raises(ProcessError, match=r"could not start service 'web' with PM2 .*boom: port 1 is taken") as exc:
        pm2.start(spec)
    assert exc.value.service == "web" and exc.value.argv[1] == "start"
    assert pm2.app(spec) is None


def test_pm2_ecosystem_without_the_app_is_not_used_and_an_explicit_missing_one_is_refused(root, pm2_home):
    (root / "ecosystem.config.js").write_text('module.exports = { apps: [{ name: "other", script: "x.js" }] };\n')
    spec = _server_spec(root, free_port(), "pm2")
    assert procman.find_ecosystem(spec) is None  # names another app: the start command is used
    spec.ecosystem = "missing.config.js"
    with pytest.raises(ProcessError, match=r"ecosystem file .*missing.config.js does not exist; nothing was started"):
        Pm2Manager(pm2_home, settle=1.0).start(spec)


def test_start_all_stops_what_it_started_when_a_later_service_fails(root, pm2_home, tmp_path):
    port = free_port()
    good = _server_spec(root, port, "pm2")
    bad = ServiceSpec(name="worker", folder=str(root / "web"), manager="command",
                      start_command=[sys.executable, "fail.py"])
    mgrs = procman.managers(pm2_home=pm2_home, state_dir=str(tmp_path / "state"))
    mgrs["pm2"].settle = 1.0
    with pytest.raises(ProcessError, match=r"could not start service 'worker'.*boom: port 1 is taken; "
                                           r"stopped again the services started before it: web"):
        procman.start_all([good, bad], mgrs)
    assert not mgrs["pm2"].is_running(good)
    assert not port_open("127.0.0.1", port, 0.2)


# --- plain commands -------------------------------------------------------------------------


@pytest.mark.smoke
def test_command_start_is_detached_and_stop_without_stop_command_terminates_it(root, tmp_path):
    port = free_port()
    spec = _server_spec(root, port, "command")
    logged = []

    def runner(argv, **kw):  # what a caller does to write commands into its run log
        logged.append(argv)
        return proc.run(argv, **kw)

    mgr = CommandManager(str(tmp_path / "logs"), runner=runner, settle=0.5)
    began = time.monotonic()
    mgr.start(spec)
    assert time.monotonic() - began < 10  # a server that runs for ever does not block the start
    assert logged and logged[0][-4:] == spec.start_command
    assert mgr.is_running(spec)
    assert health.wait_healthy(spec.health_url, timeout=15, interval=0.1).ok
    pid = int((tmp_path / "logs" / "web.pid").read_text().split()[0])
    assert os.getsid(pid) == pid  # its own session: a group stop cannot reach Kasa
    assert "listening on" in (tmp_path / "logs" / "web.log").read_text()

    mgr.stop(spec)
    assert not mgr.is_running(spec)
    assert not (tmp_path / "logs" / "web.pid").exists()
    assert not port_open("127.0.0.1", port, 0.2)
    mgr.stop(spec)  # stopping a stopped service is fine


@pytest.mark.smoke
def test_command_stop_runs_the_stop_command_in_the_service_folder(root, tmp_path):
    port = free_port()
    (root / "web" / "stop.py").write_text(
        "import os, signal\nopen('stopped-by', 'w').write('stop.py')\n"
        f"os.kill(int(open({str(tmp_path / 'logs' / 'web.pid')!r}).read().split()[0]), signal.SIGTERM)\n")
    spec = _server_spec(root, port, "command", stop_command=[sys.executable, "stop.py"])
    mgr = CommandManager(str(tmp_path / "logs"), settle=0.5)
    mgr.start(spec)
    assert health.wait_healthy(spec.health_url, timeout=15, interval=0.1).ok
    mgr.stop(spec)
    assert (root / "web" / "stopped-by").read_text() == "stop.py"
    assert not mgr.is_running(spec) and not port_open("127.0.0.1", port, 0.2)


@pytest.mark.smoke
def test_command_start_that_fails_raises_with_its_stderr(root, tmp_path):
    spec = ServiceSpec(name="web", folder=str(root / "web"), manager="command",
                       start_command=[sys.executable, "fail.py"])
    mgr = CommandManager(str(tmp_path / "logs"), settle=1.0)
    with pytest.raises(ProcessError, match=r"could not start service 'web' with its command "
                                           r"\(\S*python fail.py\): boom: port 1 is taken"):
        mgr.start(spec)
    assert not mgr.is_running(spec) and not (tmp_path / "logs" / "web.pid").exists()
    missing = ServiceSpec(name="api", folder=str(root / "nope"), manager="command", start_command=["true"])
    with pytest.raises(ProcessError, match=r"its folder .*nope does not exist; nothing was run"):
        mgr.start(missing)


@pytest.mark.smoke
def test_stop_all_goes_in_reverse_order_and_start_all_in_order(root, tmp_path):
    order = tmp_path / "order"
    specs = [ServiceSpec(name=n, folder=str(root / "web"), manager="command",
                         start_command=[sys.executable, "-c", f"open({str(order)!r}, 'a').write('start {n}\\n')"],
                         stop_command=[sys.executable, "-c", f"open({str(order)!r}, 'a').write('stop {n}\\n')"])
             for n in ("db", "api", "web")]
    specs.append(ServiceSpec(name="static", folder=str(root / "web"), manager="none"))
    mgrs = procman.managers(pm2_home=str(tmp_path / "pm2"), state_dir=str(tmp_path / "state"))
    mgrs["command"].settle = 0.3
    assert procman.stop_all(specs, mgrs) == []  # none was running (their start commands exit at once)
    assert procman.start_all(specs, mgrs) == ["db", "api", "web", "static"]
    assert order.read_text().split("\n")[:-1] == [
        "stop web", "stop api", "stop db", "start db", "start api", "start web"]


# --- systemd, through a stub systemctl (there is no systemd on this machine) --------------------
@pytest.mark.smoke
def test_systemd_manager_runs_systemctl_stop_start_is_active(root, tmp_path, monkeypatch):
    calls, state = tmp_path / "calls", tmp_path / "active"
    stub = tmp_path / "bin" / "systemctl"
    stub.parent.mkdir()
    stub.write_text(f"""#!{sys.executable}
import os, sys
open({str(calls)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
args = [a for a in sys.argv[1:] if not a.startswith("--")]
if args[-1] == "broken.service":
    sys.stderr.write("Job for broken.service failed because the control process exited with error code.\\n")
    sys.exit(1)
if args[0] == "start":
    open({str(state)!r}, "w").close()
elif args[0] == "stop" and os.path.exists({str(state)!r}):
    os.unlink({str(state)!r})
elif args[0] == "is-active":
    sys.exit(0 if os.path.exists({str(state)!r}) else 3)
""")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    spec = ServiceSpec(name="api", folder=str(root / "web"), manager="systemd", app_name="kasa-api.service")
    mgr = SystemdManager()
    assert not mgr.is_running(spec)
    mgr.start(spec)
    assert mgr.is_running(spec)
    mgr.stop(spec)
    assert not mgr.is_running(spec)
    assert calls.read_text().splitlines() == [
        "is-active --quiet kasa-api.service", "--no-ask-password start kasa-api.service",
        "is-active --quiet kasa-api.service", "is-active --quiet kasa-api.service",
        "--no-ask-password stop kasa-api.service", "is-active --quiet kasa-api.service"]
    spec.app_name = "broken.service"
    with pytest.raises(ProcessError, match=r"could not start service 'api' with systemd \(systemctl "
                                           r"--no-ask-password start broken.service\): Job for broken.service failed"):
        mgr.start(spec)


# --- health -----------------------------------------------------------------------------------
@pytest.fixture
def http_server(root):
    procs = []

    def start(**env):
        port = free_port()
        p = subprocess.Popen([sys.executable, "server.py", str(port)], cwd=root / "web",
                             env={**os.environ, **env}, start_new_session=True)
        procs.append(p)
        wait_until(lambda: port_open("127.0.0.1", port, 0.2), 10, what="the test server")
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


@pytest.mark.smoke
def test_wait_healthy_needs_the_streak_and_a_non_200_resets_it(http_server):
    base = http_server(HEALTH_SEQ="500,200,500,200,200")
    result = health.wait_healthy(f"{base}/health", consecutive=3, timeout=10, interval=0.05)
    assert result.ok and result.attempts == 6 and result.last_status == 200 and result.last_error == ""


@pytest.mark.smoke
def test_wait_healthy_gives_up_at_the_timeout_on_500s_and_says_so(http_server):
    base = http_server(HEALTH_SEQ=",".join(["500"] * 1000))
    result = health.wait_healthy(f"{base}/health", timeout=1.0, interval=0.1)
    assert not result.ok and result.last_status == 500 and result.elapsed < 2.0
    assert "answered HTTP 500, expected 200" in result.last_error


@pytest.mark.smoke
def test_wait_healthy_on_a_closed_port_fails_within_the_timeout_with_a_clear_error():
    result = health.wait_healthy(f"http://127.0.0.1:{free_port()}/health", timeout=1.0, interval=0.2)
    assert not result.ok and result.last_status is None and result.attempts >= 2
    assert result.elapsed < 2.0
    assert "connection refused" in result.last_error and "gave up after 1 s" in result.last_error
    assert "not healthy" in result.summary()


@pytest.mark.smoke
def test_wait_healthy_does_not_follow_a_redirect_to_another_host(http_server):
    result = health.wait_healthy(f"{http_server()}/away", timeout=0.5, interval=0.1)
    assert not result.ok and result.last_status == 302
    assert "kasa-elsewhere.invalid (another host) was not followed" in result.last_error
    assert not health.wait_healthy("file:///etc/passwd", timeout=0.5).ok


@pytest.mark.smoke
def test_check_all_checks_the_services_with_a_health_url_at_once(http_server, root):
    up = ServiceSpec(name="up", folder=str(root), manager="none", health_url=f"{http_server()}/health")
    down = ServiceSpec(name="down", folder=str(root), manager="none",
                       health_url=f"http://127.0.0.1:{free_port()}/health")
    quiet = ServiceSpec(name="quiet", folder=str(root), manager="none")
    began = time.monotonic()
    results = health.check_all([up, down, quiet], timeout=1.5, interval=0.1)
    assert set(results) == {"up", "down"} and results["up"].ok and not results["down"].ok
    assert time.monotonic() - began < 3.0  # side by side, not one after the other


# --- systemd scopes ----------------------------------------------------------------------------
SYSTEMD_RUN = r'''#!/usr/bin/env python3
# A stand-in for systemd-run --scope (no systemd runs here): records its argv, then runs what follows "--"
# in its own process, as systemd-run --scope does once the scope exists.
import json, os, sys
with open(LOG, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\n")
rest = sys.argv[sys.argv.index("--") + 1:]
os.execvp(rest[0], rest)
'''


@pytest.fixture
def scopes(tmp_path, monkeypatch):
    """KASA_SERVICE_SCOPE=systemd with the stand-in systemd-run; returns a function listing the scopes made."""
    stub, log = tmp_path / "systemd-run", tmp_path / "scopes.jsonl"
    stub.write_text(SYSTEMD_RUN.replace("LOG", repr(str(log))))  # the stand-in gets a clean env, as systemd-run does
    stub.chmod(0o755)
    monkeypatch.setenv("KASA_SERVICE_SCOPE", "systemd")
    monkeypatch.setenv("KASA_SYSTEMD_RUN", str(stub))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_under_systemd_the_pm2_daemon_and_a_start_commands_service_start_in_scopes_of_their_own(
        root, pm2_home, scopes, tmp_path):
    port, port2 = free_port(), free_port()
    pm2 = Pm2Manager(pm2_home, settle=0.5)
    spec = _server_spec(root, port, "pm2")
    pm2.start(spec)
    made = scopes()
    assert len(made) == 1, made  # `pm2 ping` in a scope spawned the daemon; `pm2 start` found it running
    opts, rest = made[0][: made[0].index("--")], made[0][made[0].index("--") + 1:]
    assert {"--scope", "--collect", "--slice=kasa-customers.slice"} <= set(opts)
    assert any(o.startswith("--unit=kasa-pm2-") for o in opts)
    assert rest[-2:] == [procman.pm2_binary(), "ping"] and rest[1:5] == ["-E", "-m", "engines.procman", "exec"]
    assert health.wait_healthy(spec.health_url, timeout=15, interval=0.1).ok
    pm2.stop(spec)
    pm2.start(spec)  # the daemon still runs: no second scope
    assert len(scopes()) == 1
    pm2.stop(spec)

    cmd = CommandManager(str(tmp_path / "logs"), settle=0.5)
    spec2 = _server_spec(root, port2, "command")
    cmd.start(spec2)
    try:
        launched = scopes()[-1]
        assert any(o.startswith("--unit=kasa-command-web-web-") for o in launched)  # no root: the folder names it
        assert launched[launched.index("--") + 1:][3:5] == ["engines.procman", "launch"]
        assert health.wait_healthy(spec2.health_url, timeout=15, interval=0.1).ok
    finally:
        cmd.stop(spec2)


def test_scoped_exec_switches_to_the_customers_user_inside_the_scope(scopes, customer_users, tmp_path):
    from engines import runas
    from engines.procbase import scoped_exec_argv

    who = runas.lookup(customer_users[0])
    argv = scoped_exec_argv("t", ["sh", "-c", "id -u; id -G; umask"], cwd="/", identity=who)
    out = subprocess.run(argv, cwd=procman.REPO_ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ}).stdout.split("\n")
    assert out[:3] == [str(who.uid), str(who.gid), "0027"]


@pytest.mark.smoke
def test_service_scope_is_used_only_under_a_systemd_unit_unless_asked(monkeypatch, tmp_path):
    from engines.procbase import service_scope

    monkeypatch.setenv("KASA_SYSTEMD_RUN", "/bin/true")
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("KASA_SERVICE_SCOPE", raising=False)
    assert service_scope("x") == []  # not started by systemd (make run, tests, a shell)
    monkeypatch.setenv("KASA_SERVICE_SCOPE", "off")
    monkeypatch.setenv("INVOCATION_ID", "abc")
    assert service_scope("x") == []
    monkeypatch.setenv("KASA_SERVICE_SCOPE", "systemd")
    assert service_scope("a b/c")[:2] == ["/bin/true", "--scope"]
    monkeypatch.setenv("KASA_SERVICE_SCOPE", "sometimes")
    with pytest.raises(ProcessError, match="auto, systemd or off"):
        service_scope("x")
