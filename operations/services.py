"""Service functions for runs: the only code that creates or moves them.

Admin actions, management commands and tasks call these; nothing else writes
Run.status.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.tasks import async_task

from audit.models import AuditEntry
from audit.services import audit_record
from core import permissions, sentry

from . import live, reconcile, registry, slots
from .context import OperationError, RunCancelled, RunContext, RunLost
from .models import Run, WorkerBeat
from .offline import DB_LOST

log = logging.getLogger(__name__)

LOST_RECHECK_SECONDS = 1.0
WORKER_DIED = "worker died: the task was delivered again while this run was still running; not repeated"


class OperationRefused(Exception):
    """A run could not be started; the message says why, for humans."""


class _NoLongerPending(Exception):
    """A run waiting for a worker slot was cancelled (or failed) meanwhile."""


def worker_id() -> str:
    return slots.worker_id()


def user_can_operate(user, customer) -> bool:
    return permissions.may_see(user, customer)


def run_start(customer, *, kind: str, requested_by=None, via: str = "admin", params: dict | None = None,
              enqueue: bool = True, permission: str | None = None) -> Run:
    """Create a pending run and enqueue it (on commit) with only its primary key.

    requested_by must be in the customer's team and hold the kind's permission (core.permissions.RUN_KINDS,
    or `permission` when the caller knows better: an install); None is the shell user (CLI, schedules).

    enqueue=False is for a command that executes the run in the foreground
    itself (run_execute in its own process): queuing it too would make a
    worker find it running and fail it as a redelivery.

    Refuses, with a message naming the blocking run, when the customer already
    has a mutating run (or a run of the same kind) pending or running.
    """
    spec = registry.get(kind)
    permission = permission or permissions.RUN_KINDS.get(kind)
    if permission is None:  # a kind nobody named a permission for: superusers only
        permissions.require_superuser(requested_by, f"start a {kind} run")
    else:
        permissions.require(requested_by, permission, customer)
    with transaction.atomic():
        active = Run.objects.active().filter(customer=customer)
        blocking = active.filter(Q(mutating=True) | Q(kind=kind)) if spec.mutating else active.filter(kind=kind)
        other = blocking.order_by("created_at").first()
        if other is not None:
            raise OperationRefused(_refusal(customer, kind, other))
        try:
            with transaction.atomic():
                run = Run.objects.create(
                    customer=customer, kind=kind, mutating=spec.mutating, requested_by=requested_by,
                    requested_via=via, params=params or {}, root=_changed_root(customer, spec, params),
                )
        except IntegrityError:
            # Lost a race with another request (or another run changes the same folder): a partial unique
            # index said no.
            other = Run.objects.active().filter(
                Q(customer=customer) | Q(mutating=True, root=_changed_root(customer, spec, params))
            ).order_by("created_at").first()
            raise OperationRefused(_refusal(customer, kind, other)) from None
        audit_record(action=f"run.{kind}.requested", source=_source(via), actor=requested_by, obj=run,
                     customer=customer, changes={"params": params or {}}, result="pending")
        if enqueue:
            transaction.on_commit(lambda: enqueue_run(run.pk))
    return run


def _changed_root(customer, spec, params: dict | None) -> str:
    """The folder a mutating run changes (a copy's --to-root, else the customer's root): one mutating run at a
    time per folder, whichever customer it belongs to."""
    if not spec.mutating:
        return ""
    root = str((params or {}).get("to_root") or customer.root)
    # A path names a folder of one machine: the same path on two hosts is two folders, which two runs may change
    # at once. (local keeps the bare path, as before hosts: its journals record it.)
    return root if customer.host.is_local else f"{customer.host.name}:{root}"


def _refusal(customer, kind: str, other: Run | None) -> str:
    if other is None:
        return f"cannot start {kind} on {customer}: another operation is in progress"
    return (
        f"cannot start {kind} on {customer}: {other.get_kind_display().lower()} #{other.pk} is "
        f"{other.status} (requested {other.created_at:%Y-%m-%d %H:%M:%S} UTC); wait for it to finish or cancel it"
    )


def _source(via: str) -> str:
    return via if via in AuditEntry.Source.values else AuditEntry.Source.SYSTEM


def enqueue_run(run_id: int) -> None:
    async_task("operations.tasks.execute_run", run_id, task_name=f"run-{run_id}", group="runs")


def run_execute(run_id: int) -> str:
    """Worker entry point. Claims the run, executes its handler once, records the end.

    At-least-once delivery means this may be called again for the same run:
    - still pending: take one of this worker's slots (KASA_MAX_RUNS_PER_WORKER, in the control database: a
      worker's queued runs and the foreground commands on its machine share them), claim the run (conditional
      UPDATE) and execute;
    - running: a previous delivery's worker died mid-way. Mark it failed and
      never execute it again (a half-done restore must not be repeated blindly);
    - anything else: already finished; do nothing.

    An undo that went on without the control database ends offline: its end is in the run's local journal, and
    this worker records it as soon as the database answers again (operations.reconcile.settle).
    """
    run = Run.objects.select_related("customer").filter(pk=run_id).first()
    if run is None:
        log.warning("run %s does not exist (deleted?); nothing to do", run_id)
        return "missing"
    if run.status != Run.Status.PENDING:
        return _not_pending(run)

    def waiting(waited: float) -> None:
        if waited == 0:  # said once, in the run's own log: the admin and a foreground command show why it waits
            RunContext(run).info(f"waiting for worker {slots.worker_name()}: its "
                                 f"{settings.KASA_MAX_RUNS_PER_WORKER} run slot(s) are in use")
        if not Run.objects.filter(pk=run_id, status=Run.Status.PENDING).exists():
            raise _NoLongerPending()

    try:
        with slots.hold(slots.worker_slot(), settings.KASA_MAX_RUNS_PER_WORKER, run.pk, on_wait=waiting):
            return _claim_and_execute(run)
    except _NoLongerPending:
        run.refresh_from_db()
        return _not_pending(run)


def _not_pending(run: Run) -> str:
    """A delivery that found the run already claimed: a dead worker's (fail it, never repeat it) or finished."""
    if run.status == Run.Status.RUNNING:
        if reconcile.held(run.pk):
            return "still running"  # its worker is alive on this host (perhaps undoing offline)
        outcome = _fail_gone(run, WORKER_DIED)
        if outcome == "reconciled":
            return outcome
        if outcome == "failed":
            _notify_end(run)
        return "redelivered"
    return f"already {run.status}"


