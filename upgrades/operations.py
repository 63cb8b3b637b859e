"""The upgrade and rollback operations (Run kinds "upgrade" and "rollback"), step by step.

Upgrade (and install, an upgrade from nothing), each step an UpgradeStep row and lines in the run's log:

    preflight → backup (pinned; if it fails nothing is touched) → stage → env → install/migrate/build hooks
    → stop → switch → start → health → record → cleanup (prune old releases; never fails the upgrade)

Before the backup has succeeded, a failure ends the upgrade `failed` with nothing touched. After it,
every change is journalled before it is made and any failure puts the customer back (rollback.put_back):
`rolled_back` (and the release is marked bad for the customer), or `quarantined` when that fails too.

The release folders' side (staging, the merged .env, the switch, the ecosystem file, pruning) is
upgrades.release_files: below the customer's root only through descriptors (engines.beneath).

A manual rollback undoes the customer's last successful upgrade with the same mechanics: a safety
backup, stop, the symlinks back to the previous releases, the databases from the upgrade's pre-upgrade
backup (fresh database, then swap), start, health. If it fails, its own journal is undone (the customer
stays on the upgraded release); if that fails, it is quarantined.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.utils import timezone

from backups import dbswap
from backups.models import Backup
from backups.operations import make_backup
from backups.reading import refuse_unreadable
from backups.services import BackupInputError, backup_params, backup_pin
from customers import runtime
from engines import beneath, envfile, layout, procman, releasepkg, runas
from engines.humanize import human_size, human_time
from operations import slots
from operations.context import OperationError, RunCancelled, RunContext, RunLost

from . import bluegreen, preflight, release_files, standby
from .journal import env_fingerprints, uninterruptible
from .models import Upgrade, UpgradeStep
from .rollback import (
    Job,
    discard_running_backups,
    drop_scratch,
    hold_backup,
    mark_bad,
    put_back,
    quarantine,
    record_outcome,
    restore_databases,
    scratch_dir,
)
from .selectors import rollback_target

HOOK_ORDER = releasepkg.HOOKS  # install, migrate, build: every component's install first, then migrate…


class Refused(OperationError):
    """Failed before anything was touched (preflight, backup): the upgrade ends `failed`."""


# --- entry points (operations.registry) -------------------------------------------------------------
def upgrade(ctx: RunContext) -> dict:
    up = Upgrade.objects.select_related("customer", "to_release").get(run_id=ctx.run.pk)
    if not up.begin():
        raise OperationError(f"upgrade #{up.pk} is {up.status}, not pending: not started again")
    if not up.customer.host.is_local:  # on another host: every change made there (upgrades.remote)
        from . import remote

        return remote.upgrade(ctx, up, _remote_shares())
    job = Job(ctx, up)
    try:
        if up.dry_run:
            ctx.phases(("preflight", 1))
            with job.steps.step("preflight") as slog:
                report = _preflight(job, slog, zips_dir=None)
            up.succeed()
            ctx.info(f"dry run: the upgrade to {up.to_release} may go ahead ({report.kind})")
            return {"upgrade": up.pk, "dry_run": True, "preflight": up.preflight}
        _upgrade(job)
    except RunLost:
        raise  # taken away from this worker: the reaper's on_abandon hook puts the customer back
    except BaseException as exc:
        _failed(job, exc)
    finally:
        drop_scratch(ctx.run.pk)
    return _summary(job)


def rollback(ctx: RunContext) -> dict:
    up = Upgrade.objects.select_related("customer", "rolls_back").get(run_id=ctx.run.pk)
    if not up.begin():
        raise OperationError(f"rollback #{up.pk} is {up.status}, not pending: not started again")
    if not up.customer.host.is_local:
        from . import remote_rollback

        return remote_rollback.rollback(ctx, up, _remote_shares())
    job = Job(ctx, up)
    try:
        _rollback(job)
    except RunLost:
        raise
    except BaseException as exc:
        _failed(job, exc)
    return _summary(job)


def abandon(run, ctx: RunContext) -> None:
    """The worker died mid-way (reaper or redelivery): put the customer back from the journal it left."""
    up = Upgrade.objects.select_related("customer", "to_release").filter(run=run).first()
    if up is None or up.status in Upgrade.TERMINAL:
        return
    discard_running_backups(up)
    if up.status == Upgrade.Status.PENDING or not (run.result or {}).get("touched"):
        up.fail(f"the worker died ({run.error}); nothing had been touched")
        return
    job = Job(ctx, up, doc=dict(run.result))
    for step in up.steps.filter(status=UpgradeStep.Status.RUNNING):  # the step the worker died in
        job.steps.failed = job.steps.failed or step.name
        UpgradeStep.objects.filter(pk=step.pk).update(status=UpgradeStep.Status.FAILED, finished_at=timezone.now(),
                                                      detail=(step.detail + "\nthe worker died").strip())
    what = (f"{up.get_kind_display().lower()} #{up.pk} failed at {job.steps.failed or 'an unknown step'}: "
            f"the worker died ({run.error})")
    if job.doc.get("rolling_back"):
        quarantine(job, f"{what} while putting the customer back; quarantined, nothing was deleted")
        return
    if not up.customer.host.is_local:  # put back through a session of its own, from the journal on the host
        from . import remote

        remote.abandoned(run, ctx, up, what, job.steps.failed, _remote_shares())
        return
    _outcome(job, what, put_back(job))


def _remote_shares():
    from .remote import Local

    return Local(refused=Refused, backup=_backup, record=_record, unpin_older=_unpin_older, outcome=_outcome,
                 summary=_summary, short=_short)


# Named phases of the run (RunContext.phases): each step, weighted by its usual share of the time.
UPGRADE_PHASES = (("preflight", 1), ("backup", 4), ("stage", 2), ("env", 0.5), ("stop", 1), ("switch", 0.5),
                  ("start", 2), ("health", 1), ("record", 0.3))
ROLLBACK_PHASES = (("preflight", 1), ("backup", 4), ("stop", 1), ("switch", 0.5), ("database", 2), ("env", 0.5),
                   ("start", 2), ("health", 1), ("record", 0.3))


# --- the upgrade --------------------------------------------------------------------------------------
def _upgrade(job: Job) -> None:
    ctx, up = job.ctx, job.upgrade
    ctx.phases(*UPGRADE_PHASES)
    with job.steps.step("preflight") as slog:
        report = _preflight(job, slog, zips_dir=str(scratch_dir(ctx.run.pk)))
    job.changes = report.changes
    hooks = [(p, 1) for p in HOOK_ORDER if any(p in ch.hooks for ch in job.changes)]
    after = ()
    if up.strategy == Upgrade.Strategy.BLUE_GREEN:
        hooks.append(("green", 2))
        after = (("standby", 1),)
    ctx.phases(*UPGRADE_PHASES[:4], *hooks, *UPGRADE_PHASES[4:], *after)  # the release's hooks, in their order
    with job.steps.step("backup") as slog:
        _backup(job, slog, pin=f"before upgrade #{up.pk} to {up.to_release} (run #{ctx.run.pk})")
    job.mark(touched=True)  # from here on, any failure puts the customer back
    with job.steps.step("stage") as slog:
        release_files.stage(job, slog)
    with job.steps.step("env") as slog:
        release_files.merge_envs(job, slog)
    for phase in HOOK_ORDER:
        if any(phase in ch.hooks for ch in job.changes):
            with job.steps.step(phase) as slog:
                _hooks(job, phase, slog)
    blue_green = up.strategy == Upgrade.Strategy.BLUE_GREEN
    if blue_green:  # the live services answer with the old release until the new one has proved itself
        with job.steps.step("green") as slog:
            bluegreen.verify(job, slog, lambda phase, extra, slog=slog: _hooks(job, phase, slog, extra=extra))
    with job.steps.step("stop") as slog:
        _stop(job, slog)
    with job.steps.step("switch") as slog:
        release_files.switch(job, slog)
    with job.steps.step("start") as slog:
        release_files.start(job, slog, {ch.service: ch.dest for ch in job.changes},
                            strict={ch.service for ch in job.changes})
    with job.steps.step("health") as slog:
        _health(job, slog)
    if not blue_green and any(releasepkg.SMOKE in ch.hooks for ch in job.changes):
        with job.steps.step("smoke") as slog:
            bluegreen.smoke_in_place(job, lambda phase, extra, slog=slog: _hooks(job, phase, slog, extra=extra))
    with job.steps.step("record") as slog:
        _record(job, slog, {**(job.customer.versions or {}), **up.to_versions})
    up.succeed()
    ctx.info(f"{up.get_kind_display().lower()} to {up.to_release} succeeded")
    with uninterruptible(ctx), job.steps.step("cleanup") as slog:  # it holds now: a cancel comes too late
        _cleanup(job, slog)
    if blue_green:
        with uninterruptible(ctx), job.steps.step("standby") as slog:
            standby.start(job, slog)


def _preflight(job: Job, slog, *, zips_dir: str | None) -> preflight.Report:
    up = job.upgrade
    _run_as(job, hooks=any(rc.component_version.hooks for rc in up.to_release.rows.select_related(
        "component_version")))
    report = preflight.check(job.customer, up.to_release, force=up.force, own_run=job.ctx.run, zips_dir=zips_dir)
    preflight.record(up, report, slog)
    running = report.kind != Upgrade.Kind.INSTALL  # an install starts from services that never ran
    job.mark(healthy_before=[s.name for s in job.specs() if s.health_url] if running else [])
    if not report.ok:
        raise Refused(f"preflight failed: {'; '.join(report.problems())}; nothing was touched")
    return report


def _run_as(job: Job, *, hooks: bool) -> runas.Identity | None:
    """Who the release's hooks and the services run as, before anything is touched (runtime.check_run_as)."""
    try:
        return runtime.check_run_as(job.ctx, job.customer, hooks=hooks)
    except OperationError as exc:
        raise Refused(str(exc)) from None


