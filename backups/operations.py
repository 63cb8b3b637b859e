"""The backup operation: one restore point of a customer, complete or nothing.

Each artifact streams to storage, is read back and checksummed, then the
manifest (backup.json) is written beside the artifacts last: a folder without
a manifest is never a restore point. Any failure deletes everything written
under the backup's prefix, on the primary and on every replica.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from django.conf import settings
from django.db import connection
from django.utils import timezone

from customers.models import Customer
from engines import manifestauth, streams
from engines.artifact import write_artifact, write_bytes, write_small_artifact
from engines.backupcrypto import KeyRing
from engines.humanize import human_duration, human_size
from engines.paths import PathEscapeError
from engines.ssh import SSHError
from engines.stores import StoreLocked
from operations import slots
from operations.context import OperationError, RunCancelled, RunContext, RunLost

from . import artifacts as plans
from . import chains, counters, locks
from . import remote as remote_plans
from .models import Backup, BackupArtifact, BackupCopy, StorageTarget
from .notify import backup_finished
from .services import SAFETY_TRIGGERS, prune_customer

FORMAT_VERSION = 1
MANIFEST = "backup.json"


class _Stopped(Exception):
    """The other lane failed: stop streaming this artifact at once."""


class _Progress:
    """Bytes done over all lanes, throughput and ETA, written at most twice a second."""

    def __init__(self, ctx: RunContext, expected_total: int):
        self.ctx, self.total = ctx, expected_total or None
        self.finished = 0
        self.current: dict[str, int] = {}
        self.started = time.monotonic()
        self.last = 0.0
        self.last_alive_check = self.started
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def update(self, lane: str, current: int, label: str, force: bool = False) -> None:
        if self.stop.is_set():
            raise _Stopped()
        with self.lock:
            self.current[lane] = current
            now = time.monotonic()
            check = now - self.last_alive_check > 2
            if check:
                self.last_alive_check = now
            if not force and not check and now - self.last < 0.5:
                return
            self.last = now
            done = self.finished + sum(self.current.values())
        if check:
            self.ctx.check_alive()  # a cancel request or a lost run stops the stream within ~2 s
        rate = done / max(now - self.started, 1e-6)
        msg = f"{label}: {human_size(done)} at {human_size(rate)}/s"
        if self.total and rate > 0 and self.total > done and now - self.started > 3:  # rate settles first
            msg += f", about {human_duration(round((self.total - done) / rate))} left"
        self.ctx.progress(done, max(self.total or 0, done) or None, msg)

    def artifact_done(self, lane: str, size: int) -> None:
        with self.lock:
            self.finished += size
            self.current[lane] = 0


def backup(ctx: RunContext) -> dict:
    """Wait for a backup slot of the customer's host (operations.slots: in the control database, shared by every
    worker machine; a killed worker's slot is reclaimed once its run is failed), then back up."""

    ctx.phases(*BACKUP_PHASES)

    def waiting(waited: float) -> None:
        if waited == 0:
            ctx.phase("wait for a slot")
            ctx.info(f"waiting for a backup slot ({settings.KASA_MAX_BACKUPS_PER_HOST} backups already "
                     f"running on host {slots.host_key(ctx.run.customer)})")
        ctx.check_alive()  # a cancel request or a lost run ends the wait

    with slots.hold(slots.host_slot(ctx.run.customer), settings.KASA_MAX_BACKUPS_PER_HOST, ctx.run.pk,
                    on_wait=waiting):
        return _backup(ctx)


# Named phases of a backup run (RunContext.phases); the bytes written give the progress within "write artifacts".
BACKUP_PHASES = (("wait for a slot", 0), ("write artifacts", 10), ("manifest and replicas", 1))


def _backup(ctx: RunContext) -> dict:
    ctx.phase("write artifacts")
    customer = Customer.objects.prefetch_related("services", "databases").get(pk=ctx.run.customer_id)
    return make_backup(ctx, customer, ctx.run.params, run=ctx.run)[1]


