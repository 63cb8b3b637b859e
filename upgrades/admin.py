"""Upgrades in the admin: read-only, team-scoped. They are written by the upgrade and rollback runs only;
the pages that start them hang off the customer (customers.admin → upgrades.views)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from core import permissions
from core.admin_mixins import change_link, status_badge
from customers.scoping import TeamScopedAdminMixin
from engines.humanize import human_duration, human_time

from .admin_selectors import duration_seconds, versions_text
from .models import BadRelease, Upgrade
from .views import resolve_view, steps_view


def _may_see_upgrades(request) -> bool:
    """Whoever may see customers may see their upgrades (the querysets are team-scoped)."""
    user = request.user
    return user.is_active and user.is_staff and (
        user.is_superuser or user.has_perm("upgrades.view_upgrade") or user.has_perm("customers.view_customer"))


class _ReadOnly:
    def has_module_permission(self, request):
        return _may_see_upgrades(request)

    def has_view_permission(self, request, obj=None):
        return _may_see_upgrades(request)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Upgrade)
class UpgradeAdmin(_ReadOnly, TeamScopedAdminMixin, admin.ModelAdmin):
    list_display = ("id", "customer", "kind_display", "outcome", "from_display", "to_display", "created_at",
                    "duration_display", "backup_link", "run_link")
    list_display_links = ("id", "kind_display")
    list_filter = ("status", "kind", "dry_run", "force")
    search_fields = ("customer__domain", "to_release__name")
    # Every column above is one of these rows: the changelist costs the same query count for any page size.
    list_select_related = ("customer", "to_release", "run", "backup")
    date_hierarchy = "created_at"
    # No field named status/error/progress_message: the live log's script fills those with the RUN's values.
    fields = ("customer", "kind_display", "outcome", "dry_run", "force", "release_link", "from_display", "to_display",
              "rolls_back_link", "backup_link", "run_link", "created_at", "started_at", "finished_at",
              "duration_display", "error_text", "resolution_display")
    readonly_fields = fields

    @admin.display(description="kind", ordering="kind")
    def kind_display(self, obj):
        return obj.get_kind_display() + (" (dry run)" if obj.dry_run else "")

    @admin.display(description="result", ordering="status")
    def outcome(self, obj):
        return status_badge(obj.status, obj.get_status_display())

    @admin.display(description="from")
    def from_display(self, obj):
        return versions_text(obj.from_versions)

    @admin.display(description="to")
    def to_display(self, obj):
        target = versions_text(obj.to_versions)
        return f"{obj.to_release.name}: {target}" if obj.to_release_id else target

    @admin.display(description="duration")
    def duration_display(self, obj):
        return human_duration(duration_seconds(obj))

    @admin.display(description="backup used")
    def backup_link(self, obj):
        return change_link("admin:backups_backup_change", obj.backup_id, f"#{obj.backup_id}")

    @admin.display(description="run")
    def run_link(self, obj):
        return change_link("admin:operations_run_change", obj.run_id, f"#{obj.run_id}")

    @admin.display(description="release")
    def release_link(self, obj):
        return change_link("admin:releases_release_change", obj.to_release_id,
                           obj.to_release.name if obj.to_release_id else "")

    @admin.display(description="rolls back")
    def rolls_back_link(self, obj):
        return change_link("admin:upgrades_upgrade_change", obj.rolls_back_id, f"upgrade #{obj.rolls_back_id}")

    @admin.display(description="error")
    def error_text(self, obj):
        return obj.error or "—"

    @admin.display(description="quarantine resolved")
    def resolution_display(self, obj):
        if obj.status != Upgrade.Status.QUARANTINED:
            return "—"
        if obj.resolved_at is None:
            return "no: an operator must look"
        return f"{human_time(obj.resolved_at)} by {obj.resolved_by or 'someone'}: {obj.resolution}"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("customer", "to_release", "run", "backup",
                                                            "resolved_by")

    def get_urls(self):
        own = [
            path("<int:upgrade_id>/steps/", self.admin_site.admin_view(
                lambda r, upgrade_id: steps_view(r, upgrade_id, self)), name="upgrades_upgrade_steps"),
            path("<int:upgrade_id>/resolve/", self.admin_site.admin_view(
                lambda r, upgrade_id: resolve_view(r, upgrade_id, self)), name="upgrades_upgrade_resolve"),
        ]
        return own + super().get_urls()

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = extra_context or {}
        upgrade = self.get_object(request, object_id)
        if upgrade is not None:
            extra_context["may"] = permissions.may(request.user, upgrade.customer)
            extra_context["steps"] = list(upgrade.steps.all())
            extra_context["checks"] = (upgrade.preflight or {}).get("checks", [])
            extra_context["preflight_problems"] = (upgrade.preflight or {}).get("problems", [])
            extra_context["env_diff"] = sorted((upgrade.env_diff or {}).items())
        return super().change_view(request, object_id, form_url, extra_context)


@admin.register(BadRelease)
class BadReleaseAdmin(_ReadOnly, TeamScopedAdminMixin, admin.ModelAdmin):
    """Releases rolled back for a customer: not offered to it again unless an upgrade is forced."""

    list_display = ("release", "customer", "reason", "created_at", "upgrade_link")
    list_select_related = ("release", "customer")
    search_fields = ("customer__domain", "release__name")
    fields = ("customer", "release", "upgrade_link", "reason", "created_at")
    readonly_fields = fields

    @admin.display(description="upgrade")
    def upgrade_link(self, obj):
        return change_link("admin:upgrades_upgrade_change", obj.upgrade_id, f"#{obj.upgrade_id}")