def _backup(job: Job, slog, *, pin: str, kind: str | None = None) -> None:
    ctx, up = job.ctx, job.upgrade
    scope, note = preflight.backup_scope(job.customer, kind or up.kind)
    if scope is None:
        slog.info(note)
        return
    try:
        params = backup_params(job.customer, scope=scope, trigger=Backup.Trigger.UPGRADE)
    except BackupInputError as exc:
        raise Refused(f"the pre-upgrade backup cannot be taken: {exc}; nothing was touched") from None
    params["replicas"] = []  # the way back must exist now; replicas get the next scheduled backup
    slog.info(f"{note}, to {params['target']}")
    with slots.hold(slots.host_slot(job.customer), settings.KASA_MAX_BACKUPS_PER_HOST, ctx.run.pk,
                    on_wait=lambda waited: ctx.check_alive()):
        try:
            bk, _ = make_backup(ctx, job.customer, params, pin_reason=pin)
        except (RunLost, RunCancelled):
            raise
        except Exception as exc:  # a storage error is as much a failed backup as a failed dump
            raise Refused(f"the backup failed ({_short(exc)}); nothing was touched") from None
    try:  # a dump by a host's own newer pg_dump: a way back this worker could not read is no way back
        refuse_unreadable(list(bk.artifacts.all()), "read back", tail="")
    except OperationError as exc:
        raise Refused(f"the pre-upgrade backup #{bk.pk} is the way back, but {exc}; nothing was touched") from None
    Upgrade.objects.filter(pk=up.pk).update(backup=bk)
    up.backup_id = bk.pk
    hold_backup(ctx, bk.pk)  # the way back restores from it, held in memory: no control database needed then
    job.journal.add({"type": "backup", "id": bk.pk})
    slog.info(f"backup #{bk.pk} taken and pinned ({human_size(bk.size)})")


