"""Who customer code runs as (issue 11, point 1): run_as validated, checked again at run time, refused without it
when deployed, a warning in development; what Kasa writes for the customer's code is the customer's user's; the
demo runs as kasa-demo. Real OS users (tests/conftest.py customer_users), real PM2, real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError

from engines import ownership, procman, runas
from tests.conftest import as_unprivileged, ensure_os_user, free_port, require
from tests.restore_helpers import command_json, tree_state

pytestmark = pytest.mark.django_db(transaction=True)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(pid)


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def _log(run) -> list[tuple[str, str]]:
    return list(run.log_lines.order_by("seq").values_list("level", "text"))


def _server_service(customer, *, manager: str = "command", port: int | None = None):
    """The customer's "backend" serves its folder with `python3 -m http.server` (the system's Python: the suite's
    may lie where customer users cannot go)."""
    from customers.models import Service

    port = port or free_port()
    Service.objects.filter(customer=customer, name="backend").update(
        process_manager=manager, app_name=f"web-{uuid.uuid4().hex[:6]}" if manager == "pm2" else "",
        start_command=["/usr/bin/python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        health_url=f"http://127.0.0.1:{port}/")
    return port


def _owned_by(customer, user: runas.Identity) -> None:
    """The root by the ownership model (README, "Security model"): Kasa's, group the user's, 0750; the services'
    folders the user's."""
    root = Path(customer.root)
    ownership.hand_over(root, user, service_paths=[s.path for s in customer.services.all()])
    customer.run_as = user.user
    customer.full_clean()
    customer.save()


# --- validation ----------------------------------------------------------------------------------------------
def test_run_as_must_exist_and_be_neither_root_nor_kasas_own_user(make_customer, customer_users, settings,
                                                                  tmp_path):
    customer = make_customer()
    alpha, beta = customer_users
    for name, expected in (("root", "is root"), ("kasa-t-no-such-user", "does not exist")):
        customer.run_as = name
        with pytest.raises(ValidationError) as err:
            customer.full_clean()
        assert expected in str(err.value.message_dict["run_as"])
    # Kasa's own user: the one that owns its var folder (the web may run as `kasa` while the worker is root).
    var = tmp_path / "var"
    var.mkdir()
    os.chown(var, runas.lookup(beta).uid, runas.lookup(beta).gid)
    settings.KASA_VAR_DIR = var
    customer.run_as = beta
    with pytest.raises(ValidationError) as err:
        customer.full_clean()
    assert "Kasa's own user" in str(err.value.message_dict["run_as"])
    customer.run_as = f"  {alpha} "
    customer.full_clean()
    assert customer.run_as == alpha


# --- at run time ---------------------------------------------------------------------------------------------
@pytest.fixture
def restorable_command_customer(make_customer):
    """A customer whose backend is a start command, and one backup of it (nothing here runs the command)."""
    customer = make_customer()
    (Path(customer.root) / "backend" / "index.html").write_text("<h1>backend</h1>\n")
    _server_service(customer)
    code, doc = command_json("backup", customer.domain)
    assert code == 0, doc
    return customer, doc


def test_a_deployed_kasa_refuses_to_restore_a_customer_without_run_as_before_touching_anything(
        restorable_command_customer, settings):
    from backups.models import Backup
    from operations.models import RunCommand

    customer, doc = restorable_command_customer
    settings.DEPLOYED = True
    before, backups = tree_state(Path(customer.root)), Backup.objects.count()
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 1, run
    assert "has no run_as user: a deployed Kasa never runs a customer's commands" in run["error"], run["error"]
    assert "nothing was touched" in run["error"]
    assert tree_state(Path(customer.root)) == before and Backup.objects.count() == backups  # no safety backup
    assert not RunCommand.objects.filter(run_id=run["id"]).exists()


def test_a_deployed_kasa_refuses_to_upgrade_a_customer_without_run_as_before_touching_anything(
        make_customer, settings, tmp_path):
    from tests.upgrade_fixtures import one_component_release

    customer = make_customer(services=("web",))
    shutil.rmtree(Path(customer.root) / "web")
    one_component_release(tmp_path / "pkg", "web", {"index.html": "web\n"},
                          hooks={"install": ["/usr/bin/python3", "-c", "open('installed', 'w')"]})
    settings.DEPLOYED = True
    before = tree_state(Path(customer.root))
    code, doc = command_json("upgrade", customer.domain, "--to", "1.0")
    assert code == 1 and doc["status"] == "failed", doc
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [("preflight", "failed")]
    assert "has no run_as user" in doc["error"] and "nothing was touched" in doc["error"], doc["error"]
    assert tree_state(Path(customer.root)) == before


