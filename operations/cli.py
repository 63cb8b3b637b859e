"""Helpers for management commands that start a run and wait for it."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from django.db import connection

from .models import Run, RunLogLine
from .offline import DB_LOST
from .services import run_cancel, run_execute

NO_WORKER_HINT_AFTER = 30


def run_document(run: Run) -> dict:
    return {
        "id": run.pk,
        "kind": run.kind,
        "customer": run.customer.domain,
        "status": run.status,
        "requested_via": run.requested_via,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "duration": run.duration,
        "progress": {"done": run.progress_done, "total": run.progress_total, "message": run.progress_message},
        "error": run.error,
        "result": run.result,
    }


def follow_run(run: Run, command=None, *, timeout: float, poll: float = 0.3, done=None) -> Run:
    """Wait for the run to end, echoing its log lines to stderr as they arrive.

    `done` (a threading.Event set when a foreground run's thread ends) lets the wait end at once instead of
    at the next poll."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    last_seq = 0
    hinted = lost = False
    while True:
        try:
            for line in RunLogLine.objects.filter(run=run, seq__gt=last_seq).order_by("seq"):
                sys.stderr.write(f"[{line.level}] {line.text}\n")
                last_seq = line.seq
            run.refresh_from_db()
        except DB_LOST as exc:
            # The run itself goes on (an undo records itself locally and is reconciled later): keep waiting.
            if not lost:
                sys.stderr.write(f"the control database does not answer ({str(exc).strip()[:200]}); waiting\n")
                lost = True
            with contextlib.suppress(Exception):
                connection.close()
            if (done is not None and done.is_set()) or time.monotonic() > deadline:
                sys.stderr.write(f"run #{run.pk} is recorded in its local journal; it is reconciled once the "
                                 "control database answers again (by the reaper)\n")
                return run
            time.sleep(poll * 3)
            continue
        if run.status in Run.TERMINAL:
            for line in RunLogLine.objects.filter(run=run, seq__gt=last_seq).order_by("seq"):
                sys.stderr.write(f"[{line.level}] {line.text}\n")
            return run
        if run.status == Run.Status.PENDING and not hinted and time.monotonic() - started > NO_WORKER_HINT_AFTER:
            sys.stderr.write("still pending: is a worker running (`manage.py qcluster`)?\n")
            hinted = True
        if time.monotonic() > deadline:
            sys.stderr.write(f"gave up waiting after {timeout:g} s; run #{run.pk} is {run.status}\n")
            return run
        if done is not None:
            done.wait(poll)
        else:
            time.sleep(poll)


# --- a run executed in this process (a management command in the foreground): the run executes in a thread (its
# own database connection) while the caller follows its stored log, exactly as a worker's run would be followed.
# Ctrl-C asks the run to cancel and waits for it to stop cleanly.
def execute_in_foreground(run: Run, *, timeout: float = 24 * 3600) -> Run:
    finished = threading.Event()

    def target():
        try:
            run_execute(run.pk)
        finally:
            connection.close()
            finished.set()

    thread = threading.Thread(target=target, name=f"run-{run.pk}")
    thread.start()
    try:
        run = follow_run(run, None, timeout=timeout, done=finished)
    except KeyboardInterrupt:
        run_cancel(Run.objects.get(pk=run.pk), via="cli")
        thread.join()
        run.refresh_from_db()
        return run
    thread.join()
    with contextlib.suppress(*DB_LOST):  # still away: the run stays as last seen (follow_run said why)
        run.refresh_from_db()
    return run


def add_run_arguments(parser) -> None:
    """The options of every command that starts an operation: it runs in the foreground (its log on stderr)
    unless --enqueue hands it to the workers; --wait then follows the worker's run to its end."""
    parser.add_argument("--enqueue", action="store_true", help="hand it to the workers and return at once")
    parser.add_argument("--wait", action="store_true", help="with --enqueue: wait for a worker to finish it")


def enqueued_or_run_here(command, run: Run, *, enqueue: bool, what: str, wait: bool = False) -> Run | None:
    """`--enqueue`: report the queued run (JSON: the run) and return None, or with `wait` follow the worker's run
    and return it finished. Otherwise execute the run here, its log on stderr, and return it finished."""
    if enqueue and wait:
        return follow_run(run, command, timeout=24 * 3600)
    if enqueue:
        if command.json_output:
            command.emit(run_document(run))
        else:
            command.stdout.write(f"{what} queued as run #{run.pk}")
        return None
    return execute_in_foreground(run)


def run_in_command(command, run: Run, *, enqueue: bool, what: str, done_text, wait: bool = False) -> Run | None:
    """The end of a command that started a run (see enqueued_or_run_here); a finished run is printed (JSON) or
    `done_text(run)`, exit 1 unless it succeeded."""
    run = enqueued_or_run_here(command, run, enqueue=enqueue, what=what, wait=wait)
    if run is None:
        return None
    doc = run_document(run)
    if run.status != Run.Status.SUCCEEDED:
        command.fail(f"{what} {run.status}: {run.error or 'it has not finished'}", doc)
    if command.json_output:
        command.emit(doc)
    else:
        command.stdout.write(done_text(run))
    return run
