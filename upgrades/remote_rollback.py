"""The manual rollback of a remote customer's last upgrade (upgrades.operations's rollback, on the host): a safety
backup (a normal remote backup), stop (PM2 there), the symlinks back to the previous releases (engines.layout
there), the databases from the upgrade's pre-upgrade backup through a forward of the session (backups.dbswap, as a
remote restore does), Kasa's ecosystem file for the previous releases, start, health. Each change journalled
before it is made, on the host's disk too; a failure undoes the rollback's own journal (upgrades.remote.put_back:
the customer stays on the upgraded release), and a failed undo quarantines.
"""

from __future__ import annotations

from backups import dbswap
from backups.models import Backup
from engines import envfile
from operations.context import RunContext, RunLost

from . import remote_files
from .journal import uninterruptible
from .models import Upgrade
from .remote import Local, failed, finish, finish_database, health, restore_databases, session, stop
from .remote_job import RemoteJob
from .remote_preflight import health_check
from .rollback import mark_bad
from .selectors import rollback_target

PHASES = (("preflight", 1), ("backup", 4), ("stop", 1), ("switch", 0.5), ("database", 2), ("env", 0.5),
          ("start", 2), ("health", 1), ("record", 0.3))


def rollback(ctx: RunContext, up: Upgrade, local: Local) -> dict:
    remote, job = session(ctx, up, local)
    with remote:
        try:
            _rollback(job, local)
        except RunLost:
            raise
        except BaseException as exc:
            failed(job, exc, local)
        return {**local.summary(job), "host": job.host}


def _rollback(job: RemoteJob, local: Local) -> None:
    ctx, up = job.ctx, job.upgrade
    target = up.rolls_back
    ctx.phases(*PHASES)
    with job.steps.step("preflight") as slog:
        _preflight(job, target, slog, local)
    with job.steps.step("backup") as slog:
        local.backup(job, slog, pin=f"before rollback #{up.pk} of upgrade #{target.pk} (run #{ctx.run.pk})",
                     kind=Upgrade.Kind.UPGRADE)
    job.mark(touched=True)
    lay = target.layout
    root = str(job.root)
    job.journal.add({"type": "env_before", "host": True,
                     "files": job.call("engines.hostupgrade.env_fingerprints", [i["live"] for i in lay.values()])})
    with job.steps.step("stop") as slog:
        stop(job, slog)
    with job.steps.step("switch") as slog:
        for comp, info in lay.items():
            step = job.call("engines.layout.plan_switch", root, info["live"], info["before_dir"], component=comp,
                            previous_version=info["after_version"])
            if not isinstance(step, dict) or step.get("type") != "switch" or step.get("live") != info["live"]:
                raise RuntimeError(f"{job.remote.where} answered a switch that is not the one asked for: not trusted")
            job.journal.add(step)
            job.call("engines.layout.apply_switch", step, root=root)
            slog.info(f"{info['live']} → {step['new'] or '(no folder: the install is undone)'} on {job.host}")
    bk = Backup.objects.filter(pk=target.backup_id).first()
    if bk is not None and bk.artifacts.filter(kind="database").exists():
        with job.steps.step("database") as slog:
            # Into the forward journal: a failure later unswaps them (dbswap.undo), the previous ones kept aside.
            restore_databases(job, slog, backup_id=target.backup_id, journal=job.journal)
    else:
        job.steps.skip("database", "the upgrade took no database backup (it had no database)")
    with job.steps.step("env") as slog:
        diff = {}
        for comp, info in lay.items():
            new = job.call("engines.hostupgrade.read_env", root, info["after_dir"], job.user)
            old = job.call("engines.hostupgrade.read_env", root, info["before_dir"], job.user) \
                if info["before_dir"] else {}
            diff[comp] = {"changes": [c.__dict__ for c in envfile.diff(new, old)]}
            slog.info(f"{comp}: the .env of {info['before_version'] or 'nothing'} is live again on {job.host}")
        Upgrade.objects.filter(pk=up.pk).update(env_diff=diff)
    with job.steps.step("start") as slog:
        remote_files.start(job, slog, {i["service"]: i["before_dir"] for i in lay.values()}, strict=set())
    with job.steps.step("health") as slog:
        health(job, slog)
    with job.steps.step("record") as slog:
        local.record(job, slog, dict(target.from_versions))
    up.succeed()
    ctx.info(f"upgrade #{target.pk} rolled back by hand on {job.host}")
    with uninterruptible(ctx), job.steps.step("cleanup") as slog:
        for step in reversed(job.journal.steps):
            if dbswap.is_step(step):
                try:
                    finish_database(job, step)  # the post-upgrade databases: in the safety backup now
                except Exception as exc:  # noqa: BLE001
                    slog.warning(f"could not drop {step.get('old')}: {exc}")
        try:
            job.call("engines.hostupgrade.cleanup", root, job.journal.steps)
        except Exception as exc:  # noqa: BLE001
            slog.warning(f"cleanup on {job.host}: {exc}")
        who = up.run.requested_by.get_username() if up.run.requested_by_id else up.run.requested_via
        mark_bad(target, f"rolled back by hand by {who} (rollback #{up.pk})")
        slog.info(f"release {target.to_release} marked bad for {job.customer}")
        finish(job, slog)


def _preflight(job: RemoteJob, target: Upgrade, slog, local: Local) -> None:
    from .preflight import exclusive_check

    problems = []
    if rollback_target(job.customer) != target:
        problems.append(f"upgrade #{target.pk} is no longer the customer's last successful upgrade")
    root = str(job.root)
    states = job.call("engines.hostupgrade.live_states", root, [i["live"] for i in target.layout.values()])
    for comp, info in target.layout.items():
        state = states.get(info["live"]) if isinstance(states, dict) else None
        if not isinstance(state, dict) or state.get("error"):
            problems.append(str((state or {}).get("error") or f"{info['live']}: no answer from {job.host}"))
            continue
        if state.get("kind") != "link" or state.get("version") != info["after_version"]:
            problems.append(f"{info['live']} on {job.host} no longer points at {comp} {info['after_version']}")
        if info["before_dir"] and not job.call("engines.beneath.is_dir", root, info["before_dir"]):
            problems.append(f"the previous release {info['before_dir']} is gone from {job.host}")
        if (job.customer.versions or {}).get(comp) != info["after_version"]:
            problems.append(f"the customer records {comp} {(job.customer.versions or {}).get(comp)}, not "
                            f"{info['after_version']}")
    bk = Backup.objects.filter(pk=target.backup_id).first()
    if target.backup_id and (bk is None or not bk.restorable):
        problems.append(f"the pre-upgrade backup #{target.backup_id} is {bk.status if bk else 'gone'}")
    if job.customer.databases.exists() and bk is None:
        problems.append(f"upgrade #{target.pk} took no backup of the databases: they cannot be put back")
    checks = (health_check(job), exclusive_check(job.customer, job.ctx.run))
    problems += [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    Upgrade.objects.filter(pk=job.upgrade.pk).update(preflight={
        "ok": not problems, "problems": problems, "rolls_back": target.pk, "host": job.host,
        "checks": [c.__dict__ for c in checks]})
    job.mark(healthy_before=[s.name for s in job.specs() if s.health_url])
    if problems:
        raise local.refused(f"rollback refused: {'; '.join(problems)}; nothing was touched")
    slog.info(f"rolling back upgrade #{target.pk} on {job.host}: " + ", ".join(
        f"{c} {i['after_version']} → {i['before_version'] or 'nothing'}" for c, i in target.layout.items()))