def _hooks(job: Job, phase: str, slog, *, extra: dict[str, dict[str, str]] | None = None) -> None:
    """The release's hooks: customer code, run as the customer's user with a clean environment (PATH, locale,
    HOME, USER, and the component's .env, plus `extra[component]`: the smoke hook's URLs), in the staged folder,
    umask 027, none of Kasa's descriptors."""
    if not job.journal.has("hooks"):
        job.journal.add({"type": "hooks"})  # from here the databases may have changed: a rollback restores them
    timeout = settings.KASA_HOOK_TIMEOUT
    identity = runtime.run_identity(job.customer)
    for ch in job.changes:
        argv = ch.hooks.get(phase)
        if not argv:
            continue
        values = release_files.read_env(Path(ch.dest) / ".env", identity)
        secrets = [v for k, v in values.items() if envfile.is_secret(k, v)] + procman.env_secrets(values)
        secrets += [_url_password(v) for v in values.values() if "://" in v]
        slog.info(f"{ch.component} {ch.version}: {phase} hook in {ch.dest}"
                  + (f" as {identity}" if identity else ""))
        try:
            env = procman.service_env({**values, **(extra or {}).get(ch.component, {})}, identity=identity,
                                      home=str(job.root))
            slog.command(list(argv), cwd=ch.dest, env=env, timeout=timeout, secrets=secrets, check=True,
                         identity=identity)
        except OperationError as exc:
            raise OperationError(f"the {phase} hook of {ch.component} {ch.version} failed: {exc}") from None


