"""Runs: created first, enqueued with only their pk, claimed once, never repeated."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from django.db import IntegrityError, connection
from django_q.models import OrmQ

from operations import registry
from operations.models import Run, RunLogLine
from operations.services import WORKER_DIED, OperationRefused, run_cancel, run_execute, run_start, runs_reap
from tests import kinds
from tests.conftest import processes, wait_until


@pytest.fixture
def test_kinds():
    kinds.reset()
    # Own names: registering over a real kind ("backup") would unregister it for later tests.
    registry.register("t-mutating", "tests.kinds.counting", mutating=True)
    registry.register("t-cancel", "tests.kinds.cooperative", mutating=True)
    registry.register("t-crash", "tests.kinds.crashing", mutating=False)
    yield kinds
    kinds.release.set()
    for k in ("t-mutating", "t-cancel", "t-crash"):
        registry.unregister(k)


def _in_thread(fn, *args):
    out = {}

    def target():
        try:
            out["value"] = fn(*args)
        finally:
            connection.close()

    t = threading.Thread(target=target)
    t.start()
    return t, out


@pytest.mark.smoke
@pytest.mark.django_db
def test_run_row_is_created_first_and_enqueued_with_only_its_pk_on_commit(
    make_customer, django_capture_on_commit_callbacks
):
    customer = make_customer()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        run = run_start(customer, kind="check", via="cli")
        assert Run.objects.get(pk=run.pk).status == "pending"
        assert OrmQ.objects.count() == 0  # nothing is queued before the commit
    for cb in callbacks:
        cb()
    task = OrmQ.objects.get().task
    assert task["func"] == "operations.tasks.execute_run"
    assert tuple(task["args"]) == (run.pk,) and not task["kwargs"]


@pytest.mark.smoke
@pytest.mark.django_db
def test_second_mutating_operation_on_a_customer_is_refused_with_a_clear_message(make_customer, test_kinds):
    customer = make_customer()
    first = run_start(customer, kind="t-mutating", via="cli")
    with pytest.raises(OperationRefused) as err:
        run_start(customer, kind="t-cancel", via="cli")
    assert f"t-mutating #{first.pk} is pending" in str(err.value) and customer.domain in str(err.value)
    # a read-only check may run beside it, but not two checks at once
    run_start(customer, kind="check", via="cli")
    with pytest.raises(OperationRefused, match="check #"):
        run_start(customer, kind="check", via="cli")
    # other customers are not blocked
    run_start(make_customer(root=None, domain="other.example.com", services=()), kind="t-mutating", via="cli")


@pytest.mark.smoke
@pytest.mark.django_db
def test_the_database_itself_refuses_a_second_active_mutating_run(make_customer):
    customer = make_customer()
    Run.objects.create(customer=customer, kind="backup", mutating=True)
    with pytest.raises(IntegrityError):
        Run.objects.create(customer=customer, kind="restore", mutating=True)


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_race_and_exactly_one_wins(make_customer, test_kinds):
    customer = make_customer()
    barrier = threading.Barrier(4)
    results = []

    def request():
        barrier.wait()
        try:
            results.append(run_start(customer, kind="t-mutating", via="cli").pk)
        except OperationRefused as exc:
            results.append(str(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, int)]
    assert len(won) == 1 and len(results) == 4
    assert all("cannot start t-mutating" in r for r in results if isinstance(r, str))
    assert Run.objects.filter(customer=customer).count() == 1


@pytest.mark.django_db(transaction=True)
def test_log_lines_are_stored_as_they_happen_not_at_the_end(make_customer, test_kinds):
    run = run_start(make_customer(), kind="t-mutating", via="cli")
    thread, out = _in_thread(run_execute, run.pk)
    assert test_kinds.started.wait(10)
    # Read from this thread's own connection while the handler is still working.
    assert Run.objects.get(pk=run.pk).status == "running"
    assert RunLogLine.objects.filter(run=run, text__contains="step 1").exists()
    assert not RunLogLine.objects.filter(run=run, text__contains="step 2").exists()
    test_kinds.release.set()
    thread.join(10)
    run.refresh_from_db()
    assert out["value"] == "succeeded" == run.status
    seqs = list(run.log_lines.values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    assert run.progress_done == run.progress_total == 1 and run.result == {"calls": 1}
    assert run.started_at <= run.finished_at and run.heartbeat_at is not None


@pytest.mark.django_db(transaction=True)
def test_redelivered_task_marks_a_running_run_failed_and_never_repeats_it(make_customer, test_kinds):
    run = run_start(make_customer(), kind="t-mutating", via="cli")
    thread, _ = _in_thread(run_execute, run.pk)
    assert test_kinds.started.wait(10)
    # django-q2 delivers the same task again while the first delivery is mid-way.
    assert run_execute(run.pk) == "redelivered"
    run.refresh_from_db()
    assert run.status == "failed" and run.error == WORKER_DIED
    test_kinds.release.set()
    thread.join(10)
    run.refresh_from_db()
    assert run.status == "failed" and run.error == WORKER_DIED  # the first delivery cannot overwrite it
    assert test_kinds.calls == [run.pk]  # the work ran once
    # and a delivery after the end does nothing at all
    assert run_execute(run.pk) == "already failed"
    assert test_kinds.calls == [run.pk]


@pytest.mark.smoke
@pytest.mark.django_db
def test_handler_crash_fails_the_run_with_the_traceback_in_its_log(make_customer, test_kinds):
    run = run_start(make_customer(), kind="t-crash", via="cli")
    assert run_execute(run.pk) == "failed"
    run.refresh_from_db()
    assert run.error == "internal error: ZeroDivisionError: division by zero in a handler"
    assert run.log_lines.filter(level="error", text__contains="Traceback").exists()


@pytest.mark.smoke
@pytest.mark.django_db
def test_reaper_fails_runs_whose_worker_is_gone_and_spares_live_ones(make_customer):
    from django.utils import timezone

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    now = timezone.now()
    stale = Run.objects.create(customer=make_customer(), kind="backup", status="running", worker="elsewhere:1",
                               heartbeat_at=now - timezone.timedelta(minutes=10), started_at=now)
    gone = Run.objects.create(customer=make_customer(domain="b.example.com", services=()), kind="backup",
                              status="running", worker=f"{host}:{dead.pid}", heartbeat_at=now, started_at=now)
    alive = Run.objects.create(customer=make_customer(domain="c.example.com", services=()), kind="backup",
                               status="running", worker=f"{host}:{os.getpid()}", heartbeat_at=now, started_at=now)
    assert sorted(runs_reap(stale_after=120)) == sorted([stale.pk, gone.pk])
    stale.refresh_from_db()
    gone.refresh_from_db()
    alive.refresh_from_db()
    assert stale.status == "failed" and "no heartbeat" in stale.error
    assert gone.status == "failed" and f"process {host}:{dead.pid} no longer exists" in gone.error
    assert alive.status == "running"
    assert gone.log_lines.filter(level="error", text__contains="worker lost").exists()


@pytest.mark.smoke
@pytest.mark.django_db
def test_pending_run_is_cancelled_at_once(make_customer):
    run = run_start(make_customer(), kind="check", via="cli")
    assert run_cancel(run, via="cli")
    run.refresh_from_db()
    assert run.status == "cancelled" and run.finished_at
    assert run_execute(run.pk) == "already cancelled"


@pytest.mark.django_db(transaction=True)
def test_running_run_stops_at_its_next_step_when_cancelled(make_customer, test_kinds):
    run = run_start(make_customer(), kind="t-cancel", via="cli")
    thread, out = _in_thread(run_execute, run.pk)
    assert test_kinds.started.wait(10)
    assert run_cancel(Run.objects.get(pk=run.pk), via="cli")
    test_kinds.release.set()
    thread.join(10)
    run.refresh_from_db()
    assert run.status == "cancelled" and out["value"] == "cancelled"


class _SlowHealth:
    """An HTTP server whose answer takes long: keeps a check busy on a real worker."""

    def __init__(self, delay: float):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                time.sleep(delay)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.django_db(transaction=True)
def test_killed_worker_run_is_failed_on_redelivery_not_rerun(make_customer, start_worker):
    from customers.services import customer_check_start

    slow = _SlowHealth(delay=4)
    customer = make_customer()
    customer.services.update(health_url=slow.url)
    # Redelivery after 3 s instead of hours, so the test sees the broker hand the task out again.
    worker = start_worker(KASA_TASK_RETRY=3, KASA_TASK_TIMEOUT=60)
    run = customer_check_start(customer, via="cli")
    running = wait_until(lambda: Run.objects.filter(pk=run.pk, status="running").first(), 60, what="running")
    wait_until(lambda: slow.hits, 10, what="the check to reach the health URL")
    pid = int(running.worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)  # the worker dies mid-operation
    failed = wait_until(lambda: Run.objects.filter(pk=run.pk, status="failed").first(), 60,
                        what="the redelivered task to fail the run")
    assert failed.error == WORKER_DIED, worker.output()[-2000:]
    assert len(slow.hits) == 1  # the check was not executed a second time
    assert failed.log_lines.filter(text__contains="started on").count() == 1
    slow.server.shutdown()


# --- stopping the worker (operations/management/commands/qcluster.py) ----------------------------------

def _live_members(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies waiting for their reaper do not count)."""
    return [pid for pid, (state, _, group) in processes().items() if group == pgid and state != "Z"]


