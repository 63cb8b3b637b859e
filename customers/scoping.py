"""Team scoping: what a user may see is their teams' customers and what hangs off them (superusers: all).

The rule itself is `Customer.objects.visible_to` (customers.models); this module applies it to the admin's
querysets and form choices for the apps above customers (backups, upgrades). Apps below customers (operations,
audit) reach the same rule through their foreign key to the customer (`…related_model.objects.visible_to`), as
core.permissions.may_see does, and never import this module.
"""

from __future__ import annotations

from hosts.models import Host

from .models import Customer, Team


def scope_to_user(qs, user, path: str):
    """Restrict `qs` to rows whose customer (at `path`) the user may see.

    path "" means the rows are customers themselves.
    """
    if user.is_superuser:
        return qs
    visible = Customer.objects.visible_to(user)
    if not path:
        return qs.filter(pk__in=visible.values("pk"))
    return qs.filter(**{f"{path}__in": visible.values("pk")})


def teams_of(request):
    """The teams a user may see named: their own (superusers: all)."""
    user = request.user
    return Team.objects.all() if user.is_superuser else Team.objects.filter(members=user)


def hosts_of(request):
    """The hosts a user may see named in a filter: those of their teams' customers (superusers: all)."""
    if request.user.is_superuser:
        return Host.objects.all()
    return Host.objects.filter(customers__in=customers_of(request)).distinct()


def customers_of(request):
    return Customer.objects.visible_to(request.user)


class TeamScopedAdminMixin:
    """A changelist, its objects and the Customer/Team choices of its forms limited to the user's teams."""

    team_scope_path = "customer"

    def get_queryset(self, request):
        return scope_to_user(super().get_queryset(request), request.user, self.team_scope_path)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        self._scope_choices(db_field, request, kwargs)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def formfield_for_manytomany(self, db_field, request, **kwargs):
        self._scope_choices(db_field, request, kwargs)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    @staticmethod
    def _scope_choices(db_field, request, kwargs) -> None:
        if not request.user.is_superuser:
            if db_field.related_model is Customer:
                kwargs["queryset"] = customers_of(request)
            elif db_field.related_model is Team:
                kwargs["queryset"] = teams_of(request)
