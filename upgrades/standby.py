"""The previous release kept running after a blue-green switch, for an instant way back: the standby.

Once a blue-green upgrade has switched and its services answer, each switched PM2 service with a health URL is
started again from its previous release folder as `<app>--previous`, in the customer's PM2 home and as its user,
on a free side port, the way the green copies ran before the switch (upgrades.bluegreen.side_copies). It must
answer its health URL there. It runs against the databases as the new release left them, which also shows that
the previous release still works with them. It is recorded on the Upgrade (`standby`, `standby_until`) before it
starts, so whatever happens to the worker afterwards, it is stopped:

- when its grace period (KASA_BLUEGREEN_GRACE) ends: upgrades.tasks.end_standbys, every minute;
- when another run that changes the customer starts (a guard of every run): a restore, an upgrade or a full
  rollback must not find a second copy of the old release writing to the databases;
- at the end of a `rollback --switch-back`, which goes back to it: the service paths point at the previous
  folders again and the live services restart from them on their own ports, the databases and the .env files
  as they are (no backup to take or restore: seconds, not minutes).

A service holds its port, so the live port cannot be served by both versions at once without a proxy in front
(which Kasa does not manage); a proxy may point at the standby's port at once. Nothing here fails the upgrade: a
standby that does not start or answer is stopped, and the way back is the full rollback.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from customers import runtime
from engines import beneath, procman
from engines.humanize import human_duration
from operations.context import OperationError, RunContext

from . import bluegreen
from .models import Upgrade

SUFFIX = "--previous"
# The runs that change what the standby runs against: its folders, the live release or the databases (a backup
# or a drill only reads, and leaves it running).
ENDED_BY = {"restore", "upgrade", "rollback"}


def start(job, slog) -> None:
    """Start the previous release beside the new one and record it (called once a blue-green upgrade holds)."""
    grace = settings.KASA_BLUEGREEN_GRACE
    if grace <= 0:
        slog.info("KASA_BLUEGREEN_GRACE is 0: the previous release is not kept running")
        return
    up = job.upgrade
    previous = {i["service"]: i for i in (up.layout or {}).values() if i.get("before_dir")}
    path = job.root / f"ecosystem.kasa-standby-u{up.pk}.config.js"
    try:
        sides = bluegreen.side_copies(job, slog, {name: i["before_dir"] for name, i in previous.items()},
                                      suffix=SUFFIX, label="standby", path=path)
    except OperationError as exc:
        slog.warning(f"standby: {exc}; the way back is the full rollback")
        return
    if not sides:
        slog.info("standby: no switched PM2 service with a health URL, nothing kept running")
        return
    until = timezone.now() + timedelta(seconds=grace)
    doc = {"path": str(path), "apps": [s.app["name"] for s in sides], "until": until.isoformat(),
           "services": {s.service: {"url": s.spec.health_url, "version": previous[s.service]["before_version"]}
                        for s in sides}}
    # Recorded before it starts: a worker that dies now leaves a row the schedule still ends.
    Upgrade.objects.filter(pk=up.pk).update(standby=doc, standby_until=until)
    specs = bluegreen.write_sides(job, path, sides, "standby", slog)
    try:
        runtime.start_all(job.ctx, specs)
        runtime.check_health(job.ctx, specs, label="standby: ",
                             failure="the previous release does not answer beside the new one")
    except OperationError as exc:
        slog.warning(f"{exc}; the standby is stopped, the way back is the full rollback")
        end(up.pk, reason="it did not answer", managers=runtime.run_managers(job.ctx), log=slog.info)
        return
    slog.info(f"the previous release keeps running as a standby for {human_duration(grace)}: "
              "`rollback --switch-back` goes back to it in seconds, with the databases as they are")


def end(upgrade_id: int, *, reason: str, managers: dict, log: Callable[[str], None]) -> bool:
    """Stop and delete the standby's apps and its ecosystem file; True when this call ended it. Claimed with a
    conditional UPDATE (the schedule, a guard and a switch back may race); a stop that fails gives the claim back
    (the next tick tries again) and raises procman.ProcessError."""
    up = Upgrade.objects.select_related("customer").filter(pk=upgrade_id, standby_until__isnull=False).first()
    if up is None or not Upgrade.objects.filter(pk=up.pk, standby_until=up.standby_until).update(standby_until=None):
        return False
    doc = dict(up.standby)
    root = up.customer.root_path()
    try:
        procman.stop_all(runtime.side_app_specs(up.customer, doc["path"], doc["apps"]), managers)
    except Exception:
        Upgrade.objects.filter(pk=up.pk).update(standby_until=up.standby_until)
        raise
    beneath.unlink(root, doc["path"], missing_ok=True)
    doc.update(ended_at=timezone.now().isoformat(), ended_because=reason)
    Upgrade.objects.filter(pk=up.pk).update(standby=doc)
    log(f"the standby of upgrade #{up.pk} (the previous release on its side port) stopped: {reason}")
    return True


def end_before_run(ctx: RunContext) -> None:
    """operations guard: a restore, upgrade or rollback of the customer ends its standby first (a switch back
    uses it)."""
    run = ctx.run
    if run.kind not in ENDED_BY or Upgrade.objects.filter(run=run, switch_back=True).exists():
        return
    for pk in Upgrade.objects.filter(customer_id=run.customer_id, standby_until__isnull=False).values_list("pk",
                                                                                                         flat=True):
        try:
            end(pk, reason=f"{run.get_kind_display().lower()} run #{run.pk} started",
                managers=runtime.run_managers(ctx), log=ctx.info)
        except procman.ProcessError as exc:
            raise OperationError(f"the standby of upgrade #{pk} could not be stopped ({exc}); nothing was "
                                 "touched") from None


def end_due(log: Callable[[str], None]) -> list[int]:
    """The standbys whose grace period has ended, stopped (upgrades.tasks.end_standbys)."""
    ended = []
    for pk in Upgrade.objects.filter(standby_until__lte=timezone.now()).values_list("pk", flat=True):
        try:
            if end(pk, reason="its grace period ended", managers=runtime.managers(log=log), log=log):
                ended.append(pk)
        except procman.ProcessError as exc:
            log(f"the standby of upgrade #{pk} could not be stopped (tried again next minute): {exc}")
    return ended
