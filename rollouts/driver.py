"""Moves rollouts forward, one tick at a time: the worker's scheduler (rollouts.tasks) ticks every active rollout,
an upgrade run that ends ticks its own, and a foreground `rollout start` ticks in a loop. A tick reads every
fact from rows (targets from their own Upgrade rows, never a cached status), does what is due and writes it
down, so a rollout survives any restart and two ticks never act at once (a lease taken by conditional UPDATE).

Per wave: upgrading (at most `concurrency` upgrades at once; the failures gate is watched as they end) →
baking (the gates sampled every KASA_ROLLOUT_SAMPLE_SECONDS until bake_until) → gating (every gate once more;
all successful: the next wave). A failed gate, or `consecutive_errors` errors in a row, stops the rollout:
halted (nothing more starts; the upgraded stay) or, with on_failure=revert, aborting (the customers it upgraded
are rolled back, newest first). An inconclusive gate pauses it for a person. Outside its maintenance window it
starts nothing and pauses once nothing runs; the next tick inside the window resumes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from engines import rolloutplan
from operations.models import Run
from upgrades.models import Upgrade
from upgrades.selectors import last_succeeded, rollback_target
from upgrades.services import UpgradeInputError, rollback_start, upgrade_start

from . import gates, live, notify
from .models import GateResult, Rollout, RolloutTarget, RolloutWave

log = logging.getLogger(__name__)
S, W, T = Rollout.Status, RolloutWave.State, RolloutTarget.State
LEASE = timedelta(minutes=5)  # a tick that died holding the lease blocks the rollout this long at most
TICKED = (S.SCHEDULED, S.PROGRESSING, S.PAUSED, S.ABORTING, S.HALTED)
StartRun = Callable[[Run], None]


def advance(rollout_id: int, *, start_run: StartRun | None = None, via: str = "schedule") -> Rollout | None:
    """One tick of rollout `rollout_id`; None when another tick holds it or it has ended.

    start_run: how a new upgrade or rollback run gets executed (a foreground command runs it in a thread);
    None enqueues it for the workers."""
    now = timezone.now()
    claimed = Rollout.objects.filter(pk=rollout_id, status__in=TICKED).filter(
        Q(lease_until__isnull=True) | Q(lease_until__lt=now)).update(lease_until=now + LEASE)
    if not claimed:
        return None
    before = live.fingerprint(rollout_id)
    try:
        rollout = Rollout.objects.select_related("release", "requested_by").get(pk=rollout_id)
        tick = _Tick(rollout, start_run, via)
        tick.run()
        return tick.rollout
    finally:
        Rollout.objects.filter(pk=rollout_id).update(lease_until=None)
        if live.fingerprint(rollout_id) != before:  # the rollout's open pages read it again
            live.notify(rollout_id)


def window_of(rollout: Rollout) -> rolloutplan.Window | None:
    if rollout.window_start is None or rollout.window_end is None:
        return None
    return rolloutplan.Window(rollout.window_start, rollout.window_end, rollout.window_zone or "UTC")


class _Tick:
    def __init__(self, rollout: Rollout, start_run: StartRun | None, via: str):
        self.rollout, self.start_run, self.via = rollout, start_run, via
        self.now = timezone.now()

    def run(self) -> None:
        self.refresh_targets()
        for _ in range(20):  # a zero bake moves through several states in one tick
            status = self.rollout.status
            handler = {S.SCHEDULED: self.scheduled, S.PROGRESSING: self.progressing, S.PAUSED: self.paused,
                       S.ABORTING: self.aborting}.get(status)
            if handler is None or not handler():
                break
            self.rollout.refresh_from_db()

    # --- targets, from their own Upgrade rows ---------------------------------------------------------------
    def refresh_targets(self) -> None:
        for t in self.rollout.targets.filter(state__in=RolloutTarget.RUNNING).select_related("upgrade", "revert"):
            up = t.upgrade if t.state == T.UPGRADING else t.revert
            if up is None or up.status in (Upgrade.Status.PENDING, Upgrade.Status.RUNNING):
                continue
            if t.state == T.UPGRADING:
                new = {Upgrade.Status.SUCCEEDED: T.UPGRADED, Upgrade.Status.QUARANTINED: T.QUARANTINED}.get(
                    up.status, T.FAILED)
            else:
                new = T.REVERTED if up.status == Upgrade.Status.SUCCEEDED else T.REVERT_FAILED
            RolloutTarget.objects.filter(pk=t.pk, state=t.state).update(
                state=new, finished_at=up.finished_at or self.now,
                error="" if new in (T.UPGRADED, T.REVERTED) else (up.error or up.status)[:2000])

    def running(self, wave: RolloutWave | None = None) -> int:
        qs = self.rollout.targets.filter(state__in=RolloutTarget.RUNNING)
        return (qs.filter(wave=wave) if wave else qs).count()

    # --- states ----------------------------------------------------------------------------------------------
    def scheduled(self) -> bool:
        return self.rollout.transition(S.PROGRESSING, expect=(S.SCHEDULED,), started_at=self.now)

    def paused(self) -> bool:
        win = window_of(self.rollout)
        if self.rollout.paused_by == Rollout.PausedBy.WINDOW and (win is None or win.contains(self.now)):
            return self.rollout.transition(S.PROGRESSING, expect=(S.PAUSED,), paused_by="", reason="")
        return False

    def progressing(self) -> bool:
        r = self.rollout
        wave = r.waves.exclude(state=W.SUCCEEDED).order_by("position").first()
        if wave is None:
            if self.running():
                return False
            done = r.transition(S.COMPLETED, expect=(S.PROGRESSING,), reason="")
            if done:
                self.end_targets()
                notify.rollout_ended(r)
            return False
        win = window_of(r)
        if win is not None and not win.contains(self.now) and wave.state in (W.PENDING, W.UPGRADING):
            if not self.running():
                opens = win.next_opening(self.now)
                r.transition(S.PAUSED, expect=(S.PROGRESSING,), paused_by=Rollout.PausedBy.WINDOW,
                             reason=f"outside its window {win}; resumes at {opens:%Y-%m-%d %H:%M %Z}")
            return False  # nothing new starts outside the window
        return {W.PENDING: self.wave_pending, W.UPGRADING: self.wave_upgrading, W.BAKING: self.wave_baking,
                W.GATING: self.wave_gating}.get(wave.state, lambda w: False)(wave)

    def wave_pending(self, wave: RolloutWave) -> bool:
        stale = self.not_on_target(wave)
        if stale:
            self.stop(wave, f"before wave {wave.position}: {stale}")
            return False
        RolloutWave.objects.filter(pk=wave.pk, state=W.PENDING).update(state=W.UPGRADING, started_at=self.now)
        return True

    def not_on_target(self, wave: RolloutWave) -> str:
        """Why a customer of an earlier wave is not on the target release now ("" when all are), from its own
        last successful upgrade (a manual rollback since, or an upgrade to something else, counts)."""
        earlier = self.rollout.targets.filter(wave__position__lt=wave.position).select_related("customer")
        for t in earlier:
            if t.state != T.UPGRADED:
                continue  # a failure its wave's gate allowed (max_failures): not on the release, and known
            last = last_succeeded(t.customer)
            if last is None or last.pk != t.upgrade_id:
                what = f"{last.get_kind_display().lower()} #{last.pk}" if last else "nothing"
                return f"{t.customer} is no longer on {self.rollout.release} (its last successful change is {what})"
        return ""

    def wave_upgrading(self, wave: RolloutWave) -> bool:
        r = self.rollout
        if not r.promote_all:
            m = gates.failures(r, wave)
            if m.result == GateResult.Result.FAILED:
                self.record(wave, m, final=True)
                self.stop(wave, m.summary)
                return False
        if r.status != S.PROGRESSING:
            return False
        free = r.concurrency - self.running(wave)
        pending = list(wave.targets.filter(state=T.PENDING).select_related("customer")
                       .order_by("-attempts", "position"))
        for t in pending[:max(free, 0)]:
            self.start_upgrade(t)
        if self.running(wave) or wave.targets.filter(state=T.PENDING).exists():
            return False
        bake = 0 if r.promote_all else wave.bake_seconds
        RolloutWave.objects.filter(pk=wave.pk, state=W.UPGRADING).update(
            state=W.BAKING, upgraded_at=self.now, bake_until=self.now + timedelta(seconds=bake))
        return True

    def start_upgrade(self, t: RolloutTarget) -> None:
        customer = t.customer
        if Run.objects.active().filter(customer=customer).exists():
            RolloutTarget.objects.filter(pk=t.pk).update(error="waiting: another operation of this customer runs")
            return
        force = t.attempts > 0  # a retry: past the bad-release mark its own rollback left
        try:
            with transaction.atomic():
                run = upgrade_start(customer, self.rollout.release, requested_by=self.rollout.requested_by,
                                    via=self.via, force=force, enqueue=self.start_run is None,
                                    strategy=self.rollout.strategy)
                RolloutTarget.objects.filter(pk=t.pk, state=T.PENDING).update(
                    state=T.UPGRADING, upgrade=run.upgrade, attempts=t.attempts + 1, started_at=self.now,
                    finished_at=None, error="", from_versions=dict(customer.versions or {}))
        except (UpgradeInputError, PermissionDenied) as exc:  # refused (a bad-release mark, a permission)
            RolloutTarget.objects.filter(pk=t.pk, state=T.PENDING).update(
                state=T.FAILED, attempts=t.attempts + 1, finished_at=self.now, error=f"not started: {exc}"[:2000])
            return
        if self.start_run is not None:
            self.start_run(run)

    def wave_baking(self, wave: RolloutWave) -> bool:
        r = self.rollout
        if r.promote_all:
            return self.wave_done(wave)
        if wave.bake_until and self.now >= wave.bake_until:
            RolloutWave.objects.filter(pk=wave.pk, state=W.BAKING).update(state=W.GATING)
            return True
        every = timedelta(seconds=settings.KASA_ROLLOUT_SAMPLE_SECONDS)
        if wave.last_sample_at is None or self.now - wave.last_sample_at >= every:
            RolloutWave.objects.filter(pk=wave.pk).update(last_sample_at=self.now)
            return self.judge(wave, gates.measure(r, wave), final=False)
        return False

    def wave_gating(self, wave: RolloutWave) -> bool:
        if self.rollout.promote_all:
            return self.wave_done(wave)
        return self.judge(wave, gates.measure(self.rollout, wave), final=True)

    def judge(self, wave: RolloutWave, measured: list[gates.Measurement], *, final: bool) -> bool:
        """Record the measurements; stop on a failure or too many errors in a row, pause on an inconclusive
        final one; a final all-successful one ends the wave."""
        for m in measured:
            self.record(wave, m, final=final)
        results = {m.result for m in measured}
        R = GateResult.Result
        if R.FAILED in results:
            self.stop(wave, "; ".join(m.summary for m in measured if m.result == R.FAILED))
            return False
        if R.ERROR in results:
            streak = wave.error_streak + 1
            RolloutWave.objects.filter(pk=wave.pk).update(error_streak=streak)
            if streak >= self.rollout.consecutive_errors:
                errors = "; ".join(m.summary for m in measured if m.result == R.ERROR)
                self.stop(wave, f"{streak} gate measurements in a row could not be taken: {errors}")
            return False
        RolloutWave.objects.filter(pk=wave.pk).update(error_streak=0)
        if not final:
            return False
        if R.INCONCLUSIVE in results:
            why = "; ".join(m.summary for m in measured if m.result == R.INCONCLUSIVE)
            if self.rollout.transition(S.PAUSED, expect=(S.PROGRESSING,), paused_by=Rollout.PausedBy.INCONCLUSIVE,
                                       reason=f"wave {wave.position}: {why}"):
                notify.rollout_paused(self.rollout)
            return False
        return self.wave_done(wave)

    def wave_done(self, wave: RolloutWave) -> bool:
        return bool(RolloutWave.objects.filter(pk=wave.pk).exclude(state=W.SUCCEEDED).update(
            state=W.SUCCEEDED, finished_at=self.now))

    def record(self, wave: RolloutWave, m: gates.Measurement, *, final: bool) -> None:
        GateResult.objects.create(rollout=self.rollout, wave=wave, gate=m.gate, result=m.result,
                                  summary=m.summary[:500], evidence=m.evidence, final=final)

    # --- stopping ----------------------------------------------------------------------------------------------
    def stop(self, wave: RolloutWave, why: str) -> None:
        """A gate failed: halt (the upgraded stay), or abort and roll them back (on_failure=revert)."""
        r = self.rollout
        RolloutWave.objects.filter(pk=wave.pk).update(state=W.FAILED, finished_at=self.now)
        reason = f"wave {wave.position}: {why}"
        if r.on_failure == Rollout.OnFailure.REVERT:
            r.transition(S.ABORTING, expect=(S.PROGRESSING, S.PAUSED), reason=reason + "; rolling back",
                         reverting=True)
            return
        if r.transition(S.HALTED, expect=(S.PROGRESSING, S.PAUSED), reason=reason):
            self.end_targets()
            notify.rollout_ended(r)

    def end_targets(self) -> None:
        """The rollout has ended: whoever was never started says so, and its customers are free for another."""
        self.rollout.targets.filter(state=T.PENDING).update(state=T.NOT_STARTED)
        self.rollout.targets.update(active=False)

    def aborting(self) -> bool:
        r = self.rollout
        r.targets.filter(state=T.PENDING).update(state=T.NOT_STARTED)
        if r.reverting:
            free = r.concurrency - self.running()
            newest = (r.targets.filter(state=T.UPGRADED).select_related("customer", "upgrade")
                      .order_by("-finished_at", "-pk"))
            for t in list(newest[:max(free, 0)]):
                self.start_revert(t)
            if r.targets.filter(state=T.UPGRADED).exists():
                return False
        if self.running():
            return False
        if r.transition(S.ABORTED, expect=(S.ABORTING,)):
            self.end_targets()
            notify.rollout_ended(r)
        return False

    def start_revert(self, t: RolloutTarget) -> None:
        customer = t.customer
        if Run.objects.active().filter(customer=customer).exists():
            return  # its own run ends first; the next tick tries again
        target = rollback_target(customer)
        if target is None or target.pk != t.upgrade_id:
            RolloutTarget.objects.filter(pk=t.pk, state=T.UPGRADED).update(
                state=T.REVERT_FAILED, error="not rolled back: its last upgrade is no longer this rollout's")
            return
        try:
            with transaction.atomic():
                run = rollback_start(customer, requested_by=self.rollout.requested_by, via=self.via,
                                     enqueue=self.start_run is None)
                RolloutTarget.objects.filter(pk=t.pk, state=T.UPGRADED).update(
                    state=T.REVERTING, revert=run.upgrade, started_at=self.now, finished_at=None)
        except (UpgradeInputError, PermissionDenied) as exc:  # refused: said on the target, the abort goes on
            RolloutTarget.objects.filter(pk=t.pk, state=T.UPGRADED).update(
                state=T.REVERT_FAILED, error=f"not rolled back: {exc}"[:2000])
            return
        if self.start_run is not None:
            self.start_run(run)
