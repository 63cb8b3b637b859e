"""The release registry in the admin: read-only changelists and the "Upload releases" page.

Releases serve the whole fleet (they belong to no customer), so there is no team scoping: staff who hold the
view permissions see them; uploading needs releases.add_release (superusers have it; the operators group does
not). Rows are written only by releases.services, which records every import (and every refusal) in the audit
trail, so the usual add/change/delete views are switched off rather than audited.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.shortcuts import redirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from core import permissions
from core.admin_mixins import admin_page
from engines.humanize import human_size

from .models import ComponentVersion, Release
from .services import ReleaseInputError, ReleaseStorageError, release_upload


class _ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # a customer may run any registered version: removing one is not an admin click


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    widget = MultipleFileInput

    def clean(self, data, initial=None):
        files = data if isinstance(data, list | tuple) else [data] if data else []
        if not files and self.required:
            raise forms.ValidationError(self.error_messages["required"], code="required")
        return [super(MultipleFileField, self).clean(f, initial) for f in files]


class UploadForm(forms.Form):
    releases_json = forms.FileField(label="releases.json", help_text="The catalogue: components and compatMatrix.")
    zips = MultipleFileField(label="Zips", help_text="Every zip releases.json names (select them all at once); "
                                                     "they are matched by file name.")


@admin.register(Release)
class ReleaseAdmin(_ReadOnlyAdmin):
    list_display = ("name", "versions_display", "created_at", "synced_from")
    search_fields = ("name", "rows__component_version__version")
    fields = ("name", "versions_display", "notes", "synced_from", "created_at")
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("rows__component_version")

    @admin.display(description="component versions")
    def versions_display(self, obj):
        return format_html_join(", ", "{} <code>{}</code>", sorted(obj.versions().items()))

    def get_urls(self):
        own = [path("upload/", self.admin_site.admin_view(self.upload_view), name="releases_release_upload")]
        return own + super().get_urls()

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}),
                         "may_upload": permissions.has(request.user, permissions.UPLOAD_RELEASES)}
        return super().changelist_view(request, extra_context)

    def upload_view(self, request):
        permissions.require(request.user, permissions.UPLOAD_RELEASES)
        form = UploadForm(request.POST or None, request.FILES or None)
        problems: list[str] = []
        if request.method == "POST" and form.is_valid():
            try:
                result = release_upload(form.cleaned_data["releases_json"], form.cleaned_data["zips"],
                                        actor=request.user)
            except (ReleaseInputError, ReleaseStorageError) as exc:
                problems = [str(exc)]
            else:
                self.message_user(request, f"{len(result.versions_created)} new version(s) and "
                                           f"{len(result.releases_created)} new release(s) imported; "
                                           f"{len(result.versions_existing)} version(s) and "
                                           f"{len(result.releases_existing)} release(s) were already registered",
                                  messages.SUCCESS)
                return redirect(reverse("admin:releases_release_changelist"))
        return admin_page(request, self, "admin/releases/upload.html", title="Upload releases",
                          status=400 if problems else 200, form=form, problems=problems)


@admin.register(ComponentVersion)
class ComponentVersionAdmin(_ReadOnlyAdmin):
    list_display = ("component", "version", "size_display", "sha256_short", "releases_display", "created_at")
    list_filter = ("component",)
    search_fields = ("version", "sha256")
    fields = ("component", "version", "filename", "size_display", "unpacked_display", "sha256", "file", "root",
              "requires", "hooks", "env_example", "releases_display", "notes", "synced_from", "created_at")
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("releases")

    @admin.display(description="size", ordering="size")
    def size_display(self, obj):
        return human_size(obj.size)

    @admin.display(description="unpacked")
    def unpacked_display(self, obj):
        return human_size(obj.unpacked_size)

    @admin.display(description="sha256")
    def sha256_short(self, obj):
        return format_html('<code title="{}">{}…</code>', obj.sha256, obj.sha256[:16])

    @admin.display(description="releases")
    def releases_display(self, obj):
        return ", ".join(r.name for r in obj.releases.all()) or "—"
