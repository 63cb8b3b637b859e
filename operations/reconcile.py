"""Reconciliation: what an undo recorded in its local journal while the control database did not answer goes into
the database — its bookkeeping writes, commands and log lines (in seq order), then the run's end — and the local
journal goes.

Who does it:
- the worker itself, as soon as the database answers again (`settle`: retries with backoff for
  KASA_RECONCILE_PATIENCE seconds, its heartbeat going on meanwhile so no reaper takes the run);
- otherwise the reaper at its next pass (`sweep`, from operations.services.runs_reap, every minute): it finds the
  journal files of this host whose worker is gone (nobody holds the file's lock) and reconciles those that hold
  the run's end, or whose run has ended;
- a worker that died before the end (no end in its file): the reaper fails the run and undoes its journal, from
  the local file (`take_over`) when the run's `result` lags behind it, after putting the lines that worker logged
  offline into the database.

All of one file goes in one transaction, so a crash midway changes nothing; a file whose first line is already in
the database was reconciled before (the process died before removing it) and is only removed. Local journals are
per host: with workers on several hosts, each host's reaper reconciles its own, and the undo of a run another
machine's reaper failed is owed to this host (`Run.abandon_host`, operations.services.runs_reap).
"""

from __future__ import annotations

import contextlib
import logging
import time

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from audit.models import AuditEntry
from audit.services import audit_record
from engines import localjournal

from . import live, registry
from .models import Run, RunCommand, RunLogLine
from .offline import DB_LOST, folder, keys

log = logging.getLogger(__name__)

_COMMAND_FIELDS = ("finished_at", "exit_code", "duration", "error")


# --- reading --------------------------------------------------------------------------------------------------
def read(run_id: int) -> dict | None:
    """The run's local journal, authenticated; None when there is none or it was refused (set aside, logged)."""
    try:
        return localjournal.read(folder(), run_id, keys())
    except localjournal.JournalRefused as exc:
        aside = localjournal.set_aside(folder(), run_id, timezone.now().strftime("%Y%m%dT%H%M%S"))
        log.error("local journal of run %s refused: %s; kept as %s for an operator, not followed", run_id, exc,
                  aside)
        return None


def held(run_id: int) -> bool:
    """A live process of this host (the run's worker, perhaps still undoing without the database) owns the run."""
    return localjournal.held_elsewhere(folder(), run_id)


def orphaned(run_id: int) -> bool:
    """The run has a local journal on this host and nobody holds it: the worker that wrote it is gone."""
    return localjournal.path_for(folder(), run_id).exists() and not held(run_id)


def journal_doc(run: Run, body: dict) -> dict | None:
    """The journal document of a local file, for an undo to follow: only when every path it names lies inside the
    folder the run changes (a journal never names anything else)."""
    doc = body.get("doc")
    if not isinstance(doc, dict):
        return None
    root = run.root or run.customer.root
    bad = localjournal.outside({k: v for k, v in doc.items() if isinstance(v, list)}, root)
    if bad:
        aside = localjournal.set_aside(folder(), run.pk, timezone.now().strftime("%Y%m%dT%H%M%S"))
        log.error("local journal of run %s names paths outside %s (%s); kept as %s, not followed", run.pk, root,
                  ", ".join(bad[:5]), aside)
        return None
    return doc


# --- applying --------------------------------------------------------------------------------------------------
def apply(run_id: int, body: dict, *, final: bool = True) -> None:
    """Put the file's writes, commands and lines into the database, then (final) the run's end, in one transaction."""
    lines, commands = body.get("lines") or [], body.get("commands") or []
    with transaction.atomic():
        run = Run.objects.select_for_update().select_related("customer").get(pk=run_id)
        first = lines[0] if lines else None
        done_before = first is not None and RunLogLine.objects.filter(run=run, seq=first["seq"],
                                                                      text=first["text"]).exists()
        if not done_before:
            created = _commands(run, commands)
            _lines(run, lines, created)
            for entry in body.get("deferred") or []:
                registry.replay(entry["op"])(run, entry["payload"])
        if final and body.get("outcome"):
            _end(run, body)
    live.notify(run_id)


def _when(text):
    return parse_datetime(text) if isinstance(text, str) else None


def _commands(run: Run, commands: list[dict]) -> dict[int, int]:
    """Rows for the commands started offline (local id -> pk); the ends of those whose row existed."""
    created = {}
    for c in commands:
        fields = {k: c[k] for k in _COMMAND_FIELDS if k in c}
        if "finished_at" in fields:
            fields["finished_at"] = _when(fields["finished_at"])
        if c.get("pk"):
            RunCommand.objects.filter(pk=c["pk"], run=run).update(**fields)  # never another run's row
        else:
            row = RunCommand.objects.create(run=run, argv=[str(a) for a in c.get("argv") or []],
                                            cwd=str(c.get("cwd") or "")[:1024],
                                            started_at=_when(c.get("started_at")) or timezone.now(), **fields)
            created[c["id"]] = row.pk
    return created


def _lines(run: Run, lines: list[dict], created: dict[int, int]) -> None:
    wanted = {ln["command_pk"] for ln in lines if ln.get("command_pk")}
    own = set(RunCommand.objects.filter(run=run, pk__in=wanted).values_list("pk", flat=True)) if wanted else set()
    levels = set(RunLogLine.Level.values)
    rows = [RunLogLine(run=run, seq=int(ln["seq"]), ts=_when(ln.get("ts")) or timezone.now(),
                       level=ln.get("level") if ln.get("level") in levels else RunLogLine.Level.INFO,
                       stream=str(ln.get("stream") or "kasa")[:8], text=str(ln.get("text", "")),
                       command_id=created.get(ln.get("command")) or (ln.get("command_pk") if ln.get("command_pk") in own
                                                                     else None))
            for ln in lines]
    RunLogLine.objects.bulk_create(rows, ignore_conflicts=True)  # a line already there (same seq) stays