def _claim_and_execute(run: Run) -> str:
    if not run.start(worker_id(), host=slots.host_key(run.customer)):
        return _not_pending(run)

    ctx = RunContext(run)
    # Events sent while it runs name the run and its customer, and its secrets are scrubbed from them.
    with sentry.run_scope(run, ctx.secrets):
        return _execute(run, ctx)


def _execute(run: Run, ctx: RunContext) -> str:
    run_id = run.pk
    ctx.start_heartbeat()
    try:
        ctx.info(f"{run.get_kind_display()} of {run.customer} started on {run.worker}")
        for guard in registry.guards():  # e.g. the customer's folders are still its own (customers.operations)
            guard(ctx)
        handler = registry.handler(run.kind)
        result = handler(ctx) or {}
        _end(ctx, Run.Status.SUCCEEDED, result=result)
    except RunLost as exc:
        log.warning("run %s: %s", run_id, exc)
    except RunCancelled as exc:
        _end(ctx, Run.Status.CANCELLED, error=str(exc))
    except OperationError as exc:
        _end(ctx, Run.Status.FAILED, error=str(exc), result=exc.result)
        sentry.report_failed_run(run, ctx.mask(str(exc)))
    except Exception as exc:  # a bug or an unexpected environment: keep the traceback in the log
        log.exception("run %s crashed", run_id)  # with SENTRY_DSN, an event with the traceback
        _end(ctx, Run.Status.FAILED, error=f"internal error: {type(exc).__name__}: {exc}", exc=exc)
    finally:
        if ctx.offline:  # the heartbeat goes on while we wait for the database
            reconcile.settle(ctx)
        ctx.stop_heartbeat()
        reconcile.release(ctx)  # the local journal goes once everything is in the database
        if not ctx.offline:
            run.refresh_from_db()
            if not ctx.ended_offline:  # reconciliation wrote the audit entry
                audit_record(action=f"run.{run.kind}.finished", source=AuditEntry.Source.WORKER, obj=run,
                             customer=run.customer, actor_repr=f"worker:{run.worker}",
                             result=(run.status + (f": {run.error}" if run.error else ""))[:300])
            _notify_end(run)
    return "offline" if ctx.offline else run.status


