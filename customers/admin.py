"""Customers in the admin: team-scoped. What runs (root, run_as, each service's process manager, app name,
commands and health URL) is read-only without customers.change_runtime and saved through customers.changes,
which refuses and audits; every button and action needs its permission (core.permissions). What other apps add
to the customer's page (backups, upgrades: cards, pages, actions) comes through customers.page."""

import shlex

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IS_POPUP_VAR
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models
from django.db.models import Count, OuterRef, Subquery
from django.forms.models import BaseInlineFormSet
from django.http import HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.module_loading import import_string

from audit.admin_mixins import AuditedAdminMixin
from core import permissions
from core.admin_mixins import SuperuserWritesMixin, scoped_filter, status_badge
from core.paging import FleetScaleMixin
from operations.models import Run
from operations.services import OperationRefused

from . import page
from .changes import CUSTOMER_RUNTIME, SERVICE_RUNTIME, customer_save, runs_something, service_delete, service_save
from .forms import ArgvField, VersionsField
from .models import Customer, DatabaseConnection, Service, Team
from .scoping import TeamScopedAdminMixin, hosts_of, teams_of
from .services import customer_check_start


@admin.register(Team)
class TeamAdmin(SuperuserWritesMixin, AuditedAdminMixin, admin.ModelAdmin):
    list_display = ("name", "member_count")
    ordering = ("name",)  # explicit: the member count's GROUP BY drops Meta.ordering (autocomplete pages)
    filter_horizontal = ("members",)
    search_fields = ("name",)

    def get_queryset(self, request):
        qs = super().get_queryset(request).annotate(n_members=Count("members"))
        return qs if request.user.is_superuser else qs.filter(members=request.user)

    @admin.display(description="members", ordering="n_members")
    def member_count(self, obj):
        return obj.n_members



class ServiceFormSet(BaseInlineFormSet):
    may_change_runtime = False  # set per request by ServiceInline.get_formset

    def clean(self):
        super().clean()
        if self.may_change_runtime:
            return
        for form in self.deleted_forms:
            if form.instance.pk and runs_something(form.instance):
                raise ValidationError(f"service {form.instance.name} runs something (process manager, commands or "
                                      f"health URL set): deleting it needs the permission {permissions.RUNTIME}")


class ServiceForm(forms.ModelForm):
    class Meta:
        model = Service
        fields = ("start_command", "stop_command")  # the inline names the rest (get_fields)
        field_classes = {"start_command": ArgvField, "stop_command": ArgvField}


class ServiceInline(admin.StackedInline):
    """Stacked: one service per block, its commands one argument per line (a table of them is wider than a
    screen). Without the runtime permission what runs is shown, never a form field (a POST of it is ignored)."""

    model = Service
    form = ServiceForm
    formset = ServiceFormSet
    extra = 0
    classes = ("kasa-services",)
    # Health URLs are mostly local (http://127.0.0.1:PORT/health): a bare host means http.
    formfield_overrides = {models.URLField: {"assume_scheme": "http"}}
    fields = (("name", "path"), ("process_manager", "app_name"), ("start_command", "stop_command"), "health_url")
    # What an operator without the runtime permission sees instead of the commands' form fields.
    SHOWN = {"start_command": "start_argv", "stop_command": "stop_argv"}

    def _may_change_runtime(self, request) -> bool:
        return permissions.has(request.user, permissions.RUNTIME)

    def get_fields(self, request, obj=None):
        if self._may_change_runtime(request):
            return self.fields
        return tuple(tuple(self.SHOWN.get(f, f) for f in row) if isinstance(row, tuple) else self.SHOWN.get(row, row)
                     for row in self.fields)

    def get_readonly_fields(self, request, obj=None):
        readonly = super().get_readonly_fields(request, obj)
        if self._may_change_runtime(request):
            return readonly
        # not form fields at all: a POST of them is ignored
        return (*readonly, *(self.SHOWN.get(f, f) for f in SERVICE_RUNTIME))

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        formset.may_change_runtime = self._may_change_runtime(request)
        return formset

    @admin.display(description="start command")
    def start_argv(self, obj):
        return argv_display(obj.start_command if obj else [])

    @admin.display(description="stop command")
    def stop_argv(self, obj):
        return argv_display(obj.stop_command if obj else [])


