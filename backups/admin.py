from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.utils.html import format_html

from core.admin_mixins import AuditedAdminMixin, TeamScopedAdminMixin
from operations.services import OperationRefused

from .models import Backup, BackupArtifact, BackupPolicy, StorageTarget
from .services import BackupInputError, backup_delete, backup_pin, target_check


@admin.register(StorageTarget)
class StorageTargetAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ("name", "kind", "where", "enabled")
    list_filter = ("kind", "enabled")
    actions = ["check_target"]
    fieldsets = (
        (None, {"fields": ("name", "kind", "enabled")}),
        ("Local folder / SFTP", {"fields": ("path", "host", "port", "username", "private_key")}),
        ("S3-compatible", {"fields": ("bucket", "prefix", "endpoint_url", "region", "access_key")}),
        ("Credentials", {"fields": ("secret_key",)}),
    )

    # Storage credentials serve the whole fleet: superusers only.
    def has_module_permission(self, request):
        return request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser

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
                self.message_user(request, f"{target.name}: {target_check(target)}", messages.SUCCESS)
            except BackupInputError as exc:
                self.message_user(request, str(exc), messages.ERROR)


@admin.register(BackupPolicy)
class BackupPolicyAdmin(TeamScopedAdminMixin, AuditedAdminMixin, admin.ModelAdmin):
    list_display = ("__str__", "schedule", "scope", "target", "keep_last", "encrypt")
    list_select_related = ("customer", "target")
    filter_horizontal = ("replicas",)

    def get_queryset(self, request):
        qs = super(TeamScopedAdminMixin, self).get_queryset(request)
        if request.user.is_superuser:
            return qs
        from customers.models import Customer

        return qs.filter(customer__in=Customer.objects.visible_to(request.user))


class ArtifactInline(admin.TabularInline):
    model = BackupArtifact
    extra = 0
    fields = ("name", "kind", "source", "size", "sha256", "key_id")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Backup)
class BackupAdmin(TeamScopedAdminMixin, admin.ModelAdmin):
    list_display = ("id", "customer", "finished_at", "scope", "size_display", "duration_display", "status",
                    "trigger_display", "target", "verified_at", "pinned")
    list_filter = ("status", "scope", "trigger", "pinned", "target")
    search_fields = ("customer__domain",)
    list_select_related = ("customer", "target", "requested_by")
    date_hierarchy = "created_at"
    inlines = [ArtifactInline]
    actions = ["pin", "unpin", "delete_backups"]
    fields = ("customer", "status", "scope", "services", "compression", "encrypted", "target", "prefix", "size",
              "trigger", "requested_by", "started_at", "finished_at", "pinned", "pin_reason", "verified_at",
              "error", "run_link")
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # deletion goes through the "Delete backups" action (storage first, then the catalogue)

    def get_actions(self, request):
        actions = super().get_actions(request)
        for name in ("pin", "unpin", "delete_backups"):
            actions.setdefault(name, self.get_action(name))
        return actions

    @admin.display(description="size", ordering="size")
    def size_display(self, obj):
        return f"{obj.size / 1e6:.1f} MB" if obj.size else "—"

    @admin.display(description="duration")
    def duration_display(self, obj):
        return "—" if obj.duration is None else f"{obj.duration:.1f} s"

    @admin.display(description="by")
    def trigger_display(self, obj):
        return obj.requested_by or obj.get_trigger_display()

    @admin.display(description="run")
    def run_link(self, obj):
        if not obj.run_id:
            return "—"
        return format_html('<a href="../../../operations/run/{}/change/">run #{}</a>', obj.run_id, obj.run_id)

    @admin.action(description="Pin (retention never deletes it)")
    def pin(self, request, queryset):
        for bk in queryset:
            backup_pin(bk, pinned=True, reason=f"pinned by {request.user}", actor=request.user)
        self.message_user(request, f"pinned {queryset.count()} backup(s)")

    @admin.action(description="Unpin")
    def unpin(self, request, queryset):
        for bk in queryset:
            backup_pin(bk, pinned=False, actor=request.user)
        self.message_user(request, f"unpinned {queryset.count()} backup(s)")

    @admin.action(description="Delete backups from storage")
    def delete_backups(self, request, queryset):
        queryset = queryset.exclude(status=Backup.Status.DELETED)
        if request.POST.get("confirm") != "yes":
            return TemplateResponse(request, "admin/backups/backup/delete_confirm.html", {
                **self.admin_site.each_context(request), "backups": queryset, "opts": self.model._meta,
                "title": "Delete backups from storage?",
            })
        for bk in queryset:
            try:
                removed = backup_delete(bk, actor=request.user)
                self.message_user(request, f"backup #{bk.pk}: {removed} object(s) removed", messages.SUCCESS)
            except (BackupInputError, OperationRefused, PermissionDenied) as exc:
                self.message_user(request, str(exc), messages.ERROR)
        return None
