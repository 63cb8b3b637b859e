"""Hosts in the admin: superusers add and change them; staff holding hosts.view_host see them, never a key.

The private key is write-only (an empty submission keeps it). The pinned host key is not a form field: it changes
only through "Trust this host key", which shows the fingerprints the host offers now and pins the one the
superuser confirms if the host still offers it at that moment (hosts.services.host_trust).
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils.html import format_html

from audit.admin_mixins import AuditedAdminMixin
from audit.models import AuditEntry
from core.admin_mixins import SuperuserWritesMixin, admin_page, status_badge
from core.secrets import SecretFormField
from engines import hostprobe, ssh
from engines.humanize import human_size, human_time

from .models import Host
from .services import HostInputError, host_probe_start, host_trust


class HostForm(forms.ModelForm):
    private_key = SecretFormField(
        label="Private key", widget=forms.Textarea(attrs={"rows": 4, "autocomplete": "off", "spellcheck": "false"}),
        help_text="Write-only: paste an OpenSSH private key; leave empty to keep the stored one.")

    class Meta:
        model = Host
        fields = ("name", "ssh_user", "sudo", "address", "port", "customers_root", "labels", "enabled",
                  "db_client_tools", "private_key", "key_file")


@admin.register(Host)
class HostAdmin(SuperuserWritesMixin, AuditedAdminMixin, admin.ModelAdmin):
    form = HostForm
    list_display = ("name", "ssh", "reachable_badge", "seen", "os", "free", "tools_found", "customer_count",
                    "enabled")
    list_filter = ("enabled", "reachable")
    search_fields = ("name", "address")
    actions = ["check_now"]
    readonly_fields = ("pinned_host_key", "probe", "tool_versions", "created_at")
    fieldsets = (
        (None, {"fields": ("name", ("ssh_user", "sudo", "address", "port"), "customers_root", "labels", "enabled")}),
        ("Databases", {"fields": ("db_client_tools",)}),
        ("Login", {"fields": ("pinned_host_key", "private_key", "key_file")}),
        ("Last probe", {"fields": ("probe", "tool_versions")}),
    )

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        if request.user.is_superuser:
            return qs.annotate(n_customers=Count("customers"))
        # Other teams' customers are not counted for a staff member who may not see them.
        return qs.annotate(n_customers=Count("customers", filter=Q(customers__team__members=request.user),
                                             distinct=True))

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.is_local:
            fields += ["name", "ssh_user", "sudo", "address", "port", "customers_root", "private_key", "key_file",
                       "db_client_tools"]
        return fields

    def get_fieldsets(self, request, obj=None):
        if obj is None:  # adding: the key is trusted on the host's page, after a look at its fingerprint
            return ((None, {"fields": ("name", ("ssh_user", "sudo", "address", "port"), "customers_root", "labels")}),
                    ("Databases", {"fields": ("db_client_tools",)}),
                    ("Login", {"fields": ("private_key", "key_file")}))
        return super().get_fieldsets(request, obj)

    def has_delete_permission(self, request, obj=None):
        return super().has_delete_permission(request, obj) and not (obj is not None and obj.is_local)

    def save_model(self, request, obj, form, change):
        if not change:
            obj.enabled = False  # no trusted host key yet
        super().save_model(request, obj, form, change)

    def get_urls(self):
        return [path("<int:pk>/trust/", self.admin_site.admin_view(self.trust_view), name="hosts_host_trust"),
                *super().get_urls()]

    # --- columns ---------------------------------------------------------------------------------------------
    @admin.display(description="SSH", ordering="address")
    def ssh(self, obj):
        if obj.via_tunnel:
            return f"{obj.ssh_spec()} (tunnel)"
        return obj.ssh_spec() or "this machine"

    @admin.display(description="reachable", ordering="reachable")
    def reachable_badge(self, obj):
        if obj.reachable is None:
            return status_badge("pending", "not probed", title=obj.last_error)
        if obj.reachable:
            return status_badge("succeeded", "reachable", title=obj.last_error)
        return status_badge("failed", "unreachable", title=obj.last_error)

    @admin.display(description="last seen", ordering="last_seen")
    def seen(self, obj):
        return human_time(obj.last_seen) if obj.last_seen else "never"

    @admin.display(description="free space", ordering="free_bytes")
    def free(self, obj):
        return human_size(obj.free_bytes) if obj.free_bytes is not None else "—"

    @admin.display(description="tools")
    def tool_versions(self, obj):
        return obj.tool_summary() or "—"

    @admin.display(description="tools")
    def tools_found(self, obj):
        """The list's short form: what is missing (every version on the host's page and on hover)."""
        if not obj.tools:
            return "—"
        missing = [t for t, v in obj.tools.items() if v == hostprobe.MISSING]
        return format_html('<span title="{}">{}</span>', obj.tool_summary(),
                           f"missing: {', '.join(missing)}" if missing else "all found")

    @admin.display(description="customers", ordering="n_customers")
    def customer_count(self, obj):
        return getattr(obj, "n_customers", None)

    @admin.display(description="host key")
    def pinned_host_key(self, obj):
        if obj.is_local:
            return "— (the worker's own machine: no SSH)"
        return format_html("<code>{}</code>", obj.fingerprint()) if obj.host_key else "not trusted yet"

    @admin.display(description="probe")
    def probe(self, obj):
        if obj.probed_at is None:
            return "never probed"
        state = "reachable" if obj.reachable else "UNREACHABLE"
        return format_html("{} at {}; OS {}; {} free under {}{}", state, human_time(obj.probed_at), obj.os or "—",
                           human_size(obj.free_bytes) if obj.free_bytes is not None else "—", obj.root(),
                           format_html("<br><strong>{}</strong>", obj.last_error) if obj.last_error else "")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        """The page lists the host's customers that the viewer may see, and offers the trust to superusers."""
        host = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if host is not None:
            extra["host_customers"] = list(host.customers.visible_to(request.user).only("pk", "domain")
                                           .order_by("domain")[:500])
            extra["may_trust"] = request.user.is_superuser and not host.is_local
        return super().change_view(request, object_id, form_url, extra)

    # --- actions ---------------------------------------------------------------------------------------------
    @admin.action(description="Check now (probe the selected hosts)", permissions=["change"])
    def check_now(self, request, queryset):
        hosts = list(queryset)
        for host in hosts:
            host_probe_start(host, actor=request.user, via=AuditEntry.Source.ADMIN)
        self.message_user(request, f"Probe queued for {', '.join(h.name for h in hosts)}: the page shows the "
                                   "result once a worker ran it.", messages.SUCCESS)

    def trust_view(self, request, pk):
        host = get_object_or_404(Host, pk=pk)
        if not request.user.is_superuser:
            raise PermissionDenied
        back = reverse("admin:hosts_host_change", args=[host.pk])
        if host.is_local:
            return redirect(back)
        if request.method == "POST":
            try:
                key = host_trust(host, request.POST.get("fingerprint", ""), actor=request.user,
                                 via=AuditEntry.Source.ADMIN)
            except HostInputError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"Host key {key.fingerprint} ({key.type}) of {host.name} pinned; the "
                                           "host is enabled.", messages.SUCCESS)
                return redirect(back)
        try:
            scanned, error = ssh.keyscan(host.address, host.port), ""
        except ssh.SSHError as exc:
            scanned, error = [], str(exc)
        return admin_page(request, self, "admin/hosts/trust.html", title=f"Trust the host key of {host.name}",
                          obj=host, host=host, scanned=scanned, error=error, pinned=host.fingerprint())
