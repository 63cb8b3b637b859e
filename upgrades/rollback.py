"""Putting a customer back after a failed upgrade (or a failed manual rollback): the way back, proven.

`put_back` undoes the run's journal in the issue's order — stop, switch the symlinks back, restore the
databases from the pre-upgrade backup (fresh databases swapped in, or — for a role that may not create
databases — in place in one transaction or through prefixed tables: backups.dbswap), check that each .env
is back byte for byte, start, health-check — and only once all of that holds does it throw away what the
failed attempt left (staged folders, the migrated databases or tables kept aside). The first step that
fails stops it: the upgrade is QUARANTINED, nothing more is changed or deleted, and an alert goes out; the
journal left on the run says exactly what was and was not put back.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

from django.conf import settings
from django.core.mail import mail_admins
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from backups import dbswap
from backups.locks import store_of
from backups.models import Backup
from backups.notify import post_webhook, recipients, send_email
from backups.services import policy_for
from core.secrets import reveal
from customers import runtime
from customers.models import Customer
from engines import beneath, layout, trees
from engines.backupcrypto import KeyRing
from engines.stores import StoreLocked
from operations.context import OperationError, RunContext

from .journal import Journal, Steps, env_fingerprints, uninterruptible
from .models import BadRelease, Upgrade

log = logging.getLogger(__name__)


class Job:
    """Everything one upgrade or rollback run works with; `doc` is the run's result (the journals)."""

    def __init__(self, ctx: RunContext, upgrade: Upgrade, doc: dict | None = None):
        self.ctx, self.upgrade = ctx, upgrade
        self.customer = Customer.objects.prefetch_related("services", "databases").get(pk=upgrade.customer_id)
        self.doc = doc if doc is not None else {"upgrade": upgrade.pk}
        self.journal = Journal(ctx, self.doc, "journal")
        self.undo_journal = Journal(ctx, self.doc, "rollback")
        self.steps = Steps(ctx, upgrade)
        self.changes: list = []
        for db in self.customer.databases.all():  # masked in every line a hook or a tool prints
            ctx.add_secret(reveal(db.password))
        # Held in memory from now on: the way back goes on without the control database (operations.context).
        dbswap.hold_targets(ctx, self.customer)
        self.release_name = str(upgrade.to_release) if upgrade.to_release_id else ""

    @property
    def root(self) -> Path:
        return self.customer.root_path()

    @property
    def touched(self) -> bool:
        return bool(self.doc.get("touched"))

    def mark(self, **fields) -> None:
        self.doc.update(fields)
        self.journal.save()

    def specs(self):
        return runtime.service_specs(self.customer)


# --- the way back ----------------------------------------------------------------------------------
def put_back(job: Job) -> bool:
    """Undo the journal (see the module docstring). True: the customer is back as it was; False: quarantined
    (job.doc["rollback_error"] says why). Neither a cancel request nor a control database that stops answering
    stops it: what it records goes to the run's local journal then (operations.context)."""
    with uninterruptible(job.ctx):
        return _put_back(job)


def _put_back(job: Job) -> bool:
    ctx, j = job.ctx, job.journal
    job.mark(rolling_back=True)
    for step in j.of("green"):  # a blue-green copy a dead worker left running beside the live services
        try:
            remove_green(job, step)
        except Exception as exc:  # noqa: BLE001  (never in the way of the way back)
            ctx.warning(f"could not remove the green copies {', '.join(step['apps'])}: {exc}")
    restore_db = j.has("hooks") and job.upgrade.backup_id is not None and job.upgrade.kind != Upgrade.Kind.ROLLBACK
    unswap_db = any(dbswap.is_step(s) for s in j.steps)
    live_touched = j.has("services_stopped") or j.has("switch") or restore_db or unswap_db
    stopped = j.of("services_stopped")
    healthy_before = (stopped[0]["healthy_before"] if stopped else job.doc.get("healthy_before")) or []
    with uninterruptible(ctx):
        try:
            specs = job.specs()
            if live_touched:
                with job.steps.step("rollback: stop") as slog:
                    slog.info(f"stopping {len(specs)} service(s)")
                    runtime.stop_all(ctx, specs)
            else:
                job.steps.skip("rollback: stop", "nothing live was changed: the services kept running")
            with job.steps.step("rollback: switch") as slog:
                _undo_files(job, slog)
            if restore_db:
                with job.steps.step("rollback: database") as slog:
                    restore_databases(job, slog, backup_id=job.upgrade.backup_id, journal=job.undo_journal)
            elif unswap_db:
                with job.steps.step("rollback: database") as slog:
                    for step in reversed(j.steps):
                        if dbswap.is_step(step):
                            dbswap.undo(ctx, step)
                    slog.info("the databases as they were before this run are live again")
            else:
                job.steps.skip("rollback: database", "no hook ran: the databases were not changed")
            with job.steps.step("rollback: env") as slog:
                _check_env(job, slog)
            if live_touched and job.upgrade.kind == Upgrade.Kind.INSTALL:
                job.steps.skip("rollback: start", "an install: no service ran before it")
            elif live_touched:
                with job.steps.step("rollback: start") as slog:
                    startable = [s for s in specs if os.path.isdir(s.folder)]
                    slog.info(f"starting {len(startable)} service(s)")
                    runtime.start_all(ctx, startable)
                with job.steps.step("rollback: health") as slog:
                    checked = [s for s in specs if s.name in healthy_before]
                    runtime.check_health(ctx, checked)
                    slog.info(f"healthy: {', '.join(s.name for s in checked) or 'no service to check'}")
        except Exception as exc:  # noqa: BLE001 — whatever it is, the customer now needs an operator
            job.mark(rollback_error=str(exc)[:2000])
            ctx.error(f"ROLLBACK FAILED: {exc}; nothing further is changed or deleted")
            return False
        with job.steps.step("rollback: cleanup") as slog:
            _cleanup_after_undo(job, slog)
    job.mark(rolling_back=False, rolled_back=True)
    return True