def _end(ctx: RunContext, status: str, *, error: str = "", result: dict | None = None,
         exc: BaseException | None = None) -> None:
    """Record how the run ended. A run with a local journal whose end cannot reach the control database (its undo
    went on offline, or the database went away since) keeps the end there, for reconciliation."""
    run = ctx.run
    if not ctx.offline:
        try:
            if status == Run.Status.SUCCEEDED:
                if run.succeed(result):
                    ctx.info("succeeded")
            elif status == Run.Status.CANCELLED:
                if run.cancel(expect=(Run.Status.RUNNING,), error=error):
                    ctx.warning(f"cancelled: {error}")
            elif run.fail(error, result=result):
                if exc is not None:
                    ctx.log_exception(exc)
                else:
                    ctx.error(f"failed: {error}")
            return
        except DB_LOST:
            if ctx.local is None:
                raise
            ctx.offline = True
            ctx.local.go_offline("the run's end could not be recorded")
    ctx.local.set_outcome(status, ctx.mask(error), result)
    ctx.ended_offline = True
    if exc is not None:
        ctx.log_exception(exc)
    elif status == Run.Status.FAILED:
        ctx.error(f"failed: {error}")
    elif status == Run.Status.CANCELLED:
        ctx.warning(f"cancelled: {error}")
    else:
        ctx.info("succeeded")


def _notify_end(run: Run) -> None:
    live.notify(run.pk)
    for hook in registry.end_hooks():  # e.g. a rollout waiting for this upgrade ticks at once (rollouts.tasks)
        try:
            hook(run)
        except Exception:  # noqa: BLE001  (the run has ended whatever a listener does)
            log.exception("end hook of run %s failed", run.pk)


def run_cancel(run: Run, *, requested_by=None, via: str = "admin") -> bool:
    """Cancel a pending run at once; ask a running one to stop at its next step."""
    permissions.require(requested_by, permissions.CANCEL, run.customer)
    who = requested_by.get_username() if requested_by else via
    if run.cancel(error=f"cancelled by {who} before it started"):
        done = True
    else:
        done = bool(Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING, cancel_requested_at=None)
                    .update(cancel_requested_at=timezone.now()))
    audit_record(action=f"run.{run.kind}.cancel", source=_source(via), actor=requested_by, obj=run,
                 customer=run.customer, result="requested" if done else f"not cancellable ({run.status})")
    live.notify(run.pk)
    return done


