"""Concurrency slots in the control database: at most N holders of a key at once, across every worker machine.

Two kinds of key today:

- `host:<host key>`: backups on one customer host (KASA_MAX_BACKUPS_PER_HOST), held around each backup — a
  backup run's, or the safety backup a restore or an upgrade takes;
- `worker:<worker name>`: runs one worker machine executes at once (KASA_MAX_RUNS_PER_WORKER), held by
  `operations.services.run_execute` from before the claim to the run's end.

A slot is a `SlotLease` row (key, n) with 0 <= n < N under a unique constraint: taking one is an INSERT that the
database refuses when another process, on any machine, took that slot first, so the holders never exceed N
(PostgreSQL and SQLite alike; no row lock held while a backup runs). It is released in `finally`. A lease whose run
is no longer running — its worker was killed, so no `finally` ran — is removed by the reaper when it fails the run,
or by an acquirer that finds the slots full (`reclaim`): the holder's run has ended, its heartbeat is stale, its
process was on this worker and is gone, or it never started.

These replace the flock files of `engines.slots`: a flock is per machine, so two worker machines would each have
allowed N backups on the same customer host. Nothing else needed a machine-local slot: the scratch space a
backup uses on the worker is bounded by the worker's own slots.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from .models import Run, SlotLease
from .offline import DB_LOST

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class SlotsBusy(Exception):
    """Every slot of the key is held and the caller asked not to wait."""


def node_name() -> str:
    """The machine this process runs on (its kernel node name)."""
    return os.uname().nodename


def host_key(customer) -> str:
    """The host a customer's operations work on, which KASA_MAX_BACKUPS_PER_HOST limits.

    A customer on a remote host (hosts.Host) is keyed by that host's name: every worker machine that serves it
    counts against the same slots. A customer on `local` lives on "the machine of the worker that serves it" (its
    root under KASA_CUSTOMERS_ROOT there), so the key is that machine's node name and two workers on one machine
    share its slots. With several worker machines, a `local` customer is served wherever its root is reachable
    (one machine, or a folder they share); see README, "Several workers".
    """
    host = getattr(customer, "host", None)  # hosts sits above operations: read, never imported
    if host is not None and not host.is_local:
        return f"host:{host.name}"
    return f"local:{node_name()}"


def worker_name() -> str:
    return settings.KASA_WORKER_NAME


def worker_id() -> str:
    """This process as a run records it: `<worker name>:<pid>`."""
    return f"{worker_name()}:{os.getpid()}"


def split_worker(worker: str) -> tuple[str, int | None]:
    """(`name`, pid) of a `name:pid` worker id; a pending run's bare name gives (name, None)."""
    name, sep, pid = worker.rpartition(":")
    if sep and pid.isdigit():
        return name, int(pid)
    return worker, None


def host_slot(customer) -> str:
    return f"host:{host_key(customer)}"


def worker_slot(name: str | None = None) -> str:
    return f"worker:{name or worker_name()}"


# --- taking and giving back --------------------------------------------------------------------------------------
def try_acquire(key: str, count: int, run_id: int) -> SlotLease | None:
    """Take a free slot of `key` for the run, or None when all `count` are held."""
    count = max(int(count), 1)
    held = set(SlotLease.objects.filter(key=key).values_list("n", flat=True))
    if len(held) >= count:  # (a worker configured with a larger N may hold n >= count: those count too)
        return None
    for n in range(count):
        if n in held:
            continue
        try:
            with transaction.atomic():
                return SlotLease.objects.create(key=key, n=n, run_id=run_id, worker=worker_id())
        except IntegrityError:  # another process, perhaps on another machine, took it first
            continue
    return None


def release(lease: SlotLease | None) -> None:
    if lease is None:
        return
    try:
        SlotLease.objects.filter(pk=lease.pk).delete()
    except DB_LOST:
        # The database does not answer: the lease goes once its run has ended (reclaim, or the reaper).
        log.warning("slot %s of run %s could not be released now; it is reclaimed once the run has ended",
                    lease.key, lease.run_id)


def release_run(run_id: int) -> int:
    """Every slot the run still holds (its end, or the reaper failing it)."""
    return SlotLease.objects.filter(run_id=run_id).delete()[0]


def reclaim(key: str) -> list[int]:
    """Remove the leases of `key` whose holder can no longer be using them; returns their runs.

    A lease is stale when its run has ended (its worker died before its `finally`), when its run is running with a
    heartbeat older than KASA_RUN_STALE_AFTER (the reaper is about to fail it), when it was taken by a process of
    this worker that no longer exists (a PID means something only on its own machine), or when its run never
    started although the lease is older than KASA_RUN_STALE_AFTER (its process died between lease and claim).
    """
    cutoff = timezone.now() - timezone.timedelta(seconds=settings.KASA_RUN_STALE_AFTER)
    gone = []
    for lease in SlotLease.objects.filter(key=key).select_related("run"):
        run = lease.run
        stale = (run.status in Run.TERMINAL
                 or (run.status == Run.Status.RUNNING and (run.heartbeat_at is None or run.heartbeat_at < cutoff))
                 or (run.status == Run.Status.PENDING and lease.acquired_at < cutoff)
                 or _own_process_gone(lease.worker))
        if stale and SlotLease.objects.filter(pk=lease.pk).delete()[0]:
            log.warning("slot %s %s of run #%s (%s, %s) reclaimed: its holder is gone", key, lease.n, run.pk,
                        lease.worker, run.status)
            gone.append(run.pk)
    return gone


def _own_process_gone(worker: str) -> bool:
    name, pid = split_worker(worker)
    return name == worker_name() and pid is not None and not pid_alive(pid)


@contextlib.contextmanager
def hold(key: str, count: int, run_id: int, *, wait: bool = True, poll: float = POLL_SECONDS,
         on_wait: Callable[[float], None] | None = None) -> Iterator[int]:
    """Hold one of `count` slots of `key` for the run during the block; yields its number (0-based).

    All held: reclaim the stale ones; still all held: with wait=False raise SlotsBusy, otherwise try again every
    `poll` seconds. `on_wait(seconds_waited)` is called before each pause (first with 0.0): to log "waiting" once
    and to check for a cancel; an exception it raises ends the wait (no slot is held then).
    """
    started = None
    while True:
        lease = try_acquire(key, count, run_id)
        if lease is None and reclaim(key):
            lease = try_acquire(key, count, run_id)
        if lease is not None:
            break
        if not wait:
            raise SlotsBusy(f"all {max(int(count), 1)} slot(s) of {key} are in use")
        waited = 0.0 if started is None else time.monotonic() - started
        started = started or time.monotonic()
        if on_wait is not None:
            on_wait(waited)
        time.sleep(poll)
    try:
        yield lease.n
    finally:
        release(lease)


def in_use(key: str) -> int:
    """How many slots of `key` are held right now (status pages, tests)."""
    return SlotLease.objects.filter(key=key).count()


def holders(key: str) -> list[SlotLease]:
    return list(SlotLease.objects.filter(key=key).order_by("n"))


def pid_alive(pid: int) -> bool:
    """A process of this machine exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed worker stays a zombie until its parent (qcluster) reaps it: dead all the same.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def stale_leases() -> Q:
    """Leases whose run has ended (for the reaper's sweep)."""
    return Q(run__status__in=Run.TERMINAL)
