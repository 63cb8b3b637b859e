"""An upgrade (or install) of a customer on a remote host (issue 14): upgrades.operations's order and guarantees,
with every change made on the host through one SSH session (upgrades.remote_job).

    preflight (on the host: service paths, live .env files, free disk) → verify (every zip checked and packed on
    the worker: nothing of a refused release reaches the host) → backup (a normal remote backup, pinned) → stage
    (tar through the scanner into the host as the customer's user, the tree checked there) → env (merged here
    from the live .env read there, written there) → install/migrate/build hooks (on the host, as the customer's
    user, the merged .env their environment) → stop (PM2 on the host) → switch (the symlinks, on the host) →
    start (Kasa's ecosystem file, on the host) → health (asked on the host) → record → cleanup

Every change is journalled before it is made, on the host's disk first (`.kasa-journals/run-<id>.json`, the key
of backups.remote_restore) and then in the run. A failure after the backup puts the customer back through the
same session (`put_back`: the symlinks and the ecosystem file back on the host, the databases restored from the
pre-upgrade backup through a forward of the session with Kasa's own client tools, as a remote restore does,
each .env proved unchanged, PM2 started there, health asked): `rolled_back` and the release marked bad; a
put-back that fails quarantines, the host's journal left there. A host lost mid-way fails the run naming it. A
worker that dies mid-way is put back by the reaper through a session of its own, from the host's journal
(`abandoned`).

The way back restores PostgreSQL and MySQL/MariaDB through the session's forwards (backups.remote_parts' targets,
backups.dbswap), and SQLite on the host as a remote restore does.

Not built on a remote host (refused before anything is touched): blue-green upgrades, smoke hooks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from django.conf import settings

from backups import dbswap
from backups.remote import host_facts
from backups.remote_parts import hold_forwarded_targets
from backups.remote_restore import _sqlite, _sqlite_in, host_journal_key
from customers import runtime
from customers.models import Customer
from engines import ecosystem, envfile, hostrestore, procman, releasepkg
from hosts.remote import RemoteError, RemoteHost
from operations.context import OperationError, RunCancelled, RunContext, RunLost

from . import preflight, remote_files, remote_preflight
from .journal import uninterruptible
from .models import Upgrade
from .preflight import Check
from .remote_job import RemoteJob
from .rollback import database_backup, drop_scratch, record_outcome, scratch_dir

HOOK_ORDER = releasepkg.HOOKS
PHASES = (("preflight", 1), ("verify", 1), ("backup", 4), ("stage", 2), ("env", 0.5), ("stop", 1), ("switch", 0.5),
          ("start", 2), ("health", 1), ("record", 0.3))


@dataclass
class Local:
    """What upgrades.operations shares with this module (it calls it: no import back, no cycle)."""

    refused: type
    backup: Callable
    record: Callable
    unpin_older: Callable
    outcome: Callable
    summary: Callable
    short: Callable


def session(ctx: RunContext, up: Upgrade, local: Local):
    """(RemoteHost, RemoteJob) for the run, the customer's folders and user checked on the host first; a refusal
    ends the upgrade `failed` (nothing touched) and raises."""
    customer, host = up.customer, up.customer.host

    def refuse(text: str):
        up.fail(text)
        raise OperationError(text)

    if not host.enabled:
        refuse(f"host {host.name} is disabled: no upgrade of {customer} connects to it; nothing was touched")
    if up.strategy == Upgrade.Strategy.BLUE_GREEN or up.switch_back:
        refuse(f"refused before touching anything: {customer} lives on host {host.name}, and a blue-green upgrade "
               "(or a switch back to its standby) on a remote host is not built yet; upgrade in place")
    if not customer.run_as:
        refuse(f"customer {customer} has no run_as user: on host {host.name} the release's files, hooks and services "
               "belong to the customer's user there; nothing was touched")
    try:
        remote = RemoteHost(host)
    except Exception as exc:  # noqa: BLE001 (engines.ssh: no trusted key, no key)
        refuse(f"{exc}; nothing was touched")
    try:
        facts = host_facts(remote, customer)
        job = RemoteJob(ctx, up, remote, facts, identity(remote, customer))
        hold_forwarded_targets(ctx, remote, customer)  # the way back's databases: through this session
    except (RemoteError, OperationError) as exc:
        remote.close()
        refuse(f"{exc}; nothing was touched" if "nothing was touched" not in str(exc) else str(exc))
    ctx.info(f"customer on {remote.where}: the release is checked here, unpacked there as {customer.run_as} (uid "
             f"{job.who['uid']} on {host.name}), switched there; databases through forwards of the session")
    return remote, job


def identity(remote: RemoteHost, customer: Customer) -> dict:
    """The customer's run_as user as the host knows it (uids differ between machines); never root."""
    who = remote.call("engines.hostrestore.identity", customer.run_as)
    if not isinstance(who, dict) or not all(isinstance(who.get(k), int) for k in ("uid", "gid")) or who["uid"] == 0:
        raise RemoteError(f"{remote.where} answered a user that is not one: not trusted")
    return who


