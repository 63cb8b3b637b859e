"""Service functions of the release registry: import (CLI sync or admin upload), offer, read back.

An import is all or nothing. engines.releasepkg checks releases.json and every zip first; then the versions
and releases it names are compared with what is registered (a registered version whose zip, requires or
hooks differ is refused: a version is immutable). Only then are the zips copied to Django's default storage
under content-addressed names (releases/<component>/<sha256>.zip), and the rows written in one transaction.
If that transaction fails, the blobs it copied stay behind unreferenced: we keep them rather than delete
them, because a concurrent import of the same content may already reference the same name; the next sync
finds them, checks their sha256 and reuses them.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction

from audit.models import AuditEntry
from audit.services import audit_record
from core import permissions
from engines import releasepkg
from engines.releasepkg import PackageError, Version, requirement_problems
from engines.streams import CHUNK, HashingWriter

from .models import ComponentVersion, Release, ReleaseComponent

NOTHING = "nothing was imported"


class ReleaseInputError(ValueError):
    """The input is refused (exit 2); the message says what is wrong and that nothing was imported."""


class ReleaseStorageError(RuntimeError):
    """Storage failed or holds a corrupt zip (exit 1); the message says what was left as it was."""


@dataclass
class SyncResult:
    source: str
    versions_created: list[str] = field(default_factory=list)
    versions_existing: list[str] = field(default_factory=list)
    releases_created: list[str] = field(default_factory=list)
    releases_existing: list[str] = field(default_factory=list)
    notes_updated: list[str] = field(default_factory=list)
    blobs_written: int = 0
    blobs_reused: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.versions_created or self.releases_created or self.notes_updated)

    def as_dict(self) -> dict:
        return asdict(self)


def limits() -> releasepkg.Limits:
    """Engine limits, overridable by settings (KASA_RELEASE_MAX_UNPACKED_BYTES, KASA_RELEASE_MAX_ZIP_BYTES)."""
    base = releasepkg.Limits()
    return releasepkg.Limits(
        max_zip_bytes=getattr(settings, "KASA_RELEASE_MAX_ZIP_BYTES", base.max_zip_bytes),
        max_unpacked_bytes=getattr(settings, "KASA_RELEASE_MAX_UNPACKED_BYTES", base.max_unpacked_bytes),
    )


def blob_name(component: str, sha256: str) -> str:
    return f"releases/{component}/{sha256}.zip"


# --- import --------------------------------------------------------------------------------------------------
def release_sync(path, *, actor=None, via: str = "cli") -> SyncResult:
    """Import PATH/releases.json (zips relative to it). ReleaseInputError: refused, nothing imported."""
    path = Path(path)
    if path.is_dir():
        path = path / "releases.json"
    return _import(path, source=str(path.resolve()), actor=actor, via=via, action="release.sync")


def release_upload(json_file, zip_files, *, actor) -> SyncResult:
    """Import an uploaded releases.json with its zips (Django UploadedFiles), matched by file name. Releases serve
    every customer: the actor needs releases.add_release (core.permissions.UPLOAD_RELEASES)."""
    permissions.require(actor, permissions.UPLOAD_RELEASES)
    scratch = Path(settings.KASA_SCRATCH_DIR)
    scratch.mkdir(parents=True, exist_ok=True)
    json_name = os.path.basename(getattr(json_file, "name", "") or "releases.json")
    with tempfile.TemporaryDirectory(dir=scratch, prefix="release-upload-") as tmp:
        uploaded: dict[str, Path] = {}
        for f in zip_files:
            name = os.path.basename(f.name or "")
            if not name or name in uploaded or name == json_name:
                _refused(actor, "admin", "release.upload", f"upload:{json_name}",
                         f"the uploaded file name {name!r} is empty or given twice; {NOTHING}")
            uploaded[name] = _save_upload(f, Path(tmp) / f"zip-{len(uploaded)}")
        json_path = _save_upload(json_file, Path(tmp) / "releases.json")

        def locate(rel: str) -> Path | None:
            return uploaded.get(posixpath.basename(rel))

        def extra(package: releasepkg.Package) -> list[str]:
            named = {posixpath.basename(e.file) for e in package.entries}
            return [f"{n} was uploaded but releases.json does not name it" for n in sorted(set(uploaded) - named)]

        return _import(json_path, source=f"upload:{json_name}", actor=actor, via="admin", action="release.upload",
                       locate=locate, missing="among the uploaded files", extra_checks=extra)


def _save_upload(upload, dest: Path) -> Path:
    with open(dest, "wb") as out:
        chunks = upload.chunks() if hasattr(upload, "chunks") else iter(lambda: upload.read(CHUNK), b"")
        for chunk in chunks:
            out.write(chunk)
    return dest


def _import(json_path: Path, *, source: str, actor, via: str, action: str, locate=None, missing: str = "",
            extra_checks=None) -> SyncResult:
    try:
        package = releasepkg.validate_package(json_path, locate=locate, missing=missing, limits=limits())
        problems = extra_checks(package) if extra_checks else []
        if problems:
            raise PackageError(problems)
        _plan(package)  # refuses changed versions and releases before anything is copied
    except PackageError as exc:
        _refused(actor, via, action, source, f"{json_path.name} refused, {NOTHING}: {exc}")
    result = SyncResult(source=source)
    try:
        for entry in package.entries:
            if _store_blob(entry):
                result.blobs_written += 1
            else:
                result.blobs_reused += 1
        with transaction.atomic():
            _write(package, result)
    except PackageError as exc:  # another import registered a conflicting version meanwhile
        _refused(actor, via, action, source, f"{json_path.name} refused, {NOTHING}: {exc}")
    except (OSError, ReleaseStorageError) as exc:
        message = f"storing the zips of {json_path.name} failed ({exc}); {NOTHING}"
        _audit(actor, via, action, source, result.as_dict(), f"failed: {message}")
        raise ReleaseStorageError(message) from None
    _audit(actor, via, action, source, result.as_dict(), "ok")
    return result


def _refused(actor, via, action, source, message):
    _audit(actor, via, action, source, {"source": source}, f"refused: {message}")
    raise ReleaseInputError(message)


def _audit(actor, via, action, source, changes, result):
    audit_record(action=action, source=AuditEntry.Source.ADMIN if via == "admin" else AuditEntry.Source.CLI,
                 actor=actor, changes=changes, result=result[:300])


def _plan(package: releasepkg.Package) -> tuple[dict, dict]:
    """Registered rows matching the package: ({(component, Version): ComponentVersion}, {name: Release}).
    PackageError when one of them differs from the package (versions and releases are immutable)."""
    problems: list[str] = []
    registered: dict = {}
    for comp in package.components:
        for cv in ComponentVersion.objects.filter(component=comp):
            registered[(comp, Version.parse(cv.version))] = cv
    for e in package.entries:
        cv = registered.get((e.component, e.version))
        if cv is None:
            continue
        if cv.sha256 != e.zip.sha256:
            problems.append(f"{e.label} is already registered with sha256 {cv.sha256} but {e.file} has "
                            f"{e.zip.sha256} (a version is immutable: publish a new version number)")
        elif cv.version != str(e.version):
            problems.append(f"{e.label} is already registered as {cv.version} (versions may not differ only "
                            "by build metadata)")
        elif cv.requires != e.requires or cv.hooks != e.hooks:
            problems.append(f"{e.label} is already registered with other requires/hooks (a version is "
                            "immutable: publish a new version number)")
    releases = {r.name: r for r in Release.objects.filter(name__in=[r.name for r in package.releases])
                .prefetch_related("rows__component_version")}
    for r in package.releases:
        existing = releases.get(r.name)
        wanted = {c: str(v) for c, v in r.components.items()}
        if existing is not None and existing.versions() != wanted:
            problems.append(f"release {r.name!r} is already registered as {_describe(existing.versions())}, "
                            f"not {_describe(wanted)} (a release is immutable: give it a new name)")
    if problems:
        raise PackageError(problems)
    return registered, releases


def _describe(versions: Mapping[str, str]) -> str:
    return ", ".join(f"{c} {v}" for c, v in sorted(versions.items()))


def _store_blob(entry: releasepkg.ComponentEntry) -> bool:
    """Copy the zip to default storage under its content address; False when a verified copy is there already."""
    name = blob_name(entry.component, entry.zip.sha256)
    if default_storage.exists(name):
        if _blob_matches(name, entry.zip.sha256, entry.zip.size):
            return False
        default_storage.delete(name)  # a copy cut short by an earlier crash: never reuse it
    with open(entry.path, "rb") as fh:
        saved = default_storage.save(name, File(fh, name=posixpath.basename(name)))
    if saved != name:  # a concurrent import stored the same content first: keep theirs
        default_storage.delete(saved)
    if default_storage.size(name) != entry.zip.size:
        raise ReleaseStorageError(f"{name} in storage is not {entry.zip.size} bytes after writing")
    return True


def _blob_matches(name: str, sha256: str, size: int) -> bool:
    if default_storage.size(name) != size:
        return False
    writer = HashingWriter(_Null())
    with default_storage.open(name, "rb") as fh:
        while chunk := fh.read(CHUNK):
            writer.write(chunk)
    return writer.hexdigest() == sha256


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)


def _write(package: releasepkg.Package, result: SyncResult) -> None:
    registered, releases = _plan(package)  # again, inside the transaction: another import may have run
    by_key: dict = {}
    try:
        for e in package.entries:
            cv = registered.get((e.component, e.version))
            if cv is None:
                cv = ComponentVersion.objects.create(
                    component=e.component, version=str(e.version), sha256=e.zip.sha256, size=e.zip.size,
                    unpacked_size=e.zip.unpacked_size, file=blob_name(e.component, e.zip.sha256),
                    filename=posixpath.basename(e.file)[:255], root=e.zip.root[:255], requires=e.requires,
                    hooks=e.hooks, env_example=e.zip.env_example, notes=e.notes, synced_from=result.source[:500])
                result.versions_created.append(e.label)
            else:
                result.versions_existing.append(e.label)
                if e.notes and cv.notes != e.notes:
                    ComponentVersion.objects.filter(pk=cv.pk).update(notes=e.notes)
                    result.notes_updated.append(e.label)
            by_key[(e.component, e.version)] = cv
        for r in package.releases:
            rel = releases.get(r.name)
            if rel is None:
                rel = Release.objects.create(name=r.name, notes=r.notes, synced_from=result.source[:500])
                ReleaseComponent.objects.bulk_create(
                    [ReleaseComponent(release=rel, component=c, component_version=by_key[(c, v)])
                     for c, v in r.components.items()])
                result.releases_created.append(r.name)
            else:
                result.releases_existing.append(r.name)
                if r.notes and rel.notes != r.notes:
                    Release.objects.filter(pk=rel.pk).update(notes=r.notes)
                    result.notes_updated.append(f"release {r.name}")
    except IntegrityError:
        raise PackageError(["another import registered the same versions or releases at the same time; "
                            "run the sync again"]) from None
    _rerank(package.components)


def _rerank(components) -> None:
    for comp in components:
        rows = sorted(ComponentVersion.objects.filter(component=comp).only("pk", "version", "rank"),
                      key=lambda cv: Version.parse(cv.version))
        _set_ranks(ComponentVersion, rows)
    releases = list(Release.objects.prefetch_related("rows__component_version").only("pk", "rank"))
    parsed = {r.pk: {c: Version.parse(v) for c, v in r.versions().items()} for r in releases}
    order = releasepkg.component_order({c for v in parsed.values() for c in v})
    releases.sort(key=lambda r: (releasepkg.release_sort_key(parsed[r.pk], order), r.pk))
    _set_ranks(Release, releases)


def _set_ranks(model, ordered) -> None:
    changed = []
    for i, obj in enumerate(ordered, start=1):
        if obj.rank != i:
            obj.rank = i
            changed.append(obj)
    model.objects.bulk_update(changed, ["rank"], batch_size=500)


# --- offering releases -----------------------------------------------------------------------------------------
def releases_for(customer_versions: Mapping[str, str]) -> list[tuple[Release, bool, str]]:
    """Every release, newest first, with whether a customer at `customer_versions` ({"backend": "2.4.0", …})
    may move to it by `requires`, and why (the changes it makes, or every reason it may not).

    Not allowed: a component would go down a version, a requirement is unmet (or the version it checks is
    unknown / not semver), or nothing would change ("already installed"). Requirements of a component the
    release leaves at the customer's current version are not checked again."""
    current = {k: str(v) for k, v in customer_versions.items() if v not in (None, "")}
    out = []
    for rel in Release.objects.prefetch_related("rows__component_version"):
        allowed, why = _judge(rel, current)
        out.append((rel, allowed, why))
    return out