def make_backup(ctx: RunContext, customer: Customer, p: dict, *, run=None, pin_reason: str = "") -> tuple:
    """Make one backup inside the current run; returns (Backup, result document).

    `run` links the backup to its own backup run; a restore or an upgrade passes None for the safety
    backup it takes within its own run (and pins it with `pin_reason`, so retention keeps the way back).
    The caller holds a backup slot of the customer's host (operations.slots).
    """
    target = StorageTarget.objects.get(name=p["target"])
    keyring = _keyring() if p["encrypt"] else None
    started = timezone.now()
    store = target.store()
    locks.start_writing(target, store, now=started)  # every object of this backup locked until the same moment
    chain = chains.decide(customer, p, target, store)
    chain.store, chain.keyring = store, keyring
    bk = Backup.objects.create(
        customer=customer, run=run, status=Backup.Status.RUNNING, scope=p["scope"], services=p["services"],
        kind=chain.kind, base=chain.base,
        compression=p["compression"], encrypted=p["encrypt"], target=target, trigger=p.get("trigger", "manual"),
        requested_by=ctx.run.requested_by, started_at=started, pinned=bool(pin_reason), pin_reason=pin_reason,
    )
    bk.prefix = f"{customer.domain}/{started:%Y%m%dT%H%M%SZ}-{bk.pk}"
    bk.save(update_fields=["prefix"])
    replicas = list(StorageTarget.objects.filter(name__in=p.get("replicas") or [], enabled=True))
    ctx.info(f"backup #{bk.pk} ({p['scope']}, {p['compression']}, "
             f"{'encrypted with key ' + keyring.current_id if keyring else 'NOT encrypted'}) "
             f"to {store.location(bk.prefix)}")
    ctx.info(f"{chain.kind} backup: {chain.reason}" if chain.kind == Backup.Kind.DIFFERENTIAL or
             p.get("kind") == "differential" else f"full backup: {chain.reason}")
    remote = None
    # A safety backup (before a restore or an upgrade) is taken because something may be wrong: a service folder
    # deleted outright is recorded as absent instead of failing it, so the restore or upgrade can go on and its
    # way back puts that state back (the folder absent again). Any other backup refuses a missing folder.
    absent: list[dict] | None = [] if p.get("trigger") in SAFETY_TRIGGERS else None
    try:
        try:
            if customer.host.is_local:
                specs = plans.plan(customer, p, chain=chain, absent=absent)
            else:  # over SSH (backups.remote): one session for the whole backup, closed below in every case
                remote_plans.refuse_redis(customer, "backup", p)  # before the host is even reached
                remote = _remote_host(ctx, customer)
                specs = remote_plans.plan(customer, p, remote)
        except (PathEscapeError, plans.sources.SourceError, SSHError) as exc:
            raise OperationError(str(exc)) from None
        for gone in absent or []:
            ctx.warning(f"service {gone['source']}: its folder {gone['path']} does not exist; this safety backup "
                        "records it as absent (no archive), and restoring this backup removes that folder again")
        if not specs and not absent:
            raise OperationError(f"nothing to back up for scope {p['scope']!r}")
        previous = (Backup.objects.filter(customer=customer, status=Backup.Status.SUCCEEDED, scope=p["scope"])
                    .order_by("-finished_at").values_list("size", flat=True).first())
        progress = _Progress(ctx, previous or 0)
        bandwidth = p["bandwidth_limit_mbps"] * 1e6 if p.get("bandwidth_limit_mbps") else None
        for spec in specs:
            for s in spec.secrets:
                ctx.add_secret(s)
        results = _write_all(ctx, bk, store, specs, keyring=keyring, bandwidth=bandwidth, progress=progress)
        written = []
        for spec in specs:  # catalogue rows in plan order, whatever lane finished first
            res, details = results[spec.name]
            written.append(BackupArtifact.objects.create(
                backup=bk, name=spec.name, kind=spec.kind, source=spec.source, size=res.size, sha256=res.sha256,
                compression=p["compression"], key_id=res.key_id, details=details,
            ))

        if run is not None:  # a safety backup inside a restore or an upgrade is one phase of that run
            ctx.phase("manifest and replicas")
        finished = timezone.now()
        manifest = _signed(ctx, _manifest(bk, customer, written, started, finished, keyring,
                                          excludes=plans.excludes_of(p), chain=chain, absent=absent))
        manifest_bytes = json.dumps(manifest, indent=2).encode()
        write_bytes(store, f"{bk.prefix}/{MANIFEST}", manifest_bytes)
        bk.status = Backup.Status.SUCCEEDED
        bk.size = sum(a.size for a in written)
        bk.finished_at = finished
        bk.manifest = manifest
        bk.save(update_fields=["status", "size", "finished_at", "manifest"])
        if locks.record(bk, target, store) and bk.locked_until:
            ctx.info(f"objects {target.lock_mode}-locked on {target.name} until {bk.locked_until:%Y-%m-%d %H:%M} UTC, "
                     f"{len(bk.versions)} version ids recorded")
            locks.extend_chain(ctx, bk, store, target)
    except BaseException as exc:
        counters.error(target, exc)  # only when a StoreError ended it
        discard(ctx, bk, store, replicas, exc)
        _notify(ctx, bk)
        raise
    finally:
        if remote is not None:
            remote.close()
    counters.written(target, bk.size + len(manifest_bytes))
    # A replica that fails does not take the restore point away: the copy is marked failed (and its partial
    # objects removed), the primary stays, and the warning reaches the log and the notification.
    for replica in replicas:
        _copy_to_replica(ctx, bk, store, replica, [a.name for a in written] + sidecars_of(written) + [MANIFEST],
                         written)
    ctx.info(f"backup #{bk.pk} complete: {len(written)} artifacts, {human_size(bk.size)}"
             + (f"; absent: {', '.join(g['source'] for g in absent)}" if absent else ""))
    _after_success(ctx, bk)
    return bk, {"backup": bk.pk, "kind": bk.kind, "base": bk.base_id, "location": store.location(bk.prefix),
                "size": bk.size,
                "artifacts": [{"name": a.name, "size": a.size, "sha256": a.sha256} for a in written],
                **({"absent": absent} if absent else {})}


