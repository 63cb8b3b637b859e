"""What the workers run for rollouts: the scheduled tick of every active rollout (every minute, kasa_setup's
schedule), and a tick of one rollout as soon as one of its upgrades or rollbacks ends."""

from __future__ import annotations

from django.db import transaction
from django_q.tasks import async_task

from . import driver
from .models import Rollout, RolloutTarget


def advance_rollouts() -> list[int]:
    """Tick every rollout that has something to do; returns their ids."""
    live = set(Rollout.objects.filter(status__in=(Rollout.Status.SCHEDULED, Rollout.Status.PROGRESSING,
                                                  Rollout.Status.PAUSED, Rollout.Status.ABORTING))
               .values_list("pk", flat=True))
    # A halted rollout still follows the upgrades that were running when it stopped.
    live |= set(RolloutTarget.objects.filter(state__in=RolloutTarget.RUNNING, rollout__status=Rollout.Status.HALTED)
                .values_list("rollout_id", flat=True))
    ticked = []
    for pk in sorted(live):
        if driver.advance(pk, via="schedule") is not None:
            ticked.append(pk)
    return ticked


def advance_one(rollout_id: int) -> str:
    rollout = driver.advance(rollout_id, via="worker")
    return rollout.status if rollout else "busy or ended"


def on_run_end(run) -> None:
    """operations' end hook: the rollout that waits for this upgrade or rollback ticks now."""
    if run.kind not in ("upgrade", "rollback"):
        return
    ids = set(RolloutTarget.objects.filter(upgrade__run=run).values_list("rollout_id", flat=True))
    ids |= set(RolloutTarget.objects.filter(revert__run=run).values_list("rollout_id", flat=True))
    for pk in ids:
        transaction.on_commit(lambda pk=pk: async_task("rollouts.tasks.advance_one", pk, group="rollouts"))
