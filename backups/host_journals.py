"""The way back of a remote restore in place (issue 14), shared by the run that undoes its own journal and by the
replay of a journal a lost host kept.

A restore in place on a remote host (backups.remote_restore) writes its journal on the host's disk
(`<customers root>/.kasa-journals/run-<id>.json`, engines.hostrestore) before each change. When the run fails it
undoes that journal through its own session (`undo`); when the host is lost mid-way — the connection cut during a
stream, a swap or a restart — or the worker dies, the journal stays on the host. It is replayed here:

- `replay_run`: by backups.restore.abandon, for a run whose worker died (the reaper; any worker reaches a remote
  host over SSH, so nothing is owed to a machine);
- `replay_host`: by the host probe (hosts.tasks.probe_host, through hosts.services' journal hook) whenever a
  reachable host still holds journals — the run that failed while its host was unreachable is undone once the
  host answers again.

A journal is followed only when it is authenticated (its HMAC under the host's key: a forged, corrupt or swapped-in
file is refused, reported on its run and left alone), names a restore of a customer of this host whose root it
stays inside, and its run is no longer running (a running run's worker owns it). One replay of a journal at a
time (engines.hostrestore.journal_claim). The undo is the run's own (the same code, in reverse, through a
session); the services the journal stopped are started again, as the customer's user, when the undo is whole;
the journal goes; the run's log and the audit trail say what was done.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

from django.conf import settings

from audit.models import AuditEntry
from audit.services import audit_record
from customers.models import Customer
from engines import localjournal, procman, secretbox
from hosts.models import Host
from hosts.remote import RemoteError, RemoteHost
from operations import slots
from operations.context import OperationError, RunContext
from operations.models import Run

from . import dbswap, remote_parts

log = logging.getLogger(__name__)

LOST_MARKS = ("session ended", "unreachable", "no answer")  # a RemoteError that means the host is gone


def is_lost(exc: BaseException) -> bool:
    return isinstance(exc, RemoteError) and any(m in str(exc) for m in LOST_MARKS)


# --- what the run and the replay share ---------------------------------------------------------------------------
def host_journal_key(host_name: str) -> str:
    """The HMAC key of a host's journals: derived from KASA_SECRET_KEYS for that host alone (hex)."""
    first = secretbox.parse_keys(settings.KASA_SECRET_KEYS)[0]
    return hmac.new(first.encode(),
                    b"kasa host journal v1\0" + host_name.encode(), hashlib.sha256).hexdigest()


def service_specs(customer: Customer, root: str) -> list[procman.ServiceSpec]:
    """The customer's services as the host runs them (identity resolved there, see engines.hostrestore.services)."""
    return [procman.ServiceSpec(name=s.name, folder=os.path.join(root, s.path or "."), manager=s.process_manager,
                                app_name=s.app_name, start_command=tuple(s.start_command or ()),
                                stop_command=tuple(s.stop_command or ()),
                                health_url=s.health_url, root=root)
            for s in sorted(customer.services.all(), key=lambda s: s.name)]


def services(ctx: RunContext, remote: RemoteHost, run_as: str, specs, action: str) -> None:
    """Stop or start `specs` (PM2 apps, start commands) on the host, each as the customer's user there."""
    if not specs:
        return
    wire = [{"name": s.name, "folder": s.folder, "manager": s.manager, "app_name": s.app_name,
             "start_command": list(s.start_command), "stop_command": list(s.stop_command), "root": s.root}
            for s in specs]
    answer = remote.call("engines.hostrestore.services", action, wire, run_as, settings.KASA_REMOTE_PM2 or "pm2",
                         timeout=settings.KASA_SERVICE_TIMEOUT, settle=settings.KASA_PM2_SETTLE)
    if not isinstance(answer, dict) or not isinstance(answer.get("lines"), list):
        raise OperationError(f"{remote.where} answered something that is not a service report: not trusted")
    for line in answer["lines"][:50]:
        ctx.info(f"{remote.host.name}: {str(line)[:300]}")
    if not answer.get("ok"):
        raise OperationError(f"on {remote.host.name}: {str(answer.get('error'))[:2000]}")


