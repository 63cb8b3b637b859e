"""Preflight: may this customer move to this release now? Every check runs, and each says why.

Run before an upgrade starts (admin page, `upgrade --dry-run`) and again as the upgrade's first step.
Nothing here changes anything; the only files written are the copies of the release's zips (verified
against their sha256), into `zips_dir` when the caller wants to stage from them, else a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from django.conf import settings

from backups import dbswap
from backups.models import Backup, BackupPolicy
from backups.services import BackupInputError, backup_params, policy_for
from customers import runtime
from customers.models import Customer, DatabaseConnection
from engines import beneath, ecosystem, envfile, layout, paths
from engines.humanize import human_size
from operations.models import Run
from releases.models import ComponentVersion, Release
from releases.services import ReleaseStorageError, component_zip_copy, releases_for

from .models import Upgrade
from .selectors import bad_release

MiB = 1 << 20


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    blocking: bool = True  # a non-blocking check only warns


@dataclass
class Change:
    """One component the release changes, and where it goes."""

    component: str
    version: str
    previous: str  # the customer's version now ("" when none is recorded)
    service: str
    live: str  # the service path (absolute, not resolved: it is, or becomes, the symlink)
    dest: str  # releases/<version>/<component>
    zip: str = ""  # the verified copy, when the caller kept them
    root_folder: str = ""
    hooks: dict = field(default_factory=dict)
    unpacked_size: int = 0


@dataclass
class Report:
    customer: str
    release: str
    kind: str
    from_versions: dict
    to_versions: dict
    changes: list[Change]
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.blocking)

    def problems(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.blocking and not c.ok]

    def as_dict(self) -> dict:
        return {"ok": self.ok, "customer": self.customer, "release": self.release, "kind": self.kind,
                "from": self.from_versions, "to": self.to_versions,
                "changes": [asdict(c) for c in self.changes],
                "checks": [asdict(c) for c in self.checks]}


def check(customer: Customer, release: Release, *, force: bool = False, own_run: Run | None = None,
          zips_dir: str | None = None) -> Report:
    """Every check of the issue's preflight. `own_run`: the upgrade's own run (not "something else running")."""
    customer = Customer.objects.prefetch_related("services", "databases").get(pk=customer.pk)
    current = {k: str(v) for k, v in (customer.versions or {}).items() if v}
    rows = {row.component: row.component_version for row in release.rows.select_related("component_version")}
    to_versions = {c: cv.version for c, cv in rows.items() if current.get(c) != cv.version}
    report = Report(customer=customer.domain, release=release.name,
                    kind=Upgrade.Kind.INSTALL if not current else Upgrade.Kind.UPGRADE,
                    from_versions=current, to_versions=to_versions, changes=[], checks=[])
    checks = report.checks
    checks.append(_release_allowed(customer, release, current, force))
    if not customer.host.is_local:
        # Its folders and .env files are on the host: looked at there, through SSH, as the upgrade's first step
        # (upgrades.remote_preflight; `upgrade --dry-run` runs only that), never on this machine's disk.
        checks.append(Check("host", True, f"{customer} lives on host {customer.host.name}: its service paths, .env "
                                          "files and free disk are checked on the host as the upgrade's first step "
                                          "(a dry run shows them)", blocking=False))
        checks.append(exclusive_check(customer, own_run))
        checks.append(_backup_possible(customer, report.kind))
        return report
    services = {s.name: s for s in customer.services.all()}
    try:
        root = customer.root_path()
    except paths.PathEscapeError as exc:
        checks.append(Check("services", False, f"{exc}; nothing was touched"))
        return report
    checks.append(_components(customer, root, rows, to_versions, current, services, report.changes))
    tmp = None
    if zips_dir is None:
        settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
        tmp = zips_dir = tempfile.mkdtemp(prefix="upgrade-preflight-", dir=settings.KASA_SCRATCH_DIR)
    try:
        copies: dict[str, str] = {}
        checks.append(_env(report.changes, rows, zips_dir, keep=tmp is None, copies=copies))
        checks.append(_startable(report.changes, services, copies))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    checks.append(_disk(customer, root, report.changes))
    checks.append(healthy_check(customer) if report.kind != Upgrade.Kind.INSTALL else
                  Check("health", True, "an install: nothing runs yet (every health URL must answer afterwards)"))
    checks.append(exclusive_check(customer, own_run))
    checks.append(_backup_possible(customer, report.kind))
    checks.extend(_database_rollback(customer))
    return report


# --- the checks ------------------------------------------------------------------------------------
def _release_allowed(customer, release, current, force) -> Check:
    allowed, why = next(((a, w) for r, a, w in releases_for(current) if r.pk == release.pk), (False, "not found"))
    mark = bad_release(customer, release)
    if mark is not None and not force:
        return Check("release", False, f"release {release.name} failed for this customer before ({mark.reason}); "
                                       "it is offered again only when forced")
    if not allowed:
        return Check("release", False, f"the upgrade path to {release.name} is not allowed: {why}")
    note = f" (marked bad before, forced: {mark.reason})" if mark is not None else ""
    return Check("release", True, f"{release.name}: {why}{note}")


def _components(customer, root: Path, rows, to_versions, current, services, changes: list[Change]) -> Check:
    problems = []
    sqlite_files = []
    for d in customer.databases.all():
        if d.engine == DatabaseConnection.Engine.SQLITE:
            try:
                sqlite_files.append(Path(d.sqlite_file()))
            except paths.PathEscapeError as exc:
                problems.append(f"database {d.name}: {exc}")
    for comp, version in to_versions.items():
        try:
            svc, live, dest = component_place(root, comp, version, services)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        try:
            state = layout.live_state(root, live)
        except beneath.BeneathError as exc:  # a folder on the service path is a link now
            problems.append(f"{comp}: {exc}")
            continue
        if state.kind == "other":
            problems.append(f"{comp}: {live} is neither a folder nor a link into {root / layout.RELEASES}")
        elif state.kind == "dir":
            moved = layout.release_dir(root, current.get(comp) or layout.UNVERSIONED, comp)
            if beneath.lexists(root, moved):
                problems.append(f"{comp}: the current folder cannot be kept as {moved}: that exists already")
            inside = [str(f) for f in sqlite_files if live.resolve() in f.parents]
            if inside:
                problems.append(f"{comp}: the SQLite database {', '.join(inside)} lives inside the service folder, "
                                "which an upgrade replaces; move it out of the folder first")
        if state.kind == "link" and state.version == version:
            problems.append(f"{comp}: {version} is live already although the customer records "
                            f"{current.get(comp) or 'no version'}")
        cv = rows[comp]
        changes.append(Change(component=comp, version=version, previous=current.get(comp, ""), service=svc.name,
                              live=str(live), dest=str(dest), root_folder=cv.root, hooks=dict(cv.hooks or {}),
                              unpacked_size=cv.unpacked_size))
    if problems:
        return Check("services", False, "; ".join(problems))
    named = ", ".join(f"{c.component} → {c.service}" for c in changes) or "nothing changes"
    return Check("services", True, named)


def component_place(root: Path, comp: str, version: str, services: dict) -> tuple:
    """(service, live path, release folder) of a component in the customer's root; ValueError saying why not (for
    a local and a remote customer alike: `root` is the customer's root as its host has it)."""
    svc = services.get(comp)
    if svc is None:
        # A component's files must belong to a service: it is what backups archive and what the symlink
        # switch replaces. A component nobody runs still needs one, with process manager "none".
        raise ValueError(f"{comp}: the customer has no service named {comp!r} (add one, with process manager "
                         "'none' for static files)")
    try:
        rel = paths.relative_inside(svc.path or comp, what=f"service {comp} path")
        if not rel:
            raise paths.PathEscapeError(f"service {comp} is the customer's root itself, which cannot become "
                                        "a release symlink")
        return svc, root / rel, layout.release_dir(root, version, comp)
    except (paths.PathEscapeError, layout.LayoutError) as exc:
        raise ValueError(f"{comp}: {exc}") from None


