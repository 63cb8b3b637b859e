"""Workers on several machines (issue 14, point 6): two real qclusters on one PostgreSQL control database and one
Redis, each with a var folder and a worker name of its own — two machines, as far as Kasa can tell.

They work through a schedule storm (every customer's schedule due at once), and one of them is killed mid-backup:
its run, and the runs whose tasks it had taken off the Redis queue, end failed at the hands of the other worker's
reaper, their partial artifacts and slots gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.db import connection
from django.utils import timezone
from django_q.models import Schedule, Success

from audit.models import AuditEntry
from backups.models import Backup, BackupPolicy
from backups.schedules import BACKUP_FUNC, schedules_sync
from backups.services import default_target, global_policy
from operations import slots
from operations.models import Run, SlotLease
from tests.conftest import BASE_DIR, require, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HOST_SLOTS, WORKER_SLOTS, PROCESSES = 3, 2, 3


@pytest.fixture
def fleet(subprocess_env, start_worker, redis_url, tmp_path):
    """start(name, **env): a qcluster as worker `name` with its own var folder, on Redis."""
    require(connection.vendor == "postgresql", "PostgreSQL as the control database (DATABASE_URL)")
    queue = redis.from_url(redis_url)
    queue.delete("django_q:kasa:q")  # nothing another test left may reach these workers
    envs = {}

    def env_of(name, **extra):
        var = tmp_path / name
        var.mkdir(mode=0o700, exist_ok=True)
        env = {**subprocess_env, "REDIS_URL": redis_url, "KASA_WORKER_NAME": name, "KASA_VAR_DIR": str(var),
               "KASA_HEARTBEAT_SECONDS": "1", "KASA_RUN_STALE_AFTER": "3", "KASA_DB_CONN_MAX_AGE": "0",
               **{k: str(v) for k, v in extra.items()}}
        envs[name] = env
        return env

    def start(name, **extra):
        return start_worker(**env_of(name, **extra))

    start.env_of = env_of
    start.envs = envs
    yield start
    queue.delete("django_q:kasa:q")


def _customers(make_customer, count: int, size: int) -> list:
    made = []
    for i in range(count):
        c = make_customer(f"fleet{i:02d}.example.com")
        (c.root_path() / "backend" / "data.bin").write_bytes(os.urandom(size))
        made.append(c)
    return made


def _due_now(customers, *, mbps: float) -> None:
    # Once a year, the due time set below aside: an hourly cron whose minute falls within the test would be due
    # again, a second slot of its own (a second backup, rightly).
    policy = global_policy()
    BackupPolicy.objects.filter(pk=policy.pk).update(schedule="cron", cron="0 0 1 1 *", compression="none",
                                                      encrypt=False, bandwidth_limit_mbps=mbps,
                                                      target=default_target())
    schedules_sync()
    names = [f"backup: {c.domain}" for c in customers]
    assert Schedule.objects.filter(func=BACKUP_FUNC, name__in=names).update(
        next_run=timezone.now() - timedelta(minutes=1)) == len(customers)


def _most_at_once(intervals) -> int:
    """The largest number of [start, end] intervals that overlap at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in events:  # an end sorts before a start at the same instant
        now += step
        most = max(most, now)
    return most


def _logs(*workers) -> str:
    return "\n".join(f"--- {w.log_path.name}\n{w.output()[-3000:]}" for w in workers)


def test_two_workers_back_up_a_twenty_customer_schedule_storm_once_each_within_the_host_and_worker_slots(
        fleet, make_customer):
    customers = _customers(make_customer, 20, 64_000)
    _due_now(customers, mbps=0.25)  # about a quarter of a second per backup: they overlap, and must queue
    env = {"KASA_WORKERS": PROCESSES, "KASA_MAX_RUNS_PER_WORKER": WORKER_SLOTS,
           "KASA_MAX_BACKUPS_PER_HOST": HOST_SLOTS}
    workers = [fleet("machine-1", **env), fleet("machine-2", **env)]  # both fire the due schedules as they start

    def all_done():
        runs = Run.objects.filter(kind=Run.Kind.BACKUP)
        return runs.count() >= 20 and not runs.filter(status__in=Run.ACTIVE).exists()

    try:
        wait_until(all_done, 90, 0.25, what="20 backups to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(*workers)}") from None
    runs = list(Run.objects.filter(kind=Run.Kind.BACKUP))
    assert sorted(r.customer_id for r in runs) == sorted(c.pk for c in customers)  # each customer exactly once
    assert {r.status for r in runs} == {"succeeded"}, [(r.pk, r.error) for r in runs if r.error]
    assert Success.objects.filter(func=BACKUP_FUNC).count() == 20  # each schedule fired once across the fleet
    assert all(r.params["schedule_slot"] for r in runs)
    backups = list(Backup.objects.filter(status="succeeded"))
    assert sorted(b.customer_id for b in backups) == sorted(c.pk for c in customers)

    by_worker = {}
    for r in runs:
        by_worker.setdefault(slots.split_worker(r.worker)[0], []).append((r.started_at, r.finished_at))
    assert set(by_worker) == {"machine-1", "machine-2"}  # any worker serves any customer
    assert all(r.host == f"local:{os.uname().nodename}" for r in runs)  # one machine underneath: one host's slots
    for name, spans in by_worker.items():
        assert _most_at_once(spans) <= WORKER_SLOTS, name  # 3 processes, 2 runs at once
    at_once = _most_at_once([(b.started_at, b.finished_at) for b in backups])
    assert 2 <= at_once <= HOST_SLOTS  # 4 runs at once across the two workers, 3 backups on the host
    # A worker's run slot is given back just after its run's final status is written (operations.services: the
    # slot is held around the claim and execution), so the last one may still be there for a moment.
    wait_until(lambda: not SlotLease.objects.exists(), 15, 0.1, what="the last slot leases to be given back")


