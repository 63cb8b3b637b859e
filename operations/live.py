"""Nudges for live-log consumers: "run N changed, read the database".

Messages carry no data, only the run id: the database stays the single source
of truth and a consumer that missed a nudge catches up on its next read. With
the in-memory layer (no REDIS_URL) a worker in another process cannot reach
the web process, so we skip sending and consumers poll instead.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer

log = logging.getLogger(__name__)


def group_name(run_id: int) -> str:
    return f"run-{run_id}"


def layer_is_shared() -> bool:
    layer = get_channel_layer()
    return layer is not None and not isinstance(layer, InMemoryChannelLayer)


def notify(run_id: int) -> None:
    if not layer_is_shared():
        return
    try:
        async_to_sync(get_channel_layer().group_send)(group_name(run_id), {"type": "run.changed", "run": run_id})
    except Exception as exc:  # a lost nudge must never fail an operation
        log.warning("live-log nudge for run %s failed: %s", run_id, exc)