def runs_reap(*, stale_after: int | None = None) -> list[int]:
    """Fail the runs whose worker is gone, on any machine, and reconcile the local journals left on this one.

    Gone means: no heartbeat for `stale_after` seconds (the only sign a reaper has of another machine's worker:
    it never judges another worker's runs by PIDs or journals, which mean something only on their own machine);
    or, for this worker's own runs, its process no longer exists or it left a local journal that nobody holds. A
    run whose local journal a live process of this machine still holds (a worker undoing without the control
    database, or waiting for it to record the end) is never reaped.

    A failed run's slots are freed at once. Its cleanup (the kind's on_abandon: a backup's partial objects, a
    restore's or upgrade's undo) runs here when this worker reaches the run's host, or the kind's cleanup touches
    only shared storage; otherwise it is owed (`Run.abandon_host`) and done by the next reaper on that host, from
    the local journal there. Pending runs whose task was lost with a worker (Redis has no delivery receipts) are
    failed too. Returns the runs it failed or reconciled.
    """
    stale_after = stale_after or settings.KASA_RUN_STALE_AFTER
    cutoff = timezone.now() - timezone.timedelta(seconds=stale_after)
    reaped = _owed_abandons()  # runs failed by another machine's reaper whose undo waits for this host
    # Then the journals whose worker finished its undo offline: their run ends as that worker recorded it.
    reaped += reconcile.sweep()
    me = slots.worker_name()
    for run in Run.objects.filter(status=Run.Status.RUNNING).select_related("customer"):
        if reconcile.held(run.pk):
            continue
        name, pid = slots.split_worker(run.worker)
        mine = name == me
        reason = None
        if run.heartbeat_at is None or run.heartbeat_at < cutoff:
            reason = f"worker lost: no heartbeat from {run.worker or 'unknown worker'} for over {stale_after} s"
        elif mine and pid is not None and not slots.pid_alive(pid):
            reason = f"worker lost: process {run.worker} no longer exists"
        elif mine and reconcile.orphaned(run.pk):
            reason = f"worker lost: {run.worker or 'its worker'} left its local journal and no process holds it"
        if not reason:
            continue
        outcome = _fail_gone(run, reason)
        if outcome == "failed":
            audit_record(action=f"run.{run.kind}.reaped", source=AuditEntry.Source.SYSTEM, obj=run,
                         customer=run.customer, actor_repr=f"reaper:{me}", result=reason)
            live.notify(run.pk)
        if outcome:
            reaped.append(run.pk)
    reaped += _lost_tasks(stale_after)
    slots.SlotLease.objects.filter(slots.stale_leases()).delete()  # leases of runs that ended without a finally
    return reaped


def _fail_gone(run: Run, reason: str) -> str | None:
    """A running run whose worker is gone (reaper, redelivery): "reconciled" when that worker had recorded its end
    in its local journal here, "failed" when this call failed it, None when someone else ended it first.

    The kind's cleanup runs here when this worker reaches the run's host (the dead worker's local journal, read
    first, is at least as new as the run's `result`) or when the cleanup touches only shared storage; otherwise it
    is owed to the host (`abandon_host`, set in the same UPDATE as the failure) and done there (_owed_abandons)."""
    here = _reaches(run)
    doc = None
    if here:
        done, doc = reconcile.take_over(run)  # what the dead worker logged offline goes in first
        if done:
            slots.release_run(run.pk)
            return "reconciled"
    owed = "" if here or registry.abandon_anywhere(run.kind) or registry.abandon_hook(run.kind) is None else run.host
    if not run.fail(reason, abandon_host=owed):
        return None
    slots.release_run(run.pk)
    ctx = RunContext(run)
    ctx.error(reason)
    if owed:
        ctx.warning(f"the cleanup of what it changed waits for a worker on {owed}, where its journal is: this worker "
                    f"({slots.worker_name()}) does not reach that host")
    else:
        _abandon(run, ctx, doc)
    return "failed"


def _reaches(run: Run) -> bool:
    """This worker works on the run's host (today: `local` on the same machine; a run claimed before hosts were
    recorded is taken to be local)."""
    return not run.host or run.host == slots.host_key(run.customer)


def _owed_abandons() -> list[int]:
    """Cleanups another machine's reaper could not do (its run's host is this one): claimed one at a time with a
    conditional UPDATE, then done from the local journal here when there is one."""
    done = []
    for run in Run.objects.filter(status=Run.Status.FAILED).exclude(abandon_host="").select_related("customer"):
        if run.abandon_host != slots.host_key(run.customer):
            continue
        if not Run.objects.filter(pk=run.pk, abandon_host=run.abandon_host).update(abandon_host=""):
            continue  # another reaper of this host took it
        _taken, doc = reconcile.take_over(run)
        run.refresh_from_db()
        ctx = RunContext(run)
        ctx.info(f"the cleanup owed since the run failed is done now by {slots.worker_name()}, on its host")
        _abandon(run, ctx, doc)
        live.notify(run.pk)
        done.append(run.pk)
    return done


