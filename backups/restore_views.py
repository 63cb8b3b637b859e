"""Admin pages for restores and drills: "Restore…" (what will change, then a typed confirmation) and "Verify now".

Team-scoped like every backup page: another team's backup is a 404. Without backups.restore_backup (or
verify_backup) the page is a 403, GET or POST: what a restore would change is not shown to who may not start it.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse

from core import permissions
from core.admin_mixins import admin_page
from customers.forms import ConfirmForm
from engines import envfile, unpack
from engines.humanize import human_size
from operations.selectors import estimate_text
from operations.services import OperationRefused

from .artifacts import restore_refusal
from .models import Backup
from .reading import absent_services, artifact_kwargs, keyring_for, store_of
from .selectors import backups_visible_to
from .services import BackupInputError, restore_start, verify_start

MAX_ENV_BYTES = 1024 * 1024


class RestoreForm(ConfirmForm):
    artifacts = forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple, label="What to restore")
    safety_backup = forms.BooleanField(required=False, initial=True, label="Take a safety backup first",
                                       help_text="A pinned backup of the current state, so the restore can be undone "
                                                 "later.")

    field_order = ["artifacts", "safety_backup", "confirm"]

    def __init__(self, *args, backup: Backup, **kwargs):
        super().__init__(*args, customer=backup.customer, **kwargs)
        self.backup = backup
        arts = list(backup.artifacts.order_by("pk"))
        refused = {a.name: why for a in arts if (why := restore_refusal(a.details))}
        self.fields["artifacts"].choices = [
            (a.name, f"{a.name} ({a.get_kind_display().lower()}, {human_size(a.size)})"
                     + (f": holds {refused[a.name]}, which a restore refuses" if a.name in refused else ""))
            for a in arts]
        # A safety backup taken while a service folder was gone (docs/FORMAT.md): restoring it removes it again.
        absent = absent_services(backup, [])
        self.fields["artifacts"].choices += [
            (e["source"], f"{e['source']} (absent when the backup was taken: its folder {e['path']} is removed)")
            for e in absent]
        if not self.is_bound:  # what cannot be restored is not ticked
            self.initial["artifacts"] = [a.name for a in arts if a.name not in refused] + [e["source"] for e in absent]


def restore_view(request, backup_id: int, model_admin):
    backup = get_object_or_404(backups_visible_to(request.user).select_related("customer", "target"), pk=backup_id)
    permissions.require(request.user, permissions.RESTORE)
    form = RestoreForm(request.POST or None, backup=backup)
    if request.method == "POST" and form.is_valid():
        chosen = form.cleaned_data["artifacts"]
        everything = len(chosen) == len(form.fields["artifacts"].choices)
        try:
            run = restore_start(backup, only=[] if everything else chosen, confirmed=True,
                                safety_backup=form.cleaned_data["safety_backup"], requested_by=request.user,
                                via="admin")
        except (OperationRefused, BackupInputError, PermissionDenied) as exc:
            messages.error(request, str(exc))
        else:
            return redirect(reverse("admin:operations_run_change", args=[run.pk]))
    try:
        env_changes = env_diff(backup)
        env_error = ""
    except (unpack.ArtifactError, tarfile.TarError, OSError) as exc:
        env_changes, env_error = [], f"could not read the .env files of the backup: {exc}"
    return admin_page(request, model_admin, "admin/backups/restore.html",
                      title=f"Restore backup #{backup.pk} of {backup.customer}", obj=backup,
                      status=400 if request.method == "POST" and form.errors else 200,
                      backup=backup, customer=backup.customer, form=form, env_changes=env_changes,
                      env_error=env_error, root=backup.customer.root,
                      databases=list(backup.customer.databases.all()),
                      keys_missing=backup.encrypted and not settings.KASA_BACKUP_KEYS, chain=chain_of(backup),
                      estimate=estimate_text(backup.customer_id, "restore"))


def chain_of(backup: Backup) -> dict | None:
    """What a differential restores from: its full and, per service, what changed since (for the restore page)."""
    if backup.kind != Backup.Kind.DIFFERENTIAL:
        return None
    services = []
    for art in backup.artifacts.filter(kind="service").order_by("pk"):
        d = (art.details or {}).get("differential")
        services.append({"name": art.source, **({k: d[k] for k in ("added", "changed", "deleted")} if d else {}),
                         "whole": d is None})
    base = backup.base
    return {"base": base, "usable": base is not None and base.status == Backup.Status.SUCCEEDED,
            "services": services}


def verify_view(request, backup_id: int, model_admin):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    backup = get_object_or_404(backups_visible_to(request.user).select_related("customer"), pk=backup_id)
    permissions.require(request.user, permissions.VERIFY)
    try:
        run = verify_start(backup, requested_by=request.user, via="admin")
    except (OperationRefused, BackupInputError, PermissionDenied) as exc:
        messages.error(request, str(exc))
        return redirect(reverse("admin:backups_backup_change", args=[backup.pk]))
    return redirect(reverse("admin:operations_run_change", args=[run.pk]))


def env_diff(backup: Backup) -> list[dict]:
    """Per file of the config artifact, how the backup's version differs from the live one: .env-like files
    (envfile.is_env_name) key by key with values masked; any other file (ecosystem files, the policy's extra
    config paths) only as changed or unchanged, its content never shown."""

    config = backup.artifacts.filter(kind="config").first()
    if config is None or backup.status != Backup.Status.SUCCEEDED:
        return []
    keyring = keyring_for(backup) if backup.encrypted and settings.KASA_BACKUP_KEYS else None
    if backup.encrypted and keyring is None:
        return []
    store = store_of(backup)
    files: dict[str, str] = {}
    digests: dict[str, str] = {}
    with unpack.open_plain(store, f"{backup.prefix}/{config.name}", **artifact_kwargs(backup, config, keyring)) as it:
        stream = _IterReader(it)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                fh = tar.extractfile(member)
                if envfile.is_env_name(member.name) and member.size <= MAX_ENV_BYTES:
                    files[member.name] = fh.read().decode("utf-8", errors="replace")
                else:
                    digests[member.name] = _sha256(fh)
        stream.drain()
    root = backup.customer.root_path()
    out = []
    for name in sorted({*files, *digests}):
        exists = (root / name).exists()
        if name in files:
            changes = envfile.diff(envfile.read(root / name), envfile.parse(files[name]))
            out.append({"file": name, "exists": exists, "env": True, "changes": changes})
        else:
            out.append({"file": name, "exists": exists, "env": False,
                        "changed": not exists or _live_sha256(root / name) != digests[name]})
    return out


def _sha256(fh) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _live_sha256(path) -> str | None:
    """The live file's sha256; None when it is not a regular file (a link is not followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        return _sha256(fh) if stat.S_ISREG(os.fstat(fd).st_mode) else None


class _IterReader(io.RawIOBase):
    """A file object over an iterator of bytes chunks (tarfile's stream mode reads from it)."""

    def __init__(self, it):
        self._it, self._buf = iter(it), b""

    def readable(self):
        return True

    def read(self, n=-1):
        while n < 0 or len(self._buf) < n:
            chunk = next(self._it, None)
            if chunk is None:
                break
            self._buf += chunk
        if n < 0:
            data, self._buf = self._buf, b""
        else:
            data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def drain(self):
        for _ in self._it:  # the engine checks checksum and authentication only once it has read everything
            pass