def example_text(zip_path: str, cv_root: str) -> str | None:
    """The .env.example at the component's top in its zip, or None."""
    name = f"{cv_root}/.env.example" if cv_root else ".env.example"
    with zipfile.ZipFile(zip_path) as zf:
        try:
            return zf.read(name).decode("utf-8", "replace")
        except KeyError:
            return None


def _env(changes: list[Change], rows, zips_dir: str, *, keep: bool, copies: dict[str, str]) -> Check:
    """Required keys (empty in the new .env.example) must have a value in the live .env. The zips are copied
    here (sha256 checked): a missing or altered zip is found before anything is touched. `copies` gets each
    component's verified copy."""
    problems, notes = [], []
    for ch in changes:
        cv: ComponentVersion = rows[ch.component]
        try:
            path = component_zip_copy(cv, zips_dir)
        except ReleaseStorageError as exc:
            problems.append(str(exc))
            continue
        copies[ch.component] = str(path)
        if keep:
            ch.zip = str(path)
        example = example_text(str(path), cv.root)
        live_env = os.path.join(ch.live, ".env")
        live_text = Path(live_env).read_text(encoding="utf-8", errors="replace") if os.path.isfile(live_env) else ""
        merged = layout.merge_env(live_text, example)
        if merged.missing_required:
            problems.append(f"{ch.component}: {cv} requires {', '.join(merged.missing_required)} (empty in its "
                            f".env.example); set a value in {live_env} first")
        if merged.added:
            notes.append(f"{ch.component} adds {', '.join(merged.added)}")
        if merged.removed:
            notes.append(f"{ch.component} no longer lists {', '.join(merged.removed)} (kept)")
    if problems:
        return Check("env", False, "; ".join(problems))
    return Check("env", True, "; ".join(notes) or "no new keys")