def undo(ctx: RunContext, remote: RemoteHost, journal, customer: Customer, root: str, specs) -> bool:
    """Undo the journal in reverse through the session; True when everything was put back. `journal`: .steps,
    .clear(), .services_down (backups.remote_restore.Journal, or a replayed one). `specs`: the services the run
    touched (those the journal says it stopped are stopped again first, and started once everything is back).
    A host that is gone is not asked again step after step: what is left stays in its journal there."""
    from customers import runtime

    down: list[str] = []

    def on_host(fn):
        if down:
            raise RemoteError(down[0])
        try:
            return fn()
        except RemoteError as exc:
            if is_lost(exc):
                down.append(str(exc))
            raise

    with ctx.uninterruptible():
        ok = True
        restart = next((s for s in journal.steps if s["type"] == "services_stopped"), None)
        specs = [s for s in specs if restart and s.name in (restart.get("services") or [])]
        if restart:  # started after the swap perhaps (a restart cut short): nothing runs while it is put back
            try:
                on_host(lambda: services(ctx, remote, customer.run_as, specs, "stop"))
            except Exception as exc:
                ctx.warning(f"could not stop the services before putting the previous state back: {exc}")
        for step in reversed(journal.steps):
            try:
                if step["type"] in ("files", "carry", "staging"):
                    moved = on_host(lambda step=step: remote.call("engines.hostrestore.undo_step", root, step))
                    if moved and step["type"] == "files":
                        ctx.info(f"put back {step['live']} on {remote.host.name}")
                elif step.get("host"):
                    what = on_host(lambda step=step: remote.call(
                        "engines.hostrestore.sqlite_undo", step, step["live"], f"r{ctx.run.pk}", root))
                    ctx.info(f"database {step['db']} on {remote.host.name}: {what}")
                elif step["type"] != "services_stopped":
                    dbswap.undo(ctx, step)
            except Exception as exc:
                ok = False
                ctx.error(f"could not undo {step.get('type')} ({step.get('live') or step.get('db') or ''}): {exc}")
        if ok:
            try:
                journal.clear()
            except Exception as exc:  # the host went away after the undo: its journal says nothing is left
                ctx.warning(f"the undo is complete but its journal could not be removed on {remote.host.name}: {exc}")
        if restart and ok:
            try:
                services(ctx, remote, customer.run_as, specs, "start")
                before = set(restart.get("healthy_before") or [])
                runtime.check_health(ctx, [s for s in specs if s.name in before], checker=remote.check_health)
            except Exception as exc:
                journal.services_down = str(exc)
                ctx.error(f"the previous files and databases are back but the services did not come up: {exc}")
        return ok


def cleanup(ctx: RunContext, remote: RemoteHost, journal, root: str) -> None:
    """The restore holds: the staging folder and the previous copies go, then the journal."""
    for step in reversed(journal.steps):
        try:
            if step["type"] == "staging":
                remote.call("engines.hostrestore.remove_tree", root, step["path"])
            elif remote_parts.clean_up(remote, root, step):
                continue
            elif step.get("host"):
                if step["type"] == "db_swap" and step.get("old"):
                    remote.call("engines.hostrestore.sqlite_remove", step["old"], root)
            elif dbswap.is_step(step):
                dbswap.finish(ctx, step)
        except Exception as exc:
            ctx.warning(f"could not remove the previous copy ({step.get('path') or step.get('db')}): {exc}")
    try:
        journal.clear()
    except Exception as exc:
        ctx.warning(f"the restore holds but its journal could not be removed on {remote.host.name}: {exc}")


# --- the replay --------------------------------------------------------------------------------------------------
class Replayed:
    """A journal read back from the host, as `undo` and `cleanup` use it: cleared by removing it there."""

    def __init__(self, remote: RemoteHost, run_id: int, steps: list):
        self.remote, self.run_id, self.steps = remote, run_id, steps
        self.services_down = ""

    def clear(self) -> None:
        self.remote.call("engines.hostrestore.journal_remove", self.remote.host.root(), self.run_id)
        self.steps = []


@dataclass
class Outcome:
    run: int
    what: str  # replayed, incomplete, finished, refused, skipped
    message: str


def replay_run(run: Run, ctx: RunContext) -> Outcome | None:
    """The reaper's part (backups.restore.abandon): the dead worker's journal on the customer's host, replayed now
    when the host answers; otherwise it stays there for the host probe's pass. None: the host holds none."""
    host = Customer.objects.select_related("host").get(pk=run.customer_id).host
    try:
        with _connect(host) as remote:
            return _one(remote, run.pk, ctx)
    except (RemoteError, OperationError) as exc:
        ctx.error(f"the worker died mid-restore on host {host.name}, whose journal could not be replayed now "
                  f"({exc}): it stays there and is replayed when the host answers again (its probe)")
        return Outcome(run.pk, "skipped", str(exc))


