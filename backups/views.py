"""Admin pages for backups that are not plain ModelAdmin views: "Back up now" and "Download".

Both are team-scoped: a staff member reaches only backups and customers of their teams
(anything else is a 404, never a 403 that would confirm it exists); superusers reach all.
Within the team, each needs its permission (core.permissions): a 403 without it.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.http import Http404, HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import content_disposition_header

from core import permissions
from core.admin_mixins import admin_page
from operations.selectors import estimate_text
from operations.services import OperationRefused

from .models import BackupPolicy, StorageTarget
from .selectors import backups_visible_to
from .services import BackupInputError, DownloadMissing, backup_start, policy_for
from .services import backup_download as download_open

DOWNLOAD_LINK_SECONDS = 15 * 60
STREAM_CHUNK = 512 * 1024


# --- "Back up now" ---------------------------------------------------------------------------
class BackupNowForm(forms.Form):
    scope = forms.ChoiceField(choices=BackupPolicy.Scope.choices, widget=forms.RadioSelect)
    services = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple,
        help_text="Service folders to include; none ticked: all of them. Not with scope 'Databases'.",
    )
    compression = forms.ChoiceField(choices=BackupPolicy.Compression.choices, widget=forms.RadioSelect)
    encrypt = forms.BooleanField(required=False, label="Encrypt",
                                 help_text="AES-256-GCM with a fresh key per artifact (KASA_BACKUP_KEYS).")
    target = forms.ChoiceField(label="Storage target")
    kind = forms.ChoiceField(
        choices=[("auto", "As the policy says"), ("full", "Full"),
                 ("differential", "Differential (files changed since the newest full)")],
        widget=forms.RadioSelect, initial="auto",
        help_text="Databases are always dumped whole. A differential without a usable full is a full; the run's "
                  "log says why.")

    def __init__(self, *args, customer, policy: BackupPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.fields["services"].choices = [(s, s) for s in customer.services.order_by("name")
                                           .values_list("name", flat=True)]
        # Only the targets the customer's team may use (StorageTarget.teams; none listed: every team).
        targets = StorageTarget.objects.usable_by(customer.team_id).filter(enabled=True).order_by("name")
        choices = []
        for t in targets:
            label = f"{t.name} ({t.get_kind_display()})"
            if t.pk == policy.target_id:
                label += " — the policy's"
                if policy.pk and policy.replicas.exists():
                    label += ", with its replicas"
            choices.append((t.name, label))
        self.fields["target"].choices = choices
        if not self.is_bound:
            self.initial.update(scope=policy.scope, compression=policy.compression, encrypt=policy.encrypt,
                                target=policy.target.name, services=[], kind="auto")


def backup_now_view(request, pk, model_admin):
    """GET: the form with the policy's defaults. POST: start the backup, land on the run's live page.
    Another team's customer: 404; without backups.add_backup: 403."""
    customer = get_object_or_404(model_admin.get_queryset(request), pk=pk)  # team-scoped: 404 for others
    permissions.require(request.user, permissions.BACKUP)
    policy = policy_for(customer)
    form = BackupNowForm(request.POST or None, customer=customer, policy=policy)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        # The policy's own target keeps its replicas; naming it explicitly would drop them.
        target = None if data["target"] == policy.target.name else data["target"]
        try:
            run = backup_start(customer, scope=data["scope"], services=data["services"],
                               compression=data["compression"], encrypt=data["encrypt"], target=target,
                               requested_by=request.user, via="admin", kind=data["kind"])
        except (OperationRefused, BackupInputError, PermissionDenied) as exc:
            messages.error(request, str(exc))
        else:
            if not data["encrypt"]:
                messages.warning(request, f"Backup of {customer} started WITHOUT encryption: anyone who can read "
                                          f"the storage target can read it.")
            return redirect(reverse("admin:operations_run_change", args=[run.pk]))
    return admin_page(request, model_admin, "admin/backups/backup_now.html", title=f"Back up {customer}",
                      obj=customer, status=400 if request.method == "POST" and form.errors else 200,
                      customer=customer, policy=policy, form=form, keys_missing=not settings.KASA_BACKUP_KEYS,
                      estimate=estimate_text(customer.pk, "backup"))


def backup_now_many(model_admin, request, customers) -> None:
    """The changelist action on several customers: each with its policy's defaults."""
    for customer in customers:
        try:
            run = backup_start(customer, requested_by=request.user, via="admin")
        except (OperationRefused, BackupInputError, PermissionDenied) as exc:
            model_admin.message_user(request, f"{customer}: {exc}", messages.ERROR)
            continue
        url = reverse("admin:operations_run_change", args=[run.pk])
        model_admin.message_user(request, format_html('Backup of {} queued: <a href="{}">run #{}</a>',
                                                      customer, url, run.pk), messages.SUCCESS)


# --- "Download" ------------------------------------------------------------------------------
def _chunks(fh):
    try:
        while chunk := fh.read(STREAM_CHUNK):
            yield chunk
    finally:
        fh.close()


async def _achunks(fh):
    # Under ASGI (daphne) a synchronous iterator would be drained into a list before the first byte is
    # sent (Django's StreamingHttpResponse.__aiter__): read each chunk in a thread instead.
    read = sync_to_async(fh.read, thread_sensitive=False)
    try:
        while chunk := await read(STREAM_CHUNK):
            yield chunk
    finally:
        await sync_to_async(fh.close, thread_sensitive=False)()


def backup_download(request, backup_id: int, name: str):
    """An artifact (or backup.json) of a succeeded backup: a short-lived presigned link where the target
    can make one (S3), otherwise streamed through Kasa (local folder, SFTP). Another team's backup is a 404;
    without backups.download_backup, a 403."""
    backup = get_object_or_404(backups_visible_to(request.user).select_related("target", "customer"), pk=backup_id)
    try:
        got = download_open(backup, name, requested_by=request.user, via="admin",
                            link_seconds=DOWNLOAD_LINK_SECONDS)
    except DownloadMissing as exc:
        raise Http404(str(exc)) from None
    except BackupInputError as exc:
        messages.error(request, str(exc))
        return redirect(reverse("admin:backups_backup_change", args=[backup.pk]))
    if got.url:
        return HttpResponseRedirect(got.url)
    # Bounded chunks, never the whole object in memory; an async iterator when served over ASGI.
    chunks = _achunks(got.stream) if isinstance(request, ASGIRequest) else _chunks(got.stream)
    response = StreamingHttpResponse(chunks, content_type="application/octet-stream")
    response.headers["Content-Disposition"] = content_disposition_header(True, name.rsplit("/", 1)[-1])
    if got.size is not None:
        response.headers["Content-Length"] = str(got.size)
    return response