@pytest.mark.django_db(transaction=True)
def test_worker_whose_whole_process_group_gets_sigterm_exits_instead_of_hanging(start_worker):
    # django-q2's own qcluster logs "stopping" and never exits here (its sentinel dies of the signal while
    # the main process waits for it to acknowledge the stop).
    worker = start_worker()
    wait_until(lambda: "running." in worker.output(), 60, what="the cluster to start")
    os.killpg(worker.pid, signal.SIGTERM)  # as `kill -- -PGID`, `pkill -f qcluster` or systemd's default
    assert worker.popen.wait(timeout=30) == 0, worker.output()[-2000:]
    assert "stopped by the same signal" in worker.output()
    wait_until(lambda: not _live_members(worker.pid), 10, what="every process of the cluster to end")


def _worker_busy_with_a_check(make_customer, start_worker, *, seconds: float):
    """A real worker running a real check run, which waits `seconds` for the customer's health URL."""
    from customers.services import customer_check_start

    slow = _SlowHealth(delay=seconds)
    customer = make_customer()
    customer.services.update(health_url=slow.url)
    worker = start_worker()
    run = customer_check_start(customer, via="cli")
    wait_until(lambda: slow.hits, 60, what="the check to reach the health URL")
    return worker, run, slow


@pytest.mark.django_db(transaction=True)
def test_worker_sent_sigterm_lets_its_running_run_finish_then_exits(make_customer, start_worker):
    worker, run, slow = _worker_busy_with_a_check(make_customer, start_worker, seconds=3)
    os.kill(worker.pid, signal.SIGTERM)  # the main process only: `docker stop`, systemd's KillMode=mixed
    assert worker.popen.wait(timeout=60) == 0, worker.output()[-2000:]
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED, (run.status, run.error)
    assert "has stopped" in worker.output()
    wait_until(lambda: not _live_members(worker.pid), 10, what="every process of the cluster to end")
    slow.server.shutdown()