def upgrade(ctx: RunContext, up: Upgrade, local: Local) -> dict:
    remote, job = session(ctx, up, local)
    with remote:
        try:
            if up.dry_run:
                ctx.phases(("preflight", 1))
                with job.steps.step("preflight") as slog:
                    report = _preflight(job, slog, local)
                job.journal.remove_on_host()  # nothing to undo: a dry run changes nothing
                up.succeed()
                ctx.info(f"dry run: the upgrade to {up.to_release} may go ahead on {job.host} ({report.kind})")
                return {"upgrade": up.pk, "dry_run": True, "preflight": up.preflight, "host": job.host}
            _upgrade(job, local)
        except RunLost:
            raise  # the reaper's on_abandon hook (operations.abandon) decides
        except BaseException as exc:
            failed(job, exc, local)
        finally:
            drop_scratch(ctx.run.pk)
        return {**local.summary(job), "host": job.host}


def _upgrade(job: RemoteJob, local: Local) -> None:
    ctx, up = job.ctx, job.upgrade
    ctx.phases(*PHASES)
    with job.steps.step("preflight") as slog:
        report = _preflight(job, slog, local)
    job.changes = report.changes
    hooks = [(p, 1) for p in HOOK_ORDER if any(p in ch.hooks for ch in job.changes)]
    ctx.phases(*PHASES[:5], *hooks, *PHASES[5:])
    with job.steps.step("verify") as slog:
        try:
            remote_files.pack(job, slog)
        except OperationError as exc:
            raise local.refused(f"{exc}; nothing was touched") from None
    with job.steps.step("backup") as slog:
        local.backup(job, slog, pin=f"before upgrade #{up.pk} to {up.to_release} (run #{ctx.run.pk})")
    job.mark(touched=True)  # from here on, any failure puts the customer back
    with job.steps.step("stage") as slog:
        remote_files.stage(job, slog)
    with job.steps.step("env") as slog:
        remote_files.merge_envs(job, slog)
    for phase in HOOK_ORDER:
        if any(phase in ch.hooks for ch in job.changes):
            with job.steps.step(phase) as slog:
                _hooks(job, phase, slog)
    with job.steps.step("stop") as slog:
        stop(job, slog)
    with job.steps.step("switch") as slog:
        remote_files.switch(job, slog)
    with job.steps.step("start") as slog:
        remote_files.start(job, slog, {ch.service: ch.dest for ch in job.changes},
                           strict={ch.service for ch in job.changes})
    with job.steps.step("health") as slog:
        health(job, slog)
    with job.steps.step("record") as slog:
        local.record(job, slog, {**(job.customer.versions or {}), **up.to_versions})
    up.succeed()
    ctx.info(f"{up.get_kind_display().lower()} to {up.to_release} on {job.host} succeeded")
    with uninterruptible(ctx), job.steps.step("cleanup") as slog:
        try:
            remote_files.cleanup(job, slog)
            local.unpin_older(job, slog)
        except Exception as exc:  # noqa: BLE001 (nothing here fails the upgrade)
            slog.warning(f"cleanup: {exc}")
        finish(job, slog)


def finish(job: RemoteJob, slog) -> None:
    """The change holds: the journal is emptied, the host's copy removed."""
    try:
        job.journal.clear()
        job.journal.remove_on_host()
    except Exception as exc:  # noqa: BLE001
        slog.warning(f"the journal could not be removed on {job.host}: {exc}")


