"""Admin pages of upgrades that are not plain ModelAdmin views: "Upgrade to…", "Roll back", "Mark resolved"
and the step list an upgrade's page polls.

Team-scoped like every customer page: another team's customer or upgrade is a 404 (never a 403 that would
confirm it exists). Within the team each page needs its permission (core.permissions), GET or POST, else a 403:
"Upgrade to…" upgrades.upgrade_customer (upgrades.install_release for a customer with no version yet), "Roll back"
upgrades.rollback_customer, "Mark resolved" upgrades.change_upgrade. Starting anything is POST-only and needs the
customer's domain typed in full: both operations stop the customer's services, and a rollback also puts its
databases back as they were.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse

from core import permissions
from core.admin_mixins import admin_page
from customers.forms import ConfirmForm
from operations.selectors import estimate_text
from operations.services import OperationRefused

from .admin_selectors import rollback_plan, steps_document, upgrade_plan, versions_card
from .services import UpgradeInputError, quarantine_resolve, rollback_start, upgrade_start

STARTED = (UpgradeInputError, OperationRefused, PermissionDenied)


class UpgradeForm(ConfirmForm):
    release = forms.CharField(widget=forms.HiddenInput)
    force = forms.BooleanField(required=False, widget=forms.HiddenInput)


def _choices(card: dict, *, force: bool) -> list[dict]:
    """Releases the page lets one pick: the allowed ones, and those that failed for this customer before only
    when forced (whether `requires` allows them is then the preflight's first check)."""
    return [o for o in card["offered"] if o["allowed"] or (force and o["bad"])]


def _refusal(customer, name: str, card: dict, force: bool) -> str:
    offer = next((o for o in card["offered"] if o["release"].name == name), None)
    if offer is None:
        return f"there is no release {name!r}; nothing was started"
    if offer["bad"] and not force:
        return (f"release {name} failed for {customer} before ({offer['bad']}); tick \"force\" to offer it again; "
                "nothing was started")
    return f"release {name} is not an allowed upgrade for {customer}: {offer['why']}; nothing was started"


def upgrade_view(request, pk: int, model_admin):
    """GET ?release=&force=: the chosen release's preflight, notes and .env diff, then the confirmation.
    POST: the preflight again (refused unless it passes), then start the upgrade and land on its run's page."""
    customer = get_object_or_404(model_admin.get_queryset(request), pk=pk)  # team-scoped: 404 for others
    permissions.require(request.user, permissions.upgrade_permission(customer))
    posted = request.method == "POST"
    data = request.POST if posted else request.GET
    force = data.get("force") in ("1", "on", "true", "True")
    card = versions_card(customer)
    choices = _choices(card, force=force)
    name = (data.get("release") or "").strip()
    chosen = next((o for o in choices if o["release"].name == name), None)
    problem = _refusal(customer, name, card, force) if name and chosen is None else ""
    form = plan = None
    if chosen is not None:
        form = UpgradeForm(request.POST if posted else None, customer=customer,
                           initial={"release": chosen["release"].name, "force": force})
        plan = upgrade_plan(customer, chosen["release"], force=force)
    if posted:
        if form is None:
            messages.error(request, problem or "choose a release first; nothing was started")
        elif form.is_valid() and not plan["ok"]:
            messages.error(request, f"the preflight failed ({'; '.join(plan['report'].problems())}); nothing was "
                                    "started")
        elif form.is_valid():
            release = chosen["release"]
            try:
                run = upgrade_start(customer, release, requested_by=request.user, via="admin", force=force)
            except STARTED as exc:
                messages.error(request, str(exc))
            else:
                if force and chosen["bad"]:
                    messages.warning(request, f"Upgrade of {customer} to {release} forced although it failed for "
                                              f"this customer before ({chosen['bad']}).")
                return redirect(reverse("admin:operations_run_change", args=[run.pk]))
    return admin_page(request, model_admin, "admin/upgrades/upgrade.html", title=f"Upgrade {customer}",
                      obj=customer, status=400 if posted or problem else 200,
                      customer=customer, card=card, choices=choices, chosen=chosen, force=force, problem=problem,
                      may=permissions.may(request.user, customer),
                      bad_hidden=[o for o in card["offered"] if o["bad"] and not force], plan=plan, form=form,
                      estimate=estimate_text(customer.pk, "upgrade"))


def rollback_view(request, pk: int, model_admin):
    """GET: what the rollback puts back (and what is lost), then the confirmation. POST: start it."""
    customer = get_object_or_404(model_admin.get_queryset(request), pk=pk)
    permissions.require(request.user, permissions.ROLLBACK)
    plan = rollback_plan(customer)
    form = ConfirmForm(request.POST if request.method == "POST" else None, customer=customer)
    switch_back = request.POST.get("switch_back") == "1"
    if request.method == "POST" and plan is not None and form.is_valid():
        try:
            run = rollback_start(customer, requested_by=request.user, via="admin", switch_back=switch_back)
        except STARTED as exc:
            messages.error(request, str(exc))
        else:
            return redirect(reverse("admin:operations_run_change", args=[run.pk]))
    status = 200 if request.method == "GET" and plan is not None else 400 if request.method == "POST" else 404
    return admin_page(request, model_admin, "admin/upgrades/rollback.html", title=f"Roll back {customer}",
                      obj=customer, status=status, customer=customer, plan=plan, form=form,
                      switch_back=switch_back, estimate=estimate_text(customer.pk, "rollback"))


class ResolveForm(forms.Form):
    note = forms.CharField(label="What was done", widget=forms.Textarea(attrs={"rows": 4, "cols": 80}),
                           help_text="Goes into the audit log. Upgrades of this customer are allowed again after.")


def resolve_view(request, upgrade_id: int, model_admin):
    """A quarantined upgrade an operator has dealt with: GET the form, POST the note."""
    upgrade = get_object_or_404(model_admin.get_queryset(request).select_related("customer"), pk=upgrade_id)
    permissions.require(request.user, permissions.RESOLVE)
    form = ResolveForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        try:
            quarantine_resolve(upgrade, actor=request.user, note=form.cleaned_data["note"], via="admin")
        except (UpgradeInputError, PermissionDenied) as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"Quarantine of {upgrade.customer} marked resolved; upgrades are allowed "
                                      "again.")
            return redirect(reverse("admin:upgrades_upgrade_change", args=[upgrade.pk]))
    return admin_page(request, model_admin, "admin/upgrades/resolve.html",
                      title=f"Resolve the quarantine of {upgrade.customer}", obj=upgrade,
                      status=400 if request.method == "POST" else 200, upgrade=upgrade, form=form)


def steps_view(request, upgrade_id: int, model_admin):
    """The step list as JSON, for the upgrade page's live table (read-only, GET only)."""
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    upgrade = get_object_or_404(model_admin.get_queryset(request), pk=upgrade_id)
    return JsonResponse(steps_document(upgrade))

