"""Attack: customer code runs as the worker's user (issue 11, the first attack and point 1).

A staff member sets a service's start command (or a PM2 app, or a release's hook) to code of their own, then
has Kasa back up and restore the customer (or upgrade it): before the fix that code ran as the worker's user,
read KASA_BACKUP_KEYS from the worker's /proc/<pid>/environ and wrote files as root.

Here the code is a real probe run by /usr/bin/python3 through each way Kasa starts customer code: a start
command and a PM2 app, started by a restore that a real qcluster worker executes (with KASA_BACKUP_KEYS in its
environment), and an install hook of a release, run by an upgrade in this test's own process. The probe tries
to read the worker's environ, Kasa's key files and control database (the SQLite file in the smoke run), and
another customer's folder (its own user's, mode 0750), and to write where only root may; it reports what it
got and who it was. Every attempt must fail with "Permission denied", as the customer's own user.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from engines import ownership, runas
from tests.conftest import require, wait_for_run, wait_until

pytestmark = [pytest.mark.smoke, pytest.mark.django_db(transaction=True)]

PYTHON = "/usr/bin/python3"  # the system's: the suite's own interpreter may lie in a folder only root may enter

PROBE = r'''
import json, os, sys, time
report, targets, writes = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
       "umask": os.umask(0o027), "cwd": os.getcwd(), "env": dict(os.environ), "reads": {}, "writes": {}}
os.umask(out["umask"])
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass  # the listing's own descriptor, closed by now
out["fds"] = fds
import fcntl
out["stdout"] = "write-only" if fcntl.fcntl(1, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY else "readable"
for label, path in targets.items():
    try:
        if os.path.isdir(path):
            got = "listed " + ",".join(sorted(os.listdir(path)))
        else:
            with open(path, "rb") as fh:
                data = fh.read()
            got = f"READ {len(data)} bytes" + (" with KASA_BACKUP_KEYS" if b"KASA_BACKUP_KEYS=" in data else "")
    except OSError as exc:
        got = "denied: " + exc.strerror
    out["reads"][label] = got
for label, path in writes.items():
    try:
        with open(path, "x") as fh:
            fh.write("written by customer code\n")
        out["writes"][label] = "WROTE"
    except OSError as exc:
        out["writes"][label] = "denied: " + exc.strerror
with open(report + ".tmp", "w") as fh:
    json.dump(out, fh)
os.replace(report + ".tmp", report)
while "--stay" in sys.argv:  # a service: keeps running
    time.sleep(60)
'''

KASA_SECRETS = ("KASA_BACKUP_KEYS", "KASA_SECRET_KEYS", "SECRET_KEY", "DATABASE_URL", "KASA_VAR_DIR")


@pytest.fixture
def attack(make_customer, customer_users):
    """Customer A (run as kasa-t-alpha), whose code is the probe; customer B (run as kasa-t-beta), whose service
    folder is its user's own, mode 0750, in a root of Kasa's (group that user's, 0750), with a secret in its .env;
    where the probe reports; what it goes for."""
    require(os.path.exists(PYTHON), PYTHON)
    alpha, beta = (runas.lookup(n) for n in customer_users)
    a = make_customer(services=("cmd", "app", "web"))
    b = make_customer(services=("backend",))
    root_a, root_b = Path(a.root), Path(b.root)
    for svc in ("cmd", "app"):
        (root_a / svc / "probe.py").write_text(PROBE)
    (root_b / "backend" / ".env").write_text("BETA_SECRET=beta-only-secret-value\n")
    for customer, root, user in ((a, root_a, alpha), (b, root_b, beta)):
        # By the ownership model: the root Kasa's, group the user's, 0750; the services' folders the user's.
        ownership.hand_over(root, user, service_paths=[s.path for s in customer.services.all()])
        for path in [p for p in root.rglob("*") if p.is_dir()]:
            path.chmod(0o750)
        customer.run_as = user.user
        customer.full_clean()
        customer.save()
    drop = Path(tempfile.mkdtemp(prefix="kasa-probe-", dir="/tmp"))
    runas.give(drop, alpha)
    targets = {
        "Kasa's backup keys": str(settings.KASA_VAR_DIR / "kasa_backup_keys"),
        "Kasa's secret keys": str(settings.KASA_VAR_DIR / "kasa_secret_keys"),
        "Kasa's var folder": str(settings.KASA_VAR_DIR),
        "the other customer's .env": str(root_b / "backend" / ".env"),
        "the other customer's folder": str(root_b),
    }
    if connection.vendor == "sqlite":
        targets["the control database"] = str(connection.settings_dict["NAME"])
    tag = uuid.uuid4().hex[:8]
    writes = {"Kasa's var folder": str(settings.KASA_VAR_DIR / f"written-by-customer-{tag}"),
              "/etc": f"/etc/kasa-written-by-customer-{tag}"}
    ns = type("Attack", (), dict(a=a, b=b, root_a=root_a, alpha=alpha, drop=drop, targets=targets, writes=writes))
    try:
        yield ns
    finally:
        for path in writes.values():  # only there if the attack succeeded (the code before the fix)
            Path(path).unlink(missing_ok=True)
        shutil.rmtree(drop, ignore_errors=True)


def _argv(ns, surface: str, pid: int, *, stay: bool) -> list[str]:
    targets = {**ns.targets, "the worker's environ": f"/proc/{pid}/environ"}
    for path in targets.values():
        assert os.path.exists(path), path  # what the probe cannot read exists (Kasa, as root, sees it)
    return [PYTHON, "probe.py", str(ns.drop / f"{surface}.json"), json.dumps(targets), json.dumps(ns.writes),
            *(["--stay"] if stay else [])]


def _assert_contained(ns, surface: str) -> None:
    report_path = ns.drop / f"{surface}.json"
    assert report_path.exists(), f"the {surface} never ran"
    report = json.loads(report_path.read_text())
    reached = {k: v for k, v in {**report["reads"], **report["writes"]}.items() if v != "denied: Permission denied"}
    assert (report["uid"], report["euid"]) == (ns.alpha.uid, ns.alpha.uid), (
        f"the {surface} ran as uid {report['uid']}, not as {ns.alpha}; it reached {reached}")
    assert not reached, f"the {surface} reached {reached}"
    assert report["gid"] == ns.alpha.gid and set(report["groups"]) <= {ns.alpha.gid}  # no supplementary group
    assert report["umask"] == 0o027
    assert report["cwd"].startswith(str(ns.root_a) + "/")
    assert not [k for k in report["env"] if k in KASA_SECRETS or k.startswith("KASA_")], sorted(report["env"])
    assert report["env"].get("USER") == ns.alpha.user and report["env"].get("HOME") == str(ns.root_a)
    # Beyond its stdin/stdout/stderr (a start command writes to its log, kept by Kasa, through a write-only
    # descriptor it cannot read back), no descriptor of Kasa's reaches customer code.
    kasa_files = [t for fd, t in report["fds"].items() if int(fd) > 2 and t.startswith(str(settings.KASA_VAR_DIR))]
    assert not kasa_files, f"the {surface} holds descriptors of Kasa's files: {kasa_files}"
    if surface == "start-command":
        assert report["stdout"] == "write-only" and report["fds"]["1"].endswith(".log"), report["fds"]


def _backup_and_restore(ns, worker) -> None:
    from backups.models import Backup
    from backups.services import backup_start, restore_start

    run = backup_start(ns.a, via="cli")
    assert wait_for_run(run.pk, 120).status == "succeeded", (run.pk, worker.output()[-3000:])
    backup = Backup.objects.get(run=run)
    run = restore_start(backup, confirmed=True, safety_backup=False, via="cli")
    done = wait_for_run(run.pk, 180)
    log = "\n".join(done.log_lines.order_by("seq").values_list("text", flat=True))
    assert done.status == "succeeded", f"{done.error}\n{log[-4000:]}\n{worker.output()[-3000:]}"


@pytest.mark.parametrize("surface", ["start-command", "pm2-app"])
def test_customer_code_started_by_a_restore_in_the_worker_runs_as_its_own_user_and_cannot_read_the_workers_keys_or_another_customer(  # noqa: E501
        attack, start_worker, surface):
    from customers.models import Service
    from engines import procman

    if surface == "pm2-app":
        require(os.path.exists(procman.pm2_binary()), "PM2 from npm (make install)")
    # The worker holds the backup keys in its environment, as a deployed worker does.
    worker = start_worker(KASA_BACKUP_KEYS=settings.KASA_BACKUP_KEYS)
    wait_until(lambda: Path(f"/proc/{worker.pid}/environ").exists(), 10, what="the worker")
    name = "cmd" if surface == "start-command" else "app"
    argv = _argv(attack, surface, worker.pid, stay=True)
    Service.objects.filter(customer=attack.a, name=name).update(
        process_manager="command" if surface == "start-command" else "pm2", start_command=argv,
        app_name=f"probe-{uuid.uuid4().hex[:6]}" if surface == "pm2-app" else "")
    try:
        _backup_and_restore(attack, worker)
        wait_until(lambda: (attack.drop / f"{surface}.json").exists(), 20, what=f"the {surface}'s report")
    finally:
        _kill_probes(attack.drop)  # PM2's daemon goes with the customer's root (conftest)
    _assert_contained(attack, surface)


def _kill_probes(drop: Path) -> None:
    """The probes still running as services: their command line names the drop folder."""
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if str(drop).encode() in (proc_dir / "cmdline").read_bytes():
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except OSError:
            pass


def test_a_release_hook_run_by_an_upgrade_runs_as_the_customers_user_and_cannot_read_the_workers_keys_or_another_customer(  # noqa: E501
        attack, tmp_path):
    from django.core.management import CommandError, call_command

    from tests.upgrade_fixtures import one_component_release

    # The upgrade runs in this process (the CLI in the foreground): this process is the worker.
    argv = _argv(attack, "release-hook", os.getpid(), stay=False)
    one_component_release(tmp_path / "pkg", "web", {"probe.py": PROBE, "index.html": "<h1>web</h1>\n"},
                          hooks={"install": argv})
    shutil.rmtree(attack.root_a / "web")  # an install: the component arrives from the release
    out = io.StringIO()
    try:
        call_command("upgrade", attack.a.domain, "--to", "1.0", "--json", stdout=out, stderr=io.StringIO())
    except CommandError as exc:  # a failed upgrade exits 1; its document says why
        assert exc.returncode == 1, exc
    doc = json.loads(out.getvalue() or "{}")
    _assert_contained(attack, "release-hook")
    assert doc.get("status") == "succeeded", doc