@pytest.mark.django_db(transaction=True)
def test_second_sigterm_stops_a_draining_worker_now_and_the_reaper_fails_its_run(make_customer, start_worker):
    worker, run, _ = _worker_busy_with_a_check(make_customer, start_worker, seconds=120)
    os.kill(worker.pid, signal.SIGTERM)
    wait_until(lambda: "running tasks finish first" in worker.output(), 10, what="the drain to begin")
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.popen.wait(timeout=30) == 0, worker.output()[-2000:]
    assert "second signal" in worker.output()
    wait_until(lambda: not _live_members(worker.pid), 10, what="every process of the cluster to end")
    assert runs_reap() == [run.pk]
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "no longer exists" in run.error


@pytest.mark.django_db(transaction=True)
def test_worker_whose_cluster_dies_unasked_exits_1_for_its_supervisor_to_restart_it(start_worker):
    worker = start_worker()
    wait_until(lambda: "running." in worker.output(), 60, what="the cluster to start")
    sentinel = next(pid for pid, (_, ppid, _) in processes().items() if ppid == worker.pid)
    os.kill(sentinel, signal.SIGKILL)  # as the OOM killer would
    assert worker.popen.wait(timeout=30) == 1, worker.output()[-2000:]
    assert "its sentinel exited by itself" in worker.output()
    wait_until(lambda: not _live_members(worker.pid), 10, what="the orphaned workers to end")
