"""Admin building blocks that name no app: links between admin pages, status labels, Kasa's own admin pages,
scoped changelist filters, superuser-only admins. Team scoping is customers' (customers.scoping), the audit
trail of admin changes audit's (audit.admin_mixins)."""

from __future__ import annotations

from django.contrib import admin
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html


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