def test_in_development_a_customer_without_run_as_runs_as_kasa_with_a_warning_on_the_run(
        restorable_command_customer):
    from customers import runtime
    from operations.models import Run

    customer, doc = restorable_command_customer
    try:
        code, run = command_json("restore", str(doc["id"]), "--yes", "--no-safety-backup")
        assert code == 0, run
        warnings = [t for level, t in _log(Run.objects.get(pk=run["id"])) if level == "warning"]
        assert any("has no run_as user: its commands run as Kasa's own user" in t for t in warnings), warnings
    finally:
        spec = next(s for s in runtime.service_specs(customer) if s.name == "backend")
        runtime.managers()["command"].stop(spec)


def test_a_run_as_user_removed_since_it_was_set_fails_the_restore_with_a_clear_message(
        restorable_command_customer):
    from backups.models import Backup

    require(bool(shutil.which("userdel")), "userdel")
    customer, doc = restorable_command_customer
    gone = ensure_os_user(f"kasa-t-gone{os.getpid() % 1000}")
    customer.run_as = gone
    customer.full_clean()
    customer.save()
    subprocess.run(["userdel", gone], check=True, capture_output=True)
    before, backups = tree_state(Path(customer.root)), Backup.objects.count()
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 1, run
    assert f"run_as user {gone!r} does not exist on this machine" in run["error"], run["error"]
    assert tree_state(Path(customer.root)) == before and Backup.objects.count() == backups


def test_a_worker_that_cannot_switch_users_says_so(make_customer, customer_users):
    from customers import runtime
    from operations.context import OperationError

    customer = make_customer()
    customer.run_as = customer_users[0]
    alpha = runas.lookup(customer_users[0])

    def unprivileged():
        with pytest.raises(OperationError, match="cannot start commands as kasa-t-alpha .*run the worker as root"):
            runtime.run_identity(customer)
        with pytest.raises(runas.RunAsError, match="cannot start commands as"):
            from engines import proc

            proc.run(["/bin/true"], identity=alpha)

    as_unprivileged(unprivileged)


def test_check_reports_a_missing_user_a_root_it_cannot_enter_and_a_root_open_to_others(make_customer,
                                                                                       customer_users):
    from customers.models import Customer
    from tests.test_check import _check

    customer = make_customer()
    alpha = runas.lookup(customer_users[0])
    root = Path(customer.root)
    Customer.objects.filter(pk=customer.pk).update(run_as="kasa-t-no-such-user")
    run = _check(customer)
    assert run.status == "failed" and "run as: run_as user 'kasa-t-no-such-user' does not exist" in run.error

    Customer.objects.filter(pk=customer.pk).update(run_as=alpha.user)
    root.chmod(0o700)  # root's: alpha cannot enter
    run = _check(customer)
    assert run.status == "failed" and f"run as: {alpha} cannot enter the root folder" in run.error, run.error
    assert run.result["run_as"]["ok"] is False

    runas.give(root, alpha, recursive=True)  # the whole root handed over, as before the ownership model
    root.chmod(0o755)
    run = _check(customer)
    assert run.status == "failed" and "is open to every user (mode 0755)" in run.error, run.error

    root.chmod(0o750)
    run = _check(customer)
    assert run.status == "failed" and f"the root folder {root} belongs to uid {alpha.uid}, not to Kasa's worker" \
        in run.error, run.error
    assert run.result["run_as"] == {"user": alpha.user, "ok": True, "uid": alpha.uid}

    ownership.hand_over(root, alpha, service_paths=["backend"])
    run = _check(customer)
    assert run.status == "succeeded", run.error
    assert run.result["run_as"] == {"user": alpha.user, "ok": True, "uid": alpha.uid}
    assert run.result["ownership"] == {"ok": True}
    assert (root.stat().st_uid, root.stat().st_gid, root.stat().st_mode & 0o777) == (0, alpha.gid, 0o750)


