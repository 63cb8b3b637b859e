"""How a run reads a backup's artifacts back: the key ring, engines.unpack's arguments, progress in its log.

Shared by restores, drills, the database side of restores (backups.dbswap) and the Restore page.
"""

from __future__ import annotations

import threading
import time

from django.conf import settings

from engines import hostpgtools
from engines.backupcrypto import KeyRing
from engines.humanize import human_size
from operations.context import OperationError, RunContext

from . import chains
from .locks import store_of  # noqa: F401  (part of this module's API: every read pins the recorded versions)
from .models import Backup, BackupArtifact


class Stopped(Exception):
    """The other lane failed: this one stops at its next chunk."""


def keyring_for(bk: Backup):
    """The key ring that decrypts the backup's artifacts (None for a plaintext backup)."""
    if not bk.encrypted:
        return None
    if not settings.KASA_BACKUP_KEYS:
        raise OperationError(f"backup #{bk.pk} is encrypted and KASA_BACKUP_KEYS is not set: nothing was touched")
    return KeyRing(settings.KASA_BACKUP_KEYS)


def artifact_kwargs(bk: Backup, art: BackupArtifact, keyring) -> dict:
    """What engines.unpack checks an artifact against: its checksum, size, encryption and compression."""
    return {"sha256": art.sha256, "size": art.size, "encrypted": bk.encrypted, "keyring": keyring,
            "compression": art.compression, **chains.chain_kwargs(bk, art)}


def progress(ctx: RunContext, label: str, stop: threading.Event | None = None, *, base: int = 0,
             total: int | None = None):
    """An on_progress callback: the run's progress bar at most twice a second; Stopped once `stop` is set.
    base/total: bytes already done before this artifact, and of the whole phase (its share of the bar)."""
    last = [0.0]

    def update(done: int) -> None:
        if stop is not None and stop.is_set():
            raise Stopped()
        now = time.monotonic()
        if now - last[0] > 0.5:
            last[0] = now
            ctx.progress(base + done, max(total, base + done) if total else None, f"{label}: {human_size(done)}")
    return update


def select_artifacts(bk: Backup, only: list[str]) -> list[BackupArtifact]:
    """`only` names artifacts by file name, by service/database name, or 'config'. A service the backup records
    as absent (absent_services) is a known name that selects no artifact."""
    arts = list(bk.artifacts.order_by("pk"))
    if not only:
        return arts
    gone = {e["source"] for e in absent_services(bk, [])}
    chosen, unknown = [], []
    for want in only:
        match = [a for a in arts if want in (a.name, a.source, a.name.split(".", 1)[0])]
        if not match and want not in gone:
            unknown.append(want)
        chosen += [a for a in match if a not in chosen]
    if unknown:
        has = [a.source if a.kind != "config" else "config" for a in arts] + [f"{g} (absent)" for g in sorted(gone)]
        raise OperationError(f"backup #{bk.pk} has no artifact {', '.join(map(repr, unknown))} "
                             f"(it has: {', '.join(has)})")
    return sorted(chosen, key=lambda a: a.pk)


def absent_services(bk: Backup, only: list[str]) -> list[dict]:
    """The service folders that did not exist when this (safety) backup was taken, [{"source", "path"}] from its
    manifest (backups.operations), those `only` names (all of them without `only`): restoring it removes them."""
    entries = (bk.manifest or {}).get("absent") or []
    return [{"source": str(e["source"]), "path": str(e["path"])} for e in entries
            if isinstance(e, dict) and e.get("source") and e.get("path") and (not only or e["source"] in only)]


def refuse_unreadable(arts: list[BackupArtifact], doing: str, tail: str = "; nothing was touched") -> None:
    """Before anything is touched: a PostgreSQL dump that Kasa's own pg_restore on this worker is too old to read
    (made by a host's own, newer pg_dump: Host.db_client_tools) is said so, naming both versions, instead of
    failing half-way in pg_restore."""
    for art in arts:
        if art.kind == "database" and (why := hostpgtools.too_new_to_read(art.details or {})):
            raise OperationError(f"{art.name} cannot be {doing} on this worker: {why}{tail}")
    chains.refuse_broken(arts, doing, tail)