def _remote_host(ctx: RunContext, customer: Customer):
    if not customer.host.enabled:  # an operator switched it off (maintenance, being retired): nothing connects
        raise OperationError(f"host {customer.host.name} is disabled: no backup of {customer} connects to it until "
                             "it is enabled again")
    remote = remote_plans.RemoteHost(customer.host)
    ctx.info(f"customer on {remote.where}: files stream from tar there over SSH, databases through forwards of "
             "that connection; compression and encryption here")
    if customer.host.host_pg_tools:
        ctx.info(f"host {customer.host.name} is set to its own database client tools: PostgreSQL is dumped by its "
                 "own pg_dump, run there in the snapshot taken here (row counts here); MySQL/MariaDB with Kasa's")
    return remote


def _write_all(ctx: RunContext, bk: Backup, store, specs, *, keyring, bandwidth, progress: _Progress) -> dict:
    """Stream every artifact, two at a time, pulling from one queue (database dumps first).

    A dump mostly waits on the database server and each tar|zstd chain leaves
    gaps (fsync, verification, start-up): two lanes keep both cores busy.
    With a bandwidth limit everything runs in one lane so the limit holds overall.
    """
    queue = sorted(specs, key=lambda s: s.kind != "database")  # long dumps start first
    results: dict = {}
    lock = threading.Lock()
    finisher = _Finisher(bk.pk, progress)
    try:
        _run_lanes(ctx, bk, store, specs, queue, results, lock, finisher, keyring=keyring, bandwidth=bandwidth,
                   progress=progress)
    finally:
        finisher.close()  # every commit/verification has ended (or the failure is known) before we go on
    return results


