"""Concurrency slots in the control database (operations/slots.py) and the reaper across worker machines.

The two-worker fleet test (real qclusters on Redis and PostgreSQL) is tests/test_workers_fleet.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from django.db import connection
from django.utils import timezone

from backups.tasks import scheduled_backup
from operations import registry, slots
from operations.models import Run, SlotLease, WorkerBeat
from operations.services import runs_reap
from tests import kinds


def _running(customer, kind="check", *, worker=None, heartbeat=0, host="") -> Run:
    now = timezone.now()
    return Run.objects.create(customer=customer, kind=kind, mutating=kind != "check", status=Run.Status.RUNNING,
                              worker=worker or slots.worker_id(), started_at=now, host=host,
                              heartbeat_at=now - timezone.timedelta(seconds=heartbeat))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.django_db(transaction=True)
def test_eight_threads_racing_for_two_slots_never_hold_more_than_two(make_customer):
    customer = make_customer()
    holders = [Run.objects.create(customer=customer, kind=f"k{i}", mutating=False, status=Run.Status.RUNNING,
                                  heartbeat_at=timezone.now()) for i in range(8)]
    start, most, lock = threading.Barrier(8), [0], threading.Lock()
    got = []

    def race(run_id):
        try:
            start.wait()
            for _ in range(15):
                lease = slots.try_acquire("host:race", 2, run_id)
                if lease is None:
                    continue
                with lock:
                    got.append(run_id)
                    most[0] = max(most[0], SlotLease.objects.filter(key="host:race").count())
                slots.release(lease)
        finally:
            connection.close()

    threads = [threading.Thread(target=race, args=(r.pk,)) for r in holders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got, "nobody ever got a slot"
    assert most[0] <= 2
    assert slots.in_use("host:race") == 0


@pytest.mark.django_db
def test_a_full_key_refuses_without_waiting_and_its_slot_is_free_again_after_the_block(make_customer):
    a, b = make_customer(), make_customer(services=())
    ra, rb = _running(a), _running(b)
    with slots.hold("host:x", 1, ra.pk, wait=False) as n:
        assert n == 0 and slots.in_use("host:x") == 1
        with pytest.raises(slots.SlotsBusy), slots.hold("host:x", 1, rb.pk, wait=False):
            pass
    with slots.hold("host:x", 1, rb.pk, wait=False) as n:
        assert n == 0


@pytest.mark.django_db
def test_slots_of_a_run_that_ended_stalled_or_whose_process_died_here_are_reclaimed_but_not_a_live_ones(
        make_customer):
    ended = _running(make_customer())
    stalled = _running(make_customer(services=()), heartbeat=10_000)
    died = _running(make_customer(services=()), worker=f"{slots.worker_name()}:{_dead_pid()}")
    other = _running(make_customer(services=()), worker=f"other-machine:{_dead_pid()}")  # a PID of elsewhere
    live = _running(make_customer(services=()))
    for n, run in enumerate((ended, stalled, died, other, live)):
        SlotLease.objects.create(key="host:k", n=n, run=run, worker=run.worker)
    Run.objects.filter(pk=ended.pk).update(status=Run.Status.FAILED)
    assert sorted(slots.reclaim("host:k")) == sorted([ended.pk, stalled.pk, died.pk])
    assert set(SlotLease.objects.filter(key="host:k").values_list("run_id", flat=True)) == {other.pk, live.pk}


@pytest.mark.django_db
def test_the_reaper_judges_another_workers_runs_by_heartbeat_only_and_frees_the_slots_of_those_it_fails(
        make_customer):
    dead = _dead_pid()
    # A PID that does not exist here means nothing for a run of another machine: its heartbeat is fresh.
    elsewhere = _running(make_customer(), worker=f"other-machine:{dead}")
    mine = _running(make_customer(services=()), worker=f"{slots.worker_name()}:{dead}")
    silent = _running(make_customer(services=()), worker=f"other-machine:{os.getpid()}", heartbeat=600)
    for n, run in enumerate((elsewhere, mine, silent)):
        SlotLease.objects.create(key="host:r", n=n, run=run, worker=run.worker)
    assert sorted(runs_reap(stale_after=120)) == sorted([mine.pk, silent.pk])
    elsewhere.refresh_from_db()
    silent.refresh_from_db()
    assert elsewhere.status == "running"
    assert silent.status == "failed" and silent.error.startswith(
        f"worker lost: no heartbeat from other-machine:{os.getpid()} for over 120 s")
    assert list(SlotLease.objects.values_list("run_id", flat=True)) == [elsewhere.pk]


@pytest.fixture
def undo_kind():
    kinds.reset()
    registry.register("t-undo", "tests.kinds.counting", mutating=True, on_abandon="tests.kinds.abandoned")
    yield kinds
    registry.unregister("t-undo")


@pytest.mark.django_db
def test_a_dead_workers_undo_waits_for_a_reaper_on_its_host_and_is_done_there_once(make_customer, undo_kind,
                                                                                   monkeypatch):
    run = _running(make_customer(), "t-undo", worker="machine-a:4242", heartbeat=600, host="local:machine-a")
    assert runs_reap(stale_after=120) == [run.pk]
    run.refresh_from_db()
    assert run.status == "failed" and run.abandon_host == "local:machine-a"
    assert undo_kind.abandons == []  # this machine does not reach machine-a's folders
    assert run.log_lines.filter(text__contains="waits for a worker on local:machine-a").exists()

    monkeypatch.setattr(slots, "node_name", lambda: "machine-a")  # the next reaper runs on machine-a
    assert runs_reap(stale_after=120) == [run.pk]
    assert undo_kind.abandons == [run.pk]
    run.refresh_from_db()
    assert run.abandon_host == "" and run.status == "failed"
    assert runs_reap(stale_after=120) == [] and undo_kind.abandons == [run.pk]


@pytest.mark.django_db
def test_a_pending_run_whose_task_a_stopped_or_restarted_worker_took_is_failed_as_lost(make_customer):
    now = timezone.now()
    old = now - timezone.timedelta(minutes=10)
    WorkerBeat.objects.create(name="gone", seen_at=old, started_at=old)
    WorkerBeat.objects.create(name="restarted", seen_at=now, started_at=now)
    WorkerBeat.objects.create(name="busy", seen_at=now, started_at=old)

    def pending(worker, customer):
        return Run.objects.create(customer=customer, kind="check", mutating=False, worker=worker, created_at=old,
                                  heartbeat_at=old + timezone.timedelta(seconds=1))

    lost = pending("gone", make_customer())
    again = pending("restarted", make_customer(services=()))
    waiting = pending("busy", make_customer(services=()))
    assert sorted(runs_reap(stale_after=120)) == sorted([lost.pk, again.pk])
    lost.refresh_from_db()
    again.refresh_from_db()
    waiting.refresh_from_db()
    assert lost.status == "failed" and lost.error.startswith("task lost: worker gone took it off the queue and "
                                                             "stopped beating")
    assert "restarted since" in again.error
    assert waiting.status == "pending"


@pytest.mark.django_db(transaction=True)  # the task closes its connections, as in a worker
def test_a_schedule_slot_that_fires_twice_starts_one_backup(make_customer):
    customer = make_customer()
    slot = "2026-12-05T02:17:00+00:00"
    assert scheduled_backup(customer.pk, slot=slot).startswith("queued run #")
    run = Run.objects.get(customer=customer)
    assert run.params["schedule_slot"] == slot
    Run.objects.filter(pk=run.pk).update(status=Run.Status.SUCCEEDED)  # done before the second firing
    assert scheduled_backup(customer.pk, slot=slot) == f"skipped: slot {slot} already started run #{run.pk}"
    assert scheduled_backup(customer.pk, slot="2026-12-05T03:17:00+00:00").startswith("queued run #")
    assert Run.objects.filter(customer=customer).count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_run_waiting_for_its_workers_slot_says_so_and_a_cancel_ends_the_wait(make_customer, settings):
    from operations.services import run_cancel, run_execute, run_start
    from tests.conftest import wait_until

    settings.KASA_MAX_RUNS_PER_WORKER = 1
    busy = _running(make_customer())
    SlotLease.objects.create(key=slots.worker_slot(), n=0, run=busy, worker=busy.worker)
    run = run_start(make_customer(services=()), kind="check", via="cli", enqueue=False)
    out = {}

    def execute():
        try:
            out["result"] = run_execute(run.pk)
        finally:
            connection.close()

    t = threading.Thread(target=execute)
    t.start()
    wait_until(lambda: run.log_lines.filter(text__startswith=f"waiting for worker {slots.worker_name()}: its 1 run "
                                                             "slot(s) are in use").exists(), 10, what="the wait")
    assert Run.objects.get(pk=run.pk).status == "pending"
    assert run_cancel(Run.objects.get(pk=run.pk), via="cli")
    t.join(10)
    assert out["result"] == "already cancelled"
    assert list(SlotLease.objects.values_list("run_id", flat=True)) == [busy.pk]


@pytest.mark.django_db
def test_the_redis_broker_names_the_worker_that_took_a_runs_task_and_the_reaper_fails_one_neither_taken_nor_queued(
        make_customer, redis_url, monkeypatch):
    import redis
    from django_q.signing import SignedPackage

    from operations import broker as kasa_broker
    from operations import services

    queue = kasa_broker.RedisBroker.__new__(kasa_broker.RedisBroker)  # on the test Redis, a list of its own
    queue.connection, queue.list_key = redis.from_url(redis_url), f"django_q:kasa-test-{os.getpid()}:q"
    queue.delete_queue()
    old = timezone.now() - timezone.timedelta(minutes=10)

    def pending(customer):
        run = Run.objects.create(customer=customer, kind="check", mutating=False, created_at=old)
        queue.enqueue(SignedPackage.dumps({"func": kasa_broker.EXECUTE_RUN, "args": (run.pk,), "kwargs": {}}))
        return run

    taken, waiting, lost = (pending(make_customer()), pending(make_customer(services=())),
                            pending(make_customer(services=())))
    queue.connection.lrem(queue.list_key, 1, queue.connection.lindex(queue.list_key, 2))  # Redis lost this one
    assert queue.queued_run_ids() == {taken.pk, waiting.pk}
    assert [kasa_broker.run_of(p) for _, p in queue.dequeue()] == [taken.pk]
    taken.refresh_from_db()
    assert taken.worker == slots.worker_name() and taken.status == "pending"
    WorkerBeat.objects.create(name=slots.worker_name(), started_at=old, seen_at=timezone.now())

    monkeypatch.setattr(services, "get_broker", lambda: queue)
    monkeypatch.setattr(services, "LOST_RECHECK_SECONDS", 0.01)
    try:
        assert runs_reap(stale_after=120) == [lost.pk]
    finally:
        queue.delete_queue()
    lost.refresh_from_db()
    assert lost.error == "task lost: no worker took it and it is no longer in the queue; not started"
    assert Run.objects.get(pk=taken.pk).status == Run.Status.PENDING  # in a live worker's hands
    assert Run.objects.get(pk=waiting.pk).status == Run.Status.PENDING  # still queued


@pytest.mark.django_db
def test_customers_of_one_remote_host_share_its_slots_and_local_ones_count_against_this_machine(make_customer):
    from hosts.models import Host

    web = Host.objects.create(name="web7", ssh_user="root", address="10.9.9.9", customers_root="/srv/customers")
    a, b, here = make_customer(), make_customer(), make_customer()
    Customer = type(a)
    Customer.objects.filter(pk__in=[a.pk, b.pk]).update(host=web)
    a, b = Customer.objects.get(pk=a.pk), Customer.objects.get(pk=b.pk)
    assert slots.host_key(a) == slots.host_key(b) == "host:web7"
    assert slots.host_key(here) == f"local:{os.uname().nodename}"
