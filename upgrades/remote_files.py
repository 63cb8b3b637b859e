"""The files of an upgrade of a customer on a remote host: upgrades.release_files's steps, each change made on the
host by Kasa's own engines code (engines.hostupgrade, engines.layout, engines.beneath through the session's helper)
and journalled (on the host's disk too) before it is made.

Staging: the release's zip was fetched and checked on the worker (releases: authenticated; releasepkg.check_zip
again here) and is unpacked on the worker first (engines.zipunpack: its confinement rules), into the run's scratch
folder; that tree goes as a tar stream through engines.tarcheck's scanner (each member checked before it is passed
on) into GNU tar on the host, run as the customer's user there (engines.hostrestore.TAR_LAUNCHER), and the host
checks what tar made against the scanner's counts (engines.treecheck) before the folder is renamed into place.
Nothing of a refused release reaches the host.
"""

from __future__ import annotations

import os
import shutil
import tarfile

from backups.remote_restore import _pipe_to_host  # the one way a checked stream reaches tar on a host
from engines import ecosystem, envfile, hostrestore, layout, procman, releasepkg, unpack, zipunpack
from hosts.remote import RemoteError
from operations.context import OperationError

from . import preflight
from .models import Upgrade
from .remote_job import RemoteJob
from .rollback import scratch_dir
from .selectors import live_order, protected_versions


def pack(job: RemoteJob, slog) -> None:
    """Every component's zip checked again and packed on the worker, before the pre-upgrade backup: a refused
    release ends the upgrade `failed` with nothing touched and nothing sent to the host."""
    job.packed = {}
    for ch in job.changes:
        try:
            releasepkg.check_zip(ch.zip)  # the import checked it; again before a byte of it leaves the worker
        except releasepkg.ZipRefused as exc:
            raise OperationError(f"{ch.component} {ch.version}: the zip {exc}; nothing of it reached host "
                                 f"{job.host}") from None
        job.packed[ch.component] = _pack(job, ch)
        slog.info(f"{ch.component} {ch.version}: checked and packed on the worker "
                  f"({job.packed[ch.component][2]['members']} members)")


def stage(job: RemoteJob, slog) -> None:
    root, tag = str(job.root), f"r{job.ctx.run.pk}"
    for path in job.call("engines.layout.sweep", root) or []:
        slog.info(f"removed {path} on {job.host}, left by an interrupted run")
    job.journal.add({"type": "env_before", "host": True,
                     "files": job.call("engines.hostupgrade.env_fingerprints", [ch.live for ch in job.changes])})
    for ch in job.changes:
        dest = ch.dest
        if job.call("engines.beneath.lexists", root, dest):
            aside = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}{layout.ASIDE_MARK}{tag}")
            job.journal.add({"type": "aside", "from": dest, "to": aside})
            job.call("engines.beneath.rename", root, dest, aside)
            slog.info(f"{dest} existed already on {job.host}: set aside as {os.path.basename(aside)}")
        tree, tarball, listing = job.packed[ch.component]
        step = job.journal.add({"type": "staged", "component": ch.component, "path": dest,
                                "tmp": str(layout.staging_path(dest, tag))})
        tmp = job.call("engines.hostupgrade.stage_begin", root, dest, tag, job.user)
        if tmp != step["tmp"]:
            raise OperationError(f"{job.remote.where} answered a staging folder that is not the one asked for: "
                                 "not trusted")
        _send(job, ch, tarball, tmp)
        job.call("engines.hostupgrade.stage_end", root, tmp, dest, listing, job.user)
        shutil.rmtree(tree, ignore_errors=True)
        os.unlink(tarball)
        slog.info(f"{ch.component} {ch.version} staged in {os.path.relpath(dest, root)} on {job.host}, owned by "
                  f"{job.user} there ({listing['files']} files)")