def _run_lanes(ctx, bk, store, specs, queue, results, lock, finisher, *, keyring, bandwidth, progress) -> None:

    def lane(name: str) -> None:
        while not progress.stop.is_set():
            with lock:
                if not queue:
                    return
                spec = queue.pop(0)
            results[spec.name] = _write_one(ctx, bk, store, spec, lane=name, keyring=keyring, bandwidth=bandwidth,
                                            progress=progress, finisher=finisher)

    if bandwidth or len(specs) < 2:
        lane("main")
        return

    errors: list[BaseException] = []

    def second_lane() -> None:
        try:
            lane("second")
        except BaseException as exc:  # handed to the main thread below
            errors.append(exc)
            progress.stop.set()
        finally:
            connection.close()  # this thread's own database connection

    thread = threading.Thread(target=second_lane, name=f"backup-{bk.pk}-lane2")
    thread.start()
    try:
        lane("first")
    except BaseException as exc:
        progress.stop.set()
        thread.join()
        if isinstance(exc, _Stopped) and errors:
            raise errors[0] from None  # the other lane failed first: report its error, not the stop
        raise
    thread.join()
    if errors:
        raise errors[0]


class _Finisher:
    """Makes artifact n durable and reads it back while artifact n+1 streams.

    fsync (or completing an upload) waits on the disk or the network, and the
    read-back is hashlib over large buffers: both release the GIL, so doing them
    here instead of between artifacts keeps both cores busy. Nothing is weaker:
    the manifest is written only after every artifact here has committed and
    matched its checksum, and a failure stops the lanes and fails the backup.
    """

    def __init__(self, backup_id: int, progress: _Progress):
        self.progress = progress
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"backup-{backup_id}-commit")
        self.futures: list[Future] = []
        self.open_writers: list = []
        self.lock = threading.Lock()

    def submit(self, writer, fn) -> None:
        with self.lock:
            self.open_writers.append(writer)

        def job():
            try:
                writer.commit()
                with self.lock:
                    self.open_writers.remove(writer)
                fn()
            except BaseException:
                self.progress.stop.set()  # the lanes stop at their next chunk
                raise
            finally:
                connection.close()  # this thread's own database connection (fn logs)

        self.futures.append(self.pool.submit(job))

    def close(self) -> None:
        """Wait for every job; abort writers that never committed; raise the first failure."""
        self.pool.shutdown(wait=True)
        with self.lock:
            for w in self.open_writers:
                w.abort()
            self.open_writers.clear()
        for f in self.futures:
            if f.exception() is not None:
                raise f.exception()


def _keys_said(details: dict) -> str:
    """A Redis snapshot's keys, as the run log says them."""
    if details.get("engine") != "redis":
        return ""
    if details.get("key_counts") is None:
        return f"; {details.get('counts_problem') or 'keys not counted'}"
    counts = details["key_counts"]
    return f", {sum(counts.values())} keys in {len(counts)} logical database(s)"