def replay_host(host: Host) -> list[Outcome]:
    """Every journal left on `host` whose run no longer runs: undone (or, for a restore that held, cleaned up),
    each reported on its run. RemoteError/OperationError when the host cannot be reached at all."""
    outcomes = []
    with _connect(host) as remote:
        for run_id in _listed(remote):
            try:
                outcome = _one(remote, run_id, None)
            except RemoteError as exc:
                if is_lost(exc):
                    raise
                outcome = Outcome(run_id, "incomplete", str(exc))
            if outcome is not None:
                outcomes.append(outcome)
    return outcomes


def replay_before(ctx: RunContext, remote: RemoteHost, customer: Customer) -> None:
    """A new restore of `customer`, holding it, first replays what an earlier run of it left on the host (which
    a probe has not replayed yet): it never starts from a half-swapped customer. OperationError (nothing touched)
    when such a journal cannot be replayed."""
    ids = _listed(remote)
    for run in Run.objects.filter(pk__in=ids, customer=customer).exclude(pk=ctx.run.pk).order_by("pk"):
        outcome = _one(remote, run.pk, None, holder=ctx.run)
        if outcome is None:
            continue
        if outcome.what == "foreign":
            ctx.warning(f"{outcome.message} (this restore goes on)")
            continue
        if outcome.what not in ("replayed", "finished"):
            raise OperationError(f"refused before touching anything: run {run.pk} of {customer} left its journal on "
                                 f"host {remote.host.name} and it could not be replayed: {outcome.message}")
        ctx.info(f"run {run.pk} had left its journal on host {remote.host.name}; replayed first: {outcome.message}")


def replay_from_probe(host: Host) -> list[str]:
    """hosts.services' journal hook: the probe found journals on a host that answers. What was done, a line each."""
    try:
        return [f"run {o.run}: {o.what}: {o.message}" for o in replay_host(host)]
    except (RemoteError, OperationError) as exc:
        log.warning("host %s: its journals could not be replayed now: %s", host.name, exc)
        return [f"its journals could not be replayed now: {exc}"]


def _listed(remote: RemoteHost) -> list[int]:
    ids = remote.call("engines.hostrestore.journal_list", remote.host.root())
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise RemoteError(f"{remote.where} answered a list of journals that is not one: not trusted")
    return ids


def _connect(host: Host) -> RemoteHost:
    if host.is_local:
        raise OperationError("the local host keeps no host journals (a local restore's journal is local)")
    if not host.enabled:
        raise OperationError(f"host {host.name} is disabled: nothing connects to it, its journals stay there")
    try:
        return RemoteHost(host)
    except Exception as exc:  # engines.ssh: no trusted key, no key
        raise OperationError(str(exc)) from None