def _end(run: Run, body: dict) -> None:
    out = body["outcome"]
    since = body.get("offline_since")
    note = ("the control database did not answer" + (f" from {since[:19].replace('T', ' ')} UTC" if since else "")
            + f"; recorded in the local journal of {body.get('host') or 'the worker'} and reconciled "
            + f"{timezone.now():%Y-%m-%d %H:%M:%S} UTC")
    seq = (RunLogLine.objects.filter(run=run).aggregate(m=Max("seq"))["m"] or 0) + 1
    status, error = out.get("status"), str(out.get("error") or "")
    if run.status == Run.Status.RUNNING:
        result = out.get("result")
        result = dict(result) if isinstance(result, dict) else dict(body.get("doc") or {})
        result["reconciled"] = {"offline_since": since, "at": timezone.now().isoformat(), "host": body.get("host")}
        if status == Run.Status.SUCCEEDED:
            run.succeed(result)
        elif status == Run.Status.CANCELLED:
            run.cancel(expect=(Run.Status.RUNNING,), error=f"{error} ({note})")
        else:
            run.fail(f"{error} ({note})" if error else note, result=result)
        text = f"reconciled: {note}"
    else:
        text = (f"the worker's own end, recorded while the control database did not answer: {status}"
                + (f": {error}" if error else "") + f"; the run had ended {run.status} meanwhile")
    RunLogLine.objects.create(run=run, seq=seq, level=RunLogLine.Level.WARNING, text=text)
    run.refresh_from_db()
    audit_record(action=f"run.{run.kind}.finished", source=AuditEntry.Source.WORKER, obj=run, customer=run.customer,
                 actor_repr=f"worker:{body.get('worker') or run.worker}",
                 result=(run.status + (f": {run.error}" if run.error else ""))[:300])


# --- who reconciles ----------------------------------------------------------------------------------------------
def settle(ctx) -> bool:
    """The worker's own reconciliation after an undo that went offline: retry with backoff until the database
    answers, for KASA_RECONCILE_PATIENCE seconds. True when done (the caller then removes the file)."""
    deadline = time.monotonic() + settings.KASA_RECONCILE_PATIENCE
    delay = 0.5
    while True:
        try:
            apply(ctx.run.pk, ctx.local.body, final=True)
        except DB_LOST as exc:
            with contextlib.suppress(Exception):
                connection.close()
            if time.monotonic() + delay > deadline:
                log.warning("run %s: the control database still does not answer (%s); its local journal %s stays "
                            "for the reaper", ctx.run.pk, str(exc).strip()[:200], ctx.local.path)
                return False
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        ctx.offline = False
        log.info("run %s reconciled from its local journal", ctx.run.pk)
        return True


def release(ctx) -> None:
    """The end of an execution (a worker's, or the reaper's undo of a dead one): when everything reached the
    database, the run's local journal goes; offline, it stays for the reaper, its lock released."""
    if ctx.local is not None:
        ctx.local.close(remove=not ctx.offline)
        ctx.local = None
        return
    if localjournal.path_for(folder(), ctx.run.pk).exists():  # one left by a dead worker, taken over and undone
        lock = localjournal.Lock(folder(), ctx.run.pk)
        if lock.acquire():
            localjournal.remove(folder(), ctx.run.pk)
            lock.release()


def take_over(run: Run) -> tuple[bool, dict | None]:
    """A running run whose worker is gone (reaper, redelivery). (True, None): that worker had finished — its end is
    in its local journal — and the run is reconciled now: nothing more to do. (False, doc): what it logged and
    wrote offline is in the database now, and doc is its local journal document (None: none, or refused), ahead of
    the run's `result` or equal to it, for the abandon hook to undo."""
    lock = localjournal.Lock(folder(), run.pk)
    if not lock.acquire():
        return False, None
    try:
        body = read(run.pk)
        if body is None:
            return False, None
        if body.get("outcome"):
            apply(run.pk, body, final=True)
            localjournal.remove(folder(), run.pk)
            return True, None
        apply(run.pk, body, final=False)
        body.update(lines=[], commands=[], deferred=[])
        localjournal.write(folder(), run.pk, body, keys())
        return False, journal_doc(run, body)
    finally:
        lock.release()


def sweep() -> list[int]:
    """The reaper's pass over this host's local journals: those whose worker is gone and that hold the run's end,
    or whose run has ended, are reconciled and removed. Returns their run ids. A run still running without an end
    in its file is left to runs_reap (take_over, then the undo)."""
    done = []
    for run_id in localjournal.listed(folder()):
        lock = localjournal.Lock(folder(), run_id)
        if not lock.acquire():
            continue  # its worker is alive (perhaps still undoing, or waiting for the database)
        try:
            body = read(run_id)
            if body is None:
                if not localjournal.path_for(folder(), run_id).exists():  # gone meanwhile, or set aside
                    localjournal.remove(folder(), run_id)  # (the lock file this pass made)
                continue
            run = Run.objects.filter(pk=run_id).first()
            if run is None:
                localjournal.remove(folder(), run_id)
                continue
            if not body.get("outcome") and (run.status in Run.ACTIVE or run.abandon_host):
                continue  # still running, or failed by another machine's reaper with its undo owed here
            apply(run_id, body, final=True)
            localjournal.remove(folder(), run_id)
            done.append(run_id)
        except DB_LOST:
            raise
        except Exception:  # one bad file must not stop the others
            log.exception("could not reconcile the local journal of run %s", run_id)
        finally:
            lock.release()
    return done
