"""The verification drill: prove that a backup really restores, without touching the customer.

checksums + decryption of every artifact, a test extraction of each archive
into a scratch folder (every member checked, then the extracted tree compared
with the archive's own listing: count and size of every file), and a test
restore of each database into a scratch database whose per-table row counts
must equal the manifest's (Redis: the snapshot loaded into a scratch
redis-server, keys per logical database compared, backups.redisswap). The result is recorded on the backup (verified_at
or a failed flag) and a failure alerts like a failed backup.
"""

from __future__ import annotations

import shutil
import time

from django.conf import settings
from django.utils import timezone

from engines import fileindex, trees, unpack
from engines.humanize import human_duration, human_size, human_time
from operations.context import OperationError, RunCancelled, RunContext, RunLost

from . import chains, counters, dbswap, deepdrill, locks, redisswap
from .models import Backup
from .notify import verification_failed
from .reading import artifact_kwargs, keyring_for, progress, refuse_unreadable, store_of


def verify(ctx: RunContext) -> dict:
    started = time.monotonic()
    bk = Backup.objects.select_related("customer", "target").get(pk=ctx.run.params["backup"])
    if not bk.restorable:
        raise OperationError(f"backup #{bk.pk} is {bk.status}: only a succeeded backup can be verified")
    ctx.info(f"verification drill of backup #{bk.pk} of {bk.customer.domain} "
             f"({human_time(bk.finished_at)}, {human_size(bk.size)} on {bk.target.name})")
    go_deep = deepdrill.wanted(ctx, bk)  # before the drill: a deep drill refused (remote host) costs nothing
    try:
        checks = _drill(ctx, bk)
        deep = deepdrill.deep_drill(ctx, bk) if go_deep else None
    except (RunLost, RunCancelled):
        raise
    except Exception as exc:
        counters.error(bk.target, exc)  # only when a StoreError ended it
        message = str(exc) if isinstance(exc, OperationError) else f"{type(exc).__name__}: {exc}"
        Backup.objects.filter(pk=bk.pk).update(verify_status=Backup.VerifyStatus.FAILED, verify_error=message[:5000],
                                               verify_checked_at=timezone.now())
        _alert(ctx, bk.pk)
        raise OperationError(f"verification failed: {message}") from None
    counters.read(bk.target, bk.size)  # its artifacts, read back to the end (a differential's base not counted)
    seconds = round(time.monotonic() - started, 2)
    now = timezone.now()
    Backup.objects.filter(pk=bk.pk).update(verified_at=now, verify_status=Backup.VerifyStatus.PASSED,
                                           verify_error="", verify_checked_at=now, verify_seconds=seconds)
    ctx.info(f"backup #{bk.pk} verified in {human_duration(seconds)}: {len(checks)} artifact(s) restore")
    return {"backup": bk.pk, "customer": bk.customer.domain, "verified": True, "seconds": seconds,
            "checks": checks, **({"deep": deep} if deep is not None else {})}


DRILL_DISK_MARGIN = 2 * 1024**3


