from django.contrib import admin

from .models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """Read-only: the audit trail is written by services, never edited. Team-scoped: entries about the user's
    teams' customers (superusers: all, entries about no customer included)."""

    list_display = ("ts", "actor_repr", "source", "action", "object_repr", "result")
    list_filter = ("source", "action")
    search_fields = ("actor_repr", "action", "object_repr", "result")
    list_select_related = ("customer",)
    date_hierarchy = "ts"

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        if request.user.is_superuser:
            return qs
        # The team rule is customers' (Customer.objects.visible_to), reached through the relation: audit sits
        # below customers and does not import it.
        customers = AuditEntry._meta.get_field("customer").related_model
        return qs.filter(customer__in=customers.objects.visible_to(request.user).values("pk"))

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