# --- what Kasa writes for the customer's code ------------------------------------------------------------------
def test_an_upgrade_runs_pm2_and_the_hooks_as_the_customers_user_and_hands_it_what_kasa_writes(
        make_customer, customer_users, tmp_path):
    from customers.models import Service
    from engines import ecosystem
    from tests.upgrade_fixtures import one_component_release

    require(os.path.exists(procman.pm2_binary()), "PM2 from npm (make install)")
    alpha = runas.lookup(customer_users[0])
    customer = make_customer(services=("web",))
    root = Path(customer.root)
    (root / "web" / ".env").write_text("GREETING=hello\nAPI_TOKEN=t0ken-of-the-customer\n")
    _owned_by(customer, alpha)
    port = free_port()
    Service.objects.filter(customer=customer, name="web").update(
        process_manager="pm2", app_name=f"web-{uuid.uuid4().hex[:6]}",
        start_command=["/usr/bin/python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        health_url=f"http://127.0.0.1:{port}/built.txt")
    hook = ["/usr/bin/python3", "-c", "import os; open('built.txt', 'w').write(str(os.getuid()))"]
    one_component_release(tmp_path / "pkg", "web", {"index.html": "web 1.0\n", ".env.example": "GREETING=\nNEW=1\n"},
                          hooks={"build": hook})
    code, doc = command_json("upgrade", customer.domain, "--to", "1.0")
    assert code == 0, doc
    release = root / "releases" / "1.0.0" / "web"
    assert (release / "built.txt").read_text() == str(alpha.uid)  # the hook ran as the user, in its folder
    assert _get(f"http://127.0.0.1:{port}/built.txt") == (200, str(alpha.uid))
    owned = [release, release / "index.html", release / ".env", root / ecosystem.FILE_NAME,
             root / procman.PM2_HOME_NAME]
    assert {str(p.relative_to(root)): p.lstat().st_uid for p in owned} == {
        str(p.relative_to(root)): alpha.uid for p in owned}
    # releases/ and releases/<version>/ stay Kasa's (what it switches and prunes there is not the user's to swap),
    # open for the user to pass through.
    for folder in (root / "releases", root / "releases" / "1.0.0"):
        assert (folder.lstat().st_uid, folder.stat().st_mode & 0o777) == (0, 0o755), folder
    assert (root / ecosystem.FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert (root / procman.PM2_HOME_NAME).stat().st_mode & 0o777 == 0o700
    assert (release / ".env").stat().st_mode & 0o777 == 0o600
    # PM2's daemon and the app are the customer's user's.
    home = procman.pm2_home_for(root)
    daemon = int((Path(home) / "pm2.pid").read_text())
    assert _uid_of(daemon) == alpha.uid
    apps = procman.Pm2Manager(settle=0.5).apps(procman.ServiceSpec("web", str(root / "web"), "pm2", root=str(root),
                                                                   pm2_home=home, identity=alpha))
    assert [_uid_of(a["pid"]) for a in apps] == [alpha.uid]


def test_an_upgrade_never_copies_a_file_the_customers_env_links_to_into_its_folder(make_customer, customer_users,
                                                                                    tmp_path):
    """The customer's user replaces its .env with a link to Kasa's backup keys: the merged .env Kasa hands it
    must not carry them. The upgrade stops at its env step and puts everything back."""
    from tests.upgrade_fixtures import one_component_release

    alpha = runas.lookup(customer_users[0])
    customer = make_customer(services=("web",))
    root = Path(customer.root)
    _owned_by(customer, alpha)
    keys = settings.KASA_VAR_DIR / "kasa_backup_keys"
    (root / "web" / ".env").symlink_to(keys)
    one_component_release(tmp_path / "pkg", "web", {"index.html": "web 1.0\n", ".env.example": "NEW=1\n"})
    code, doc = command_json("upgrade", customer.domain, "--to", "1.0")
    assert code == 1 and doc["status"] == "rolled_back", doc
    assert f"{root / 'web' / '.env'} was not read" in doc["error"] and "failed at env" in doc["error"], doc["error"]
    secret = keys.read_bytes().strip()
    leaked = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]
    assert not leaked


# --- engines: PM2 home, untrusted output and files ------------------------------------------------------------
def test_a_pm2_home_too_long_for_pm2s_sockets_is_refused_with_a_clear_message(tmp_path):
    spec = procman.ServiceSpec("web", str(tmp_path), "pm2", app_name="web", pm2_home="/srv/" + "x" * 100)
    with pytest.raises(procman.ProcessError, match="too long for PM2's unix sockets .*shorter root folder"):
        procman.Pm2Manager().start(spec)


def test_pm2_jlist_output_is_parsed_as_untrusted_input():
    hostile = ['[{"name": "web", "pm2_env": "not an object"}, 7, {"pm2_env": {}}, {"name": ["x"]}]']
    assert procman.parse_jlist(hostile) == [{"name": "web", "pm2_env": {}}]
    assert procman.parse_jlist(["garbage", '{"apps": []}']) is None
    assert procman.parse_jlist(['[{"name": "a", "pm2_env": {"status": "online"}}]', "[broken"]) == [
        {"name": "a", "pm2_env": {"status": "online"}}]


def test_files_the_customer_names_are_read_only_when_they_are_its_users_regular_files(tmp_path, customer_users):
    alpha = runas.lookup(customer_users[0])
    folder = tmp_path / "customer"
    folder.mkdir()
    own = folder / "app.log"
    own.write_text("first\nlast line\n")
    runas.give(own, alpha)
    assert runas.read_owned(own, alpha, limit=10, tail=True) == b"last line\n"
    kasa_file = tmp_path / "kasa_backup_keys"
    kasa_file.write_text("k1:secret\n")
    link = folder / "err.log"
    link.symlink_to(kasa_file)
    fifo = folder / "fifo.log"
    os.mkfifo(fifo)
    runas.give(fifo, alpha)
    for path in (kasa_file, link, fifo):  # Kasa's file, a link to it, a FIFO that would hang a plain read
        with pytest.raises(runas.NotOwned):
            runas.read_owned(path, alpha)
    assert procman.last_log_line(str(link), alpha) == "" and procman.last_log_line(str(own), alpha) == "last line"


# --- the demo ----------------------------------------------------------------------------------------------------
def test_the_demo_runs_under_pm2_as_kasa_demo_on_its_ports(transactional_db, monkeypatch):
    from customers import runtime
    from customers.demo import DEMO_DOMAIN, DEMO_USER, SERVICES, demo_seed, service_ports
    from tests.conftest import free_ports, kill_pm2_under

    require(os.geteuid() == 0, "root (the demo's own user)")
    monkeypatch.setenv("KASA_DEMO_PORT", str(free_ports()))
    require(os.path.exists(procman.pm2_binary()), "PM2 from npm (make install)")
    folder = Path(settings.KASA_CUSTOMERS_ROOT) / DEMO_DOMAIN
    shutil.rmtree(folder, ignore_errors=True)
    try:
        customer, created = demo_seed(prefer_postgres=False)
        assert created and customer.run_as == DEMO_USER
        user = runas.lookup(DEMO_USER)
        # The ownership model: the root Kasa's (group kasa-demo, 0750), the services' folders the user's.
        assert (folder.stat().st_uid, folder.stat().st_gid, folder.stat().st_mode & 0o777) == (0, user.gid, 0o750)
        assert (folder / "backend" / ".env").stat().st_uid == user.uid
        assert (folder / "ecosystem.config.js").stat().st_uid == user.uid
        assert (folder / "data" / "demo.sqlite3").stat().st_uid == user.uid  # beside the services, not in one
        specs = runtime.service_specs(customer)
        assert {s.identity for s in specs} == {user}
        procman.start_all(specs, runtime.managers())
        ports = service_ports()
        assert {s.name: s.health_url for s in specs if s.health_url} == {
            name: f"http://127.0.0.1:{port}/health" for name, port in ports.items()}
        for port in ports.values():
            assert _get(f"http://127.0.0.1:{port}/health") == (200, "ok")
        apps = procman.Pm2Manager().apps(specs[0])
        assert sorted(a["name"] for a in apps) == sorted(f"demo-{n}" for n in SERVICES)
        assert {_uid_of(a["pid"]) for a in apps} == {user.uid}
        procman.stop_all(specs, runtime.managers())
    finally:
        kill_pm2_under(folder)
        shutil.rmtree(folder, ignore_errors=True)


def test_kasa_setup_json_says_who_the_demo_runs_as(transactional_db):
    from io import StringIO

    from django.core.management import call_command

    from customers.demo import DEMO_DOMAIN

    folder = Path(settings.KASA_CUSTOMERS_ROOT) / DEMO_DOMAIN
    shutil.rmtree(folder, ignore_errors=True)
    out = StringIO()
    try:
        call_command("kasa_setup", "--sqlite-demo", "--no-start", "--json", stdout=out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    doc = json.loads(out.getvalue())
    assert doc["demo"]["run_as"] == ("kasa-demo" if os.geteuid() == 0 else None), doc["demo"]
    assert doc["demo"]["note"]