def _startable(changes: list[Change], services, copies: dict[str, str]) -> Check:
    """Each PM2 service the release changes must be startable from the release's files as they come in the
    zip (engines.ecosystem: the service's start command, package.json's "main" or "node FILE" start script,
    or server.js/index.js/app.js/main.js), so that an upgrade never stops a customer it cannot start again."""
    problems, how = [], []
    for ch in changes:
        svc = services.get(ch.service)
        if svc is None or svc.process_manager != svc.ProcessManager.PM2:
            continue
        if ch.component not in copies:
            continue  # the zip is missing or altered: the env check says so
        try:
            with zipfile.ZipFile(copies[ch.component]) as zf:
                names = zf.namelist()

                def read(name: str, zf=zf) -> bytes | None:
                    try:
                        return zf.read(name)
                    except KeyError:
                        return None

                found = ecosystem.script_in_zip(names, read, top=ch.root_folder, start_command=svc.start_command,
                                                where=f"{ch.component} {ch.version}")
        except (ecosystem.EcosystemError, zipfile.BadZipFile, OSError) as exc:
            problems.append(f"service {svc.name}: {exc}")
            continue
        how.append(f"{svc.name}: " + (" ".join(svc.start_command) if svc.start_command else found["script"]))
    if problems:
        return Check("start", False, "; ".join(problems))
    return Check("start", True, "; ".join(how) or "no PM2 service changes")


def _disk(customer, root: Path, changes: list[Change]) -> Check:
    margin = settings.KASA_UPGRADE_DISK_MARGIN
    release_need = sum(c.unpacked_size for c in changes)
    last = (Backup.objects.filter(customer=customer, status=Backup.Status.SUCCEEDED, scope="full")
            .order_by("-finished_at").values_list("size", flat=True).first())
    backup_need = last if last is not None else _tree_size(root)
    needs = {_device(root): [release_need + margin, str(root)]}
    target = _backup_folder(customer)
    if target is not None:
        dev = _device(target)
        if dev in needs:
            needs[dev][0] += backup_need
        else:
            needs[dev] = [backup_need + margin, str(target)]
    problems, seen = [], []
    for need, where in needs.values():
        free = shutil.disk_usage(where).free
        seen.append(f"{where}: {human_size(free)} free, {human_size(need)} needed")
        if free < need:
            problems.append(f"not enough free disk on {where}: {human_size(free)} free, {human_size(need)} "
                            f"needed (backup {human_size(backup_need)} + release {human_size(release_need)} + "
                            f"{human_size(margin)} margin)")
    return Check("disk", not problems, "; ".join(problems or seen))


def _device(path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return os.stat(path).st_dev


def _backup_folder(customer) -> Path | None:
    target = policy_for(customer).target
    return Path(target.path) if target.kind == target.Kind.LOCAL and target.path else None


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != layout.RELEASES or dirpath != str(root)]
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def healthy_check(customer) -> Check:
    specs = runtime.service_specs(customer)
    checked = [s.name for s in specs if s.health_url]
    if not checked:
        return Check("health", True, "no service has a health URL")
    healthy = runtime.healthy_now(specs)
    down = [n for n in checked if n not in healthy]
    if down:
        return Check("health", False, f"not healthy now: {', '.join(down)} (an upgrade starts from a working "
                                      "customer, so that its health checks mean something)")
    return Check("health", True, f"healthy now: {', '.join(checked)}")