def _preflight(job: RemoteJob, slog, local: Local):
    up = job.upgrade
    ctx = job.ctx
    ctx.info(f"customer commands run as {job.user} (uid {job.who['uid']} on {job.host})")
    report = remote_preflight.check(job, up.to_release, force=up.force, zips_dir=str(scratch_dir(ctx.run.pk)))
    smoke = [ch.component for ch in report.changes if releasepkg.SMOKE in ch.hooks]
    if smoke:
        report.checks.append(Check("smoke", False, f"{', '.join(smoke)} ship a smoke hook: not built yet for a "
                                                   f"customer on a remote host ({job.host})"))
    preflight.record(up, report, slog)
    running = report.kind != Upgrade.Kind.INSTALL
    job.mark(healthy_before=[s.name for s in job.specs() if s.health_url] if running else [])
    if not report.ok:
        raise local.refused(f"preflight failed: {'; '.join(report.problems())}; nothing was touched")
    return report


def _hooks(job: RemoteJob, phase: str, slog) -> None:
    """The release's hooks on the host, as the customer's user there, in the staged folder, their environment the
    merged .env (read there, sent on the launcher's stdin) plus PATH, locale, HOME, USER (engines.hostupgrade)."""
    if not job.journal.has("hooks"):
        job.journal.add({"type": "hooks"})  # from here the databases may have changed: a rollback restores them
    for ch in job.changes:
        argv = ch.hooks.get(phase)
        if not argv:
            continue
        values = job.call("engines.hostupgrade.read_env", str(job.root), ch.dest, job.user)
        for secret in [v for k, v in values.items() if envfile.is_secret(k, v)] + procman.env_secrets(values):
            job.ctx.add_secret(secret)
        slog.info(f"{ch.component} {ch.version}: {phase} hook in {ch.dest} on {job.host} as {job.user}")
        try:
            job.hook(slog, list(argv), ch.dest, values, timeout=settings.KASA_HOOK_TIMEOUT)
        except OperationError as exc:
            raise OperationError(f"the {phase} hook of {ch.component} {ch.version} failed: {exc}") from None


def stop(job: RemoteJob, slog) -> None:
    specs = job.specs()
    job.journal.add({"type": "services_stopped", "healthy_before": job.doc.get("healthy_before") or []})
    slog.info(f"stopping {len(specs)} service(s) on {job.host}")
    job.services("stop", specs, slog.info)


def health(job: RemoteJob, slog) -> None:
    specs = [s for s in job.specs() if s.health_url]
    runtime.check_health(job.ctx, specs, checker=job.remote.check_health)  # asked on the host
    slog.info(f"healthy: {', '.join(s.name for s in specs)}" if specs else
              "no service has a health URL: none was health-checked")


def started_specs(job: RemoteJob) -> list[procman.ServiceSpec]:
    """The services whose folder is there, with Kasa's ecosystem file where it lists their app (as
    customers.runtime.service_specs does locally)."""
    root = str(job.root)
    path = os.path.join(root, ecosystem.FILE_NAME)
    managed = set(job.call("engines.hostupgrade.ecosystem_apps", root, path, job.user) or [])
    specs = job.present_specs()
    for s in specs:
        if s.manager == "pm2" and s.app_name in managed:
            s.ecosystem = path
    return specs


# --- databases -----------------------------------------------------------------------------------------------
def restore_databases(job: RemoteJob, slog, *, backup_id: int, journal) -> None:
    """upgrades.rollback.restore_databases for a remote customer: PostgreSQL and MySQL/MariaDB through the session's
    forwards (backups.dbswap: a fresh database swapped in, or in place / through prefixed tables), SQLite on the
    host as a remote restore does it (streamed into a private folder there, written beside the live file with its
    owner, rows counted, swapped in; journalled as `host` steps)."""
    ctx = job.ctx
    held = database_backup(ctx, slog, backup_id)
    if held is None:
        return
    bk, arts, store, keyring = held
    servers = [a for a in arts if not _sqlite(a)]
    plan = SimpleNamespace(backup=bk, customer=job.customer, clone=False, root=job.root, to_databases={},
                           artifacts=servers)
    for art in servers:
        dbswap.restore_fresh(ctx, plan, store, keyring, art, journal)
    way_back = None
    if journal is job.journal and dbswap.in_place(journal):  # a manual rollback's: its own way back first
        way_back = dbswap.way_back_backup(ctx, job.customer, trigger="upgrade",
                                          pin=f"{dbswap.WAY_BACK}rollback run #{ctx.run.pk}")
        slog.info(f"backup #{way_back} of the databases taken with the services stopped: the way back")
    dbswap.swap_all(ctx, plan, journal, way_back=way_back)
    for art in arts:
        if _sqlite(art):
            _sqlite_in(ctx, SimpleNamespace(backup=bk, root=job.root), job.remote, art,
                       job.facts["sqlite"][art.source], journal)
    slog.info(f"databases {', '.join(a.source for a in arts)} restored from backup #{bk.pk}; the changed ones are "
              "kept aside until the way back holds")


