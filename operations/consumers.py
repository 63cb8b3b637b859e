"""Live log of a run over a WebSocket.

connect(): only an authenticated, active staff user of the customer's team
gets in. Then: join the run's group, replay the stored lines, and stream
typed messages ("line", "progress", "status"). Every push reads the database
(lines with seq > last sent), so order and completeness never depend on the
channel layer: with Redis a worker's nudge triggers the read at once; with the
in-memory layer (worker in another process) a short poll does.
"""

from __future__ import annotations

import asyncio

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from . import live
from .models import Run, RunLogLine

BATCH = 500


class RunLogConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        self.run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        if not await self._allowed(user, self.run_id):
            await self.close(code=4403)
            return
        self.group = live.group_name(self.run_id)
        self.last_seq = 0
        self.last_state = None
        self.finished = False
        self._lock = asyncio.Lock()
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        try:
            self.last_seq = max(0, int(self._query().get("after", "0")))
        except ValueError:
            self.last_seq = 0
        await self.push()
        interval = settings.KASA_LIVE_POLL_SECONDS if not live.layer_is_shared() else 5.0
        self._poller = asyncio.create_task(self._poll(interval))

    def _query(self) -> dict:
        from urllib.parse import parse_qs

        raw = self.scope.get("query_string", b"").decode()
        return {k: v[-1] for k, v in parse_qs(raw).items()}

    async def disconnect(self, code):
        poller = getattr(self, "_poller", None)
        if poller:
            poller.cancel()
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        pass  # the page only listens

    async def run_changed(self, event):
        await self.push()

    async def _poll(self, interval: float):
        try:
            while not self.finished:
                await asyncio.sleep(interval)
                await self.push()
        except asyncio.CancelledError:
            pass

    async def push(self):
        async with self._lock:
            while True:
                lines, state = await self._read(self.run_id, self.last_seq)
                for line in lines:
                    await self.send_json(line)
                    self.last_seq = line["seq"]
                if len(lines) < BATCH:
                    break
            if state != self.last_state:
                self.last_state = state
                await self.send_json({"type": "progress", **state["progress"]})
                await self.send_json({"type": "status", **state["status"]})
            if state["status"]["finished"]:
                self.finished = True

    @staticmethod
    @database_sync_to_async
    def _allowed(user, run_id: int) -> bool:
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return False
        return Run.objects.visible_to(user).filter(pk=run_id).exists()

    @staticmethod
    @database_sync_to_async
    def _read(run_id: int, after: int):
        lines = [
            ln.as_message()
            for ln in RunLogLine.objects.filter(run_id=run_id, seq__gt=after).order_by("seq")[:BATCH]
        ]
        run = Run.objects.only(
            "status", "error", "progress_done", "progress_total", "progress_message", "started_at", "finished_at"
        ).get(pk=run_id)
        state = {
            "progress": {"done": run.progress_done, "total": run.progress_total, "message": run.progress_message},
            "status": {
                "status": run.status, "label": run.get_status_display(), "error": run.error,
                "finished": run.status in Run.TERMINAL,
                "duration": run.duration,
            },
        }
        return lines, state
