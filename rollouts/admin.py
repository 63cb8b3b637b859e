"""The Rollouts section of the admin: the list and each rollout's waves, customers and gate results (read-only:
rollouts change only through rollouts.services, from the CLI or the rollout's own controls)."""

from __future__ import annotations

from django.contrib import admin

from customers.models import Customer

from .models import GateResult, Rollout, RolloutTarget, RolloutWave


class _ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class WaveInline(_ReadOnlyInline):
    model = RolloutWave
    fields = readonly_fields = ("position", "percent", "bake_seconds", "state", "started_at", "upgraded_at",
                                "bake_until", "finished_at")


class TargetInline(_ReadOnlyInline):
    model = RolloutTarget
    fields = readonly_fields = ("wave", "customer", "state", "upgrade", "revert", "attempts", "error")

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("wave", "customer", "upgrade", "revert")


class GateInline(_ReadOnlyInline):
    model = GateResult
    fields = readonly_fields = ("created_at", "wave", "gate", "result", "final", "summary")


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    list_display = ("id", "release", "status", "strategy", "on_failure", "requested_by", "created_at", "finished_at")
    list_filter = ("status",)
    list_select_related = ("release", "requested_by")
    inlines = [WaveInline, TargetInline, GateInline]
    readonly_fields = [f.name for f in Rollout._meta.fields]

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        if request.user.is_superuser:
            return qs
        # The team rule: a rollout is shown only when every customer in it is one the user may see.
        hidden = RolloutTarget.objects.exclude(customer__in=Customer.objects.visible_to(request.user))
        return qs.exclude(pk__in=hidden.values("rollout_id"))

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