def argv_display(argv) -> str:
    """A command for reading: its arguments as a shell would quote them (it never goes through one), or a dash."""
    if not argv:
        return "—"
    return format_html("<code>{}</code>", shlex.join(str(a) for a in argv))


class CustomerForm(forms.ModelForm):
    class Meta:
        model = Customer
        fields = ("versions",)  # the admin names the rest (get_fieldsets)
        field_classes = {"versions": VersionsField}


class DatabaseInline(admin.StackedInline):
    model = DatabaseConnection
    extra = 0
    fields = (("name", "engine"), ("host", "port"), ("database", "user"), ("password", "tls"), "sqlite_path")


@admin.register(Customer)
class CustomerAdmin(FleetScaleMixin, TeamScopedAdminMixin, AuditedAdminMixin, admin.ModelAdmin):
    team_scope_path = ""
    # The host is a filter here and a field of the customer's page: one more column would push the changelist past
    # 1366 px (tests/test_browser_layout.py).
    list_display = ("domain", "name", "team", "status_badge", "versions_display", "last_run")
    list_filter = ("status", ("team", scoped_filter(teams_of)), ("host", scoped_filter(hosts_of)))
    ordering = ("domain",)  # explicit: the last run's GROUP BY drops Meta.ordering (autocomplete pages)
    search_fields = ("domain", "name", "tags")
    list_select_related = ("team",)
    inlines = [ServiceInline, DatabaseInline]
    actions = ["check_action"]  # and those of customers.page (get_actions)
    # The host is set when the customer is added (customer_add --host); moving a customer between hosts is an
    # operation of its own (issue 14), not a field edit.
    readonly_fields = ("host", "old_copy_shown", "created_at", "updated_at")
    form = CustomerForm

    def get_fieldsets(self, request, obj=None):
        """Versions appear once: the Versions card shows them on a customer's page; a runtime holder may correct
        the record in a folded section (an upgrade keeps it), and sets it on a new customer."""
        runtime = permissions.has(request.user, permissions.RUNTIME)
        what_runs = ("host", "root", "run_as") if obj is not None or not runtime else ("root", "run_as", "versions")
        if obj is not None and obj.old_copy:  # after a move, until it is confirmed (backups.move)
            what_runs = (*what_runs, "old_copy_shown")
        sets = [(None, {"fields": (("domain", "name"), ("team", "status"), "tags",
                                   ("version_pin", "version_pin_reason"))}),
                ("What runs", {"fields": what_runs, "classes": ("kasa-what-runs",)})]
        if obj is not None:
            if runtime:
                sets.append(("Correct the recorded versions", {
                    "fields": ("versions",), "classes": ("collapse",),
                    "description": "The Versions section below shows them; upgrades and rollbacks keep them. Change "
                                   "them here only to correct the record."}))
            sets.append(("History", {"fields": (("created_at", "updated_at"),)}))
        return sets

    @admin.display(description="old copy")
    def old_copy_shown(self, obj):
        old = obj.old_copy or {}
        if not old:
            return "—"
        return (f"on host {old.get('host')} at {old.get('root')}, " + ("stopped" if old.get("stopped") else
                "NOT stopped") + f", left by run #{old.get('run')}: confirm the move (Move to host… page) to delete it")

    def get_queryset(self, request):
        # The newest run's time from the index (customer, -created_at), not a GROUP BY over every run.
        newest = Run.objects.filter(customer=OuterRef("pk")).order_by("-created_at").values("created_at")[:1]
        return super().get_queryset(request).annotate(last_run_at=Subquery(newest))

    def get_readonly_fields(self, request, obj=None):
        readonly = super().get_readonly_fields(request, obj)
        if permissions.has(request.user, permissions.RUNTIME):
            return readonly
        return (*readonly, *CUSTOMER_RUNTIME)

    def has_add_permission(self, request):
        # A new customer needs a root folder, which is a runtime field.
        return super().has_add_permission(request) and permissions.has(request.user, permissions.RUNTIME)

    def has_check_permission(self, request):
        return permissions.has(request.user, permissions.CHECK)

    def save_model(self, request, obj, form, change):
        customer_save(obj, actor=request.user, via="admin")

    def save_formset(self, request, form, formset, change):
        if formset.model is not Service:
            return super().save_formset(request, form, formset, change)
        changed = formset.save(commit=False)
        for service in formset.deleted_objects:  # first: a row deleted and added again keeps its unique name
            service_delete(service, actor=request.user, via="admin")
        for service in changed:
            service_save(service, actor=request.user, via="admin")
        formset.save_m2m()
        return None

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        return status_badge(obj.status, obj.get_status_display())

    @admin.display(description="versions")
    def versions_display(self, obj):
        return ", ".join(f"{k} {v}" for k, v in sorted(obj.versions.items())) or "—"

    @admin.display(description="last operation", ordering="last_run_at")
    def last_run(self, obj):
        return obj.last_run_at

    def get_urls(self):
        urls = super().get_urls()
        own = [path("<int:pk>/check/", self.admin_site.admin_view(self.check_view), name="customers_customer_check")]
        own += [path(f"<int:pk>/{p.route}/", self.admin_site.admin_view(self._page_view(p.view)),
                     name=f"customers_customer_{p.route}") for p in page.pages()]
        return own + urls

    def _page_view(self, view: str):
        """A page another app adds under the customer (customers.page): view(request, pk, model_admin)."""
        def serve(request, pk):
            return import_string(view)(request, pk, self)
        return serve

    def check_view(self, request, pk):
        """The "Check now" button on the customer page (POST only)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        customer = get_object_or_404(self.get_queryset(request), pk=pk)  # team-scoped: 404 for others
        permissions.require(request.user, permissions.CHECK)  # a 403
        try:
            run = customer_check_start(customer, requested_by=request.user, via="admin")
        except (OperationRefused, PermissionDenied) as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return redirect(reverse("admin:customers_customer_change", args=[pk]))
        return redirect(reverse("admin:operations_run_change", args=[run.pk]))

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = extra_context or {}
        customer = self.get_object(request, object_id)
        if customer is not None:
            extra_context["may"] = permissions.may(request.user, customer)
            extra_context["recent_runs"] = customer.runs.select_related("requested_by")[:10]
            extra_context.update(page.card_context(request, customer))
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.action(description="Check databases and services", permissions=["check"])
    def check_action(self, request, queryset):
        started = []
        for customer in queryset:
            try:
                started.append(customer_check_start(customer, requested_by=request.user, via="admin"))
            except (OperationRefused, PermissionDenied) as exc:
                self.message_user(request, str(exc), messages.ERROR)
        if len(started) == 1:
            return redirect(reverse("admin:operations_run_change", args=[started[0].pk]))
        for run in started:
            url = reverse("admin:operations_run_change", args=[run.pk])
            self.message_user(request, format_html('Check of {} queued: <a href="{}">run #{}</a>',
                                                   run.customer, url, run.pk), messages.SUCCESS)
        return None

    def get_actions(self, request):
        """Django's and check_action, then those other apps add (customers.page), each for holders of its
        permission."""
        actions = super().get_actions(request)
        if self.actions is None or IS_POPUP_VAR in request.GET:  # as Django's own: no actions there
            return actions
        for action in page.actions():
            if permissions.has(request.user, action.permission):
                func = import_string(action.function)
                actions[func.__name__] = (func, func.__name__, func.short_description)
        return actions

from . import maintenance_admin  # noqa: E402,F401 (MaintenanceConnection's admin, superusers only)
