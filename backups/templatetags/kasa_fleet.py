"""The fleet dashboard on the admin index: who is outside its recovery objectives, at a glance."""

from django import template

from backups.recovery import fleet, summary
from customers.models import Customer
from engines.humanize import human_duration, human_size

register = template.Library()


@register.inclusion_tag("admin/backups/fleet.html", takes_context=True)
def kasa_fleet(context):
    user = context["request"].user
    rows = fleet(Customer.objects.visible_to(user).order_by("domain"))
    for r in rows:
        current = r.rpo_current
        r.rpo_text = human_duration(current.total_seconds()) if current is not None else "never verified"
        r.rpo_target_text = human_duration(r.rpo_target.total_seconds())
        r.rto_text = human_duration(r.rto_measured) if r.rto_measured is not None else "—"
        r.rto_target_text = human_duration(r.rto_target.total_seconds())
        r.storage_text = human_size(r.storage) if r.storage else "—"
    s = summary(rows)
    s["storage_text"] = human_size(s["storage"]) if s["storage"] else "0 B"
    # Problems first, then by domain: the rows that need someone come to the top.
    rows.sort(key=lambda r: (not (r.outside_rpo or r.last_failed or r.outside_rto), r.customer.domain))
    return {"rows": rows, "summary": s}
