"""Admin building blocks: team scoping, the audit trail for admin changes, links between admin pages."""

from __future__ import annotations

from django.contrib import admin
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from audit.models import AuditEntry
from audit.services import audit_record


def change_link(viewname: str, pk, text: str):
    """A link to another object's admin page for a changelist or detail column, or a dash when there is none."""
    if not pk:
        return "—"
    return format_html('<a href="{}">{}</a>', reverse(viewname, args=[pk]), text)


def status_badge(value: str, label: str, kind: str = "status", title: str = ""):
    """A coloured label for a status column (kasa.css styles `kasa-<kind>-<value>`); `title` shows on hover."""
    if title:
        return format_html('<span class="kasa-status kasa-{}-{}" title="{}">{}</span>', kind, value, title, label)
    return format_html('<span class="kasa-status kasa-{}-{}">{}</span>', kind, value, label)


def admin_page(request, model_admin, template: str, *, title: str, obj=None, status: int = 200, **context):
    """One of Kasa's own admin pages (back up now, restore, upgrade…) with the admin's header, breadcrumbs
    and object tools: the site's context, the model's `opts`, `original` for the object it is about."""
    return TemplateResponse(request, template, {
        **model_admin.admin_site.each_context(request), "opts": model_admin.model._meta, "original": obj,
        "title": title, "subtitle": None, **context,
    }, status=status)


def scope_to_user(qs, user, path: str, *, allow_null: str | bool = False):
    """Restrict `qs` to rows whose customer (at `path`) the user may see.

    path "" means the rows are customers themselves. allow_null="superuser"
    keeps rows without a customer for superusers only (they already see all).
    """
    from customers.models import Customer

    if user.is_superuser:
        return qs
    visible = Customer.objects.visible_to(user)
    if not path:
        return qs.filter(pk__in=visible.values("pk"))
    return qs.filter(**{f"{path}__in": visible.values("pk")})


def teams_of(request):
    """The teams a user may see named: their own (superusers: all)."""
    from customers.models import Team

    user = request.user
    return Team.objects.all() if user.is_superuser else Team.objects.filter(members=user)


def customers_of(request):
    from customers.models import Customer

    return Customer.objects.visible_to(request.user)


def scoped_filter(choices):
    """A changelist filter on a relation that lists only `choices(request)` (a queryset). Django's own
    RelatedFieldListFilter lists every row of the related table: other teams' names, every storage target."""

    class ScopedRelatedFieldListFilter(admin.RelatedFieldListFilter):
        def field_choices(self, field, request, model_admin):
            return [(obj.pk, str(obj)) for obj in choices(request)]

    return ScopedRelatedFieldListFilter


class SuperuserWritesMixin:
    """Only superusers add, change or delete (what serves every team: teams, storage targets, maintenance
    connections); who may see it is the admin's own business."""

    def has_add_permission(self, request, *args):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser


class SuperuserOnlyMixin(SuperuserWritesMixin):
    """Superusers only, seeing included: credentials that reach the whole fleet."""

    def has_module_permission(self, request):
        return request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser


class TeamScopedAdminMixin:
    team_scope_path = "customer"
    team_scope_allow_null: str | bool = False

    def get_queryset(self, request):
        return scope_to_user(super().get_queryset(request), request.user, self.team_scope_path)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        from customers.models import Customer, Team

        if not request.user.is_superuser:
            if db_field.related_model is Customer:
                kwargs["queryset"] = customers_of(request)
            elif db_field.related_model is Team:
                kwargs["queryset"] = teams_of(request)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def formfield_for_manytomany(self, db_field, request, **kwargs):
        from customers.models import Customer, Team

        if not request.user.is_superuser:
            if db_field.related_model is Customer:
                kwargs["queryset"] = customers_of(request)
            elif db_field.related_model is Team:
                kwargs["queryset"] = teams_of(request)
        return super().formfield_for_manytomany(db_field, request, **kwargs)


def _changed_fields(message) -> dict:
    # Django's change message lists field names only, never values: safe for secrets.
    return {"message": message} if isinstance(message, list) else {"message": str(message)}


class AuditedAdminMixin:
    """Every add, change and delete made in the admin lands in the audit trail."""

    def log_addition(self, request, obj, message):
        audit_record(action="admin.add", source=AuditEntry.Source.ADMIN, actor=request.user, obj=obj,
                     changes=_changed_fields(message), result="ok")
        return super().log_addition(request, obj, message)

    def log_change(self, request, obj, message):
        audit_record(action="admin.change", source=AuditEntry.Source.ADMIN, actor=request.user, obj=obj,
                     changes=_changed_fields(message), result="ok")
        return super().log_change(request, obj, message)

    def log_deletions(self, request, queryset):
        for obj in queryset:
            audit_record(action="admin.delete", source=AuditEntry.Source.ADMIN, actor=request.user, obj=obj,
                         result="ok")
        return super().log_deletions(request, queryset)
