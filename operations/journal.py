"""A run's journal: what an operation changed, written BEFORE each change — to a local file first, then to the
run's `result`.

The local file (operations.offline, engines.localjournal: `$KASA_VAR_DIR/journals/run-<id>.json`, authenticated,
fsynced) is what makes the way back independent of the control database: an undo that finds the database gone
goes on from memory and this file, and the reaper prefers the file when the run's `result` lags behind it.
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
            self.save()
        return step

    def save(self) -> None:
        """Write the journal as it stands: after `add`, or after a step was changed in place (`step["done"] =
        True`) or steps were removed. Local file first (fsynced), then the run's `result`."""
        self.doc[self.key] = self.steps
        # On local disk and fsynced first: if the control database is gone by the next change, the way back is
        # still written down. While undoing, a database that does not answer is not an error (ctx.record).
        self.ctx.keep_local().save_doc(self.doc)
        self.ctx.record(lambda: Run.objects.filter(pk=self.ctx.run.pk).update(result=self.doc))

    def clear(self) -> None:
        """The change holds: nothing is left to undo (a journal the reaper finds empty puts nothing back)."""
        with self.lock:
            self.steps = []
            self.save()

    def refuse(self, step: dict, reason: BaseException | str) -> None:
        """The step was refused before it changed anything (a folder below the root turned out to be a link:
        engines.beneath): its undo has nothing to do, and the journal says why."""
        with self.lock:
            step["refused"] = str(reason)[:500]
            self.save()

    def has(self, kind: str) -> bool:
        return any(s["type"] == kind for s in self.steps)

    def of(self, kind: str) -> list[dict]:
        return [s for s in self.steps if s["type"] == kind]
