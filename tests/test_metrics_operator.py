"""/metrics as an operator uses it: run durations as a histogram, storage counters that never go down, queue,
workers, quarantines, target checks — and the whole live scrape accepted by `promtool check metrics`."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from backups.models import Backup, StorageTarget
from backups.services import BackupInputError, backup_delete, default_target, target_check
from operations.models import Run, WorkerBeat

from .conftest import free_port, require
from .test_fleet_overview import upgrade

TOKEN = "metrics-token-for-the-operator-tests"


def scrape(live_server) -> str:
    req = urllib.request.Request(f"{live_server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310  (the test's own live server)
        assert resp.status == 200
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def _run(customer, kind: str, status: str, seconds: float) -> Run:
    end = timezone.now()
    return Run.objects.create(kind=kind, customer=customer, status=status, mutating=False,
                              started_at=end - timedelta(seconds=seconds), finished_at=end)


@pytest.fixture
def token(settings):
    settings.KASA_METRICS_TOKEN = TOKEN


@pytest.mark.django_db(transaction=True)
def test_run_durations_are_a_histogram_by_kind_and_result_with_fixed_buckets(live_server, token, make_customer):
    a, b = make_customer(), make_customer()
    quick = [_run(a, "backup", "succeeded", seconds) for seconds in (0.5, 3, 3)]
    _run(a, "backup", "succeeded", 700)
    _run(b, "backup", "succeeded", 20000)  # beyond the last bound: +Inf only
    _run(b, "backup", "failed", 10)
    Run.objects.create(kind="backup", customer=b, status="pending", mutating=True)  # not finished: not counted
    moved = _run(b, "check", "running", 40)  # finished after this: moves from nowhere into the histogram
    Run.objects.filter(pk=moved.pk).update(status="cancelled")

    text = scrape(live_server)
    ok = {"kind": "backup", "result": "succeeded"}
    assert value(text, "kasa_run_duration_seconds_bucket", le="1.0", **ok) == 1
    assert value(text, "kasa_run_duration_seconds_bucket", le="5.0", **ok) == 3
    assert value(text, "kasa_run_duration_seconds_bucket", le="900.0", **ok) == 4
    assert value(text, "kasa_run_duration_seconds_bucket", le="14400.0", **ok) == 4
    assert value(text, "kasa_run_duration_seconds_bucket", le="+Inf", **ok) == 5
    assert value(text, "kasa_run_duration_seconds_count", **ok) == 5
    assert value(text, "kasa_run_duration_seconds_sum", **ok) == pytest.approx(0.5 + 3 + 3 + 700 + 20000, abs=1)
    assert value(text, "kasa_run_duration_seconds_bucket", le="15.0", kind="backup", result="failed") == 1
    assert value(text, "kasa_run_duration_seconds_bucket", le="60.0", kind="check", result="cancelled") == 1
    assert value(text, "kasa_run_duration_seconds_count", kind="check", result="cancelled") == 1
    assert 'result="pending"' not in text and 'result="running"' not in text

    # Deleting runs (and moving one) keeps the buckets exact: the trigger takes them out again.
    Run.objects.filter(pk__in=[r.pk for r in quick]).delete()
    text = scrape(live_server)
    assert value(text, "kasa_run_duration_seconds_bucket", le="5.0", **ok) == 0
    assert value(text, "kasa_run_duration_seconds_count", **ok) == 2


@pytest.mark.django_db(transaction=True)
def test_storage_counters_count_bytes_written_and_read_and_never_go_down_when_backups_are_deleted(
        live_server, token, make_customer, customer_root, admin_user):
    customer = make_customer()
    (customer_root / "backend" / "data.bin").write_bytes(b"kasa" * 50_000)
    call_command("backup", customer.domain)
    bk = Backup.objects.get(customer=customer, status="succeeded")
    target = default_target().name
    text = scrape(live_server)
    written = value(text, "kasa_storage_written_bytes_total", target=target)
    assert written is not None and written > bk.size  # the artifacts and the manifest
    assert value(text, "kasa_storage_read_bytes_total", target=target) == 0
    assert value(text, "kasa_storage_errors_total", target=target) == 0
    assert value(text, "kasa_storage_stored_bytes", target=target) == bk.size  # the space used now

    call_command("verify", bk.pk)  # the drill reads every artifact back
    text = scrape(live_server)
    assert value(text, "kasa_storage_read_bytes_total", target=target) == bk.size

    backup_delete(bk, actor=admin_user)
    text = scrape(live_server)
    assert value(text, "kasa_storage_written_bytes_total", target=target) == written
    assert value(text, "kasa_storage_stored_bytes", target=target) is None  # nothing kept there any more
    assert value(text, "kasa_storage_read_bytes_total", target=target) == bk.size


@pytest.mark.django_db(transaction=True)
def test_a_storage_error_ending_a_backup_counts_against_its_target_and_checks_set_target_up(
        live_server, token, make_customer, customer_root, admin_user, tmp_path):
    down = StorageTarget.objects.create(name="s3-down", kind="s3", bucket="kasa-backups",
                                        endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
                                        access_key="AKIAEXAMPLE", secret_key="Sup3r-S3cret-Key")
    fine = StorageTarget.objects.create(name="local-ok", kind="local", path=str(tmp_path / "store"))
    StorageTarget.objects.create(name="never-checked", kind="local", path=str(tmp_path / "other"))
    customer = make_customer()
    with pytest.raises(CommandError):
        call_command("backup", customer.domain, "--target", "s3-down")
    assert Backup.objects.get(customer=customer).status == "failed"
    target_check(fine, actor=admin_user)
    with pytest.raises(BackupInputError):
        target_check(down, actor=admin_user)

    text = scrape(live_server)
    assert value(text, "kasa_storage_errors_total", target="s3-down") == 2  # the backup, then the check
    assert value(text, "kasa_storage_target_up", target="s3-down") == 0
    assert value(text, "kasa_storage_target_up", target="local-ok") == 1
    assert value(text, "kasa_storage_errors_total", target="local-ok") == 0
    assert value(text, "kasa_storage_target_up", target="never-checked") is None
    assert "Sup3r-S3cret-Key" not in text


@pytest.mark.django_db(transaction=True)
def test_queue_workers_and_quarantines_are_exposed_and_staff_see_only_their_customers(
        live_server, token, client, make_customer, team, staff_user):
    from customers.models import Team

    mine, other = make_customer(), make_customer(team_=Team.objects.create(name="another-team"))
    text = scrape(live_server)
    assert value(text, "kasa_queue_depth") == 0 and value(text, "kasa_queue_oldest_age_seconds") == 0
    Run.objects.create(kind="backup", customer=mine, status="pending", mutating=True,
                       created_at=timezone.now() - timedelta(minutes=10))
    Run.objects.create(kind="check", customer=other, status="pending", mutating=False)
    seen = timezone.now() - timedelta(seconds=30)
    WorkerBeat.objects.create(name="worker-a", pid=42, seen_at=seen)
    upgrade(mine, "quarantined")

    text = scrape(live_server)
    assert value(text, "kasa_queue_depth") == 2
    assert 600 <= value(text, "kasa_queue_oldest_age_seconds") < 700
    assert value(text, "kasa_worker_heartbeat_timestamp_seconds", worker="worker-a") == pytest.approx(
        seen.timestamp())
    assert value(text, "kasa_upgrade_quarantined", customer=mine.domain) == 1
    assert value(text, "kasa_upgrade_quarantined", customer=other.domain) == 0

    client.force_login(staff_user(team))
    text = client.get("/metrics").content.decode()
    assert value(text, "kasa_queue_depth") == 1  # their customer's run only
    assert other.domain not in text
    assert "kasa_worker_heartbeat" not in text and "kasa_storage_" not in text  # the fleet's machinery


@pytest.mark.django_db(transaction=True)
def test_promtool_finds_no_problem_in_a_live_scrape(live_server, token, make_customer, customer_root, admin_user,
                                                    tmp_path):
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (Debian's prometheus package: make system-deps)")
    customer = make_customer()
    (customer_root / "backend" / "data.bin").write_bytes(b"x" * 10_000)
    call_command("backup", customer.domain)
    _run(customer, "check", "failed", 2)
    Run.objects.create(kind="backup", customer=customer, status="pending", mutating=True)
    WorkerBeat.objects.create(name="worker-a", pid=1)
    upgrade(customer, "quarantined")
    target_check(default_target(), actor=admin_user)

    text = scrape(live_server)
    for name in ("kasa_run_duration_seconds_bucket", "kasa_storage_written_bytes_total", "kasa_storage_target_up",
                 "kasa_queue_depth", "kasa_worker_heartbeat_timestamp_seconds", "kasa_upgrade_quarantined"):
        assert name in text, name
    Path(tmp_path / "scrape.txt").write_text(text)
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (done.stdout, done.stderr)