def _undo_files(job: Job, slog) -> None:
    """Symlinks, the ecosystem file and the recorded versions, newest change first."""
    if not any(s["type"] in ("switch", "ecosystem", "versions") for s in job.journal.steps):
        slog.info("nothing had been switched yet")
    for step in reversed(job.journal.steps):
        kind = step["type"]
        if kind == "switch":
            if layout.undo_switch(step, root=job.root):
                slog.info(f"{step['live']}: put back ({_describe_before(step['before'])})")
        elif kind == "ecosystem":
            _undo_ecosystem(step, job.root)
            slog.info(f"{step['path']}: put back")
        elif kind == "versions":
            job.ctx.record(lambda v=step["old"]: Customer.objects.filter(pk=job.customer.pk).update(versions=v),
                           replay="customer_versions", versions=step["old"])
            job.customer.versions = step["old"]
            slog.info(f"recorded versions put back: {_versions(step['old'])}")
    _tidy(job.root)


def remove_green(job: Job, step: dict, specs=None) -> None:
    """Delete a blue-green upgrade's green apps (upgrades.bluegreen) from the customer's PM2 and their ecosystem
    file; the journal step is then done."""
    if step.get("done"):
        return
    root = job.root
    if specs is None:
        specs = runtime.side_app_specs(job.customer, step["path"], step["apps"])
    runtime.stop_all(job.ctx, specs)
    if beneath.lexists(root, step["path"]):
        beneath.unlink(root, step["path"], missing_ok=True)
    step["done"] = True
    job.journal.save()
    job.ctx.info("green copies stopped and removed")


def _describe_before(before: dict) -> str:
    if before["kind"] == "dir":
        return "the original folder"
    if before["kind"] == "link":
        return f"link to {before['target']}"
    return "no folder, as before"


def _undo_ecosystem(step: dict, root: Path) -> None:
    saved = step.get("saved")
    if saved and beneath.lexists(root, saved):
        beneath.rename(root, saved, step["path"])
    elif not saved and step.get("written"):
        beneath.unlink(root, step["path"], missing_ok=True)


def restore_databases(job: Job, slog, *, backup_id: int, journal: Journal) -> None:
    """Every database of the backup put back the way its role allows (backups.dbswap, as a restore does: a
    fresh database swapped in, prefixed tables, or in place in one transaction; what is kept aside stays,
    journalled, until the caller's finish or undo). A manual rollback writes into its forward journal, which
    a later failure undoes: a database restored in place then needs a backup of its state from before, taken
    here with the services stopped. The automatic rollback is the way back itself: a failure quarantines."""
    held = database_backup(job.ctx, slog, backup_id)
    if held is None:
        return
    bk, arts, store, keyring = held
    plan = SimpleNamespace(backup=bk, customer=job.customer, clone=False, root=job.root, to_databases={},
                           artifacts=arts)
    for art in arts:
        dbswap.restore_fresh(job.ctx, plan, store, keyring, art, journal)
    way_back = None
    if journal is job.journal and dbswap.in_place(journal):
        way_back = dbswap.way_back_backup(job.ctx, job.customer, trigger=Backup.Trigger.UPGRADE,
                                          pin=f"{dbswap.WAY_BACK}rollback run #{job.ctx.run.pk}")
        slog.info(f"backup #{way_back} of the databases taken with the services stopped: the way back")
    dbswap.swap_all(job.ctx, plan, journal, way_back=way_back)
    slog.info(f"databases {', '.join(a.source for a in arts)} restored from backup #{bk.pk}; the changed ones are "
              "kept aside until the rollback holds")


