"""Starting a move of a customer to another host, and confirming one (backups.move runs it).

- `customer_move`: checks the request completely (the customer's team and the restore permission, plus
  customers.change_runtime: a move changes the customer's host and root folder; the target host; the backup)
  and starts a restore run with `to_host`. The default backup is the newest *verified* one: a succeeded backup
  whose last verification drill passed (Backup.verify_status "passed": restored into scratch, every artifact
  read, row counts matched) — a move never starts from a backup nobody has restored.
- `move_confirm`: after a move, the old copy (stopped, left in place) is deleted, and the customer forgets it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from audit.services import audit_record
from core import permissions
from customers.models import Customer
from hosts.models import Host
from operations.models import Run
from operations.services import OperationRefused, run_start

from .models import Backup
from .services import BackupInputError


def latest_verified(customer: Customer) -> Backup | None:
    return (Backup.objects.filter(customer=customer, status=Backup.Status.SUCCEEDED,
                                  verify_status=Backup.VerifyStatus.PASSED)
            .order_by("-finished_at", "-pk").first())


def customer_move(customer: Customer, *, host: Host | str, backup: Backup | None = None, requested_by=None,
                  via: str = "admin", enqueue: bool = True) -> Run:
    from . import move

    permissions.require(requested_by, permissions.RESTORE, customer)
    permissions.require(requested_by, permissions.RUNTIME, customer)
    if isinstance(host, str):
        target = Host.objects.filter(name=host).first()
        if target is None:
            raise BackupInputError(f"no host named {host!r}")
    else:
        target = host
    if customer.old_copy:
        raise BackupInputError(f"{customer} was moved from host {customer.old_copy.get('host')} and that move is not "
                               "confirmed yet: confirm it (the old copy is deleted) before moving again")
    if backup is None:
        backup = latest_verified(customer)
        if backup is None:
            raise BackupInputError(f"{customer} has no verified backup (a succeeded backup whose verification drill "
                                   "passed): run a drill first, or name a backup")
    elif backup.customer_id != customer.pk:
        raise BackupInputError(f"backup #{backup.pk} is not {customer}'s")
    if not backup.restorable:
        raise BackupInputError(f"backup #{backup.pk} is {backup.status}: only a succeeded backup can be moved from")
    if backup.encrypted and not settings.KASA_BACKUP_KEYS:
        raise BackupInputError(f"backup #{backup.pk} is encrypted and KASA_BACKUP_KEYS is not set")
    found = move.problems(customer, target, backup)
    if found:
        raise BackupInputError("; ".join(found))
    params = {"backup": backup.pk, "only": [], "to_root": None, "to_databases": {}, "to_databases_shown": {},
              "rewrite_env": False, "safety_backup": False, "to_host": target.name}
    return run_start(customer, kind=Run.Kind.RESTORE, requested_by=requested_by, via=via, params=params,
                     enqueue=enqueue)


def move_confirm(customer: Customer, *, requested_by=None, via: str = "admin") -> dict:
    """Delete the old copy a move left (its folders on the old host) and forget it. Refused while a run is active
    for the customer (that run may be the move itself)."""
    from hosts.remote import RemoteError, RemoteHost

    permissions.require(requested_by, permissions.RESTORE, customer)
    permissions.require(requested_by, permissions.RUNTIME, customer)
    old = dict(customer.old_copy or {})
    if not old:
        raise BackupInputError(f"{customer} has no old copy to delete: it was not moved (or the move is confirmed)")
    if Run.objects.active().filter(customer=customer).exists():
        raise OperationRefused(f"{customer} has a run in progress: confirm the move once it has ended")
    source = Host.objects.filter(name=old.get("host")).first()
    root = old.get("root") or ""
    if source is None:
        raise BackupInputError(f"the old copy's host {old.get('host')} is gone: nothing to delete there")
    if source.pk == customer.host_id and root == customer.root:
        raise BackupInputError("the old copy is the customer's live folder: refused")
    import posixpath
    from pathlib import PurePosixPath

    from engines import paths

    for other in Customer.objects.filter(host=source).exclude(pk=customer.pk).values_list("root", flat=True):
        # A customer added there since the move may have been given this folder, or one inside it.
        if paths.overlap(PurePosixPath(posixpath.normpath(root)), PurePosixPath(posixpath.normpath(other))):
            raise BackupInputError(f"{root} on {source.name} overlaps another customer's root now: refused")
    if source.is_local:
        from customers import roots

        if problem := roots.copy_root_problem(root, Customer.objects.filter(host=source).values_list("root",
                                                                                                     flat=True)):
            raise BackupInputError(f"the old copy's folder: {problem}")
        from engines import hostmove

        hostmove.remove_root(str(settings.KASA_CUSTOMERS_ROOT), root, customer.run_as)
    else:
        try:
            with RemoteHost(source) as remote:
                remote.call("engines.hostmove.remove_root", source.root(), root, customer.run_as,
                            settings.KASA_REMOTE_PM2 or "")
        except (RemoteError, OSError) as exc:
            raise BackupInputError(f"could not delete the old copy on host {source.name}: {exc}") from None
    with transaction.atomic():
        Customer.objects.filter(pk=customer.pk).update(old_copy={})
        audit_record(action="customer.move_confirmed", source=via if via in ("admin", "cli") else "system",
                     actor=requested_by, obj=customer, customer=customer,
                     changes={"deleted": {"host": source.name, "root": root}}, result="ok")
    customer.old_copy = {}
    return {"host": source.name, "root": root}
