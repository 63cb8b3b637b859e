"""What a handler gets while it executes a run: logging, progress, commands.

Each log line is INSERTed as it is written and a nudge is sent, so the admin
page shows it within a second. A background thread keeps `heartbeat_at` fresh
so the reaper can tell a long quiet step from a dead worker; if the run has
been taken away from us (failed by the reaper or a redelivery), the next
heartbeat or log call raises RunLost and the handler stops.

An undo (inside `uninterruptible()`) does not stop for a control database that
does not answer: a run with a local journal (operations.offline — restores and
upgrades) then goes *offline* for the rest of its execution: log lines (with
their seq), commands, bookkeeping writes (`record`) and the run's end go to the
local journal, and operations.reconcile puts them into the database once it
answers again. What the undo needs from the database (credentials, the
customer's services) is read when the run starts and held in memory (`held`),
never written to disk.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections.abc import Iterable, Sequence

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Max
from django.utils import timezone

from engines import proc, runas

from . import live
from .models import Run, RunCommand, RunLogLine
from .offline import DB_LOST, JournalHeld, LocalRecord, PendingCommand

log = logging.getLogger(__name__)


class OperationError(Exception):
    """A handler's way to end the run failed with a clear message."""

    def __init__(self, message: str, *, result: dict | None = None):
        super().__init__(message)
        self.result = result


class RunLost(Exception):
    """The run is no longer ours (reaped, redelivered elsewhere or cancelled)."""


class RunCancelled(Exception):
    pass