def _stop(job: Job, slog) -> None:
    specs = job.specs()
    job.journal.add({"type": "services_stopped", "healthy_before": job.doc.get("healthy_before") or []})
    slog.info(f"stopping {len(specs)} service(s)")
    runtime.stop_all(job.ctx, specs)


def _health(job: Job, slog) -> None:
    specs = [s for s in job.specs() if os.path.isdir(s.folder)]
    runtime.check_health(job.ctx, specs)
    checked = [s.name for s in specs if s.health_url]
    slog.info(f"healthy: {', '.join(checked)}" if checked else "no service has a health URL: none was health-checked")


def _record(job: Job, slog, versions: dict) -> None:
    customer = job.customer
    job.journal.add({"type": "versions", "old": dict(customer.versions or {})})
    customer.versions = versions
    customer.save(update_fields=["versions", "updated_at"])
    slog.info("versions recorded: " + (", ".join(f"{c} {v}" for c, v in sorted(versions.items())) or "none"))


def _cleanup(job: Job, slog) -> None:
    """The upgrade holds. Remove what was set aside, prune old releases, unpin earlier pre-upgrade backups.
    Nothing here can fail the upgrade: trouble is a warning."""
    try:
        release_files.cleanup(job, slog)
        _unpin_older(job, slog)
    except Exception as exc:  # noqa: BLE001
        slog.warning(f"cleanup: {exc}")
    job.journal.clear()


def _unpin_older(job: Job, slog) -> None:
    """Only the last upgrade can be rolled back by hand: the backups pinned for earlier ones go back to the
    retention policy."""
    older = (Upgrade.objects.real().filter(customer=job.customer, backup__pinned=True)
             .exclude(pk=job.upgrade.pk).exclude(backup=None)
             .exclude(status=Upgrade.Status.QUARANTINED, resolved_at__isnull=True).select_related("backup"))
    for up in older:
        backup_pin(up.backup, pinned=False, via="worker")
        slog.info(f"backup #{up.backup_id} (before upgrade #{up.pk}) unpinned: retention decides now")


