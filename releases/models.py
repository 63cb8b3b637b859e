"""The release registry: versioned component zips and the releases (compatMatrix rows) that combine them.

Rows are written only by releases.services (release_sync / release_upload) after engines.releasepkg has
accepted the whole releases.json, and are never changed afterwards: a version is immutable (its zip, sha256,
requires and hooks), and so is the set of versions a release names. `rank` holds semver order, recomputed on
each sync, so that the database can order by it (semver order is not a string order).
"""

from __future__ import annotations

from django.core.validators import RegexValidator
from django.db import models

component_validator = RegexValidator(r"^[a-z][a-z0-9_-]{0,31}$", "Use lowercase letters, digits, - and _.")


class ComponentVersion(models.Model):
    component = models.CharField(max_length=32, validators=[component_validator])
    version = models.CharField(max_length=100, help_text="Semantic version, e.g. 2.5.0 or 2.5.0-rc.1.")
    sha256 = models.CharField(max_length=64)
    size = models.PositiveBigIntegerField(help_text="Bytes of the zip.")
    unpacked_size = models.PositiveBigIntegerField(default=0, help_text="Declared bytes once unpacked.")
    file = models.CharField(max_length=300, help_text="Name of the zip in Django's default storage.")
    filename = models.CharField(max_length=255, help_text="The zip's name in releases.json.")
    root = models.CharField(max_length=255, blank=True,
                            help_text="Folder inside the zip holding the component; empty: files at the top.")
    requires = models.JSONField(default=dict, blank=True,
                                help_text='Preconditions on current versions, e.g. {"from": ">=2.4.0 <3"}.')
    hooks = models.JSONField(default=dict, blank=True,
                             help_text='argv lists run in the staged folder: {"install": ["npm", "ci"], …}.')
    env_example = models.JSONField(default=list, blank=True, help_text="Keys of the zip's .env.example.")
    notes = models.TextField(blank=True)
    rank = models.PositiveIntegerField(default=0, help_text="Position in semver order among this component.")
    synced_from = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["component", "-rank"]
        constraints = [models.UniqueConstraint(fields=["component", "version"], name="unique_component_version")]

    def __str__(self):
        return f"{self.component} {self.version}"


class Release(models.Model):
    name = models.CharField(max_length=100, unique=True)
    components = models.ManyToManyField(ComponentVersion, through="ReleaseComponent", related_name="releases")
    notes = models.TextField(blank=True)
    rank = models.PositiveIntegerField(default=0, help_text="Position in semver order (backend first).")
    synced_from = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-rank", "-id"]

    def __str__(self):
        return self.name

    def versions(self) -> dict[str, str]:
        """component → version (uses prefetched rows when there are some)."""
        return {row.component: row.component_version.version for row in self.rows.all()}


class ReleaseComponent(models.Model):
    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="rows")
    component_version = models.ForeignKey(ComponentVersion, on_delete=models.PROTECT, related_name="+")
    # Repeats component_version.component so that the database refuses two versions of one component.
    component = models.CharField(max_length=32)

    class Meta:
        ordering = ["release", "component"]
        constraints = [models.UniqueConstraint(fields=["release", "component"], name="unique_release_component")]

    def __str__(self):
        return f"{self.release}: {self.component_version}"
