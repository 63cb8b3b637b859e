"""Per-target counters behind /metrics' kasa_storage_* series (backups.models.TargetCounter).

Each call is one atomic UPDATE (F() + n) of the target's row, created on first use, so concurrent workers never
lose an increment and nothing is kept in a process. Approximations, documented in README's metrics list:
- written: what a succeeded backup stored — its artifacts (BackupArtifact.size: compressed, encrypted bytes), the
  manifest and each replica's copy of them; the sidecar indexes and a failed backup's partial objects are not
  counted.
- read: the artifacts a succeeded restore or verification drill read back (their stored sizes).
A counting failure never changes a run's outcome: it is logged and the run goes on.
"""

from __future__ import annotations

import logging

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from engines.stores import StoreError

from .models import TargetCounter

log = logging.getLogger(__name__)


def _update(target_id: int, **fields) -> None:
    try:
        if not TargetCounter.objects.filter(target_id=target_id).update(**fields):
            try:
                with transaction.atomic():
                    TargetCounter.objects.create(target_id=target_id)
            except IntegrityError:
                pass  # another worker created it first
            TargetCounter.objects.filter(target_id=target_id).update(**fields)
    except Exception:  # noqa: BLE001  (a metric never fails a backup or a restore)
        log.exception("could not update the counters of storage target %s", target_id)


def written(target, n: int) -> None:
    if n > 0:
        _update(target.pk, written_bytes=F("written_bytes") + int(n))


def read(target, n: int) -> None:
    if n > 0:
        _update(target.pk, read_bytes=F("read_bytes") + int(n))


def store_error_of(exc: BaseException | None) -> StoreError | None:
    """The StoreError behind `exc`, if any: an OperationError a run raises often wraps one (`from` or `from None`:
    both leave it in __context__)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StoreError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def error(target, exc: BaseException | None = None) -> bool:
    """Count one storage error of `target` when `exc` is (or wraps) a StoreError, or always when `exc` is None."""
    if target is None or (exc is not None and store_error_of(exc) is None):
        return False
    _update(target.pk, errors=F("errors") + 1)
    return True


def checked(target, ok: bool) -> None:
    """The result of a target check (backups.services.target_check): kasa_storage_target_up."""
    _update(target.pk, check_ok=ok, checked_at=timezone.now())
