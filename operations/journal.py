"""A run's journal: what an operation changed, written to the run's `result` BEFORE each change.

A worker killed at any point leaves exactly what the reaper's on_abandon hook needs to put the customer
back. A journal never holds a secret: steps name databases by connection name and files by path.
Restores and upgrades keep theirs here (and the database steps of both go through backups.dbswap).
"""

from __future__ import annotations

import threading

from .context import RunContext
from .models import Run


class RunJournal:
    """One list of steps at `doc[key]` of the run's result document; safe to add to from several threads."""

    def __init__(self, ctx: RunContext, doc: dict | None = None, key: str = "journal"):
        self.ctx, self.key = ctx, key
        self.doc = doc if doc is not None else {}
        self.steps: list[dict] = self.doc.setdefault(key, [])
        self.lock = threading.Lock()

    def add(self, step: dict) -> dict:
        with self.lock:
            self.steps.append(step)
            self._save()
        return step

    def _save(self) -> None:
        self.doc[self.key] = self.steps
        Run.objects.filter(pk=self.ctx.run.pk).update(result=self.doc)

    def has(self, kind: str) -> bool:
        return any(s["type"] == kind for s in self.steps)

    def of(self, kind: str) -> list[dict]:
        return [s for s in self.steps if s["type"] == kind]
