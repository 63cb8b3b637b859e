"""Nudges for a rollout's page: "rollout N changed, read the database" — the run pages' mechanism
(operations.live) for rollouts. A nudge carries only the id; the page's consumer (rollouts.consumers) reads the
rollout again. With the in-memory channel layer a worker cannot reach the web process: nothing is sent and the
consumer polls instead, cheaply (fingerprint() first, the whole document only when it changed)."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db.models import Max

from operations.live import layer_is_shared

from .models import GateResult, Rollout

log = logging.getLogger(__name__)


def group_name(rollout_id: int) -> str:
    return f"rollout-{rollout_id}"


def fingerprint(rollout_id: int) -> tuple | None:
    """What changes when anything the page shows changes (None: the rollout is gone). Three small queries."""
    head = (Rollout.objects.filter(pk=rollout_id)
            .values_list("status", "paused_by", "reason", "promote_all", "reverting", "finished_at").first())
    if head is None:
        return None
    r = Rollout(pk=rollout_id)
    waves = tuple(r.waves.order_by("position").values_list("state", "bake_until", "error_streak"))
    targets = tuple(r.targets.order_by("pk").values_list("state", "upgrade_id", "revert_id", "attempts", "error"))
    gates = GateResult.objects.filter(rollout_id=rollout_id).aggregate(m=Max("id"))["m"]
    return head, waves, targets, gates


def notify(rollout_id: int) -> None:
    if not layer_is_shared():
        return
    try:
        async_to_sync(get_channel_layer().group_send)(group_name(rollout_id),
                                                      {"type": "rollout.changed", "rollout": rollout_id})
    except Exception as exc:  # a lost nudge must never fail a tick
        log.warning("live nudge for rollout %s failed: %s", rollout_id, exc)
