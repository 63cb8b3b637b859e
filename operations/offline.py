"""What a run keeps on local disk: its journal always, and — while an undo runs without the control database —
its log lines, commands, bookkeeping writes and end.

The file is engines.localjournal's (authenticated, atomic, fsynced, in `$KASA_VAR_DIR/journals`, 0600; see that
module for why there and not beside the staging folder). Its body:

    {"run": id, "kind", "customer": id, "root", "host", "worker",
     "doc": the run's result document (the journal steps), written before each change,
     "offline_since": when the control database stopped answering (None: it answered all along),
     "lines": [{"seq", "ts", "level", "stream", "text", "command": local id | None, "command_pk": pk | None}],
     "commands": [{"id": local id} or {"pk": RunCommand pk}, with argv, cwd, started_at, finished_at, ...],
     "deferred": [{"op": a registered replay name, "payload": {...}}],   # e.g. an UpgradeStep row
     "outcome": None | {"status", "error", "result"}}

Nothing secret is written: steps name databases by connection name, lines and argv are masked as in the database.
operations.reconcile puts the rest into the database and removes the file.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import threading

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from engines import localjournal, secretbox

log = logging.getLogger(__name__)

# A control database that does not answer (refused, gone, timed out, connection closed under us); not an
# integrity or programming error, which must still fail the operation.
DB_LOST = (OperationalError, InterfaceError)


class JournalHeld(Exception):
    """Another live process owns the run's local journal (its worker): this one must not write it."""


def folder():
    return settings.KASA_VAR_DIR / "journals"


@functools.lru_cache(maxsize=4)
def _keys(raw: str) -> list[tuple[str, bytes]]:
    return localjournal.derive_keys(secretbox.parse_keys(raw))


def keys() -> list[tuple[str, bytes]]:
    return _keys(settings.KASA_SECRET_KEYS)


def jsonable(value):
    """A detached, JSON-only copy (the journal document keeps changing in memory after it is written)."""
    return json.loads(json.dumps(value, default=str))


class LocalRecord:
    """The run's local journal as this process owns it: the file, its lock, and the body in memory."""

    def __init__(self, run):
        self.run_id = run.pk
        self.lock = localjournal.Lock(folder(), run.pk)
        if not self.lock.acquire():
            raise JournalHeld(f"run #{run.pk}: its local journal is held by another live process")
        self._mutex = threading.Lock()
        self.body = {
            "run": run.pk, "kind": run.kind, "customer": run.customer_id, "root": run.root,
            "host": socket.gethostname(), "worker": run.worker, "doc": None, "offline_since": None,
            "lines": [], "commands": [], "deferred": [], "outcome": None,
        }
        self._next_command = 1

    @property
    def path(self):
        return localjournal.path_for(folder(), self.run_id)

    def _write(self) -> None:
        localjournal.write(folder(), self.run_id, self.body, keys())

    # --- always --------------------------------------------------------------------------------------
    def save_doc(self, doc: dict) -> None:
        """The journal steps, on disk and fsynced before the change they announce."""
        with self._mutex:
            self.body["doc"] = jsonable(doc)
            self._write()

    # --- while the control database does not answer -------------------------------------------------------
    def go_offline(self, why: str) -> None:
        with self._mutex:
            if self.body["offline_since"] is None:
                self.body["offline_since"] = timezone.now().isoformat()
                self.body["offline_why"] = why[:500]
                self._write()

    def add_line(self, *, seq: int, level: str, stream: str, text: str, command=None) -> None:
        with self._mutex:
            self.body["lines"].append({
                "seq": seq, "ts": timezone.now().isoformat(), "level": level, "stream": stream, "text": text,
                "command": getattr(command, "local_id", None), "command_pk": getattr(command, "pk", None),
            })
            self._write()

    def add_command(self, *, argv: list[str], cwd: str) -> int:
        with self._mutex:
            local_id = self._next_command
            self._next_command += 1
            self.body["commands"].append({"id": local_id, "argv": argv, "cwd": cwd,
                                          "started_at": timezone.now().isoformat()})
            self._write()
            return local_id

    def end_command(self, command, **fields) -> None:
        """The end of a command: one started offline (its local id), or one whose row exists already (its pk)."""
        fields = {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in fields.items()}
        with self._mutex:
            local_id = getattr(command, "local_id", None)
            entry = next((c for c in self.body["commands"] if local_id and c.get("id") == local_id), None)
            if entry is None:
                entry = {"pk": command.pk}
                self.body["commands"].append(entry)
            entry.update(fields)
            self._write()

    def defer(self, op: str, payload: dict) -> None:
        with self._mutex:
            self.body["deferred"].append({"op": op, "payload": jsonable(payload)})
            self._write()

    def set_outcome(self, status: str, error: str, result) -> None:
        with self._mutex:
            self.body["outcome"] = {"status": status, "error": error, "result": jsonable(result),
                                    "at": timezone.now().isoformat()}
            self._write()

    def forget_applied(self) -> None:
        """What was put into the database (lines, commands, writes) leaves the file; the journal stays."""
        with self._mutex:
            self.body.update(lines=[], commands=[], deferred=[])
            self._write()

    # --- the end -------------------------------------------------------------------------------------
    def close(self, *, remove: bool) -> None:
        """remove: the run is reconciled, the file goes; else it stays for operations.reconcile (the reaper)."""
        if remove:
            localjournal.remove(folder(), self.run_id)
        self.lock.release()


class PendingCommand:
    """A command started while the control database did not answer: its row is created by reconciliation."""

    pk = None

    def __init__(self, local_id: int):
        self.local_id = local_id