def _pack(job: RemoteJob, ch) -> tuple[str, str, dict]:
    """The zip unpacked on the worker (engines.zipunpack refuses what leaves its folder) and packed as a tar of
    that tree: what the scanner will read, and its counts for the host's tree check."""
    scratch = scratch_dir(job.ctx.run.pk) / "trees"
    scratch.mkdir(mode=0o700, exist_ok=True)
    tree = scratch / f"{ch.component}-{ch.version}"
    shutil.rmtree(tree, ignore_errors=True)
    try:
        zipunpack.stage_zip(ch.zip, scratch, tree, root_folder=ch.root_folder, tag="w", owner=None)
    except layout.LayoutError as exc:
        raise OperationError(f"{ch.component} {ch.version}: {exc}; nothing of it reached host {job.host}") from None
    tarball = str(tree) + ".tar"
    with tarfile.open(tarball, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(tree)):
            tar.add(tree / name, arcname=name, recursive=True)
    scanner = unpack.TarScanner(f"{ch.component} {ch.version}", unpack.Limits())
    try:
        with open(tarball, "rb") as fh:
            while chunk := fh.read(1 << 20):
                scanner.feed(chunk)
        listing = scanner.finish()
    except unpack.ArtifactError as exc:
        raise OperationError(f"{ch.component} {ch.version}: {exc}; nothing of it reached host {job.host}") from None
    counts = {k: getattr(listing, k) for k in ("members", "files", "dirs", "symlinks", "hardlinks", "total_size")}
    return str(tree), tarball, counts


def _send(job: RemoteJob, ch, tarball: str, tmp: str) -> None:
    """The tar, through the scanner again (what reaches the host is what was checked), into tar on the host as
    the customer's user."""
    root = str(job.root)
    who = job.who
    argv = job.remote.session.argv(["python3", "-I", "-c", hostrestore.TAR_LAUNCHER, root,
                                    os.path.relpath(tmp, root), str(who["uid"]), str(who["gid"]),
                                    *unpack._tar_argv()])
    scanner = unpack.TarScanner(f"{ch.component} {ch.version}", unpack.Limits())

    def feed(write, close):
        with open(tarball, "rb") as fh:
            while chunk := fh.read(1 << 20):
                if scanner.ended:
                    continue
                for piece in scanner.feed(chunk) or ():
                    write(piece)
                if scanner.ended:
                    close()
        return scanner.finish()

    _pipe_to_host(job.remote, argv, type("Art", (), {"name": f"{ch.component} {ch.version}"})(), tmp, feed)


def merge_envs(job: RemoteJob, slog) -> None:
    """Per component: the live .env (read on the host, the customer's user's own file only) merged with the
    release's .env.example here, written into the staged folder there."""
    root, diff = str(job.root), {}
    for ch in job.changes:
        example = preflight.example_text(ch.zip, ch.root_folder) if ch.zip else None
        live_text = job.call("engines.hostupgrade.read_env_text", root, ch.live, job.user)
        merged = layout.merge_env(live_text, example)
        if merged.missing_required:
            raise OperationError(f"{ch.component} {ch.version} requires {', '.join(merged.missing_required)}, "
                                 f"which {ch.live}/.env on {job.host} does not set")
        values = envfile.parse(merged.text)
        for secret in [v for k, v in values.items() if envfile.is_secret(k, v)] + procman.env_secrets(values):
            job.ctx.add_secret(secret)  # masked in every later line (the hooks print what they like)
        shipped = job.call("engines.hostupgrade.write_env", root, ch.dest, merged.text, job.user,
                           live_text is not None or bool(merged.text))
        if shipped:
            slog.warning(f"{ch.component}: the release ships a .env; the customer's own replaces it")
        old, new = envfile.parse(live_text or ""), envfile.parse(merged.text)
        diff[ch.component] = {"added": list(merged.added), "removed_from_example": merged.removed,
                              "changes": [c.__dict__ for c in envfile.diff(old, new)], "example": example is not None}
        slog.info(f"{ch.component}: .env merged on {job.host} — "
                  + (f"added {', '.join(f'{k}={envfile.shown(k, v)}' for k, v in merged.added.items())}"
                     if merged.added else "no new key"))
    Upgrade.objects.filter(pk=job.upgrade.pk).update(env_diff=diff)


def switch(job: RemoteJob, slog) -> None:
    """Each service path made a link to its new release folder on the host (engines.layout there)."""
    root, plan = str(job.root), {}
    for ch in job.changes:
        step = job.call("engines.layout.plan_switch", root, ch.live, ch.dest, component=ch.component,
                        previous_version=ch.previous)
        if not isinstance(step, dict) or step.get("type") != "switch" or step.get("live") != ch.live:
            raise OperationError(f"{job.remote.where} answered a switch that is not the one asked for: not trusted")
        job.journal.add(step)
        job.call("engines.layout.apply_switch", step, root=root)
        before = step["before"]
        if before["kind"] == "dir":
            job.call("engines.hostupgrade.open_releases", root)
            before_dir, before_version = before["moved_to"], ch.previous or layout.UNVERSIONED
        elif before["kind"] == "link":
            before_dir = os.path.normpath(os.path.join(os.path.dirname(ch.live), before["target"]))
            before_version = before["version"]
        else:
            before_dir, before_version = None, ""
        plan[ch.component] = {"service": ch.service, "live": ch.live, "before": before, "before_dir": before_dir,
                              "before_version": before_version, "after_dir": ch.dest, "after_version": ch.version}
        slog.info(f"{os.path.relpath(ch.live, root)} → {step['new']} on {job.host}")
    Upgrade.objects.filter(pk=job.upgrade.pk).update(layout=plan)
    job.upgrade.layout = plan