# --- the manual rollback ----------------------------------------------------------------------------
def _rollback(job: Job) -> None:
    ctx, up = job.ctx, job.upgrade
    target = up.rolls_back
    ctx.phases(*(p for p in ROLLBACK_PHASES if not (up.switch_back and p[0] in ("backup", "database"))))
    with job.steps.step("preflight") as slog:
        _rollback_preflight(job, target, slog)
    if up.switch_back:  # nothing to take a backup of: only links and processes change
        job.steps.skip("backup", "switch back: the databases are not touched, the release folders stay")
    else:
        with job.steps.step("backup") as slog:
            _backup(job, slog, pin=f"before rollback #{up.pk} of upgrade #{target.pk} (run #{ctx.run.pk})",
                    kind=Upgrade.Kind.UPGRADE)
    job.mark(touched=True)
    lay = target.layout
    job.journal.add({"type": "env_before", "files": env_fingerprints([i["live"] for i in lay.values()])})
    with job.steps.step("stop") as slog:
        _stop(job, slog)
    with job.steps.step("switch") as slog:
        for comp, info in lay.items():
            step = layout.plan_switch(job.root, info["live"], info["before_dir"], component=comp,
                                      previous_version=info["after_version"])
            job.journal.add(step)
            release_files.applied(job, step, lambda step=step: layout.apply_switch(step, root=job.root))
            slog.info(f"{info['live']} → {step['new'] or '(no folder: the install is undone)'}")
    target_backup = Backup.objects.filter(pk=target.backup_id).first()
    if up.switch_back:
        job.steps.skip("database", "switch back: the databases stay as they are (the previous release ran against "
                                   "them as the standby)")
    elif target_backup is not None and target_backup.artifacts.filter(kind="database").exists():
        with job.steps.step("database") as slog:
            # Into the forward journal: a failure later unswaps them (dbswap.undo), the previous ones kept aside.
            restore_databases(job, slog, backup_id=target.backup_id, journal=job.journal)
    else:
        job.steps.skip("database", "the upgrade took no database backup (it had no database)")
    with job.steps.step("env") as slog:
        diff = {}
        for comp, info in lay.items():
            new = envfile.read(Path(info["after_dir"]) / ".env")
            old = envfile.read(Path(info["before_dir"]) / ".env") if info["before_dir"] else {}
            diff[comp] = {"changes": [c.__dict__ for c in envfile.diff(new, old)]}
            lost = [k for k in new if k not in old]
            slog.info(f"{comp}: the .env of {info['before_version'] or 'nothing'} is live again"
                      + (f"; keys only the upgraded release had: {', '.join(lost)}" if lost else ""))
        Upgrade.objects.filter(pk=up.pk).update(env_diff=diff)
    with job.steps.step("start") as slog:
        release_files.start(job, slog, {i["service"]: i["before_dir"] for i in lay.values()}, strict=set())
    with job.steps.step("health") as slog:
        _health(job, slog)
    with job.steps.step("record") as slog:
        _record(job, slog, dict(target.from_versions))
    up.succeed()
    ctx.info(f"upgrade #{target.pk} {'switched back' if up.switch_back else 'rolled back'} by hand")
    with uninterruptible(ctx), job.steps.step("cleanup") as slog:
        if up.switch_back:
            try:
                standby.end(target.pk, reason=f"switched back to it (rollback #{up.pk})",
                            managers=runtime.run_managers(ctx), log=slog.info)
            except Exception as exc:  # noqa: BLE001  (the schedule ends it in a minute)
                slog.warning(f"the standby could not be stopped: {exc}")
        for step in reversed(job.journal.steps):
            if step["type"] in ("db_swap", "db_tables_swap", "db_inplace"):
                try:
                    dbswap.finish(ctx, step)  # the post-upgrade databases: in the safety backup now
                except Exception as exc:  # noqa: BLE001
                    slog.warning(f"could not drop {step.get('old')}: {exc}")
            else:
                release_files.drop_saved_ecosystem(job, step)
        who = up.run.requested_by.get_username() if up.run.requested_by_id else up.run.requested_via
        mark_bad(target, f"rolled back by hand by {who} (rollback #{up.pk})")
        slog.info(f"release {target.to_release} marked bad for {job.customer}")
        job.journal.clear()


def _rollback_preflight(job: Job, target: Upgrade, slog) -> None:
    _run_as(job, hooks=False)
    problems = []
    if rollback_target(job.customer) != target:
        problems.append(f"upgrade #{target.pk} is no longer the customer's last successful upgrade")
    root = job.root
    for comp, info in target.layout.items():
        try:
            state = layout.live_state(root, info["live"])
            before_there = not info["before_dir"] or beneath.is_dir(root, info["before_dir"])
        except beneath.BeneathError as exc:  # a folder on the way is a link now
            problems.append(str(exc))
            continue
        if state.kind != "link" or state.version != info["after_version"]:
            problems.append(f"{info['live']} no longer points at {comp} {info['after_version']}")
        if not before_there:
            problems.append(f"the previous release {info['before_dir']} is gone")
        if (job.customer.versions or {}).get(comp) != info["after_version"]:
            problems.append(f"the customer records {comp} {(job.customer.versions or {}).get(comp)}, not "
                            f"{info['after_version']}")
    bk = Backup.objects.filter(pk=target.backup_id).first()
    if job.upgrade.switch_back:
        target.refresh_from_db()
        if not target.standby_live:
            problems.append(f"no standby of the previous release runs for upgrade #{target.pk} any more: a full "
                            "rollback puts files and databases back")
        else:
            urls = {name: s["url"] for name, s in target.standby["services"].items()}
            specs = [procman.ServiceSpec(name=name, folder=str(root), manager="pm2", health_url=url)
                     for name, url in urls.items()]
            down = sorted(set(urls) - set(runtime.healthy_now(specs)))
            if down:
                problems.append(f"the standby does not answer ({', '.join(down)}): a full rollback puts files and "
                                "databases back")
    elif target.backup_id and (bk is None or not bk.restorable):
        problems.append(f"the pre-upgrade backup #{target.backup_id} is {bk.status if bk else 'gone'}")
    if job.customer.databases.exists() and bk is None and not job.upgrade.switch_back:
        problems.append(f"upgrade #{target.pk} took no backup of the databases: they cannot be put back")
    health = preflight.healthy_check(job.customer)
    exclusive = preflight.exclusive_check(job.customer, job.ctx.run)
    problems += [f"{c.name}: {c.detail}" for c in (health, exclusive) if not c.ok]
    Upgrade.objects.filter(pk=job.upgrade.pk).update(preflight={
        "ok": not problems, "problems": problems, "rolls_back": target.pk,
        "checks": [c.__dict__ for c in (health, exclusive)]})
    job.mark(healthy_before=[s.name for s in job.specs() if s.health_url])
    if problems:
        raise Refused(f"rollback refused: {'; '.join(problems)}; nothing was touched")
    slog.info(f"{'switching back' if job.upgrade.switch_back else 'rolling back'} upgrade #{target.pk}: " + ", ".join(
        f"{c} {i['after_version']} → {i['before_version'] or 'nothing'}" for c, i in target.layout.items()))