def _one(remote: RemoteHost, run_id: int, ctx: RunContext | None, holder: Run | None = None) -> Outcome | None:
    """Replay one journal; `holder`: the caller's run, which holds the customer (replay_before)."""
    host = remote.host
    run = Run.objects.filter(pk=run_id).select_related("customer", "customer__host").first()
    if run is not None and run.status in Run.ACTIVE:
        return None  # its worker owns it (or the reaper fails it first, then abandon replays it)
    if run is not None and not _in_place_restore(run):
        # An upgrade's, a rollback's, a copy's or a move's journal (same folder, same key): theirs to undo (the
        # upgrade's reaper path, an operator after a quarantine), never this restore replay's. Left as it is.
        return Outcome(run_id, "foreign", f"the journal of {run.kind} run {run_id} on host {host.name} is not a "
                                          "restore in place's: left there for its own way back or an operator")
    if run is not None and holder is None:
        busy = Run.objects.filter(customer_id=run.customer_id, mutating=True, status__in=Run.ACTIVE).first()
        if busy is not None:  # never beside another change of the customer; a restore replays it first itself
            return Outcome(run_id, "skipped", f"run {busy.pk} of the customer is under way")
    claimed = remote.call("engines.hostrestore.journal_claim", host.root(), run_id)
    if claimed is None:
        return None  # none there: the run changed nothing on the host, or its journal is gone already
    if not claimed:
        return Outcome(run_id, "skipped", "another replay of this journal is under way")
    loaded = remote.call("engines.hostrestore.journal_load", host.root(), run_id, _key(host))
    if not isinstance(loaded, dict):
        raise RemoteError(f"{remote.where} answered a journal that is not one: not trusted")
    if loaded.get("refused") is not None:
        return _refuse(host, run, ctx, run_id, str(loaded["refused"])[:500])
    body = loaded.get("body")
    if body is None:
        return None  # removed meanwhile
    problem = _untrusted(host, run, body)
    if problem:
        return _refuse(host, run, ctx, run_id, problem)
    ctx = ctx or RunContext(run)
    customer, root, steps = run.customer, os.path.normpath(body["root"]), body["steps"]
    journal = Replayed(remote, run_id, steps)
    with ctx.uninterruptible():
        if any(dbswap.is_step(s) and not s.get("host") for s in steps):
            remote_parts.hold_forwarded_targets(ctx, remote, customer)
        if run.status == Run.Status.SUCCEEDED:  # it held; only its cleanup was cut short
            cleanup(ctx, remote, journal, root)
            outcome = Outcome(run_id, "finished", f"the restore held: its leftovers on host {host.name} were "
                                                  "removed with its journal")
        elif undo(ctx, remote, journal, customer, root, service_specs(customer, root)):
            what = "the pre-restore state was put back" if _touched(steps) else "nothing had been touched"
            if journal.services_down:
                what += f", but the services did not come back up ({journal.services_down}): an operator must look"
            outcome = Outcome(run_id, "replayed", f"its journal on host {host.name} was replayed: {what}")
        else:
            outcome = Outcome(run_id, "incomplete", f"its journal on host {host.name} could not be fully replayed: "
                                                    "it stays there (tried again at the host's next probe)")
    (ctx.info if outcome.what != "incomplete" else ctx.error)(outcome.message)
    audit_record(action=f"run.{run.kind}.host_journal", source=AuditEntry.Source.SYSTEM, obj=run,
                 customer=customer, actor_repr=f"worker:{slots.worker_name()}",
                 result=f"{outcome.what}: {outcome.message}")
    return outcome


def _in_place_restore(run: Run) -> bool:
    p = run.params or {}
    return run.kind == "restore" and not (p.get("to_root") or p.get("to_host") or p.get("to_databases"))


def _key(host: Host) -> str:
    return host_journal_key(host.name)


def _touched(steps: list) -> bool:
    return any(s.get("type") in ("services_stopped", "files", "carry", "db_swap") for s in steps)


def _untrusted(host: Host, run: Run | None, body: dict) -> str:
    """Why an authenticated journal is still not followed ("" when it is)."""
    if run is None:
        return "its run is not in the control database"
    if run.kind != "restore" or run.customer is None or run.customer.host_id != host.pk:
        return f"run {run.pk} is not a restore of a customer of host {host.name}"
    root = body.get("root")
    if not isinstance(root, str) or os.path.normpath(root) != os.path.normpath(run.customer.root):
        return f"it names the root {root!r}, not the customer's ({run.customer.root})"
    steps = body.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("type"), str) for s in steps):
        return "its steps are not a list of steps"
    outside = localjournal.outside(steps, root)
    if outside:
        return f"it names paths outside {root}: {', '.join(outside[:3])}"
    return ""


def _refuse(host: Host, run: Run | None, ctx: RunContext | None, run_id: int, why: str) -> Outcome:
    """A journal that is not followed is left on the host as it is, for an operator; said once on its run."""
    message = (f"the journal of run {run_id} on host {host.name} was refused, nothing in it was followed: {why}; it "
               f"stays there ({host.root()}/.kasa-journals/run-{run_id}.json): an operator must look")
    if run is None:
        log.error("%s", message)
        return Outcome(run_id, "refused", message)
    action = f"run.{run.kind}.host_journal_refused"
    if ctx is not None or not AuditEntry.objects.filter(action=action, object_type=Run._meta.label,
                                                        object_id=str(run.pk)).exists():
        (ctx or RunContext(run)).error(message)
        audit_record(action=action, source=AuditEntry.Source.SYSTEM, obj=run, customer=run.customer,
                     actor_repr=f"worker:{slots.worker_name()}", result=why)
    return Outcome(run_id, "refused", message)
