"""Backups, policies and storage targets in the admin. Backups are team-scoped and read-only; each action and
button needs its permission (core.permissions), and storage targets are named only where the user's teams may
use them (StorageTarget.teams). Targets themselves are superusers' business."""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models
from django.shortcuts import redirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from audit.admin_mixins import AuditedAdminMixin
from core import permissions
from core.admin_mixins import SuperuserOnlyMixin, admin_page, change_link, scoped_filter, status_badge
from core.paging import FleetScaleMixin
from customers.models import Customer
from customers.scoping import TeamScopedAdminMixin
from engines.humanize import human_duration, human_size, human_time
from operations.selectors import estimate_text
from operations.services import OperationRefused

from . import locks
from .models import Backup, BackupArtifact, BackupPolicy, StorageTarget
from .restore_views import restore_view, verify_view
from .schedules import ScheduleError, schedules_sync
from .selectors import MANIFEST, downloadable_names, trigger_label
from .services import BackupInputError, backup_delete, backup_pin, target_check, verify_start


def _may_see_backups(request) -> bool:
    """Whoever may see customers may see their backups (the querysets are team-scoped)."""
    user = request.user
    return user.is_active and user.is_staff and (
        user.is_superuser or user.has_perm("backups.view_backup") or user.has_perm("customers.view_customer"))


def download_url(backup: Backup, name: str) -> str:
    return reverse("backups-download", args=[backup.pk, name])


def targets_of(request):
    """The storage targets a user may see named: those open to one of their teams (superusers: all)."""
    return StorageTarget.objects.visible_to(request.user)


class StorageTargetForm(forms.ModelForm):
    class Meta:
        model = StorageTarget
        fields = ["name", "kind", "enabled", "teams", "path", "host", "port", "username", "private_key", "bucket",
                  "prefix", "endpoint_url", "region", "access_key", "lock_mode", "lock_days", "secret_key"]

    def _post_clean(self):
        super()._post_clean()  # the instance now holds the form's values (and passed the model's own checks)
        if not self.errors and (problem := self.instance.lock_problem()):
            # Saving a locked target proves the bucket can keep the promise: Object Lock and versioning on.
            self.add_error("lock_mode", problem)


@admin.register(StorageTarget)
class StorageTargetAdmin(SuperuserOnlyMixin, AuditedAdminMixin, admin.ModelAdmin):
    form = StorageTargetForm
    # Storage credentials serve the whole fleet: superusers only.
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    list_display = ("name", "kind", "where", "lock", "enabled", "teams_display")
    list_filter = ("kind", "enabled")
    actions = ["check_target"]
    filter_horizontal = ("teams",)
    fieldsets = (
        (None, {"fields": ("name", "kind", "enabled", "teams")}),
        ("Local folder / SFTP", {"fields": ("path", "host", "port", "username", "private_key")}),
        ("S3-compatible", {"fields": ("bucket", "prefix", "endpoint_url", "region", "access_key")}),
        ("Object lock (S3: immutable backups)", {"fields": ("lock_mode", "lock_days"),
                                                 "description": "The bucket must have been created with Object "
                                                                "Lock; saving checks it (docs/STORAGE.md)."}),
        ("Credentials", {"fields": ("secret_key",)}),
    )


    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("teams")

    @admin.display(description="teams")
    def teams_display(self, obj):
        return ", ".join(t.name for t in obj.teams.all()) or "every team"

    @admin.display(description="object lock")
    def lock(self, obj):
        return f"{obj.lock_mode}, {obj.lock_days} day(s)" if obj.immutable else "—"

    @admin.display(description="where")
    def where(self, obj):
        if obj.kind == StorageTarget.Kind.S3:
            return f"s3://{obj.bucket}/{obj.prefix}" + (f" at {obj.endpoint_url}" if obj.endpoint_url else "")
        if obj.kind == StorageTarget.Kind.SFTP:
            return f"sftp://{obj.username}@{obj.host}{obj.path}"
        return obj.path

    @admin.action(description="Check target (write, read back, delete a probe)")
    def check_target(self, request, queryset):
        for target in queryset:
            try:
                self.message_user(request, f"{target.name}: {target_check(target, actor=request.user)}",
                                  messages.SUCCESS)
            except (BackupInputError, PermissionDenied) as exc:
                self.message_user(request, str(exc), messages.ERROR)