def database_backup(ctx: RunContext, slog, backup_id: int) -> tuple | None:
    """The pre-upgrade backup whose databases a rollback puts back: (backup, its database artifacts, its store, the
    keyring), None when it holds no database; OperationError when it cannot be restored (local and remote alike)."""
    bk, arts, store = ctx.held.get(("backup", backup_id)) or hold_backup(ctx, backup_id)
    if not bk.restorable:
        raise OperationError(f"the pre-upgrade backup #{bk.pk} is {bk.status}: the databases cannot be put back")
    if not arts:
        slog.info(f"backup #{bk.pk} holds no database")
        return None
    keyring = None
    if bk.encrypted:
        if not settings.KASA_BACKUP_KEYS:
            raise OperationError(f"backup #{bk.pk} is encrypted and KASA_BACKUP_KEYS is not set")
        keyring = KeyRing(settings.KASA_BACKUP_KEYS)
    return bk, arts, store, keyring


def hold_backup(ctx: RunContext, backup_id: int) -> tuple:
    """The pre-upgrade backup, its database artifacts and its store, read once and held in memory: the way back
    restores from it without the control database."""
    bk = Backup.objects.select_related("target").get(pk=backup_id)
    held = ctx.held[("backup", backup_id)] = (bk, list(bk.artifacts.filter(kind="database").order_by("pk")),
                                              store_of(bk))
    return held


def _check_env(job: Job, slog) -> None:
    """The .env files live in the previous release folders, which no step writes: prove they are back."""
    recorded = {}
    for step in job.journal.of("env_before"):
        recorded.update(step["files"])
    if not recorded:
        slog.info("no .env was recorded (nothing had been staged)")
        return
    now = env_fingerprints(list(recorded))
    changed = [p for p, sha in recorded.items() if now.get(p) != sha]
    if changed:
        raise OperationError(f"the .env of {', '.join(changed)} is not the one from before the upgrade")
    slog.info(f"{len(recorded)} .env file(s) identical to before")


def _cleanup_after_undo(job: Job, slog) -> None:
    """The way back holds: throw away what the failed attempt left. Trouble here is only a warning."""
    for step in reversed(job.undo_journal.steps):
        try:
            dbswap.finish(job.ctx, step)  # the migrated databases kept aside
        except Exception as exc:  # noqa: BLE001
            slog.warning(f"could not drop {step.get('old') or step.get('db')}: {exc}")
    root = job.root
    for step in job.journal.steps:
        try:
            if step["type"] == "staged":
                trees.discard(step["tmp"], root=root)
                trees.discard(step["path"], root=root)
            elif step["type"] == "ecosystem" and step.get("saved"):
                beneath.unlink(root, step["saved"], missing_ok=True)
        except OSError as exc:
            slog.warning(f"could not remove {step.get('path')}: {exc}")
    for step in job.journal.of("aside"):  # a folder set aside before staging takes its place again
        if not step.get("refused") and beneath.lexists(root, step["to"]) and not beneath.lexists(root, step["from"]):
            beneath.rename(root, step["to"], step["from"])
    _tidy(root)
    job.undo_journal.steps.clear()
    job.journal.save()
    slog.info("staged releases and the databases kept aside removed")


def _tidy(root: Path) -> None:
    """Remove empty version folders (and an empty releases/ folder) that a rollback leaves."""
    base = root / layout.RELEASES
    try:
        if not beneath.is_dir(root, base):
            return
        for version in beneath.listdir(root, base):
            beneath.rmdir(root, base / version)  # only when empty (and a real folder)
        beneath.rmdir(root, base)
    except beneath.BeneathError:
        pass  # a link where Kasa's folders should be: left alone


def _versions(versions: dict) -> str:
    return ", ".join(f"{c} {v}" for c, v in sorted(versions.items())) or "none"


# --- outcomes --------------------------------------------------------------------------------------
def mark_bad(upgrade: Upgrade, reason: str) -> None:
    if upgrade.to_release_id is None:
        return
    BadRelease.objects.get_or_create(customer_id=upgrade.customer_id, release_id=upgrade.to_release_id,
                                     defaults={"upgrade": upgrade, "reason": reason[:2000]})


