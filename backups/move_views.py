"""Admin pages for moving a customer to another host: "Move to host…" (the target host and the backup, then the
typed domain) and "Confirm move" (the old copy deleted).

Team-scoped like every customer page: another team's customer is a 404. Without the restore permission and
customers.change_runtime (a move changes the customer's host and root) the page is a 403, GET or POST.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse

from core import permissions
from core.admin_mixins import admin_page
from customers.forms import ConfirmForm
from engines.humanize import human_time
from hosts.models import Host
from operations.services import OperationRefused

from .models import Backup
from .move_service import customer_move, latest_verified, move_confirm
from .services import BackupInputError


class MoveForm(ConfirmForm):
    host = forms.ChoiceField(label="Move to host")
    backup = forms.ChoiceField(label="From backup",
                               help_text="Verified backups only (their last verification drill passed).")
    field_order = ["host", "backup", "confirm"]

    def __init__(self, *args, customer, **kwargs):
        super().__init__(*args, customer=customer, **kwargs)
        hosts = Host.objects.filter(enabled=True).exclude(pk=customer.host_id).order_by("name")
        self.fields["host"].choices = [(h.name, f"{h.name} (the worker's machine)" if h.is_local else
                                        f"{h.name} ({h.address})") for h in hosts]
        verified = (Backup.objects.filter(customer=customer, status=Backup.Status.SUCCEEDED,
                                          verify_status=Backup.VerifyStatus.PASSED).order_by("-finished_at")[:20])
        self.fields["backup"].choices = [(str(b.pk), f"#{b.pk} of {human_time(b.finished_at)} ({b.scope})")
                                         for b in verified]
        newest = latest_verified(customer)
        if newest is not None and not self.is_bound:
            self.initial["backup"] = str(newest.pk)


def _customer(request, pk, model_admin):
    customer = get_object_or_404(model_admin.get_queryset(request), pk=pk)  # team-scoped: 404 for others
    permissions.require(request.user, permissions.RESTORE)
    permissions.require(request.user, permissions.RUNTIME)
    return customer


def move_view(request, pk, model_admin):
    customer = _customer(request, pk, model_admin)
    form = MoveForm(request.POST or None, customer=customer)
    if request.method == "POST" and form.is_valid():
        backup = Backup.objects.filter(pk=int(form.cleaned_data["backup"]), customer=customer).first()
        try:
            run = customer_move(customer, host=form.cleaned_data["host"], backup=backup, requested_by=request.user,
                                via="admin")
        except (OperationRefused, BackupInputError, PermissionDenied) as exc:
            messages.error(request, str(exc))
        else:
            return redirect(reverse("admin:operations_run_change", args=[run.pk]))
    return admin_page(request, model_admin, "admin/backups/move.html", title=f"Move {customer} to another host",
                      obj=customer, status=400 if request.method == "POST" and form.errors else 200,
                      customer=customer, form=form, old_copy=customer.old_copy)


def move_confirm_view(request, pk, model_admin):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    customer = _customer(request, pk, model_admin)
    try:
        gone = move_confirm(customer, requested_by=request.user, via="admin")
    except (OperationRefused, BackupInputError, PermissionDenied) as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"The old copy of {customer} on host {gone['host']} ({gone['root']}) was deleted.")
    return redirect(reverse("admin:customers_customer_change", args=[customer.pk]))