class BackupPolicyForm(forms.ModelForm):
    def clean(self):
        data = super().clean()
        customer = data.get("customer")
        if customer is not None:  # the replicas too go only where the customer's team may put backups
            refused = [t.name for t in data.get("replicas") or [] if not t.usable_by(customer.team_id)]
            if refused:
                raise ValidationError({"replicas": f"not open to team {customer.team}: {', '.join(refused)}"})
        return data


@admin.register(BackupPolicy)
class BackupPolicyAdmin(TeamScopedAdminMixin, AuditedAdminMixin, admin.ModelAdmin):
    form = BackupPolicyForm
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    list_display = ("__str__", "schedule", "scope", "target", "keep_last", "encrypt", "verify_schedule")
    list_select_related = ("customer", "target")
    list_filter = ("schedule", ("target", scoped_filter(targets_of)))
    filter_horizontal = ("replicas",)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.related_model is StorageTarget:
            kwargs["queryset"] = targets_of(request)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def formfield_for_manytomany(self, db_field, request, **kwargs):
        if db_field.related_model is StorageTarget:
            kwargs["queryset"] = targets_of(request)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def get_queryset(self, request):
        qs = super(TeamScopedAdminMixin, self).get_queryset(request)
        if request.user.is_superuser:
            return qs
        return qs.filter(customer__in=Customer.objects.visible_to(request.user))

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)

        try:
            schedules_sync()  # the django-q2 schedules follow the saved policy at once
        except ScheduleError as exc:
            self.message_user(request, f"backup schedules not updated: {exc}", messages.ERROR)


class ArtifactInline(admin.TabularInline):
    model = BackupArtifact
    extra = 0
    fields = ("name", "kind", "source", "size_display", "sha256_short", "key_id", "download", "warnings")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_view_permission(self, request, obj=None):
        return _may_see_backups(request)

    def get_fields(self, request, obj=None):
        if permissions.has(request.user, permissions.DOWNLOAD):
            return self.fields
        return tuple(f for f in self.fields if f != "download")

    def get_readonly_fields(self, request, obj=None):
        return self.get_fields(request, obj)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("backup")

    @admin.display(description="size")
    def size_display(self, obj):
        return human_size(obj.size)

    @admin.display(description="sha256")
    def sha256_short(self, obj):
        return format_html('<code title="{}">{}…</code>', obj.sha256, obj.sha256[:16])

    @admin.display(description="warnings")
    def warnings(self, obj):
        details = obj.details or {}
        links, special = details.get("outward_links"), details.get("unrestorable")
        return format_html_join(" ", '<span class="kasa-warning" title="{}">{}</span>', [
            *([("\n".join(links["examples"]), f"{links['count']} symbolic link(s) point outside the folder: a "
                "restore refuses them until they are excluded")] if links else []),
            *([("\n".join(special["examples"]), f"{special['count']} FIFO(s), device file(s) or overlong path(s): "
                "a restore refuses them until they are excluded")] if special else []),
        ])

    @admin.display(description="download")
    def download(self, obj):
        if obj.backup.status != Backup.Status.SUCCEEDED:
            return "—"
        return format_html('<a class="kasa-download" href="{}">Download</a>', download_url(obj.backup, obj.name))


