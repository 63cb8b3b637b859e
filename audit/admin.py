from django.contrib import admin

from core.admin_mixins import TeamScopedAdminMixin

from .models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(TeamScopedAdminMixin, admin.ModelAdmin):
    """Read-only: the audit trail is written by services, never edited."""

    team_scope_path = "customer"
    team_scope_allow_null = "superuser"
    list_display = ("ts", "actor_repr", "source", "action", "object_repr", "result")
    list_filter = ("source", "action")
    search_fields = ("actor_repr", "action", "object_repr", "result")
    list_select_related = ("customer",)
    date_hierarchy = "ts"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
