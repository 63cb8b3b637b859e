"""Issue 12, points 6 and 7: commands behave alike, run logs stay clean, no trash is left in a customer's root.

Real PM2 (node_modules), real PostgreSQL, the real management commands (subprocesses where the exact stdout,
stderr and exit code are the point)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from backups.models import Backup, StorageTarget
from backups.services import backup_start
from customers import runtime
from customers.models import Service
from engines import procman, trees
from operations.models import Run, RunLogLine
from operations.services import run_execute
from tests.conftest import PG_HOST, PG_PORT, free_port

PM2_NOISE = re.compile(r"[┌│├└─]|__/\\\\|Runtime Edition|PM2 is a Production|pm2 id|\bnamespace\b")


def _manage(env, *args, timeout=180):
    return subprocess.run([sys.executable, "manage.py", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _log(run) -> list[str]:
    return list(RunLogLine.objects.filter(run=run).order_by("seq").values_list("text", flat=True))


def _trash(root: Path) -> list[str]:
    return [p.name for p in root.rglob(f"{trees.TRASH_PREFIX}*")]


def _pm2_customer(make_customer, *, names=("backend", "admin", "store")):
    """A customer whose three services are PM2 apps (a sleeping process each; no health URL), all running."""
    customer = make_customer(services=names)
    root = customer.root_path()
    for name in names:
        (root / name / "app.txt").write_text(f"{name} v1\n")
        Service.objects.filter(customer=customer, name=name).update(
            process_manager="pm2", app_name=f"{name}-{customer.domain.split('.')[0]}",
            start_command=["/bin/sleep", "600"])
    customer = type(customer).objects.prefetch_related("services").get(pk=customer.pk)
    procman.start_all(runtime.service_specs(customer), runtime.managers())
    return customer


def _pids(customer) -> dict[str, int]:
    mgr = runtime.managers()["pm2"]
    return {s.name: (mgr.app(s) or {}).get("pid") for s in runtime.service_specs(customer)}


def _full_backup(customer) -> Backup:
    run = backup_start(customer, via="cli", enqueue=False)
    run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    return Backup.objects.get(run=run)


# --- customer_check in the foreground, --enqueue queues ---------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_customer_check_without_a_worker_runs_in_the_foreground_and_prints_its_result(
        make_customer, subprocess_env):
    customer = make_customer()
    out = _manage(subprocess_env, "customer_check", customer.domain)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"check of {customer.domain}: succeeded (no health URL: backend)"
    assert "[info]" in out.stderr  # its log, live, on stderr
    run = Run.objects.get(customer=customer, kind="check")
    assert run.status == "succeeded" and run.requested_via == "cli"


@pytest.mark.django_db(transaction=True)
def test_customer_check_enqueue_queues_the_run_and_returns(make_customer, subprocess_env):
    customer = make_customer()
    out = _manage(subprocess_env, "customer_check", customer.domain, "--enqueue", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "pending" and doc["kind"] == "check"
    assert Run.objects.get(pk=doc["id"]).status == "pending"  # no worker here: it waits in the queue


# --- errors are sentences; JSON keeps the type ------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("argv, start", [
    (["customer_check", "nobody.example.com"], "No customer with domain 'nobody.example.com'."),
    (["backup", "nobody.example.com"], "No customer with domain 'nobody.example.com'."),
    (["restore", "999999", "--yes"], "No backup #999999."),
    (["verify", "999999"], "No backup #999999."),
    (["upgrade", "nobody.example.com", "--to", "x"], "No customer with domain 'nobody.example.com'."),
    (["rollback", "nobody.example.com"], "No customer with domain 'nobody.example.com'."),
    (["backup_import", "--target", "nowhere"], "No storage target named 'nowhere'."),
], ids=lambda v: v[0] if isinstance(v, list) else "")
def test_an_error_is_a_sentence_and_its_json_keeps_the_type(subprocess_env, argv, start):
    out = _manage(subprocess_env, *argv)
    assert out.returncode == 2
    assert out.stderr.strip() == start and "BadInput" not in out.stderr
    out = _manage(subprocess_env, *argv, "--json")
    assert out.returncode == 2
    doc = json.loads(out.stdout)
    assert doc["type"] == "BadInput" and doc["exit_code"] == 2 and doc["error"]


@pytest.mark.django_db(transaction=True)
def test_a_failed_check_says_so_in_a_sentence_and_its_json_document_has_a_type(make_customer, subprocess_env):
    customer = make_customer(databases=[("main", f"postgresql://u:p@127.0.0.1:{free_port()}/x")])
    out = _manage(subprocess_env, "customer_check", customer.domain)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(f"Check of {customer.domain} failed: 1 problem(s)")
    out = _manage(subprocess_env, "customer_check", customer.domain, "--json")
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["type"] == "OperationFailed" and doc["status"] == "failed"


# --- the local target exists after migrate ----------------------------------------------------------------
def test_a_fresh_migrate_creates_the_local_target_and_backup_import_works(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'fresh.sqlite3'}", KASA_VAR_DIR=str(tmp_path / "var"),
               KASA_BACKUP_DIR=str(tmp_path / "backups"), DJANGO_SETTINGS_MODULE="config.settings")
    out = _manage(env, "migrate", "--no-input", timeout=300)
    assert out.returncode == 0, out.stderr
    out = _manage(env, "backup_import", "--target", "local", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["imported"] == []
    # kasa_setup finds it and creates no second one
    out = _manage(env, "kasa_setup", "--no-demo", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["backup_target"] == "local"


@pytest.mark.django_db
def test_the_local_target_is_kasas_backup_folder():
    from backups.services import default_target

    target = default_target()
    assert target.name == "local" and target.kind == StorageTarget.Kind.LOCAL
    assert StorageTarget.objects.filter(name="local").count() == 1


# --- restore --only: only its services; clean logs; no trash ----------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_restore_only_backend_restarts_only_backend_and_logs_one_pm2_line_per_app(make_customer):
    customer = _pm2_customer(make_customer)
    root = customer.root_path()
    bk = _full_backup(customer)
    (root / "backend" / "app.txt").write_text("backend v2\n")
    before = _pids(customer)
    assert all(before.values()), before

    from django.core.management import call_command
    call_command("restore", str(bk.pk), "--only", "backend", "--yes", "--no-safety-backup",
                 stdout=open(os.devnull, "w"))
    after = _pids(customer)
    assert after["admin"] == before["admin"] and after["store"] == before["store"]
    assert after["backend"] and after["backend"] != before["backend"]
    assert (root / "backend" / "app.txt").read_text() == "backend v1\n"
    assert _trash(root) == []  # moved out of the root before the restore returned

    run = Run.objects.filter(customer=customer, kind="restore").latest("created_at")
    lines = _log(run)
    app = f"backend-{customer.domain.split('.')[0]}"
    assert [t for t in lines if t.startswith("PM2 app ")] == [
        f"PM2 app {app} (backend): stopped, not listed",
        f"PM2 app {app} (backend): online, pid {after['backend']}",
    ]
    assert not [t for t in lines if PM2_NOISE.search(t)], [t for t in lines if PM2_NOISE.search(t)]
    assert "stopping 1 service(s): backend" in lines
    assert "backend: no health URL, not health-checked" in lines
    assert not any("healthy" in t for t in lines)


@pytest.mark.django_db(transaction=True)
def test_a_whole_restore_leaves_no_trash_in_the_root_when_it_returns(make_customer):
    customer = make_customer(services=("backend", "store"))
    root = customer.root_path()
    for name in ("backend", "store"):
        for i in range(50):
            (root / name / f"f{i}.txt").write_text("x" * 1000)
    bk = _full_backup(customer)
    (root / "store" / "new.txt").write_text("after the backup\n")
    from django.core.management import call_command
    call_command("restore", str(bk.pk), "--yes", stdout=open(os.devnull, "w"))
    assert _trash(root) == []
    assert not (root / "store" / "new.txt").exists()
    trash = Path(settings.KASA_CUSTOMERS_ROOT) / ".kasa-trash"
    assert trash.is_dir() and (trash.stat().st_mode & 0o777) == 0o700


def test_discard_in_the_background_moves_the_tree_out_of_the_root_at_once(tmp_path):
    root, kasa_trash = tmp_path / "root", tmp_path / "trash"
    (root / "old" / "deep").mkdir(parents=True)
    (root / "old" / "deep" / "f").write_text("x")
    trees.discard(root / "old", background=True, root=root, trash_dir=kasa_trash)
    assert os.listdir(root) == []  # nothing left in the root when discard returns


def test_discard_in_the_background_without_a_trash_folder_removes_before_returning(tmp_path):
    (tmp_path / "old" / "deep").mkdir(parents=True)
    trees.discard(tmp_path / "old", background=True, root=tmp_path)
    assert os.listdir(tmp_path) == []


def test_pm2_banner_tables_and_listings_are_kept_out_of_the_log_its_messages_stay():
    kept = [("stdout", "[PM2] Starting /bin/sleep in fork_mode (1 instance)"), ("stderr", "[PM2][ERROR] no app"),
            ("stderr", "Error: something the command said")]
    dropped = [("stdout", "__/\\\\\\\\\\\\\\\\\\\\\\\\\\\\\\____/\\\\\\\\____"), ("stdout", "  Runtime Edition"),
               ("stdout", "│ id │ name │"), ("stdout", "┌────┬"), ("stdout", "+--- a"), ("stdout", "pid : 14101"),
               ("stdout", "host metrics | cpu: 0%"), ("stdout", "")]
    assert all(procman.pm2_line_kept(*line) for line in kept)
    assert not any(procman.pm2_line_kept(*line) for line in dropped)


# --- no psql warning of Kasa's making; "no health URL" ------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_check_of_a_passwordless_postgresql_database_logs_no_password_file_warning(make_customer, pg_server):
    name = settings.DATABASES["default"]["NAME"]
    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        pytest.skip("the control database is not PostgreSQL")
    customer = make_customer(databases=[("main", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}")])
    run = Run.objects.get(pk=_check(customer).pk)
    assert run.status == "succeeded", run.error
    lines = _log(run)
    assert not [t for t in lines if "password file" in t or "/dev/null" in t], lines
    assert "service backend: no health URL configured" in lines
    assert any(t.endswith("ok; no health URL: backend") for t in lines), lines


def _check(customer):
    from customers.services import customer_check_start

    run = customer_check_start(customer, via="cli", enqueue=False)
    run_execute(run.pk)
    return run


# --- an upgrade and its rollback: no trash, PM2 summarised, "no health URL" -----------------------------------
from tests.test_upgrades import customer_factory, fast_health, releases  # noqa: E402, F401  (their fixtures)


def test_an_upgrade_and_its_rollback_leave_no_trash_and_log_pm2_as_one_line_per_app(
        customer_factory, releases):  # noqa: F811
    from django.core.management import call_command

    from upgrades.models import Upgrade

    customer = customer_factory()
    root = customer.root_path()
    for argv in (["upgrade", customer.domain, "--to", "2.5"], ["rollback", customer.domain]):
        call_command(*argv, stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
        assert _trash(root) == [], argv
        up = Upgrade.objects.filter(customer=customer).latest("created_at")
        assert up.status == "succeeded", up.error
        lines = _log(up.run)
        assert not [t for t in lines if PM2_NOISE.search(t)], [t for t in lines if PM2_NOISE.search(t)]
        pm2 = [t for t in lines if t.startswith(f"PM2 app {customer.app} (backend): ")]
        assert pm2[-1].startswith(f"PM2 app {customer.app} (backend): online, pid "), pm2
        assert "store: no health URL, not health-checked" in lines