def quarantine(job: Job, message: str) -> None:
    record_outcome(job, Upgrade.Status.QUARANTINED, message)
    job.ctx.error(message)


def record_outcome(job: Job, status: str, message: str, *, bad: str = "") -> None:
    """The upgrade's end — rolled back (the release marked bad for the customer when `bad` says why), quarantined
    (with its alert) or failed — now, or at reconciliation when the way back went on without the control database
    (replay_outcome)."""
    job.ctx.record(lambda: _settle(job.upgrade, status, message, bad), replay="upgrade_outcome", status=status,
                   message=message, bad=bad)


def _settle(up: Upgrade, status: str, message: str, bad: str) -> None:
    if status == Upgrade.Status.ROLLED_BACK:
        up.rolled_back(message)
        if bad:
            mark_bad(up, bad)
    elif status == Upgrade.Status.QUARANTINED:
        if up.quarantine(message):
            alert(up, message)
    else:
        up.fail(message)


def replay_outcome(run, payload: dict) -> None:
    """Reconciliation (operations.reconcile): the end of this run's own upgrade."""
    if payload["status"] not in (Upgrade.Status.ROLLED_BACK, Upgrade.Status.QUARANTINED, Upgrade.Status.FAILED):
        raise ValueError(f"not an upgrade outcome: {payload['status']!r}")
    up = Upgrade.objects.select_related("customer").get(run=run)
    _settle(up, payload["status"], str(payload["message"]), str(payload.get("bad") or ""))


def alert(upgrade: Upgrade, message: str) -> None:
    """A quarantine needs a human: mail the customer's backup recipients and webhook, else the ADMINS."""
    customer = upgrade.customer
    subject = f"[Kasa] Upgrade QUARANTINED: {customer.domain} (upgrade #{upgrade.pk}) needs an operator"
    lines = [f"Customer: {customer.domain}",
             f"{upgrade.get_kind_display()} #{upgrade.pk}, run #{upgrade.run_id}: "
             f"{_versions(upgrade.from_versions)} → {_versions(upgrade.to_versions)}",
             f"What happened: {message}",
             "Nothing was deleted: the staged releases, the previous ones, the pre-upgrade backup "
             f"(#{upgrade.backup_id or 'none'}) and any database kept aside are all still there.",
             "The run's result holds the journal of what was changed and what was put back."]
    try:
        base = settings.KASA_BASE_URL.rstrip("/")
        lines.append(f"Run: {base}{reverse('admin:operations_run_change', args=[upgrade.run_id])}")
    except NoReverseMatch:
        pass
    body = _redact(customer, "\n".join(lines))
    try:
        policy = policy_for(customer)
        to = recipients(policy)
        sent = send_email(to, subject, body) if to else False
        hooked = post_webhook(policy.webhook_url, subject, body, ok=False) if policy.webhook_url else False
        if not (sent or hooked):
            mail_admins(subject, body, fail_silently=True)
    except Exception:  # noqa: BLE001 — an alert problem must not hide the quarantine itself
        log.warning("alert about quarantined upgrade %s failed", upgrade.pk, exc_info=True)
    log.error("%s: %s", subject, message)


def _redact(customer, text: str) -> str:
    for db in customer.databases.all():
        pw = reveal(db.password)
        if pw and len(pw) >= 4:
            text = text.replace(pw, "********")
    return text


def discard_running_backups(upgrade: Upgrade) -> None:
    """A pre-upgrade backup a dead worker was still writing is nobody's restore point: delete its objects."""
    for bk in Backup.objects.filter(customer_id=upgrade.customer_id, run=None, status=Backup.Status.RUNNING,
                                    trigger=Backup.Trigger.UPGRADE, created_at__gte=upgrade.created_at):
        purge_after = None
        try:
            bk.target.store().delete_prefix(bk.prefix)
        except StoreLocked as locked:  # written under an object lock: the first prune after it ends removes it
            purge_after = locked.until
        except Exception:  # noqa: BLE001
            log.warning("could not remove the partial backup %s", bk.pk, exc_info=True)
        Backup.objects.filter(pk=bk.pk).update(status=Backup.Status.FAILED, finished_at=timezone.now(),
                                               error="the worker died during the upgrade", purge_after=purge_after)


def scratch_dir(run_id: int) -> Path:
    path = Path(settings.KASA_SCRATCH_DIR) / f"upgrade-{run_id}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def drop_scratch(run_id: int) -> None:
    shutil.rmtree(Path(settings.KASA_SCRATCH_DIR) / f"upgrade-{run_id}", ignore_errors=True)
