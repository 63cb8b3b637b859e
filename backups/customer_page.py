"""What backups add to the customer's admin page (registered in BackupsConfig.ready() with customers.page):
the backups card (table, chart, restores and drills), the recovery figures, "Back up now" (the page and the
changelist action)."""

from __future__ import annotations

from django.contrib import admin
from django.shortcuts import redirect
from django.urls import reverse

from engines.humanize import human_duration

from .recovery import NO_IMMUTABLE_TEXT, fleet
from .selectors import backup_chart, customer_backups
from .views import backup_now_many


def backups_card(request, customer) -> dict:
    return {
        "backups": customer_backups(customer, 20),
        "backup_chart": backup_chart(customer),
        "restore_runs": list(customer.runs.filter(kind__in=["restore", "verify"])
                             .select_related("requested_by").order_by("-created_at")[:20]),
    }


def recovery_card(request, customer) -> dict:
    rec = fleet([customer])[0]
    current = rec.rpo_current
    return {"recovery": {
        "rpo": human_duration(current.total_seconds()) if current is not None else "never verified",
        "rpo_target": human_duration(rec.rpo_target.total_seconds()), "outside_rpo": rec.outside_rpo,
        "rto": human_duration(rec.rto_measured) if rec.rto_measured is not None else "—",
        "rto_target": human_duration(rec.rto_target.total_seconds()), "outside_rto": rec.outside_rto,
        "last_verified": rec.last_verified,
        "copies": rec.copies_text, "no_immutable": rec.no_immutable, "no_immutable_text": NO_IMMUTABLE_TEXT,
    }}


@admin.action(description="Back up now")
def backup_action(model_admin, request, queryset):
    """One customer: the intermediate page to choose what to back up. Several: each with its policy."""
    customers = list(queryset)
    if len(customers) == 1:
        return redirect(reverse("admin:customers_customer_backup", args=[customers[0].pk]))
    backup_now_many(model_admin, request, customers)
    return None
