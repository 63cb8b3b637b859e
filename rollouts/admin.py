"""The Rollouts section of the admin: the list, "Roll out…" and each rollout's own page (rollouts.views: the waves,
customers and gate results, live, and the controls). Rows change only through rollouts.services, from the CLI or
those pages; the inlines below are kept for the read-only history views."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from core import permissions

from .models import GateResult, Rollout, RolloutTarget, RolloutWave
from .selectors import visible_rollouts
from .views import control_view, rollout_view, start_view


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
        # The team rule: a rollout is shown only when every customer in it is one the user may see.
        return visible_rollouts(request.user, super().get_queryset(request))

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_urls(self):
        view = self.admin_site.admin_view
        own = [
            path("start/", view(lambda r: start_view(r, self)), name="rollouts_rollout_start"),
            path("<int:pk>/control/<str:action>/", view(lambda r, pk, action: control_view(r, pk, action, self)),
                 name="rollouts_rollout_control"),
        ]
        return own + super().get_urls()

    def change_view(self, request, object_id, form_url="", extra_context=None):
        return rollout_view(request, object_id, self)

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "may_roll_out": permissions.has(request.user, permissions.ROLLOUT)}
        return super().changelist_view(request, extra_context)
