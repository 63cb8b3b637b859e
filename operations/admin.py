from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from core import permissions
from core.admin_mixins import status_badge
from core.paging import FleetScaleMixin
from engines.humanize import human_duration, human_time

from . import registry
from .models import Run
from .runview import phase_document
from .selectors import typical_seconds
from .services import run_cancel


@admin.register(Run)
class RunAdmin(FleetScaleMixin, admin.ModelAdmin):
    """Runs are written by services only: the admin shows them and their live log."""

    list_display = ("id", "kind", "customer", "status_badge", "requested", "created_at", "duration_display",
                    "progress_display")
    list_filter = ("status", "kind", "created_at")
    search_fields = ("customer__domain", "error")
    list_select_related = ("customer", "requested_by")
    # At fleet scale (docs/PERFORMANCE.md; FleetScaleMixin): no date hierarchy, it reads the dates of every row.
    actions = ["cancel_action"]
    # Every field the run changes while it runs is rendered with an id that runlog.js keeps current from the
    # WebSocket's "status" message (operations.runview): no reload needed. The error is shown once, in the live box.
    fields = ("kind", "customer", "status_display", "requested_by", "requested_via", "created_display",
              "started_display", "finished_display", "worker_display", "summary_display", "links_display", "params")
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

    @admin.display(description="status")
    def status_display(self, obj):
        # The contract of the live page (and its browser tests): #run-status[data-status] follows the run.
        return format_html('<span id="run-status" class="kasa-status kasa-status-{}" data-status="{}">{}</span>',
                           obj.status, obj.status, obj.get_status_display())

    @admin.display(description="created")
    def created_display(self, obj):
        return human_time(obj.created_at)

    @admin.display(description="started")
    def started_display(self, obj):
        return format_html('<span id="run-started">{}</span>', human_time(obj.started_at) if obj.started_at else "—")

    @admin.display(description="finished")
    def finished_display(self, obj):
        text = human_time(obj.finished_at) if obj.finished_at else "—"
        took = f" (took {human_duration(obj.duration)})" if obj.duration is not None else ""
        return format_html('<span id="run-finished">{}</span><span id="run-took">{}</span>', text, took)

    @admin.display(description="worker")
    def worker_display(self, obj):
        return format_html('<span id="run-worker">{}</span>', obj.worker or "—")

    @admin.display(description="result")
    def summary_display(self, obj):
        return format_html('<span id="run-summary">{}</span>', registry.details(obj).get("summary") or "—")

    @admin.display(description="links")
    def links_display(self, obj):
        links = registry.details(obj).get("links") or []
        inner = format_html_join(" · ", '<a href="{}">{}</a>', ((x["url"], x["label"]) for x in links))
        return format_html('<span id="run-links">{}</span>', inner or "—")

    @admin.display(description="requested by")
    def requested(self, obj):
        return obj.requested_by or obj.requested_via

    @admin.display(description="duration")
    def duration_display(self, obj):
        return human_duration(obj.duration)

    @admin.display(description="progress")
    def progress_display(self, obj):
        if obj.phase_plan:
            return f"{obj.phase} ({obj.percent:.0f} %)" if obj.is_active else f"{obj.percent:.0f} %"
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
            commands = list(run.commands.all())
            for c in commands:
                c.took = human_duration(c.duration) if c.duration is not None else ""
            extra_context["commands"] = commands
            extra_context["cancellable"] = run.status in Run.ACTIVE and self.has_cancel_permission(request)
            extra_context["phase"] = phase_document(run, typical_seconds(run.customer_id, run.kind))
        return super().change_view(request, object_id, form_url, extra_context)