class RunContext:
    def __init__(self, run: Run):
        self.run = run
        self._seq = (RunLogLine.objects.filter(run=run).aggregate(m=Max("seq"))["m"] or 0) + 1
        self._secrets: list[str] = []
        self._stop = threading.Event()
        self._log_lock = threading.RLock()  # a handler may log from two threads (backup lanes)
        self._heartbeat_thread: threading.Thread | None = None
        self.lost = False
        self._undoing = 0  # > 0 inside uninterruptible(): putting things back must not stop half-way
        self.local: LocalRecord | None = None  # the run's local journal, from its first journal write
        self.offline = False  # the control database stopped answering during an undo: the local journal records
        self.ended_offline = False  # the run's end went to the local journal (reconciliation records it)
        # What an undo needs from the control database, read while it answers and kept in this process's memory
        # only (never on disk): database targets with their credentials, the customer's services…
        self.held: dict = {}
        self._plan: list[list] = list(run.phase_plan or [])  # [[name, weight], …] (phases())
        self._phase = run.phase or ""
        self._percent = run.percent or 0.0  # never goes down while the run runs
        # Two backup lanes report progress at once: computing the percentage and writing it happen under one lock,
        # or an older value computed first could be written last and move the bar back.
        self._progress_lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------
    def start_heartbeat(self) -> None:
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True, name="run-heartbeat")
        self._heartbeat_thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._heartbeat_thread:
            self._heartbeat_thread.join(timeout=5)

    def _heartbeat_loop(self) -> None:
        try:
            while not self._stop.wait(settings.KASA_HEARTBEAT_SECONDS):
                if not self.beat():
                    self.lost = True
                    return
        finally:
            connection.close()  # this thread's own connection

    def beat(self) -> bool:
        try:
            return bool(
                Run.objects.filter(pk=self.run.pk, status=Run.Status.RUNNING).update(heartbeat_at=timezone.now())
            )
        except DB_LOST:
            # Not a lost run: nobody can reap it while the database is away either. Beat again as soon as it is
            # back (a fresh connection each try), before a reaper finds the heartbeat stale.
            _drop_connection()
            return True

    @contextlib.contextmanager
    def uninterruptible(self):
        """Putting a customer back (a rollback, an undo — also run by the reaper for a dead worker, whose run
        is already failed) is not stopped half-way by a cancel request or a lost run: check_alive() passes,
        and progress, which a finished run no longer takes, is not recorded."""
        self._undoing += 1
        try:
            yield self
        finally:
            self._undoing -= 1

    @property
    def undoing(self) -> bool:
        return bool(self._undoing)

    def check_alive(self) -> None:
        if self._undoing:
            return
        if self.lost:
            raise RunLost(f"run #{self.run.pk} was taken away from this worker")
        row = Run.objects.filter(pk=self.run.pk).values("status", "cancel_requested_at").first()
        if not row or row["status"] != Run.Status.RUNNING:
            self.lost = True
            raise RunLost(f"run #{self.run.pk} is {row and row['status']}, no longer running here")
        if row["cancel_requested_at"]:
            raise RunCancelled("cancelled on request")

    # --- secrets -------------------------------------------------------------
    def add_secret(self, value: str) -> None:
        """Mask this value in every later log line and argv of the run."""
        if value and value not in self._secrets:
            self._secrets.append(value)

    @property
    def secrets(self) -> list[str]:
        """The values masked so far: the live list (core.sentry scrubs them from the run's events)."""
        return self._secrets

    def mask(self, text: str) -> str:
        return proc.mask(text, self._secrets)

    # --- the local journal and the control database ---------------------------------------------------
    def keep_local(self) -> LocalRecord:
        """The run's local journal (created, and its lock taken, on first use)."""
        if self.local is None:
            try:
                self.local = LocalRecord(self.run)
            except JournalHeld as exc:
                raise RunLost(str(exc)) from None
        return self.local

    def _may_go_offline(self) -> bool:
        return bool(self._undoing and self.local is not None)

    def _go_offline(self, exc: BaseException) -> None:
        """Latched for the rest of this execution: what follows goes to the local journal, in order, and is
        reconciled at the end (trying the database on every line would slow the undo down to its timeouts)."""
        with self._log_lock:
            if self.offline:
                return
            self.offline = True
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("run %s: the control database does not answer (%s); the undo goes on, recorded in %s",
                    self.run.pk, why, self.local.path)
        self.local.go_offline(why)
        _drop_connection()
        self.warning(f"the control database does not answer ({why}): the undo goes on and is recorded in the "
                     "local journal; the run is reconciled when the database answers again")

    def record(self, write, *, replay: str | None = None, **payload):
        """A write of the run's own bookkeeping (its steps, a row it changes on its way back). While undoing, a
        control database that does not answer does not stop the undo: the write is kept in the local journal,
        to be made by reconciliation through the replay function registered as `replay`
        (operations.registry.register_replay; None when the local journal holds it already). Returns what
        `write` returned, or None when it was kept for later."""
        if not self.offline:
            try:
                return write()
            except DB_LOST as exc:
                if not self._may_go_offline():
                    raise
                self._go_offline(exc)
        if replay:
            self.local.defer(replay, payload)
        return None

    # --- logging -------------------------------------------------------------
    def log(self, text: str, *, level: str = RunLogLine.Level.INFO, stream: str = "kasa",
            command: RunCommand | PendingCommand | None = None) -> None:
        with self._log_lock:
            text = self.mask(str(text))
            if not self.offline:
                try:
                    RunLogLine.objects.create(run=self.run, seq=self._seq, level=level, stream=stream,
                                              command=command, text=text)
                except DB_LOST as exc:
                    if not self._may_go_offline():
                        raise
                    self._go_offline(exc)  # logs its own line first, under the next seq
            if self.offline:
                self.local.add_line(seq=self._seq, level=level, stream=stream, text=text, command=command)
            self._seq += 1
        if not self.offline:
            live.notify(self.run.pk)

    def info(self, text: str) -> None:
        self.log(text)

    def warning(self, text: str) -> None:
        self.log(text, level=RunLogLine.Level.WARNING)

    def error(self, text: str) -> None:
        self.log(text, level=RunLogLine.Level.ERROR)

    def log_exception(self, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.log(tb.rstrip(), level=RunLogLine.Level.ERROR)

    # --- named phases ---------------------------------------------------------------------------------
    def phases(self, *plan: tuple[str, float]) -> None:
        """Declare the run's named phases in order, each with a weight (its expected share of the time). The
        overall percentage is the weight of the phases passed plus the done share of the current one
        (progress(done, total) within it); phase() moves on."""
        self._plan = [[str(name), float(max(weight, 0))] for name, weight in plan]
        self._save_phase({"phase_plan": self._plan})

    def phase(self, name: str, weight: float = 1.0) -> None:
        """Enter the named phase (appended to the plan with `weight` when it was not declared): its progress
        starts at 0 and the page shows its name. A phase already passed does not move the bar back."""
        if self._undoing:
            return
        if not any(n == name for n, _ in self._plan):
            self._plan.append([name, float(weight)])
        self._phase = name
        fields = {"phase": name[:100], "phase_plan": self._plan, "phase_started_at": timezone.now(),
                  "progress_done": 0, "progress_total": None, "progress_message": ""}
        with self._progress_lock:
            fields["percent"] = self._overall(0, None)
            self._save_phase(fields)

    def _overall(self, done: int, total: int | None) -> float:
        weights = sum(w for _, w in self._plan)
        if not weights or not self._phase:  # no phases: the run's own done/total, when it has one
            if total and not self._plan:
                self._percent = max(self._percent, min(100.0, 100.0 * done / total))
            return round(self._percent, 2)
        before, current = 0.0, 0.0
        for n, w in self._plan:
            if n == self._phase:
                current = w
                break
            before += w
        share = min(1.0, max(0.0, done / total)) if total else 0.0
        self._percent = max(self._percent, min(100.0, 100.0 * (before + current * share) / weights))
        return round(self._percent, 2)

    def _save_phase(self, fields: dict) -> None:
        if not Run.objects.filter(pk=self.run.pk, status=Run.Status.RUNNING).update(**fields):
            self.lost = True
            raise RunLost(f"run #{self.run.pk} is no longer running here")
        live.notify(self.run.pk)

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        """Progress within the current phase (or the whole run when it has no phases): done of total."""
        if self._undoing:
            return
        fields = {"progress_done": done, "heartbeat_at": timezone.now()}
        if total is not None:
            fields["progress_total"] = total
        if message:
            fields["progress_message"] = self.mask(message)[:300]
        with self._progress_lock:
            fields["percent"] = self._overall(done, total)
            if not Run.objects.filter(pk=self.run.pk, status=Run.Status.RUNNING).update(**fields):
                self.lost = True
                raise RunLost(f"run #{self.run.pk} is no longer running here")
        live.notify(self.run.pk)

    # --- external commands ---------------------------------------------------
    def command(
        self, argv: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
        timeout: float | None = None, secrets: Iterable[str] = (), check: bool = False,
        on_start=None, raise_proc_errors: bool = False, identity: runas.Identity | None = None,
        keep_line=None,
    ) -> proc.CommandResult:
        """Run argv, storing the command row and each output line as it comes.

        identity: the OS user customer code runs as (engines.runas); None is Kasa itself.
        raise_proc_errors: a missing program or a timeout re-raises the engine's own exception (logged first)
        instead of OperationError, for engines that handle it themselves (procman puts services back).
        keep_line: engines.proc.run's filter of what reaches the log (PM2's banner and tables do not).
        """
        self.check_alive()
        secrets = [s for s in secrets if s]
        for s in secrets:
            self.add_secret(s)
        shown = proc.masked_argv(argv, self._secrets)
        row = self.record(lambda: RunCommand.objects.create(run=self.run, argv=shown, cwd=cwd or ""))
        if row is None:  # offline: created by reconciliation
            row = PendingCommand(self.local.add_command(argv=shown, cwd=cwd or ""))
        self.log("$ " + " ".join(shown), stream="kasa", command=row)

        def on_line(stream: str, line: str) -> None:
            self.log(line, stream=stream, command=row)

        try:
            res = proc.run(argv, cwd=cwd, env=env, timeout=timeout, secrets=self._secrets,
                           on_line=on_line, on_start=on_start, identity=identity, keep_line=keep_line)
        except (proc.CommandNotFound, proc.CommandTimeout, runas.RunAsError) as exc:
            self._end_command(row, finished_at=timezone.now(), error=str(exc))
            self.error(str(exc))
            if raise_proc_errors:
                raise
            raise OperationError(str(exc)) from None
        self._end_command(row, finished_at=timezone.now(), exit_code=res.exit_code, duration=res.duration)
        self.log(f"exit code {res.exit_code} after {res.duration:.2f} s",
                 level=RunLogLine.Level.INFO if res.ok else RunLogLine.Level.WARNING, command=row)
        if check and not res.ok:
            raise OperationError(f"{shown[0]} failed: {res.last_error_line()}")
        return res

    def _end_command(self, row, **fields) -> None:
        if row.pk is not None:
            if self.record(lambda: RunCommand.objects.filter(pk=row.pk).update(**fields)) is not None:
                return
        self.local.end_command(row, **fields)  # offline: reconciliation completes (or creates) the row

    def runner(self):
        """An engines.proc.run-compatible callable that records through this run."""

        def _run(argv, *, env=None, cwd=None, timeout=None, secrets=(), on_start=None, identity=None,
                 keep_line=None, **_):
            return self.command(argv, env=env, cwd=cwd, timeout=timeout, secrets=secrets, on_start=on_start,
                                raise_proc_errors=True, identity=identity, keep_line=keep_line)

        return _run


def _drop_connection() -> None:
    """Forget a connection the database dropped: the next query connects afresh."""
    with contextlib.suppress(Exception):
        connection.close()


def close_db_after(fn):
    def wrapper(*args, **kwargs):
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return wrapper
