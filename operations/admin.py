from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse

from core import permissions
from core.admin_mixins import status_badge

from .models import Run
from .services import run_cancel


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    """Runs are written by services only: the admin shows them and their live log."""

    list_display = ("id", "kind", "customer", "status_badge", "requested", "created_at", "duration_display",
                    "progress_display")
    list_filter = ("status", "kind")
    search_fields = ("customer__domain", "error")
    list_select_related = ("customer", "requested_by")
    date_hierarchy = "created_at"
    actions = ["cancel_action"]
    fields = ("kind", "customer", "status", "requested_by", "requested_via", "created_at", "started_at",
              "finished_at", "worker", "progress_message", "error", "result", "params")
    readonly_fields = fields

    def get_queryset(self, request):
        qs = super().get_queryset(request)  # team-scoped (RunQuerySet.visible_to: the customers' rule)
        return qs if request.user.is_superuser else qs.visible_to(request.user)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_cancel_permission(self, request):
        return permissions.has(request.user, permissions.CANCEL)

    def get_urls(self):
        own = [path("<int:pk>/cancel/", self.admin_site.admin_view(self.cancel_view), name="operations_run_cancel")]
        return own + super().get_urls()

    def cancel_view(self, request, pk):
        """The "Cancel" button of a run's page (POST only): another team's run is a 404, without
        operations.cancel_run a 403."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        run = get_object_or_404(self.get_queryset(request).select_related("customer"), pk=pk)
        permissions.require(request.user, permissions.CANCEL)
        if run_cancel(run, requested_by=request.user):
            self.message_user(request, f"cancel requested for run #{run.pk}", messages.SUCCESS)
        else:
            run.refresh_from_db()
            self.message_user(request, f"run #{run.pk} is {run.status}: nothing to cancel", messages.WARNING)
        return redirect(reverse("admin:operations_run_change", args=[run.pk]))

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        return status_badge(obj.status, obj.get_status_display())

    @admin.display(description="requested by")
    def requested(self, obj):
        return obj.requested_by or obj.requested_via

    @admin.display(description="duration")
    def duration_display(self, obj):
        d = obj.duration
        return "—" if d is None else f"{d:.1f} s"

    @admin.display(description="progress")
    def progress_display(self, obj):
        if obj.progress_total:
            return f"{obj.progress_done}/{obj.progress_total}"
        return "—"

    @admin.action(description="Cancel selected runs", permissions=["cancel"])
    def cancel_action(self, request, queryset):
        for run in queryset.filter(status__in=Run.ACTIVE):
            try:
                run_cancel(run, requested_by=request.user)
                self.message_user(request, f"cancel requested for run #{run.pk}", messages.SUCCESS)
            except PermissionDenied as exc:
                self.message_user(request, str(exc), messages.ERROR)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = extra_context or {}
        run = self.get_object(request, object_id)
        if run is not None:
            extra_context["commands"] = run.commands.all()
            extra_context["cancellable"] = run.status in Run.ACTIVE and self.has_cancel_permission(request)
        return super().change_view(request, object_id, form_url, extra_context)

