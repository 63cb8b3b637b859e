"""`{% kasa_fleet %}`: the fleet overview on the admin index (console.overview), above Django's app list."""

from django import template

from console.overview import overview

register = template.Library()


@register.inclusion_tag("admin/console/overview.html", takes_context=True)
def kasa_fleet(context):
    return {"o": overview(context["request"].user)}