# --- outcomes -----------------------------------------------------------------------------------------
def _failed(job: Job, exc: BaseException) -> None:
    """Always raises: OperationError with the outcome (or the cancel, after putting things back). The way back
    runs to its end even when the control database stops answering (RunContext.uninterruptible, record)."""
    with uninterruptible(job.ctx):
        _put_back_and_raise(job, exc)


def _put_back_and_raise(job: Job, exc: BaseException) -> None:
    up, ctx = job.upgrade, job.ctx
    ctx.record(up.refresh_from_db)  # without the database, this worker's own view of the upgrade holds
    if up.status == Upgrade.Status.SUCCEEDED:  # only its cleanup was cut short: the upgrade stands
        raise exc
    if not job.touched:
        message = str(exc) if isinstance(exc, Refused) else f"failed before anything was touched: {_short(exc)}"
        record_outcome(job, Upgrade.Status.FAILED, message)
        if isinstance(exc, (RunCancelled, KeyboardInterrupt)):
            raise exc
        raise OperationError(message, result=job.doc) from None
    ctx.error(f"{job.steps.failed or 'a step'} failed: {_short(exc)}; putting the customer back")
    target = f"to {job.release_name}" if up.to_release_id else f"of upgrade #{up.rolls_back_id}"
    what = f"{up.get_kind_display().lower()} {target} failed at {job.steps.failed or 'an unknown step'}: {_short(exc)}"
    message = _outcome(job, what, put_back(job))
    if isinstance(exc, (RunCancelled, KeyboardInterrupt)):
        raise exc
    raise OperationError(message, result=job.doc) from None


def _outcome(job: Job, what: str, ok: bool) -> str:
    up = job.upgrade
    if ok:
        bad = ""
        if up.kind == Upgrade.Kind.ROLLBACK:
            message = f"{what}; undone: the customer is on the upgraded release again, as before the rollback"
        else:
            message = (f"{what}; rolled back: the previous release, its .env and the databases are back and the "
                       "services answer")
            bad = f"{what} (run #{up.run_id}, {human_time(timezone.now())})"
        record_outcome(job, Upgrade.Status.ROLLED_BACK, message, bad=bad)
        job.ctx.warning(message)
        return message
    message = (f"{what}; ROLLBACK FAILED ({job.doc.get('rollback_error')}): quarantined, an operator must look; "
               "nothing was deleted")
    quarantine(job, message)
    return message


def _summary(job: Job) -> dict:
    up = job.upgrade
    up.refresh_from_db()
    return {"upgrade": up.pk, "kind": up.kind, "status": up.status, "release": str(up.to_release or ""),
            "from": up.from_versions, "to": up.to_versions, "backup": up.backup_id, "layout": up.layout}


def _url_password(value: str) -> str:
    try:
        return urlsplit(value).password or ""
    except ValueError:
        return ""


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:2000]