def undo_database(job: RemoteJob, step: dict) -> None:
    """One database step of a journal undone: on the host for SQLite (engines.hostrestore.sqlite_undo), through
    the forward otherwise (backups.dbswap.undo)."""
    if step.get("host"):
        what = job.call("engines.hostrestore.sqlite_undo", step, step["live"], f"r{job.ctx.run.pk}", str(job.root))
        job.ctx.info(f"database {step['db']} on {job.host}: {what}")
    else:
        dbswap.undo(job.ctx, step)


def finish_database(job: RemoteJob, step: dict) -> None:
    """What a held database step kept aside goes: the previous SQLite file on the host, or dbswap.finish."""
    if step.get("host"):
        if step["type"] == "db_swap" and step.get("old"):
            job.call("engines.hostrestore.sqlite_remove", step["old"], str(job.root))
    else:
        dbswap.finish(job.ctx, step)


# --- the way back --------------------------------------------------------------------------------------------
def failed(job: RemoteJob, exc: BaseException, local: Local) -> None:
    """Always raises (operations._failed's remote twin): the outcome, after putting the customer back."""
    with uninterruptible(job.ctx):
        up, ctx = job.upgrade, job.ctx
        ctx.record(up.refresh_from_db)
        if up.status == Upgrade.Status.SUCCEEDED:
            raise exc
        if not job.touched:
            message = str(exc) if isinstance(exc, local.refused) else \
                f"failed before anything was touched: {local.short(exc)}"
            record_outcome(job, Upgrade.Status.FAILED, message)
            try:
                job.journal.remove_on_host()  # it holds nothing to undo
            except RemoteError as gone:
                ctx.warning(f"the journal could not be removed on {job.host}: {gone}")
            if isinstance(exc, (RunCancelled, KeyboardInterrupt)):
                raise exc
            raise OperationError(message, result=job.doc) from None
        ctx.error(f"{job.steps.failed or 'a step'} failed on {job.host}: {local.short(exc)}; putting the customer "
                  "back")
        target = f"to {job.release_name}" if up.to_release_id else f"of upgrade #{up.rolls_back_id}"
        what = (f"{up.get_kind_display().lower()} {target} on host {job.host} failed at "
                f"{job.steps.failed or 'an unknown step'}: {local.short(exc)}")
        ok = put_back(job)
        if not ok:
            job.doc["rollback_error"] = (f"{job.doc.get('rollback_error')}; the journal stays on host {job.host} "
                                         f"({job.journal.path})")
        message = local.outcome(job, what, ok)
        if isinstance(exc, (RunCancelled, KeyboardInterrupt)):
            raise exc
        raise OperationError(message, result=job.doc) from None