def exclusive_check(customer, own_run) -> Check:
    active = Run.objects.active().filter(customer=customer, mutating=True)
    if own_run is not None:
        active = active.exclude(pk=own_run.pk)
    other = active.order_by("created_at").first()
    if other is not None:
        return Check("exclusive", False, f"{other.get_kind_display().lower()} #{other.pk} is {other.status}")
    quarantined = Upgrade.objects.unresolved_quarantine().filter(customer=customer).first()
    if quarantined is not None:
        return Check("exclusive", False, f"upgrade #{quarantined.pk} is quarantined and waits for an operator "
                                         "(mark it resolved once the customer is checked)")
    return Check("exclusive", True, "nothing else is running")


def _backup_possible(customer, kind: str) -> Check:
    scope, note = backup_scope(customer, kind)
    if scope is None:
        return Check("backup", True, note)
    try:
        params = backup_params(customer, scope=scope, trigger=Backup.Trigger.UPGRADE)
    except BackupInputError as exc:
        return Check("backup", False, f"the pre-upgrade backup cannot be taken: {exc}")
    return Check("backup", True, f"{note}, to {params['target']}")


def backup_scope(customer, kind: str) -> tuple[str | None, str]:
    """What the pre-upgrade backup covers. An install has no files worth a backup (it puts the first
    release in place; a folder already there is kept aside and put back by a rollback): its databases
    only, so that a failed migrate can be undone; nothing at all when it has none."""
    if kind != Upgrade.Kind.INSTALL:
        return BackupPolicy.Scope.FULL, "a full backup, pinned"
    if customer.databases.exists():
        return BackupPolicy.Scope.DATABASE, "an install: a backup of the databases only, pinned"
    return None, "an install without databases: no backup (there is nothing to back up)"


def _database_rollback(customer) -> list[Check]:
    """How a rollback would put each database back (it no longer needs CREATEDB: see backups.dbswap). Reported,
    never blocking; a problem here (the database unreachable) shows again, for real, at the backup."""
    out = []
    for db in customer.databases.exclude(engine=DatabaseConnection.Engine.SQLITE):
        name = f"rollback of database {db.name}"
        try:
            target = dbswap.target_for(customer, db.name)
            method, why = dbswap.choose(target)
        except Exception as exc:  # noqa: BLE001 (reported, never fatal)
            out.append(Check(name, False, f"could not check: {exc}", blocking=False))
            continue
        if method == dbswap.IN_PLACE:
            detail = why
        elif target.maint is not None:
            detail = f"into a fresh database, swapped in, {why}"
        elif target.engine == "redis":
            detail = "into an empty spare logical database of its server, swapped in with SWAPDB"
        elif target.engine == "mysql":
            detail = ("into a fresh database beside it when the user may create one, else into prefixed tables "
                      "of the database itself, swapped in with one RENAME TABLE")
        else:
            detail = "into a fresh database, swapped in"
        out.append(Check(name, True, detail, blocking=False))
    return out


def change_env_text(change: Change) -> tuple[str | None, str | None]:
    """(live .env text or None, the release's .env.example text or None) of one change."""
    live_env = os.path.join(change.live, ".env")
    live = Path(live_env).read_text(encoding="utf-8", errors="replace") if os.path.isfile(live_env) else None
    example = example_text(change.zip, change.root_folder) if change.zip else None
    return live, example


def masked(values: dict[str, str]) -> dict[str, str | None]:
    return {k: envfile.shown(k, v) for k, v in values.items()}


def record(up: Upgrade, report: Report, slog) -> None:
    """The preflight's verdict on the Upgrade row (report, kind, versions) and one log line per check: for a local
    and a remote customer alike."""
    Upgrade.objects.filter(pk=up.pk).update(preflight=report.as_dict(), kind=report.kind,
                                            from_versions=report.from_versions, to_versions=report.to_versions)
    up.refresh_from_db()
    for c in report.checks:
        text = f"{c.name}: {c.detail}"
        if c.ok:
            slog.info(f"ok  {text}")
        elif c.blocking:
            slog.info(f"FAILED  {text}")
        else:
            slog.warning(text)