def _reap_as(env: dict) -> list[int]:
    out = subprocess.run([sys.executable, "manage.py", "reap_runs", "--json"], cwd=BASE_DIR, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["reaped"]


def test_a_worker_killed_mid_backup_leaves_failed_runs_that_the_other_workers_reaper_cleans_up(fleet,
                                                                                                make_customer):
    customers = _customers(make_customer, 4, 3_000_000)
    _due_now(customers, mbps=0.3)  # ten seconds each
    # One run at a time on machine-1: its first backup runs, the three others wait in its hands, off the queue.
    doomed = fleet("machine-1", KASA_WORKERS=2, KASA_MAX_RUNS_PER_WORKER=1)

    def taken():
        runs = list(Run.objects.filter(kind=Run.Kind.BACKUP))
        running = [r for r in runs if r.status == "running" and r.progress_done > 0]
        waiting = [r for r in runs if r.status == "pending" and r.worker == "machine-1"]
        return (running[0], waiting) if len(runs) == 4 and len(running) == 1 and len(waiting) == 3 else None

    try:
        running, waiting = wait_until(taken, 60, 0.2, what="machine-1 to run one backup and hold three")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(doomed)}") from None
    bk = Backup.objects.get(run=running)
    folder = Path(default_target().path) / bk.prefix
    wait_until(lambda: folder.exists() and any(folder.iterdir()), 20, what="a partial artifact")
    assert SlotLease.objects.filter(run=running).count() == 2  # machine-1's run slot and the host's backup slot

    os.killpg(doomed.pid, signal.SIGKILL)  # the whole cluster, at once: no finally runs anywhere
    doomed.popen.wait()
    # machine-2's own reaper pass, every second here instead of every minute (KASA_REAP_SECONDS).
    survivor = fleet("machine-2", KASA_REAP_SECONDS=1)
    ours = [running.pk] + [r.pk for r in waiting]
    try:
        wait_until(lambda: not Run.objects.filter(pk__in=ours, status__in=Run.ACTIVE).exists(), 30, 0.2,
                   what="machine-2's reaper to fail the dead worker's runs")
        # A run is failed first, then cleaned up (its partial objects, its backup row), then audited as reaped.
        wait_until(lambda: AuditEntry.objects.filter(action="run.backup.reaped", object_id=str(running.pk)).exists(),
                   30, 0.2, what="machine-2's reaper to finish cleaning up after the dead backup")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(survivor)}") from None

    running.refresh_from_db()
    assert running.status == "failed"
    assert running.error.startswith(f"worker lost: no heartbeat from {running.worker} for over 3 s")
    assert running.worker.startswith("machine-1:")
    bk.refresh_from_db()
    assert bk.status == "failed"
    assert not folder.exists() or not any(folder.iterdir())  # the partial artifact is gone
    for r in waiting:
        r.refresh_from_db()
        assert r.status == "failed" and r.error.startswith(
            "task lost: worker machine-1 took it off the queue and stopped beating before it started"), r.error
    assert not SlotLease.objects.exists()
    assert not Run.objects.filter(status__in=Run.ACTIVE).exists()  # no silent gap: the next schedule may start
    reapers = set(AuditEntry.objects.filter(action="run.backup.reaped", object_id__in=[str(pk) for pk in ours])
                  .values_list("actor_repr", flat=True))
    assert reapers == {"reaper:machine-2"}, reapers
    assert _reap_as(fleet.envs["machine-2"]) == []  # `manage.py reap_runs` on machine-2: nothing left