@admin.register(Backup)
class BackupAdmin(FleetScaleMixin, TeamScopedAdminMixin, admin.ModelAdmin):
    list_display = ("id", "customer", "finished_at", "scope", "size_display", "duration_display",
                    "status_badge",
                    "trigger_display", "target", "verification", "pinned", "unsigned")  # verified_at: the badge's title
    list_display_links = ("id", "finished_at")
    list_filter = ("status", "verify_status", "scope", "kind", "trigger", "pinned", "created_at",
                   ("target", scoped_filter(targets_of)))
    search_fields = ("customer__domain",)
    list_select_related = ("customer", "target", "requested_by")
    # At fleet scale (docs/PERFORMANCE.md; FleetScaleMixin): no date hierarchy, it reads the dates of every row;
    # "created_at" is a filter (today, past 7 days, this month…) instead.
    inlines = [ArtifactInline]
    actions = ["pin", "unpin", "verify_backups", "restore_backup", "delete_backups"]
    fields = ("customer", "status_badge", "scope", "kind_display", "services", "compression", "encrypted", "unsigned",
              "target",
              "prefix", "size_display", "lock_display", "trigger", "requested_by", "started_at", "finished_at",
              "pinned", "pin_reason",
              "verification", "verified_at", "verify_error", "error", "run_link", "downloads")
    readonly_fields = fields

    def has_module_permission(self, request):
        return _may_see_backups(request)

    def has_view_permission(self, request, obj=None):
        return _may_see_backups(request)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # deletion goes through the "Delete backups" action (storage first, then the catalogue)

    # The actions' permissions (`@admin.action(permissions=[…])` asks has_<name>_permission): an action the user
    # may not take is not offered, and a POST naming it anyway does nothing.
    def has_pin_permission(self, request):
        return permissions.has(request.user, permissions.PIN)

    def has_verify_permission(self, request):
        return permissions.has(request.user, permissions.VERIFY)

    def has_restore_permission(self, request):
        return permissions.has(request.user, permissions.RESTORE)

    def has_delete_from_storage_permission(self, request):
        return permissions.has(request.user, permissions.DELETE)

    def has_download_permission(self, request):
        return permissions.has(request.user, permissions.DOWNLOAD)

    def get_fields(self, request, obj=None):
        if self.has_download_permission(request):
            return self.fields
        return tuple(f for f in self.fields if f != "downloads")

    def get_readonly_fields(self, request, obj=None):
        return self.get_fields(request, obj)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), "may": permissions.may(request.user)}
        obj = self.get_object(request, object_id)
        if obj is not None:  # how long a drill of this customer's backups usually takes, next to "Verify now"
            extra_context["estimate"] = estimate_text(obj.customer_id, "verify")
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(description="size", ordering="size")
    def size_display(self, obj):
        """The size, and under it the full a differential applies on: one column, so that the changelist still
        fits 1366 px (tests/test_browser_layout.py)."""
        size = human_size(obj.size) if obj.size else "—"
        if obj.kind != Backup.Kind.DIFFERENTIAL:
            return size
        return format_html("{}<br>{}", size, self.kind_display(obj))

    @admin.display(description="kind", ordering="kind")
    def kind_display(self, obj):
        if obj.kind != Backup.Kind.DIFFERENTIAL:
            return obj.get_kind_display()
        if obj.base_id is None:
            return format_html('<span title="its full backup is not in the catalogue">diff. (no full)</span>')
        # Short: the changelist must fit 1366 px (tests/test_browser_layout.py); the title says it whole.
        return format_html('<span title="differential on full backup #{}">diff. of <a href="{}">#{}</a></span>',
                           obj.base_id, reverse("admin:backups_backup_change", args=[obj.base_id]), obj.base_id)

    @admin.display(description="duration")
    def duration_display(self, obj):
        return human_duration(obj.duration)

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        return status_badge(obj.status, obj.get_status_display())

    @admin.display(description="by", ordering="trigger")
    def trigger_display(self, obj):
        return trigger_label(obj)

    @admin.display(description="verified?", ordering="verify_status")
    def verification(self, obj):
        when = f"verified {human_time(obj.verified_at)}" if obj.verified_at else ""
        return status_badge(obj.verify_status, obj.get_verify_status_display(), "verify", title=when)

    def get_urls(self):


        own = [
            path("<int:backup_id>/restore/", self.admin_site.admin_view(lambda r, backup_id: restore_view(
                r, backup_id, self)), name="backups_backup_restore"),
            path("<int:backup_id>/verify/", self.admin_site.admin_view(lambda r, backup_id: verify_view(
                r, backup_id, self)), name="backups_backup_verify"),
        ]
        return own + super().get_urls()

    @admin.action(description="Verify now (test restore into scratch)", permissions=["verify"])
    def verify_backups(self, request, queryset):

        for bk in queryset.select_related("customer"):
            try:
                run = verify_start(bk, requested_by=request.user, via="admin")
            except (BackupInputError, OperationRefused, PermissionDenied) as exc:
                self.message_user(request, f"backup #{bk.pk}: {exc}", messages.ERROR)
                continue
            url = reverse("admin:operations_run_change", args=[run.pk])
            self.message_user(request, format_html('Verification of backup #{} queued: <a href="{}">run #{}</a>',
                                                   bk.pk, url, run.pk), messages.SUCCESS)

    @admin.action(description="Restore… (one backup)", permissions=["restore"])
    def restore_backup(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "choose exactly one backup to restore", messages.ERROR)
            return None
        return redirect(reverse("admin:backups_backup_restore", args=[queryset.first().pk]))

    @admin.display(description="run")
    def run_link(self, obj):
        return change_link("admin:operations_run_change", obj.run_id, f"run #{obj.run_id}")

    @admin.display(description="download")
    def downloads(self, obj):
        names = downloadable_names(obj)
        if not names:
            return "— (only a succeeded backup can be downloaded)"
        return format_html_join(
            " ", '<a class="button kasa-download" href="{}">{}</a>',
            ((download_url(obj, n), n + (" (manifest)" if n == MANIFEST else "")) for n in names),
        )

    @admin.display(description="object lock")
    def lock_display(self, obj):
        places = [(obj.target.name, obj.lock_mode, obj.locked_until)]
        places += [(c.target.name, c.lock_mode, c.locked_until) for c in obj.copies.select_related("target")]
        shown = [f"{name}: {mode} until {human_time(until)}" for name, mode, until in places if until]
        return "; ".join(shown) or "none"

    @admin.action(description="Pin (retention never deletes it)", permissions=["pin"])
    def pin(self, request, queryset):
        for bk in queryset.select_related("customer"):
            backup_pin(bk, pinned=True, reason=f"pinned by {request.user}", actor=request.user)
        self.message_user(request, f"pinned {queryset.count()} backup(s)")

    @admin.action(description="Unpin", permissions=["pin"])
    def unpin(self, request, queryset):
        for bk in queryset.select_related("customer"):
            backup_pin(bk, pinned=False, actor=request.user)
        self.message_user(request, f"unpinned {queryset.count()} backup(s)")

    @admin.action(description="Delete backups from storage", permissions=["delete_from_storage"])
    def delete_backups(self, request, queryset):
        queryset = queryset.exclude(status=Backup.Status.DELETED).select_related("customer", "target")
        if request.POST.get("confirm") != "yes":
            rows = [(bk, locks.locked_until(bk)) for bk in queryset]
            return admin_page(request, self, "admin/backups/backup/delete_confirm.html",
                              title="Delete backups from storage?", rows=rows, backups=queryset,
                              may_bypass=request.user.is_superuser)
        for bk in queryset:
            typed = request.POST.get(f"bypass_{bk.pk}", "").strip()
            try:
                removed = backup_delete(bk, actor=request.user, bypass_governance=bool(typed), confirmation=typed)
                self.message_user(request, f"backup #{bk.pk}: {removed} object(s) removed", messages.SUCCESS)
            except (BackupInputError, OperationRefused, PermissionDenied) as exc:
                self.message_user(request, str(exc), messages.ERROR)
        return None