def _write_one(ctx: RunContext, bk: Backup, store, spec, *, lane: str, keyring, bandwidth, progress: _Progress,
               finisher: _Finisher):
    ctx.check_alive()
    ctx.info(f"{spec.name}: {spec.kind} {spec.source}")
    name = f"{bk.prefix}/{spec.name}"
    res = None
    try:
        with spec.opener() as (chain, details):
            ctx.info("$ " + " | ".join(" ".join(st.argv) for st in chain.stages))
            res = write_artifact(chain, store, name, keyring=keyring, bandwidth=bandwidth, commit=False,
                                 on_progress=lambda n: progress.update(lane, n, spec.name))
            for label, line in chain.stderr_lines():
                ctx.warning(f"{label}: {line}")
            _write_sidecars(ctx, bk, store, spec, details, keyring=keyring)
    except BaseException as exc:
        if res is not None and res.writer is not None:
            res.writer.abort()  # the stream was whole but its opener failed on the way out (e.g. row counts)
        if isinstance(exc, (streams.ChainError, plans.sources.SourceError)):
            raise OperationError(f"{spec.name}: {exc}") from None
        raise
    progress.artifact_done(lane, res.source_bytes)
    progress.update(lane, 0, spec.name, force=True)
    rows = details.get("row_counts")
    if outward := details.get("outward_links"):
        ctx.warning(f"{spec.name}: {outward['count']} symbolic link(s) point outside the folder "
                    f"({', '.join(outward['examples'])}{', …' if outward['count'] > len(outward['examples']) else ''})."
                    " They are backed up as they are, but a restore refuses links that leave the folder: exclude "
                    "them, or what holds them if it can be rebuilt (a virtualenv, say), in the backup policy")
    if special := details.get("unrestorable"):
        ctx.warning(f"{spec.name}: {special['count']} file(s) a restore never creates "
                    f"({', '.join(special['examples'])}{', …' if special['count'] > len(special['examples']) else ''})."
                    " They are backed up as tar writes them, but a restore refuses FIFOs, device files and paths "
                    "longer than 4096 bytes: exclude them in the backup policy")

    def verified() -> None:
        _verify_object(store, name, res.sha256, res.size)
        ctx.info(f"{spec.name}: {human_size(res.size)} stored, sha256 {res.sha256[:16]}…"
                 + (f", {len(rows)} tables" if rows is not None else "") + _keys_said(details))

    finisher.submit(res.writer, verified)
    res.writer = None
    return res, details


def _write_sidecars(ctx: RunContext, bk: Backup, store, spec, details: dict, *, keyring) -> None:
    """A service archive's file index (a full) or change list (a differential), stored, encrypted and checked
    like an artifact, named in the archive's details (backups.chains)."""
    compression = "none" if bk.compression == "none" else "gzip"  # in this process (write_small_artifact)
    for what, path in (details.pop("sidecars", None) or {}).items():
        short = plans.sidecar_name(spec.source, what, compression, bk.encrypted)
        res = write_small_artifact(store, f"{bk.prefix}/{short}", path, keyring=keyring, gzip=compression == "gzip")
        _verify_object(store, f"{bk.prefix}/{short}", res.sha256, res.size)
        details[what] = {"name": short, "size": res.size, "sha256": res.sha256, "compression": compression}
    if d := details.get("differential"):
        ctx.info(f"{spec.name}: differential on #{d['base']['backup_id']}: {d['added']} new, {d['changed']} "
                 f"changed, {d['deleted']} deleted, {d['unchanged']} unchanged ({human_size(d['bytes'])} of files)")


def sidecars_of(arts) -> list[str]:
    """Names of the file indexes and change lists beside a backup's service archives."""
    return [side["name"] for a in arts for what in ("index", "changes") if (side := (a.details or {}).get(what))]


def _keyring():

    if not settings.KASA_BACKUP_KEYS:
        raise OperationError("KASA_BACKUP_KEYS is not set: refusing to write an unencrypted backup silently")
    return KeyRing(settings.KASA_BACKUP_KEYS)


def _verify_object(store, name: str, sha256: str, size: int) -> None:
    """A copy is only trusted after it was checked where it landed.

    Remote targets (S3, SFTP) are read back in full and hashed: the bytes crossed a network and another
    system. On a local folder the file was fsynced and its sha256 computed over exactly the bytes handed to
    the kernel; reading it back right away would come from the page cache and prove nothing more, so its
    size is checked instead. (The real re-read from disk is the verification drill, which also restores.)
    """
    if store.kind == "local":
        got_size = store.size(name)
        if got_size != size:
            raise OperationError(f"{name}: stored copy is {got_size} bytes, {size} were written")
        return
    with store.open_read(name) as fh:
        got, n = streams.sha256_of(fh)
    if got != sha256 or n != size:
        raise OperationError(f"{name}: stored copy does not match what was written "
                             f"(sha256 {got[:16]}…, {n} bytes; expected {sha256[:16]}…, {size} bytes)")


