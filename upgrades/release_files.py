"""The files of an upgrade: staging the release folders, the merged .env, the symlink switch, Kasa's PM2
ecosystem file, and, once the upgrade holds, what was set aside and the old releases pruned.

Everything happens below the customer's root, where the customer's OS user owns each release folder's contents
(and may change them while Kasa's worker, as root, works there): paths are reached from the root's descriptor
without following a link and changed through descriptors (engines.beneath, engines.layout). A change refused
because a folder on its path turned out to be a link changed nothing: its journal step is marked `refused`,
the upgrade fails and the customer is put back (upgrades.rollback).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from django.conf import settings

from customers import runtime
from engines import beneath, ecosystem, envfile, layout, releasepkg, runas, trees, unpack, zipunpack
from operations.context import OperationError

from . import preflight
from .journal import env_fingerprints
from .models import Upgrade
from .rollback import Job
from .selectors import live_order, protected_versions


def identity(job: Job) -> runas.Identity | None:
    """The customer's user now (looked up again: it may have been removed since the preflight)."""
    return runtime.run_identity(job.customer)


def _ids(who: runas.Identity | None) -> tuple[int, int] | None:
    return (who.uid, who.gid) if who is not None else None


def applied(job: Job, step: dict, action) -> None:
    """Make a journalled change; refused before anything changed (a link in the way): the step says so."""
    try:
        action()
    except beneath.BeneathError as exc:
        job.journal.refuse(step, exc)
        raise OperationError(str(exc)) from None


def read_env(path: Path, who: runas.Identity | None) -> dict[str, str]:
    """A .env in the customer's folders, which its user may have replaced: only a regular file of that user's is
    read (never a link to Kasa's files or another customer's), since its values go to the user's processes."""
    try:
        return envfile.read(path, owner=who)
    except runas.NotOwned as exc:
        raise OperationError(f"{path} was not read: {exc}") from None


def _read_env_text(path: Path, who: runas.Identity) -> str | None:
    try:
        return runas.read_owned(path, who, limit=16 << 20).decode("utf-8", "replace")
    except runas.NotOwned as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise OperationError(f"{path} was not read: {exc}") from None


def open_releases(job: Job) -> None:
    """releases/ and releases/<version>/ stay Kasa's (the customer's user cannot swap what Kasa later switches,
    prunes or moves there) but must let that user pass through to its services: 0755. Folders Kasa creates
    there now are 0755 already; this also opens those of older runs (0700). What is inside is given to the user
    where it is made."""
    if identity(job) is None:
        return
    # Through descriptors opened without following links: a chmod by path would follow a link swapped in.
    try:
        top = beneath.open_dir(job.root, job.root / layout.RELEASES)
    except OSError:
        return  # none yet, or not a folder of ours: nothing to open
    try:
        os.fchmod(top, 0o755)
        for name in os.listdir(top):
            try:
                fd = os.open(name, beneath.DIR_FLAGS, dir_fd=top)
            except OSError:
                continue
            try:
                os.fchmod(fd, 0o755)
            finally:
                os.close(fd)
    finally:
        os.close(top)


def stage(job: Job, slog) -> None:
    """Each component's zip unpacked into releases/<version>/<component> (engines.zipunpack)."""
    root, tag = job.root, f"r{job.ctx.run.pk}"
    for path in layout.sweep(root):
        slog.info(f"removed {path}, left by an interrupted run")
    owner = identity(job)  # hooks and services run as that user: it owns the release folders' contents
    job.journal.add({"type": "env_before", "files": env_fingerprints([ch.live for ch in job.changes])})
    for ch in job.changes:
        dest = Path(ch.dest)
        if beneath.lexists(root, dest):
            # Left by an earlier attempt (e.g. a release rolled back by hand and now forced again): set aside,
            # never reused: a release folder always starts from its verified zip.
            aside = dest.parent / f".{dest.name}{layout.ASIDE_MARK}{tag}"
            step = job.journal.add({"type": "aside", "from": str(dest), "to": str(aside)})
            applied(job, step, lambda step=step: beneath.rename(root, step["from"], step["to"]))
            slog.info(f"{dest} existed already: set aside as {aside.name}")
        try:
            releasepkg.check_zip(ch.zip)  # the import checked it; checked again before anything is unpacked
        except releasepkg.ZipRefused as exc:
            raise OperationError(f"{ch.component} {ch.version}: the zip {exc}") from None
        job.journal.add({"type": "staged", "component": ch.component, "path": str(dest),
                         "tmp": str(layout.staging_path(dest, tag))})
        try:
            staged = zipunpack.stage_zip(ch.zip, root, dest, root_folder=ch.root_folder, tag=tag, owner=owner)
        except layout.LayoutError as exc:
            raise OperationError(f"{ch.component} {ch.version}: {exc}") from None
        for line in unpack.setid_warnings(f"{ch.component} {ch.version}", staged.setid):
            slog.warning(line)
        slog.info(f"{ch.component} {ch.version} staged in {dest.relative_to(root)}"
                  + (f", owned by {owner.user}" if owner else ""))
    open_releases(job)