def put_back(job: RemoteJob) -> bool:
    """upgrades.rollback.put_back on the host: True when the customer is back as it was; False (the error in
    job.doc["rollback_error"]) when an operator must look."""
    ctx, j = job.ctx, job.journal
    with uninterruptible(ctx):
        restore_db = j.has("hooks") and job.upgrade.backup_id is not None and \
            job.upgrade.kind != Upgrade.Kind.ROLLBACK
        unswap_db = any(dbswap.is_step(s) for s in j.steps)
        live_touched = j.has("services_stopped") or j.has("switch") or restore_db or unswap_db
        stopped = j.of("services_stopped")
        healthy_before = (stopped[0]["healthy_before"] if stopped else job.doc.get("healthy_before")) or []
        root = str(job.root)
        try:
            job.mark(rolling_back=True)
            if live_touched:
                with job.steps.step("rollback: stop") as slog:
                    job.services("stop", job.specs(), slog.info)
            else:
                job.steps.skip("rollback: stop", "nothing live was changed: the services kept running")
            with job.steps.step("rollback: switch") as slog:
                for line in job.call("engines.hostupgrade.undo_files", root, j.steps):
                    slog.info(f"{line} on {job.host}")
                for step in reversed(j.of("versions")):
                    ctx.record(lambda v=step["old"]: Customer.objects.filter(pk=job.customer.pk).update(versions=v),
                               replay="customer_versions", versions=step["old"])
                    job.customer.versions = step["old"]
                    slog.info("recorded versions put back")
            if restore_db:
                with job.steps.step("rollback: database") as slog:
                    restore_databases(job, slog, backup_id=job.upgrade.backup_id, journal=job.undo_journal)
            elif unswap_db:
                with job.steps.step("rollback: database") as slog:
                    for step in reversed(j.steps):
                        if dbswap.is_step(step):
                            undo_database(job, step)
                    slog.info("the databases as they were before this run are live again")
            else:
                job.steps.skip("rollback: database", "no hook ran: the databases were not changed")
            with job.steps.step("rollback: env") as slog:
                remote_files.check_env(job, slog)
            if live_touched and job.upgrade.kind == Upgrade.Kind.INSTALL:
                job.steps.skip("rollback: start", "an install: no service ran before it")
            elif live_touched:
                with job.steps.step("rollback: start") as slog:
                    job.services("start", started_specs(job), slog.info)
                with job.steps.step("rollback: health") as slog:
                    checked = [s for s in job.specs() if s.name in healthy_before and s.health_url]
                    runtime.check_health(ctx, checked, checker=job.remote.check_health)
                    slog.info(f"healthy: {', '.join(s.name for s in checked) or 'no service to check'}")
        except Exception as exc:  # noqa: BLE001 — whatever it is, the customer now needs an operator
            job.doc["rollback_error"] = str(exc)[:2000]
            try:
                job.mark()
            except Exception:  # noqa: BLE001 (the host is gone: the run's own copy says it)
                job.ctx.keep_local().save_doc(job.doc)
            ctx.error(f"ROLLBACK FAILED on {job.host}: {exc}; nothing further is changed or deleted")
            return False
        with job.steps.step("rollback: cleanup") as slog:
            for step in reversed(job.undo_journal.steps):
                try:
                    finish_database(job, step)
                except Exception as exc:  # noqa: BLE001
                    slog.warning(f"could not drop {step.get('old') or step.get('db')}: {exc}")
            try:
                job.call("engines.hostupgrade.after_undo", root, j.steps)
            except RemoteError as exc:
                slog.warning(f"could not remove what the failed attempt left on {job.host}: {exc}")
            job.undo_journal.steps.clear()
            job.mark(rolling_back=False, rolled_back=True)
            try:
                job.journal.remove_on_host()
            except RemoteError as exc:
                slog.warning(f"the way back holds but its journal could not be removed on {job.host}: {exc}")
            slog.info(f"staged releases and the databases kept aside removed on {job.host}")
    return True


def abandoned(run, ctx: RunContext, up: Upgrade, what: str, failed_step: str, local: Local) -> None:
    """The worker died mid-way (the reaper, on any worker: a remote customer's host is reached from each): a
    session of its own puts the customer back from the journal on the host (written before the run's copy, so at
    least as new; the run's for what the host does not hold). A host that does not answer, or a journal that
    cannot be trusted, quarantines naming the host and the journal."""
    from engines.localjournal import JournalRefused

    from .rollback import quarantine

    host = up.customer.host
    where = f"{host.name} ({hostrestore.journal_path(host.root(), run.pk)})"
    doc = dict(run.result or {})
    try:
        remote = RemoteHost(host)
    except Exception as exc:  # noqa: BLE001
        quarantine(SimpleNamespace(ctx=ctx, upgrade=up), f"{what}; the way back could not reach host {host.name} "
                   f"({exc}): quarantined, nothing was deleted; the journal is on {where} and in the run")
        return
    with remote:
        try:
            body = remote.call("engines.hostrestore.journal_read", host.root(), run.pk,
                               host_journal_key(host.name))
            if isinstance(body, dict) and isinstance(body.get("steps"), list):
                doc["journal"] = body["steps"]
                doc["rollback"] = body.get("rollback") if isinstance(body.get("rollback"), list) else []
            facts = host_facts(remote, up.customer)
            job = RemoteJob(ctx, up, remote, facts, identity(remote, up.customer), doc=doc)
            hold_forwarded_targets(ctx, remote, up.customer)
        except (RemoteError, OperationError, JournalRefused) as exc:
            quarantine(SimpleNamespace(ctx=ctx, upgrade=up), f"{what}; the way back failed on host {host.name} "
                       f"({exc}): quarantined, nothing was deleted; the journal is on {where} and in the run")
            return
        job.steps.failed = failed_step
        ctx.info(f"putting the customer back on {host.name} from the journal there")
        ok = put_back(job)
        if not ok:
            job.doc["rollback_error"] = f"{job.doc.get('rollback_error')}; the journal stays on {where}"
        local.outcome(job, what, ok)
