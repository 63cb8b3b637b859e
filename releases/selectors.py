"""Read-only queries and documents of the release registry (nothing here writes)."""

from __future__ import annotations

from django.db.models import Prefetch

from .models import ComponentVersion, Release, ReleaseComponent


def releases_newest_first():
    """Releases in semver order, newest first, with their component versions prefetched (two queries)."""
    rows = ReleaseComponent.objects.select_related("component_version").order_by("component")
    return Release.objects.order_by("-rank", "-id").prefetch_related(Prefetch("rows", queryset=rows))


def component_versions():
    """Every component version, by component then newest first, with the names of the releases using it."""
    return ComponentVersion.objects.order_by("component", "-rank").prefetch_related(
        Prefetch("releases", queryset=Release.objects.only("pk", "name").order_by("-rank")))


def component_version_document(cv: ComponentVersion) -> dict:
    return {
        "component": cv.component,
        "version": cv.version,
        "sha256": cv.sha256,
        "size": cv.size,
        "unpacked_size": cv.unpacked_size,
        "file": cv.file,
        "filename": cv.filename,
        "root": cv.root,
        "requires": cv.requires,
        "hooks": cv.hooks,
        "env_example": cv.env_example,
        "notes": cv.notes,
        "created_at": cv.created_at,
    }


def release_document(release: Release) -> dict:
    return {
        "name": release.name,
        "notes": release.notes,
        "created_at": release.created_at,
        "synced_from": release.synced_from,
        "components": [component_version_document(row.component_version) for row in release.rows.all()],
    }


def registry_document() -> dict:
    """What `release_list --json` prints: releases newest first, then every component version."""
    return {
        "releases": [release_document(r) for r in releases_newest_first()],
        "component_versions": [{**component_version_document(cv), "releases": [r.name for r in cv.releases.all()]}
                               for cv in component_versions()],
    }

