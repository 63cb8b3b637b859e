"""Service functions of rollouts: what the CLI, the admin and the scheduler call. Nothing else changes a rollout.

    rollout_create(plan, …)        -> Rollout (scheduled: its waves and targets written; the driver starts it)
    rollout_pause / rollout_resume / rollout_promote / rollout_promote_all / rollout_abort / rollout_retry
                                    -> Rollout (each audited; refused with RolloutError when it cannot apply)

Every control is a conditional UPDATE on the rollout's status (Rollout.transition), so a person and a driver's
tick never both win; the driver (rollouts.driver) reads the result on its next tick.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.models import AuditEntry
from audit.services import audit_record
from core import permissions
from customers.models import Customer
from engines import rolloutplan
from upgrades.models import Upgrade

from . import live
from .models import Rollout, RolloutTarget, RolloutWave
from .planning import Plan

PROMOTE_ALL_CONFIRMATION = "promote all"


class RolloutError(ValueError):
    """A request that cannot apply; the message says why and that nothing changed."""


def _source(via: str) -> str:
    return via if via in AuditEntry.Source.values else AuditEntry.Source.SYSTEM


def _audit(rollout: Rollout, action: str, *, actor, via: str, result: str = "", changes: dict | None = None):
    audit_record(action=f"rollout.{action}", source=_source(via), actor=actor, obj=rollout, changes=changes,
                 result=result[:300])
    live.notify(rollout.pk)  # every change of a rollout is audited: its open pages read it again


def rollout_create(plan: Plan, *, requested_by=None, via: str = "cli", concurrency: int = 2, max_failures: int = 0,
                   consecutive_errors: int = 4, on_failure: str = Rollout.OnFailure.HALT, health_gate: bool = True,
                   prometheus: dict | None = None, window: str = "", window_zone: str = "UTC",
                   strategy: str = Rollout.Strategy.IN_PLACE) -> Rollout:
    """Write the rollout with its waves and targets, status scheduled. Refused when nobody is selected, or when
    a selected customer is in another active rollout (the database's one_active_rollout constraint decides)."""
    permissions.require(requested_by, permissions.ROLLOUT)
    if not plan.members:
        raise RolloutError(f"no customer to roll {plan.release.name} out to ({len(plan.skipped)} skipped); nothing "
                           "was started")
    if concurrency < 1 or concurrency > 50:
        raise RolloutError("concurrency must be between 1 and 50")
    if on_failure not in Rollout.OnFailure.values:
        raise RolloutError(f"on-failure must be {' or '.join(Rollout.OnFailure.values)}")
    if strategy not in Rollout.Strategy.values:
        raise RolloutError(f"strategy must be {' or '.join(Rollout.Strategy.values)}")
    win = rolloutplan.parse_window(window, window_zone or "UTC")
    gates = {"health": bool(health_gate)}
    if prometheus:
        gates["prometheus"] = _prometheus_gate(prometheus)
    try:
        with transaction.atomic():
            rollout = Rollout.objects.create(
                release=plan.release, selection=plan.selection, strategy=strategy, percents=plan.percents,
                concurrency=concurrency, max_failures=max_failures, consecutive_errors=max(consecutive_errors, 1),
                on_failure=on_failure, gates=gates, window_start=win.start if win else None,
                window_end=win.end if win else None, window_zone=win.zone if win else "UTC", skipped=plan.skipped,
                status=Rollout.Status.DRAFT, requested_by=requested_by, requested_via=via)
            for i, members in enumerate(plan.waves):
                wave = RolloutWave.objects.create(rollout=rollout, position=i + 1, percent=plan.percents[i],
                                                  bake_seconds=plan.bakes[i])
                RolloutTarget.objects.bulk_create([
                    RolloutTarget(rollout=rollout, wave=wave, customer=c, position=j,
                                  from_versions=dict(c.versions or {}))
                    for j, c in enumerate(members)])
            rollout.transition(Rollout.Status.SCHEDULED, expect=(Rollout.Status.DRAFT,))
            _audit(rollout, "created", actor=requested_by, via=via, result=f"{len(plan.members)} customers",
                   changes=plan.document())
    except IntegrityError:
        busy = (RolloutTarget.objects.filter(customer__in=plan.members, active=True)
                .select_related("customer", "rollout").first())
        where = f": {busy.customer} is in rollout #{busy.rollout_id}" if busy else ""
        raise RolloutError(f"a customer may be in one active rollout at a time{where}; nothing was started") from None
    return rollout


def _prometheus_gate(spec: dict) -> dict:
    query = str(spec.get("query") or "").strip()
    op = str(spec.get("op") or "<").strip()
    if not query:
        raise RolloutError("a Prometheus gate needs a query")
    if op not in ("<", "<=", ">", ">=", "==", "!="):
        raise RolloutError(f"a Prometheus gate's comparison is one of < <= > >= == != (got {op!r})")
    try:
        threshold = float(spec.get("threshold"))
    except (TypeError, ValueError):
        raise RolloutError("a Prometheus gate needs a number as its threshold") from None
    return {"query": query, "op": op, "threshold": threshold}


def parse_prometheus(text: str) -> dict | None:
    """`QUERY OP THRESHOLD` as one string (the CLI's --prometheus), e.g. `sum(rate(errors[5m])) < 0.05`."""
    text = (text or "").strip()
    if not text:
        return None
    for op in ("<=", ">=", "==", "!=", "<", ">"):
        query, sep, threshold = text.rpartition(op)
        if sep and query.strip():
            return _prometheus_gate({"query": query.strip(), "op": op, "threshold": threshold.strip()})
    raise RolloutError("write the Prometheus gate as QUERY OP THRESHOLD, e.g. 'sum(rate(http_errors[5m])) < 0.05'")


# --- controls ---------------------------------------------------------------------------------------------------
def _control(rollout: Rollout, actor) -> None:
    permissions.require(actor, permissions.ROLLOUT_CONTROL)
    if actor is not None and rollout.targets.exclude(customer__in=Customer.objects.visible_to(actor)).exists():
        raise PermissionDenied("this rollout includes customers outside your teams")


def rollout_pause(rollout: Rollout, *, actor=None, via: str = "admin") -> Rollout:
    """No new upgrade starts; those running finish (each rolls back on its own failure)."""
    _control(rollout, actor)
    who = actor.get_username() if actor else via
    if not rollout.transition(Rollout.Status.PAUSED, expect=(Rollout.Status.PROGRESSING,),
                              paused_by=Rollout.PausedBy.OPERATOR, reason=f"paused by {who}"):
        raise RolloutError(f"rollout #{rollout.pk} is {rollout.status}: only a progressing rollout can be paused")
    _audit(rollout, "paused", actor=actor, via=via)
    return rollout


def rollout_resume(rollout: Rollout, *, actor=None, via: str = "admin") -> Rollout:
    """Go on from where it paused (an inconclusive gate is measured again)."""
    _control(rollout, actor)
    scheduled = rollout.status == Rollout.Status.SCHEDULED
    if scheduled or not rollout.transition(Rollout.Status.PROGRESSING, expect=(Rollout.Status.PAUSED,),
                                           paused_by="", reason=""):
        raise RolloutError(f"rollout #{rollout.pk} is {rollout.status}: only a paused rollout can be resumed")
    # An inconclusive gate is measured again from scratch.
    RolloutWave.objects.filter(rollout=rollout, state=RolloutWave.State.GATING).update(error_streak=0)
    _audit(rollout, "resumed", actor=actor, via=via)
    return rollout


def rollout_promote(rollout: Rollout, *, actor=None, via: str = "admin") -> Rollout:
    """End the current bake now: its final gates are taken at once. On a rollout paused by an inconclusive gate,
    a person accepts the wave without the missing data and the rollout goes on."""
    _control(rollout, actor)
    wave = current_wave(rollout)
    now = timezone.now()
    if rollout.status == Rollout.Status.PAUSED and rollout.paused_by == Rollout.PausedBy.INCONCLUSIVE and wave:
        with transaction.atomic():
            if not rollout.transition(Rollout.Status.PROGRESSING, expect=(Rollout.Status.PAUSED,), paused_by="",
                                      reason=""):
                raise RolloutError(f"rollout #{rollout.pk} changed meanwhile; look again")
            RolloutWave.objects.filter(pk=wave.pk).update(state=RolloutWave.State.SUCCEEDED, finished_at=now)
        _audit(rollout, "promoted", actor=actor, via=via, result=f"wave {wave.position} accepted without its data")
        return rollout
    if rollout.status != Rollout.Status.PROGRESSING or wave is None or wave.state != RolloutWave.State.BAKING:
        raise RolloutError(f"rollout #{rollout.pk} is not baking a wave: nothing to promote")
    RolloutWave.objects.filter(pk=wave.pk, state=RolloutWave.State.BAKING).update(bake_until=now)
    _audit(rollout, "promoted", actor=actor, via=via, result=f"wave {wave.position}: bake ended early")
    return rollout


def rollout_promote_all(rollout: Rollout, *, actor=None, via: str = "admin", confirmation: str = "") -> Rollout:
    """Skip every remaining bake and gate: the waves still go one after the other, each when the one before has
    upgraded. Asks for the words PROMOTE_ALL_CONFIRMATION."""
    _control(rollout, actor)
    if confirmation.strip().lower() != PROMOTE_ALL_CONFIRMATION:
        raise RolloutError(f"type {PROMOTE_ALL_CONFIRMATION!r} to skip every remaining bake and gate")
    if rollout.status not in (Rollout.Status.PROGRESSING, Rollout.Status.PAUSED, Rollout.Status.SCHEDULED):
        raise RolloutError(f"rollout #{rollout.pk} is {rollout.status}: nothing left to promote")
    Rollout.objects.filter(pk=rollout.pk).update(promote_all=True, updated_at=timezone.now())
    if rollout.status == Rollout.Status.PAUSED and rollout.paused_by != Rollout.PausedBy.WINDOW:
        rollout.transition(Rollout.Status.PROGRESSING, expect=(Rollout.Status.PAUSED,), paused_by="", reason="")
    rollout.refresh_from_db()
    _audit(rollout, "promoted_all", actor=actor, via=via)
    return rollout


def rollout_abort(rollout: Rollout, *, actor=None, via: str = "admin", revert: bool | None = None) -> Rollout:
    """Halt now: nothing more starts; running upgrades finish. With revert (default: the rollout's on_failure),
    every customer it upgraded is rolled back, newest first."""
    _control(rollout, actor)
    revert = rollout.on_failure == Rollout.OnFailure.REVERT if revert is None else revert
    who = actor.get_username() if actor else via
    if not rollout.transition(Rollout.Status.ABORTING, expect=(Rollout.Status.SCHEDULED, Rollout.Status.PROGRESSING,
                                                              Rollout.Status.PAUSED, Rollout.Status.HALTED),
                              reason=f"aborted by {who}" + (", rolling back" if revert else ""),
                              reverting=bool(revert)):
        raise RolloutError(f"rollout #{rollout.pk} is {rollout.status}: it cannot be aborted")
    _audit(rollout, "aborted", actor=actor, via=via, result="revert" if revert else "halt")
    return rollout


def rollout_retry(rollout: Rollout, *, actor=None, via: str = "admin") -> Rollout:
    """Start again from the first wave that is not wholly upgraded: its failed customers first (forced past the
    bad-release mark their rollback left), then the rest. Refused while a customer of it is quarantined."""
    _control(rollout, actor)
    if rollout.status not in (Rollout.Status.HALTED, Rollout.Status.ABORTED):
        raise RolloutError(f"rollout #{rollout.pk} is {rollout.status}: only a halted or aborted rollout can be "
                           "retried")
    if rollout.targets.filter(state__in=RolloutTarget.RUNNING).exists():
        raise RolloutError("upgrades or rollbacks of this rollout are still running: retry once they have ended")
    stuck = rollout.targets.filter(state=RolloutTarget.State.QUARANTINED,
                                   upgrade__in=Upgrade.objects.unresolved_quarantine()).select_related("customer")
    if stuck.exists():
        names = ", ".join(str(t.customer) for t in stuck[:5])
        raise RolloutError(f"quarantined customers must be resolved first: {names}; nothing was retried")
    first = (rollout.waves.filter(targets__state__in=[s for s in RolloutTarget.State.values
                                                      if s != RolloutTarget.State.UPGRADED])
             .order_by("position").first())
    if first is None:
        raise RolloutError("every customer of this rollout is upgraded: nothing to retry")
    try:
        with transaction.atomic():
            if not rollout.transition(Rollout.Status.PROGRESSING, expect=(rollout.status,), paused_by="", reason="",
                                      finished_at=None, reverting=False):
                raise RolloutError(f"rollout #{rollout.pk} changed meanwhile; look again")
            later = rollout.waves.filter(position__gte=first.position)
            later.update(state=RolloutWave.State.PENDING, started_at=None, upgraded_at=None, bake_until=None,
                         last_sample_at=None, error_streak=0, finished_at=None)
            rollout.targets.filter(wave__position__gte=first.position).exclude(
                state=RolloutTarget.State.UPGRADED).update(state=RolloutTarget.State.PENDING, error="",
                                                           started_at=None, finished_at=None)
            rollout.targets.update(active=True)
    except IntegrityError:
        raise RolloutError("a customer of this rollout is in another active rollout now; nothing was retried") \
            from None
    _audit(rollout, "retried", actor=actor, via=via, result=f"from wave {first.position}")
    return rollout


def current_wave(rollout: Rollout) -> RolloutWave | None:
    """The first wave that has not succeeded (None: all have)."""
    return rollout.waves.exclude(state=RolloutWave.State.SUCCEEDED).order_by("position").first()