def _drill(ctx: RunContext, bk: Backup) -> list[dict]:
    keyring = keyring_for(bk)
    store = store_of(bk)
    arts = list(bk.artifacts.order_by("pk"))
    refuse_unreadable(arts, "drilled")
    _check_locks(ctx, bk)
    scratch = settings.KASA_SCRATCH_DIR / f"verify-{ctx.run.pk}"
    scratch.mkdir(parents=True, mode=0o700)
    checks = []
    # Test-extracted trees stay until the end of the drill when the scratch disk has ample room: removing one just
    # before extracting the next makes the next pay, on an ext4 without a journal, for every inode just freed
    # (the allocator skips recently freed inodes one by one: docs/PERFORMANCE.md, "Differential backups").
    # Else one archive's tree at a time, as before.
    stored = sum(a.size for a in arts if a.kind != "database") + chains.base_size(arts)
    keep_trees = shutil.disk_usage(scratch).free > 4 * stored + DRILL_DISK_MARGIN
    ctx.phases(*[(f"drill {a.name}", max(a.size, 1)) for a in arts])  # one named phase per artifact, by size
    try:
        for art in arts:
            ctx.check_alive()
            ctx.phase(f"drill {art.name}")
            name = f"{bk.prefix}/{art.name}"
            kwargs = artifact_kwargs(bk, art, keyring)
            try:
                if art.kind == "database" and (art.details or {}).get("engine") == "redis":
                    checks.append(redisswap.drill(ctx, bk, store, keyring, art))
                elif art.kind == "database":
                    counts = dbswap.restore_to_scratch(ctx, bk, store, keyring, art)
                    expected = (art.details or {}).get("row_counts") or {}
                    diffs = dbswap.compare_counts(expected, counts)
                    if diffs:
                        raise OperationError(f"{art.name}: the restored database differs from the manifest: "
                                             + "; ".join(diffs[:10]))
                    ctx.info(f"{art.name}: restored into a scratch database, {len(counts)} tables, row counts "
                             "match the manifest")
                    checks.append({"artifact": art.name, "tables": len(counts), "rows": sum(counts.values())})
                else:
                    dest = scratch / art.name.split(".", 1)[0]
                    listing = unpack.extract_artifact(store, name, dest=str(dest),
                                                      on_progress=progress(ctx, f"test extraction of {art.name}",
                                                                           total=art.size),
                                                      **kwargs)
                    if not keep_trees:
                        trees.remove_tree(dest, ignore_errors=True)  # one archive's tree at a time on the scratch disk
                    for line in unpack.setid_warnings(art.name, listing.setid):
                        ctx.warning(line)  # a restore would strip them too: the operator should know
                    if d := (art.details or {}).get("differential"):
                        ctx.info(f"{art.name}: a differential on full backup #{bk.base_id}: the full's archive "
                                 f"{d['base']['name']}, the change list and this archive were read, checked and "
                                 "extracted as one")
                    if side := (art.details or {}).get("index"):
                        entries = _check_index(bk, store, keyring, art, side)
                        ctx.info(f"{art.name}: its file index ({entries} entries) reads back whole")
                    ctx.info(f"{art.name}: test extraction of {listing.files} files, {listing.dirs} folders, "
                             f"{human_size(listing.total_size)}: every member checked and in place")
                    checks.append({"artifact": art.name, "files": listing.files, "dirs": listing.dirs,
                                   "symlinks": listing.symlinks, "bytes": listing.total_size})
            except unpack.ArtifactError as exc:
                raise OperationError(str(exc)) from None
    finally:
        trees.remove_tree(scratch, ignore_errors=True)
    return checks


def _check_locks(ctx: RunContext, bk: Backup) -> None:
    """On a locked target the lock is part of the backup's promise: each object's retention (mode, date) is read
    back, and a full that would unlock before this differential is a broken chain (backups.locks)."""
    problems = locks.lock_problems(bk)
    if problems:
        raise OperationError("object lock not as promised: " + "; ".join(problems[:10]))
    places = [(bk.target.name, bk.locked_until)] + [(c.target.name, c.locked_until) for c in bk.copies.all()]
    for name, until in places:
        if until:
            ctx.info(f"object locks on {name}: every object locked until {until:%Y-%m-%d %H:%M} UTC or later"
                     + (f", and full backup #{bk.base_id} as long" if bk.base_id else ""))


def _check_index(bk: Backup, store, keyring, art, side: dict) -> int:
    """A full's file index, which its differentials are made from: stored bytes, decryption and every record."""
    count = 0
    with unpack.open_plain(store, f"{bk.prefix}/{side['name']}", sha256=side["sha256"], size=side["size"],
                           encrypted=bk.encrypted, keyring=keyring,
                           compression=side.get("compression", art.compression)) as chunks:
        try:
            for _ in fileindex.read_index(chunks):
                count += 1
        except fileindex.IndexError_ as exc:
            raise OperationError(f"{side['name']}: the file index is unusable ({exc}): differentials cannot be "
                                 "made on this backup") from None
    return count


def _alert(ctx: RunContext, backup_id: int) -> None:
    try:

        verification_failed(backup_id)
    except Exception as exc:
        ctx.warning(f"notification failed: {exc}")
