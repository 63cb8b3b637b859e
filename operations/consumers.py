"""Live log of a run over a WebSocket.

connect(): only an authenticated, active staff user of the customer's team
gets in; anyone else is closed with code 4403 (accepted first, then closed, so
a browser sees 4403 and stops retrying instead of a bare 1006). Then: join the
run's group, replay the stored lines, and stream typed messages ("line",
"progress", "status" — with the times, worker, result summary and links —, "phase" with the overall
percentage and ETA, and "steps" for a run with a step table). Every push reads the database (lines with seq > last
sent), so order and completeness never depend on the channel layer: with Redis
a worker's nudge triggers the read at once; with the in-memory layer (worker in
another process) a short poll does.

A worker writes its last lines ("succeeded", a traceback) just after the
terminal status, so the consumer keeps reading for FINISH_GRACE seconds after
the run ended, then closes the socket normally (1000).
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from . import live, registry
from .models import Run, RunLogLine
from .runview import phase_document, status_document
from .selectors import typical_seconds

BATCH = 500
SAFETY_POLL_SECONDS = 5.0  # with a shared layer: nudges drive updates; this only catches a lost one
FINISH_GRACE = 10.0  # seconds after the run ended during which late lines are still read
CLOSE_FORBIDDEN = 4403


class RunLogConsumer(AsyncJsonWebsocketConsumer):
    group = None
    _poller = None

    async def connect(self):
        self.run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        if not await self._allowed(self.scope.get("user"), self.run_id):
            await self.accept()
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.last_seq = self._after()
        self.last_state = None
        self.typical = await self._typical(self.run_id)  # the history estimate, once per connection
        self.settled = False
        self._finished_seen = None
        self._lock = asyncio.Lock()
        self.group = live.group_name(self.run_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.push()
        self._poller = asyncio.create_task(self._poll(self._interval()))

    def _after(self) -> int:
        raw = parse_qs(self.scope.get("query_string", b"").decode()).get("after", ["0"])[-1]
        try:
            return max(0, int(raw))
        except ValueError:
            return 0

    @staticmethod
    def _interval() -> float:
        if live.layer_is_shared():
            # Never faster than the configured poll; KASA_LIVE_POLL_SECONDS above 5 s
            # stretches the safety net too (tests use that to prove the push path).
            return max(SAFETY_POLL_SECONDS, settings.KASA_LIVE_POLL_SECONDS)
        return settings.KASA_LIVE_POLL_SECONDS

    async def disconnect(self, code):
        if self._poller:
            self._poller.cancel()
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        pass  # the page only listens

    async def run_changed(self, event):
        await self.push()

    async def _poll(self, interval: float):
        try:
            while not self.settled:
                await asyncio.sleep(interval)
                await self.push()
            await self.close(code=1000)  # normal closure: the run is over and fully sent
        except asyncio.CancelledError:
            pass

    async def push(self):
        async with self._lock:
            while True:
                lines, state, finished_ago = await self._read(self.run_id, self.last_seq)
                for line in lines:
                    await self.send_json(line)
                    self.last_seq = line["seq"]
                if len(lines) < BATCH:
                    break
            if state is None:  # the run is gone
                self.settled = True
                return
            if _key(state) != _key(self.last_state):  # the ETA alone changes every second: not a change
                previous, self.last_state = self.last_state or {}, state
                await self.send_json({"type": "progress", **state["progress"]})
                if state["phase"] and _key(state)["phase"] != _key(previous).get("phase"):
                    await self.send_json({"type": "phase", **state["phase"]})  # the bar first: then the end
                await self.send_json({"type": "status", **state["status"]})
                if state["steps"] and state["steps"] != previous.get("steps"):
                    await self.send_json({"type": "steps", **state["steps"]})
            if state["status"]["finished"]:
                now = asyncio.get_running_loop().time()
                self._finished_seen = self._finished_seen or now
                self.settled = (finished_ago is None or finished_ago > FINISH_GRACE
                                or now - self._finished_seen > FINISH_GRACE)

    @staticmethod
    @database_sync_to_async
    def _allowed(user, run_id: int) -> bool:
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return False
        return Run.objects.visible_to(user).filter(pk=run_id).exists()

    @staticmethod
    @database_sync_to_async
    def _typical(run_id: int) -> float | None:
        run = Run.objects.filter(pk=run_id).values("customer_id", "kind").first()
        return typical_seconds(run["customer_id"], run["kind"]) if run else None

    def _read(self, run_id: int, after: int):
        return self._read_db(run_id, after, self.typical)

    @staticmethod
    @database_sync_to_async
    def _read_db(run_id: int, after: int, typical: float | None):
        lines = [
            ln.as_message()
            for ln in RunLogLine.objects.filter(run_id=run_id, seq__gt=after).order_by("seq")[:BATCH]
        ]
        run = Run.objects.filter(pk=run_id).first()
        if run is None:
            return lines, None, None
        finished = run.status in Run.TERMINAL
        details = registry.details(run)
        state = {
            "progress": {
                "done": run.progress_done, "total": run.progress_total, "message": run.progress_message,
            },
            "status": status_document(run, details),
            "phase": phase_document(run, typical),
            "steps": details.get("steps"),
        }
        ago = (timezone.now() - run.finished_at).total_seconds() if finished and run.finished_at else None
        return lines, state, ago


def _key(state: dict | None) -> dict:
    if not state:
        return {}
    phase = state["phase"] and {k: v for k, v in state["phase"].items() if k not in ("eta", "eta_text")}
    return {**state, "phase": phase}