def _copy_to_replica(ctx, bk: Backup, store, replica: StorageTarget, names: list[str], written) -> None:
    sums = {a.name: (a.sha256, a.size) for a in written}
    copied = 0
    try:
        rstore = replica.store()
        locks.start_writing(replica, rstore)
        for short in names:
            ctx.check_alive()
            name = f"{bk.prefix}/{short}"
            with store.open_read(name) as src:
                w = rstore.open_write(name)
                try:
                    h = streams.HashingWriter(w)
                    while chunk := src.read(streams.CHUNK):
                        h.write(chunk)
                    w.commit()
                except BaseException:
                    w.abort()
                    raise
            copied += h.size
            _verify_object(rstore, name, *sums.get(short, (h.hexdigest(), h.size)))
    except (RunLost, RunCancelled):
        raise
    except Exception as exc:
        counters.error(replica, exc)
        ctx.warning(f"replica {replica.name} failed, the primary copy is kept: {exc}")
        try:
            replica.store().delete_prefix(bk.prefix)
        except StoreLocked as locked:  # written locked before it failed: gone after the lock (purge_unlocked)
            ctx.warning(f"the partial copy on {replica.name} stays until its lock ends: {locked}")
            BackupCopy.objects.create(backup=bk, target=replica, status="failed", error=str(exc)[:2000],
                                      purge_after=locked.until)
            return
        except Exception as cleanup:
            ctx.warning(f"could not remove the partial copy on {replica.name}: {cleanup}")
        BackupCopy.objects.create(backup=bk, target=replica, status="failed", error=str(exc)[:2000])
        return
    counters.written(replica, copied)
    copy = BackupCopy.objects.create(backup=bk, target=replica, verified_at=timezone.now())
    locks.record(copy, replica, rstore)
    lock = f", {replica.lock_mode}-locked until {copy.locked_until:%Y-%m-%d %H:%M} UTC" if copy.locked_until else ""
    ctx.info(f"copied to replica {replica.name} ({rstore.location(bk.prefix)}), checksums verified{lock}")
    if copy.locked_until and bk.base_id:
        locks.extend_chain(ctx, bk, rstore, replica, copy_of_base=bk.base.copies.filter(target=replica).first())


def discard(ctx, bk: Backup, store, replicas, exc: BaseException) -> None:
    """Delete every partial artifact; the backup is failed and never offered for restore."""
    for s in [store] + [r.store() for r in replicas]:
        try:
            removed = s.delete_prefix(bk.prefix)
            if removed:
                ctx.warning(f"removed {removed} partial object(s) from {s.location(bk.prefix)}")
        except StoreLocked as locked:  # partial objects written locked: the first prune after the lock removes them
            ctx.warning(f"partial objects at {s.location(bk.prefix)} are retained by the object lock: {locked}; "
                        "the first prune after it ends removes them")
            if s is store:
                bk.purge_after = locked.until
        except Exception as cleanup_exc:  # keep the original error; say what could not be cleaned
            ctx.error(f"could not remove partial backup at {bk.prefix}: {cleanup_exc}")
    bk.status = Backup.Status.FAILED
    bk.error = str(exc)[:5000] or type(exc).__name__
    bk.finished_at = timezone.now()
    bk.save(update_fields=["status", "error", "finished_at", "purge_after"])


def _notify(ctx: RunContext, bk: Backup) -> None:
    """Email/webhook about the result; a notification problem never changes the backup's outcome."""
    try:

        backup_finished(bk.pk)
    except Exception as exc:
        ctx.warning(f"notification failed: {exc}")


def _after_success(ctx: RunContext, bk: Backup) -> None:
    _notify(ctx, bk)
    try:

        plan = prune_customer(bk.customer, via="worker")
        if plan.delete:
            ctx.info(f"retention removed {len(plan.delete)} old backup(s): {', '.join(f'#{i}' for i in plan.delete)}")
    except Exception as exc:  # retention trouble is reported, never turns a good backup into a failed one
        ctx.warning(f"retention failed: {exc}")


