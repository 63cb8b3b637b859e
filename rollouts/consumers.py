"""A rollout's page, live, over the WebSocket (the run pages' mechanism: operations.consumers).

connect(): only an authenticated, active staff user who may see the rollout (every customer in it is of their
teams: rollouts.selectors.visible_rollouts) gets in; anyone else is accepted, then closed with 4403. Then: join
the rollout's group, send the page's live part, and send it again whenever the rollout changes — at once on a
nudge (rollouts.live.notify, with a shared channel layer), else on the next poll. A poll reads the cheap
fingerprint and renders the page only when it changed. Messages: {"type": "rollout", "status", "ended",
"controls", "html"}; the html is the template fragment the page was rendered with (rollouts.pageview).
"""

from __future__ import annotations

import asyncio

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from operations.consumers import CLOSE_FORBIDDEN, RunLogConsumer

from . import live
from .models import Rollout
from .pageview import page_document, render_live
from .selectors import visible_rollouts


class RolloutConsumer(AsyncJsonWebsocketConsumer):
    group = None
    _poller = None

    async def connect(self):
        self.rollout_id = int(self.scope["url_route"]["kwargs"]["rollout_id"])
        if not await self._allowed(self.scope.get("user"), self.rollout_id):
            await self.accept()
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.last = None
        self._lock = asyncio.Lock()
        self.group = live.group_name(self.rollout_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.push()
        self._poller = asyncio.create_task(self._poll(RunLogConsumer._interval()))

    async def disconnect(self, code):
        if self._poller:
            self._poller.cancel()
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        pass  # the page only listens; its controls are POST forms

    async def rollout_changed(self, event):
        await self.push()

    async def _poll(self, interval: float):
        try:
            while True:  # an ended rollout may be retried: the page follows it as long as it is open
                await asyncio.sleep(interval)
                await self.push()
        except asyncio.CancelledError:
            pass

    async def push(self):
        async with self._lock:
            seen = await self._fingerprint(self.rollout_id)
            if seen is None:
                await self.close(code=1000)
                return
            if seen == self.last:
                return
            self.last = seen
            await self.send_json(await self._message(self.rollout_id))

    @staticmethod
    @database_sync_to_async
    def _allowed(user, rollout_id: int) -> bool:
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return False
        return visible_rollouts(user).filter(pk=rollout_id).exists()

    @staticmethod
    @database_sync_to_async
    def _fingerprint(rollout_id: int):
        return live.fingerprint(rollout_id)

    @staticmethod
    @database_sync_to_async
    def _message(rollout_id: int) -> dict:
        rollout = Rollout.objects.select_related("release", "requested_by").get(pk=rollout_id)
        doc = page_document(rollout)
        return {"type": "rollout", "status": doc["status"], "status_label": doc["status_label"],
                "ended": doc["ended"], "controls": doc["controls"], "progress_text": doc["progress_text"],
                "html": render_live(doc)}