def _judge(rel: Release, current: Mapping[str, str]) -> tuple[bool, str]:
    changes, problems = [], []
    for row in rel.rows.all():
        cv, comp = row.component_version, row.component
        target = Version.parse(cv.version)
        have = current.get(comp)
        if have is not None:
            try:
                have_v = Version.parse(have)
            except releasepkg.VersionError:
                problems.append(f"the customer's {comp} version {have!r} is not a semantic version")
                continue
            if target == have_v:
                continue
            if target < have_v:
                problems.append(f"{comp} would go down from {have_v} to {target}")
                continue
            changes.append(f"{comp} {have_v} → {target}")
        else:
            changes.append(f"{comp} {target} (new)")
        problems += [f"{cv} {p}" for p in requirement_problems(cv.requires, comp, current)]
    if problems:
        return False, "; ".join(problems)
    if not changes:
        return False, "already installed"
    return True, ", ".join(changes)


# --- reading a stored zip --------------------------------------------------------------------------------------
def component_zip_open(cv: ComponentVersion):
    """The stored zip as a readable binary file object (streamed from storage; close it)."""
    return default_storage.open(cv.file, "rb")


def component_zip_path(cv: ComponentVersion) -> Path | None:
    """The zip's local path when default storage is a local folder, else None (use component_zip_copy)."""
    try:
        return Path(default_storage.path(cv.file))
    except NotImplementedError:
        return None


def component_zip_copy(cv: ComponentVersion, dest_dir) -> Path:
    """Copy the zip into dest_dir (a zip needs random access, which S3 objects lack), checking its sha256.
    ReleaseStorageError when the stored bytes differ; the partial copy is removed, storage is left as it is."""
    dest = Path(dest_dir) / f"{cv.component}-{cv.version}.zip"
    try:
        with component_zip_open(cv) as src, open(dest, "wb") as out:
            writer = HashingWriter(out)
            while chunk := src.read(CHUNK):
                writer.write(chunk)
    except FileNotFoundError:
        dest.unlink(missing_ok=True)
        raise ReleaseStorageError(f"the zip of {cv} ({cv.file}) is missing from storage") from None
    if writer.hexdigest() != cv.sha256 or writer.size != cv.size:
        dest.unlink(missing_ok=True)
        raise ReleaseStorageError(f"the zip of {cv} in storage has sha256 {writer.hexdigest()}, not the registered "
                                  f"{cv.sha256}; it was not used and storage was left as it is")
    return dest