def abandon(run, ctx: RunContext) -> None:
    """The worker died mid-backup: delete what it wrote and fail the backup."""
    bk = Backup.objects.filter(run=run, status=Backup.Status.RUNNING).select_related("target").first()
    if bk is None:
        return
    replicas = list(StorageTarget.objects.filter(name__in=run.params.get("replicas") or []))
    discard(ctx, bk, bk.target.store(), replicas, RuntimeError(run.error or "worker died"))
    _notify(ctx, bk)


def _service_fields(details: dict) -> dict:
    fields = {"path": details.get("path")}
    for key in ("index", "changes", "differential"):  # the chain (backups.chains): backup_import rebuilds it
        if key in details:
            fields[key] = details[key]
    for key in ("outward_links", "unrestorable"):  # what a restore refuses: the backup run warned about them
        if key in details:
            fields[key] = details[key]
    return fields


def _signed(ctx: RunContext, manifest: dict) -> dict:
    """The manifest with its authentication tag (engines.manifestauth, docs/FORMAT.md): backup_import trusts
    only what Kasa wrote. Signed in its JSON form, which is exactly what a reader will parse back."""
    manifest = json.loads(json.dumps(manifest, default=str))
    if not settings.KASA_BACKUP_KEYS:
        ctx.warning(f"{MANIFEST} is NOT signed: KASA_BACKUP_KEYS is not set. backup_import accepts this backup only "
                    "with --trust-unsigned")
        return manifest
    return manifestauth.sign(manifest, manifestauth.ManifestKeys(settings.KASA_BACKUP_KEYS))


def _manifest(bk: Backup, customer: Customer, written, started, finished, keyring, *, excludes: list[str],
              chain=None, absent: list[dict] | None = None) -> dict:
    return {
        "format": "kasa-backup",
        "format_version": FORMAT_VERSION,
        "kasa_version": settings.KASA_VERSION,
        "backup_id": bk.pk,
        "customer": {"domain": customer.domain, "name": customer.name, "uuid": str(customer.uuid)},
        "scope": bk.scope,
        "kind": bk.kind,
        **({"base": {"backup_id": chain.base.pk, "prefix": chain.base.prefix,
                     "manifest_sha256": chain.base_manifest_sha256}} if chain is not None and chain.base else {}),
        "services": bk.services,
        "trigger": bk.trigger,
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "duration": (finished - started).total_seconds(),
        "component_versions": customer.versions,
        # Enough to re-create the customer on a fresh Kasa (backup_import): never a password.
        "instance": {
            "root": customer.root,
            "services": [{"name": s.name, "path": s.path, "process_manager": s.process_manager,
                          "app_name": s.app_name, "start_command": s.start_command, "stop_command": s.stop_command,
                          "health_url": s.health_url} for s in customer.services.all()],
            "databases": [{"name": d.name, "engine": d.engine, "host": d.host, "port": d.port,
                           "database": d.database, "user": d.user, "sqlite_path": d.sqlite_path,
                           **({"tls": d.tls} if d.engine == "redis" else {})}
                          for d in customer.databases.all()],
        },
        "compression": bk.compression,
        "excludes": excludes,  # left out of the service archives; a restore keeps the live ones
        "encrypted": bk.encrypted,
        "key_id": keyring.current_id if keyring else None,
        "artifacts": [
            {"name": a.name, "kind": a.kind, "source": a.source, "size": a.size, "sha256": a.sha256,
             "compression": a.compression, "encrypted": bk.encrypted, "key_id": a.key_id or None,
             **({"database": a.details} if a.kind == "database" else {}),
             **(_service_fields(a.details) if a.kind == "service" else {}),
             **({"files": a.details.get("files")} if a.kind == "config" else {})}
            for a in written
        ],
        # Service folders that did not exist when this safety backup was taken (no artifact): a restore of the
        # backup removes them again. Left out when there are none, so other manifests read as before.
        **({"absent": absent} if absent else {}),
    }