def merge_envs(job: Job, slog) -> None:
    """Per component: the live .env copied into the staged folder and merged there (see layout.merge_env)."""
    diff = {}
    services = {s.name: s for s in job.customer.services.all()}
    who = identity(job)
    root = job.root
    for ch in job.changes:
        live_text, example = preflight.change_env_text(ch)
        live_env = Path(ch.live) / ".env"
        if who is not None:
            # The merged file goes to the customer's user: the live one is read only when it is that user's own
            # regular file, never through a link to Kasa's files or another customer's.
            live_text = _read_env_text(live_env, who)
        merged = layout.merge_env(live_text, example)
        if merged.missing_required:
            raise OperationError(f"{ch.component} {ch.version} requires {', '.join(merged.missing_required)}, "
                                 f"which {ch.live}/.env does not set")
        target = Path(ch.dest) / ".env"
        if beneath.lexists(root, target):
            slog.warning(f"{ch.component}: the release ships a .env; the customer's own replaces it")
            beneath.unlink(root, target)
        if live_text is not None or merged.text:
            # Written in the staged folder's descriptor (the customer's user owns that folder), given to that user,
            # who runs the services; 0600, or the live file's mode where Kasa's own user runs them (development).
            mode = 0o600
            if who is None and live_env.is_file():
                mode = live_env.stat().st_mode & 0o777
            beneath.write_file(root, target, merged.text.encode("utf-8"), mode=mode, owner=_ids(who))
        old, new = envfile.parse(live_text or ""), envfile.parse(merged.text)
        changes = [c.__dict__ for c in envfile.diff(old, new)]
        diff[ch.component] = {"added": list(merged.added), "removed_from_example": merged.removed,
                              "changes": changes, "example": example is not None}
        slog.info(f"{ch.component}: .env merged — "
                  + (f"added {', '.join(f'{k}={envfile.shown(k, v)}' for k, v in merged.added.items())}"
                     if merged.added else "no new key")
                  + (f"; no longer in .env.example (kept): {', '.join(merged.removed)}" if merged.removed else ""))
        svc = services[ch.service]
        if svc.process_manager == svc.ProcessManager.PM2:
            try:
                ecosystem.script_for(ch.dest, svc.start_command)
            except ecosystem.EcosystemError as exc:
                raise OperationError(f"service {svc.name}: {exc}") from None
    Upgrade.objects.filter(pk=job.upgrade.pk).update(env_diff=diff)


def switch(job: Job, slog) -> None:
    """Each service path made a link to its new release folder (a plain folder kept as the previous release)."""
    root, plan = job.root, {}
    for ch in job.changes:
        step = layout.plan_switch(root, ch.live, ch.dest, component=ch.component, previous_version=ch.previous)
        job.journal.add(step)
        applied(job, step, lambda step=step: layout.apply_switch(step, root=root))
        before = step["before"]
        if before["kind"] == "dir":
            open_releases(job)  # the original folder moved into a releases/<version>/ Kasa created
            before_dir, before_version = before["moved_to"], ch.previous or layout.UNVERSIONED
        elif before["kind"] == "link":
            before_dir = os.path.normpath(os.path.join(os.path.dirname(ch.live), before["target"]))
            before_version = before["version"]
        else:
            before_dir, before_version = None, ""
        plan[ch.component] = {"service": ch.service, "live": ch.live, "before": before, "before_dir": before_dir,
                              "before_version": before_version, "after_dir": ch.dest, "after_version": ch.version}
        slog.info(f"{os.path.relpath(ch.live, root)} → {step['new']}"
                  + (f" (the original folder kept as {os.path.relpath(before_dir, root)})"
                     if before["kind"] == "dir" else ""))
    Upgrade.objects.filter(pk=job.upgrade.pk).update(layout=plan)
    job.upgrade.layout = plan