def start(job: RemoteJob, slog, folders: dict[str, str | None], *, strict: set[str]) -> None:
    """Kasa's PM2 ecosystem file regenerated on the host (journalled: the previous one is kept), then start."""
    root = str(job.root)
    apps, included = [], set()
    for svc in sorted(job.customer.services.all(), key=lambda s: s.name):
        if svc.process_manager != svc.ProcessManager.PM2:
            continue
        live = os.path.join(root, svc.path or svc.name)
        folder = folders.get(svc.name) or live
        if not job.call("engines.hostupgrade.present", root, [folder]):
            continue
        try:
            apps.append(job.call("engines.hostupgrade.ecosystem_app", root, svc.app_name, live, folder,
                                 list(svc.start_command or ()), job.user))
            included.add(svc.name)
        except RemoteError as exc:  # EcosystemError there (a lost host is a RemoteError too: raised on next call)
            if svc.name in strict:
                raise OperationError(f"service {svc.name} on {job.host}: {exc}") from None
            slog.warning(f"service {svc.name} is left out of the ecosystem file: {exc}")
    path = os.path.join(root, ecosystem.FILE_NAME)
    if apps:
        step = job.journal.add({"type": "ecosystem", "path": path, "saved": f"{path}.kasa-prev-r{job.ctx.run.pk}",
                                "written": True, "host": True})
        saved = job.call("engines.hostupgrade.write_ecosystem", root, path, apps, job.user, f"r{job.ctx.run.pk}")
        step["saved"] = saved
        job.journal.save()
        slog.info(f"{ecosystem.FILE_NAME} written on {job.host} for {', '.join(sorted(included))}")
    specs = job.present_specs()
    for spec in specs:
        if spec.name in included:
            spec.ecosystem = path
    slog.info(f"starting {len(specs)} service(s) on {job.host}")
    job.services("start", specs, slog.info)


def cleanup(job: RemoteJob, slog) -> None:
    """The upgrade holds: what was set aside goes, old releases are pruned (as release_files.prune)."""
    from django.conf import settings

    root = str(job.root)
    job.call("engines.hostupgrade.cleanup", root, job.journal.steps)
    keep, removed = settings.KASA_KEEP_RELEASES, []
    job.customer.refresh_from_db()
    for comp in sorted(set(job.upgrade.layout) | set(job.customer.versions or {})):
        protect = protected_versions(job.customer, comp)
        info = job.upgrade.layout.get(comp) or {}
        protect |= {v for v in (info.get("before_version"), info.get("after_version")) if v}
        svc = job.customer.services.filter(name=comp).first()
        if svc is not None:
            state = job.call("engines.hostupgrade.live_states", root, [os.path.join(root, svc.path or comp)])
            version = next(iter(state.values()), {}).get("version")
            if version:
                protect.add(version)
        present = job.call("engines.layout.present_versions", root, comp)
        for version in layout.prune_plan(present, order=live_order(job.customer, comp), keep=keep, protect=protect):
            job.call("engines.layout.remove_release", root, version, comp)
            removed.append(f"{comp} {version}")
    if removed:
        slog.info(f"pruned old releases on {job.host}: {', '.join(removed)}")


def check_env(job: RemoteJob, slog) -> None:
    """The .env files live in the previous release folders, which no step writes: prove they are back."""
    recorded = {}
    for step in job.journal.of("env_before"):
        recorded.update(step["files"])
    if not recorded:
        slog.info("no .env was recorded (nothing had been staged)")
        return
    now = job.call("engines.hostupgrade.env_fingerprints", list(recorded))
    changed = [p for p, sha in recorded.items() if now.get(p) != sha]
    if changed:
        raise OperationError(f"the .env of {', '.join(changed)} on {job.host} is not the one from before")
    slog.info(f"{len(recorded)} .env file(s) on {job.host} identical to before")