def _lost_tasks(stale_after: int) -> list[int]:
    """Pending runs whose task no worker holds any more: one a worker took off the Redis queue (operations.broker)
    and that worker stopped beating or restarted since; or one no worker took that is no longer in the Redis list
    either. Without this a lost task would leave the run pending for good, refusing the customer's next backup."""
    now = timezone.now()
    cutoff = now - timezone.timedelta(seconds=stale_after)
    beats = {b.name: b for b in WorkerBeat.objects.all()}
    lost = []
    for run in Run.objects.filter(status=Run.Status.PENDING, created_at__lt=cutoff).exclude(worker=""):
        beat = beats.get(run.worker)
        if beat is not None and beat.seen_at >= cutoff and (run.heartbeat_at is None
                                                            or beat.started_at <= run.heartbeat_at):
            continue  # in a live worker's hands (perhaps waiting for one of its slots)
        why = ("stopped beating" if beat is None or beat.seen_at < cutoff else "restarted since")
        lost += _fail_lost(run, f"task lost: worker {run.worker} took it off the queue and {why} before it "
                                f"started; not started")
    queued = _queued_run_ids()
    if queued is None:
        return lost
    gone = [r for r in Run.objects.filter(status=Run.Status.PENDING, worker="", created_at__lt=cutoff)
            if r.pk not in queued]
    if gone:
        # A worker may have popped one an instant before the list was read and be writing its name now: look again
        # a moment later (the failure's condition on the empty name covers a mark that lands before it, too).
        time.sleep(LOST_RECHECK_SECONDS)
        queued = _queued_run_ids()
        for run in gone:
            if run.pk not in queued:
                lost += _fail_lost(run, "task lost: no worker took it and it is no longer in the queue; not started")
    return lost


def _queued_run_ids() -> set[int] | None:
    """The runs whose task waits in the broker, when the broker can tell (Redis); None otherwise (the ORM broker
    keeps every task until acknowledged and delivers it again)."""
    broker = get_broker()
    lister = getattr(broker, "queued_run_ids", None)
    return lister() if lister is not None else None


def _fail_lost(run: Run, reason: str) -> list[int]:
    # The worker's name stays in the condition: a run taken meanwhile by another delivery is not failed.
    if not Run.objects.filter(pk=run.pk, status=Run.Status.PENDING, worker=run.worker).update(
            status=Run.Status.FAILED, error=reason, finished_at=timezone.now()):
        return []
    run.refresh_from_db()
    slots.release_run(run.pk)
    RunContext(run).error(reason)
    audit_record(action=f"run.{run.kind}.reaped", source=AuditEntry.Source.SYSTEM, obj=run, customer=run.customer,
                 actor_repr=f"reaper:{slots.worker_name()}", result=reason)
    _notify_end(run)
    return [run.pk]


def _abandon(run: Run, ctx: RunContext, local_doc: dict | None = None) -> None:
    """Let the kind clean up after a handler that died (partial artifacts, a journal to undo). `local_doc`: the
    dead worker's local journal, written before its copy in `result`, so never behind it."""
    hook = registry.abandon_hook(run.kind)
    try:
        if hook is None:
            return
        if local_doc is not None and local_doc != run.result:
            ctx.info("the run's journal is taken from its local journal, which is ahead of the control database")
            run.result = local_doc
        try:
            hook(run, ctx)
        except Exception as exc:  # cleanup trouble must not hide the failure itself
            log.exception("cleanup of abandoned run %s failed", run.pk)
            ctx.error(f"cleanup after the dead worker failed: {exc}")
    finally:
        reconcile.release(ctx)  # went offline meanwhile: the file stays, the next pass reconciles it