def start(job: Job, slog, folders: dict[str, str | None], *, strict: set[str]) -> None:
    """Regenerate the customer's PM2 ecosystem file (journalled: the previous one is kept), then start."""
    root, ctx = job.root, job.ctx
    who = runtime.run_identity(job.customer)
    apps, included = [], set()
    for svc in job.customer.services.all().order_by("name"):
        if svc.process_manager != svc.ProcessManager.PM2:
            continue
        live = root / (svc.path or svc.name)
        folder = folders.get(svc.name) or str(live)
        if not os.path.isdir(folder):
            continue
        try:
            apps.append(ecosystem.app(svc.app_name, cwd=live, folder=folder, start_command=svc.start_command,
                                      env=read_env(Path(folder) / ".env", who)))
            included.add(svc.name)
        except ecosystem.EcosystemError as exc:
            if svc.name in strict:
                raise OperationError(f"service {svc.name}: {exc}") from None
            slog.warning(f"service {svc.name} is left out of the ecosystem file: {exc}")
    path = root / ecosystem.FILE_NAME
    if apps:
        saved = None
        if beneath.lexists(root, path):
            saved = f"{path}.kasa-prev-r{ctx.run.pk}"
            # A link the customer's user put there is kept as a link, never followed by Kasa's copy; the copy
            # is the user's again (a rollback renames it back for PM2, which runs as that user).
            beneath.copy_entry(root, path, saved, owner=_ids(who))
        job.journal.add({"type": "ecosystem", "path": str(path), "saved": saved, "written": True})
        ecosystem.write(path, apps, owner=who, root=root)
        slog.info(f"{path.name} written for {', '.join(sorted(included))}")
    specs = [s for s in job.specs() if os.path.isdir(s.folder)]
    for spec in specs:
        if spec.name in included:
            spec.ecosystem = str(path)
    slog.info(f"starting {len(specs)} service(s)")
    runtime.start_all(ctx, specs)


def drop_saved_ecosystem(job: Job, step: dict) -> None:
    if step["type"] == "ecosystem" and step.get("saved"):
        beneath.unlink(job.root, step["saved"], missing_ok=True)


def cleanup(job: Job, slog) -> None:
    """The upgrade holds. Remove what was set aside and prune old releases (the caller unpins earlier
    pre-upgrade backups). Nothing here can fail the upgrade: trouble is a warning."""
    for step in job.journal.steps:
        if step["type"] == "aside" and not step.get("refused"):
            trees.discard(step["to"], root=job.root)
        drop_saved_ecosystem(job, step)
    prune(job, slog)


def prune(job: Job, slog) -> list[str]:
    """Keep the live release, the rollback target and KASA_KEEP_RELEASES (default 3) others per component."""
    keep = settings.KASA_KEEP_RELEASES
    root, removed = job.root, []
    job.customer.refresh_from_db()
    components = set(job.upgrade.layout) | set(job.customer.versions or {})
    for comp in sorted(components):
        protect = protected_versions(job.customer, comp)
        info = job.upgrade.layout.get(comp) or {}
        protect |= {v for v in (info.get("before_version"), info.get("after_version")) if v}
        svc = job.customer.services.filter(name=comp).first()
        if svc is not None:  # whatever the service's link points at now is live, recorded or not
            state = layout.live_state(root, root / (svc.path or comp))
            if state.version:
                protect.add(state.version)
        present = layout.present_versions(root, comp)
        for version in layout.prune_plan(present, order=live_order(job.customer, comp), keep=keep, protect=protect):
            layout.remove_release(root, version, comp)
            removed.append(f"{comp} {version}")
    if removed:
        slog.info(f"pruned old releases (keeping {keep} besides the live one and the way back): {', '.join(removed)}")
    return removed
