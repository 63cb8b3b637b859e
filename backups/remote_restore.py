"""A restore in place of a customer on a remote host (issue 14): the local restore's order and guarantees, with
every change made on the host.

- **Checked on the worker before anything reaches the host.** Every file artifact is read whole first (checksum,
  decryption, every tar member header: engines.unpack.verify_artifact): a corrupt, tampered or hostile archive is
  refused before the staging folder exists. Then each is read again and streamed through engines.tarcheck's
  scanner (which checks each member before passing it on) into GNU tar on the host, run as the customer's user
  as the host knows it (engines.hostrestore.TAR_LAUNCHER); the host checks the tree tar made against the
  scanner's counts (engines.treecheck, through the helper). The backup keys never leave the worker.
- **Staged beside the live folders, swapped on the host**: the staging folder `.kasa-restore-<run>` (0700, the
  login user's) and the extraction folders (the customer's user's) below the root, the swaps with
  engines.swap (renameat2 on descriptors from the root) and the log folders carried over, all run on the host
  by Kasa's own code through hosts.remote's helper.
- **Databases** (PostgreSQL, MySQL/MariaDB) come back through a forward of the session with Kasa's own client
  tools, exactly as backups.dbswap does locally (a fresh database swapped in; for a user that may not create
  databases, PostgreSQL in place in one transaction, MySQL/MariaDB through prefixed tables): dbswap's targets
  are pointed at the forward for this run (backups.remote_parts). SQLite files are streamed into a private
  folder on the host, written beside the live file there (its owner and mode, rows counted) and swapped in on
  the host (engines.dbrestore_sqlite through the helper).
- **Release links**: a service kept behind one (an upgraded service) gets its link back where the backup says,
  made and exchanged on the host, journalled there like every swap (backups.remote_parts.relink).
- **Services**: PM2 on the host (its own `pm2`, Host.tools or KASA_REMOTE_PM2), run by engines.procman there
  (engines.hostrestore.services), every PM2 call as the customer's user; health URLs are asked on the host (a
  URL names the service as its host sees it: hosts.remote.RemoteHost.check_health), as a remote check does.
- **The journal** is the run's (local file, run result: operations.journal) *and* a copy on the host's disk
  (engines.hostrestore.journal_write), written before each change. A failure undoes it through the same
  session; a host lost mid-way fails the run naming the host and leaves its journal there, replayed once the
  host answers again (backups.host_journals: its probe, the reaper for a dead worker, or the customer's next
  restore, which replays it before touching anything).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from customers.models import Customer
from engines import dbrestore, hostrestore, hostside, procman, ssh, unpack
from engines.humanize import human_duration, human_size
from engines.plainread import drain, last_line, write_all
from engines.proc import kill_group as proc_kill
from hosts.remote import RemoteError, RemoteHost
from operations.context import OperationError, RunCancelled, RunContext, RunLost

from . import dbswap, host_journals, remote_parts, restore_files
from .host_journals import host_journal_key
from .reading import artifact_kwargs, keyring_for, progress, store_of
from .remote import host_facts

MANAGERS = ("pm2", "command", "none")  # what a remote restore stops and starts on the host (systemd: not yet)
DISK_MARGIN = 256 * 1024 * 1024  # as backups.restore's: room left on the host's disk after staging


def is_remote(customer: Customer) -> bool:
    return not customer.host.is_local


class Journal:
    """The restore's journal (backups.restore.Journal) with a copy on the host's disk, written before the run's."""

    def __init__(self, local, remote: RemoteHost, run_id: int, root: str):
        self.local, self.remote, self.run_id, self.root = local, remote, run_id, root
        self.key = host_journal_key(remote.host.name)
        self.path = hostrestore.journal_path(remote.host.root(), run_id)
        self.steps = local.steps

    def save(self) -> None:
        self.remote.call("engines.hostrestore.journal_write", self.remote.host.root(), self.run_id,
                         {"run": self.run_id, "root": self.root, "steps": self.local.steps}, self.key)
        self.local.save()
        self.steps = self.local.steps

    def add(self, step: dict) -> dict:
        with self.local.lock:
            self.local.steps.append(step)
            self.save()
        return step

    def refuse(self, step: dict, reason) -> None:
        step["refused"] = str(reason)[:500]
        self.save()

    def clear(self) -> None:
        self.local.steps = []
        self.save()
        self.remote.call("engines.hostrestore.journal_remove", self.remote.host.root(), self.run_id)

    def touched_live(self) -> bool:
        return self.local.touched_live()

    @property
    def services_down(self) -> str:
        return self.local.services_down

    @services_down.setter
    def services_down(self, value: str) -> None:
        self.local.services_down = value


@dataclass
class Steps:
    """What this module, backups.move and backups.move_local share with backups.restore (which calls them: no
    import back, no cycle)."""

    journal: type  # backups.restore.Journal
    phases: Callable
    safety_backup: Callable
    short: Callable
    record_versions: Callable
    touched_specs: Callable
    # the local restore's own building blocks, for a move onto `local` (backups.move_local)
    stage: Callable | None = None
    restore_file_databases: Callable | None = None
    check_disk: Callable | None = None
    cleanup: Callable | None = None


def restore(ctx: RunContext, plan, local: Steps) -> dict:
    """backups.restore's in-place path for a remote customer; `plan` from its _plan."""
    p = ctx.run.params
    started = time.monotonic()
    customer = plan.customer
    host = customer.host
    if plan.clone:
        raise OperationError(f"refused before touching anything: {customer} lives on host {host.name}, and a "
                             "restore into a copy (--to-root, --to-database) on a remote host is not built yet")
    if not host.enabled:
        raise OperationError(f"host {host.name} is disabled: no restore of {customer} connects to it")
    _refuse_unbuilt(customer, plan)
    if not customer.run_as:
        raise OperationError(f"customer {customer} has no run_as user: a restore on host {host.name} gives the "
                             "restored files to the customer's user there; nothing was touched")
    keyring = keyring_for(plan.backup)
    store = store_of(plan.backup)
    try:
        remote = RemoteHost(host)
    except Exception as exc:  # engines.ssh: no trusted key, no key
        raise OperationError(str(exc)) from None
    with remote:
        try:
            facts = host_facts(remote, customer)
            who = remote.call("engines.hostrestore.identity", customer.run_as)
        except RemoteError as exc:
            raise OperationError(f"{exc}; nothing was touched") from None
        if not isinstance(who, dict) or not all(isinstance(who.get(k), int) for k in ("uid", "gid")) or \
                who["uid"] == 0:
            raise OperationError(f"{remote.where} answered a user that is not one: not trusted; nothing was touched")
        root = facts["root"]
        plan.root = type(plan.root)(root)
        ctx.info(f"customer on {remote.where}: the archives are checked here, unpacked there as {customer.run_as} "
                 f"(uid {who['uid']} on {host.name}), swapped there; databases through forwards")
        remote_parts.hold_forwarded_targets(ctx, remote, customer)
        try:
            host_journals.replay_before(ctx, remote, customer)
        except RemoteError as exc:
            raise OperationError(f"{exc}; nothing was touched") from None
        journal = Journal(local.journal(ctx), remote, ctx.run.pk, root)
        safety = None
        wants_safety = p.get("safety_backup", True)
        ctx.phases(*local.phases(False, wants_safety, late=False))
        try:
            staging = _stage(ctx, plan, remote, store, keyring, journal, who)
            late = dbswap.in_place(journal)
            if late:
                ctx.phases(*local.phases(False, wants_safety, late=True))
            if wants_safety and not late:
                safety = local.safety_backup(ctx, plan)
            safety = _swap_in(ctx, plan, remote, staging, journal, local, facts, in_place=late) or safety
        except BaseException as exc:
            touched = journal.touched_live()
            undone = _undo(ctx, plan, remote, journal, local)
            if isinstance(exc, (RunLost, RunCancelled)):
                raise
            what = "the pre-restore state was put back" if touched else "nothing was touched"
            if journal.services_down:
                what += (f", but the services did not come back up ({journal.services_down}): an operator must "
                         "look")
            if not undone:
                raise OperationError(
                    f"restore failed: {local.short(exc)}; ROLLBACK INCOMPLETE on host {host.name} "
                    f"({remote.where}): the journal of what changed stays there ({journal.path}) for the way "
                    f"back; an operator must look at {root}") from None
            # the error names the host: a database's or service's own message names only what it was given
            raise OperationError(f"restore on host {host.name} failed: {local.short(exc)}; {what}",
                                 result={"safety_backup": safety}) from None
        with ctx.uninterruptible():
            host_journals.cleanup(ctx, remote, journal, root)
            local.record_versions(ctx, plan)
    seconds = time.monotonic() - started
    ctx.info(f"restore of backup #{plan.backup.pk} on host {host.name} complete in {human_duration(seconds)}"
             + (f" (safety backup #{safety})" if safety else ""))
    return {"backup": plan.backup.pk, "customer": customer.domain, "clone": False, "host": host.name,
            "root": root, "artifacts": [a.name for a in plan.artifacts], "safety_backup": safety,
            "databases": {}, "seconds": round(seconds, 2)}


def _refuse_unbuilt(customer: Customer, plan) -> None:
    for s in customer.services.all():
        if s.process_manager not in MANAGERS:
            raise OperationError(f"refused before touching anything: service {s.name} of {customer} is run by "
                                 f"{s.process_manager}; on host {customer.host.name} a restore stops and starts "
                                 f"PM2 and start-command services only (not built yet for {s.process_manager})")
    engines = {d.name: d.engine for d in customer.databases.all()}
    for art in plan.artifacts:
        if art.kind == "database" and engines.get(art.source) not in ("postgresql", "mysql", "sqlite"):
            raise OperationError(f"refused before touching anything: database {art.source} "
                                 f"({engines.get(art.source) or 'unknown'}) of {customer} on host "
                                 f"{customer.host.name}: a remote restore brings back PostgreSQL, MySQL/MariaDB "
                                 "and SQLite databases only; choose the artifacts with --only")


# --- staging ---------------------------------------------------------------------------------------------------
def _stage(ctx: RunContext, plan, remote: RemoteHost, store, keyring, journal: Journal, who: dict) -> str | None:
    files = [a for a in plan.artifacts if a.kind != "database"]
    dbs = [a for a in plan.artifacts if a.kind == "database"]
    ctx.phase("verify and unpack")
    listings = {}
    for art in files:  # every member checked here before a byte of any archive reaches the host
        ctx.check_alive()
        try:
            listings[art.name] = unpack.verify_artifact(store, f"{plan.backup.prefix}/{art.name}", tar=True,
                                                        on_progress=progress(ctx, f"verifying {art.name}"),
                                                        **artifact_kwargs(plan.backup, art, keyring))
        except unpack.ArtifactError as exc:
            raise OperationError(f"refused on the worker, nothing reached host {remote.host.name}: {exc}") from None
        ctx.info(f"{art.name}: checksum, decryption and {listings[art.name].members} members verified on the worker")
    staging = None
    root = str(plan.root)
    if files:
        need = sum(a.size for a in files)
        free = remote.call("engines.hostrestore.free_bytes", root)
        if not isinstance(free, int) or free < need + DISK_MARGIN:
            raise OperationError(f"not enough free disk on {remote.host.name} under {root}: staging needs at least "
                                 f"{human_size(need)} plus a {human_size(DISK_MARGIN)} margin, "
                                 f"{human_size(free if isinstance(free, int) else 0)} free; nothing was touched")
        staging = str(restore_files.staging_dir(plan.root, ctx.run.pk))
        journal.add({"type": "staging", "path": staging})
        remote.call("engines.hostrestore.make_staging", root, staging)
        for art in files:
            ctx.check_alive()
            dest = os.path.join(staging, art.name.split(".", 1)[0])
            listing = _send(ctx, plan, remote, store, keyring, art, dest, who)
            for line in unpack.setid_warnings(art.name, listing.setid):
                ctx.warning(line)
            ctx.info(f"{art.name}: {listing.files} files ({human_size(listing.total_size)}) unpacked into staging on "
                     f"{remote.host.name} as {who['user']}")
    for art in dbs:
        ctx.check_alive()
        if _sqlite(art):  # restored on the host once the folders are in place; read whole now
            try:
                unpack.verify_artifact(store, f"{plan.backup.prefix}/{art.name}", tar=False,
                                       **artifact_kwargs(plan.backup, art, keyring))
            except unpack.ArtifactError as exc:
                raise OperationError(f"refused: {exc}") from None
            ctx.info(f"{art.name}: checksum and decryption verified on the worker")
        else:
            dbswap.restore_fresh(ctx, plan, store, keyring, art, journal)
    return staging


def _send(ctx: RunContext, plan, remote: RemoteHost, store, keyring, art, dest: str, who: dict):
    """One archive through the scanner into tar on the host (as the customer's user there); the tree checked
    there after tar."""
    root = str(plan.root)
    name = f"{plan.backup.prefix}/{art.name}"
    remote.call("engines.hostrestore.prepare_dest", root, dest, who["uid"], who["gid"])
    argv = remote.session.argv(["python3", "-I", "-c", hostrestore.TAR_LAUNCHER, root, os.path.relpath(dest, root),
                                str(who["uid"]), str(who["gid"]), *unpack._tar_argv()])
    scanner = unpack.TarScanner(name, unpack.Limits())

    def feed(write, close):
        with unpack.open_plain(store, name, on_progress=progress(ctx, f"unpacking {art.name}"),
                               **artifact_kwargs(plan.backup, art, keyring)) as chunks:
            for chunk in chunks:
                if scanner.ended:
                    continue
                for piece in scanner.feed(chunk) or ():
                    write(piece)
                if scanner.ended:
                    close()
            return scanner.finish()

    listing = _pipe_to_host(remote, argv, art, dest, feed)
    counts = {k: getattr(listing, k) for k in ("members", "files", "dirs", "symlinks", "hardlinks", "total_size")}
    try:
        remote.call("engines.hostrestore.check_tree", root, dest, counts, who["uid"])
    except RemoteError as exc:
        raise OperationError(f"{art.name}: the tree tar made on {remote.host.name} was refused: {exc}") from None
    return listing


def _pipe_to_host(remote: RemoteHost, argv: list[str], art, dest: str, feed):
    """Run `argv` (through the session) with `feed(write, close)` writing its stdin; feed's result. A connection
    lost on the way is a RemoteError naming the host, a failing command or a refused artifact an OperationError;
    the command is killed whatever else ends it early."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, bufsize=0)
    tail: collections.deque = collections.deque(maxlen=20)
    reader = threading.Thread(target=drain, args=(proc.stderr, tail), daemon=True)
    reader.start()
    try:
        result = feed(lambda piece: write_all(proc.stdin.fileno(), piece), proc.stdin.close)
        if not proc.stdin.closed:
            proc.stdin.close()
        code = proc.wait(timeout=600)
        reader.join(timeout=10)
    except BrokenPipeError:
        code = proc.wait(timeout=60)
        reader.join(timeout=10)
        _lost_or_failed(remote, art, dest, code, tail)
        raise
    except unpack.ArtifactError as exc:
        proc_kill(proc)
        raise OperationError(f"{art.name}: {exc}") from None
    except BaseException:
        proc_kill(proc)
        raise
    if code != 0:
        _lost_or_failed(remote, art, dest, code, tail)
    return result


def _lost_or_failed(remote: RemoteHost, art, dest: str, code, tail) -> None:
    if code == 255:
        try:
            remote.session.check(255, "\n".join(tail))
        except ssh.SSHError as exc:
            raise RemoteError(str(exc)) from None
    raise OperationError(f"{art.name}: tar failed extracting into {dest} on {remote.host.name} (exit code {code}"
                         f"{': ' + last_line(tail) if last_line(tail) else ''})")


# --- SQLite, on the host -----------------------------------------------------------------------------------------
def _sqlite(art) -> bool:
    return art.kind == "database" and (art.details or {}).get("engine") == "sqlite"


def _sqlite_in(ctx: RunContext, plan, remote: RemoteHost, art, live: str, journal: Journal) -> None:
    """The file streamed into a private folder on the host (the login user's, 0700), written beside the live one
    with its owner and mode and its rows counted there, then swapped in (engines.dbrestore_sqlite on the host);
    journalled as backups.dbswap's db_fresh / db_swap steps, marked `host`."""
    root, tag = str(plan.root), f"r{ctx.run.pk}"
    folder = remote.call("engines.hostside.private_copy_dir")
    if not isinstance(folder, str) or not os.path.isabs(folder) or ".." in folder.split("/") or \
            not os.path.basename(folder).startswith(hostside.COPY_PREFIX):
        raise RemoteError(f"{remote.where} answered a temporary folder that is not one: not trusted")
    try:
        copy = os.path.join(folder, "restore.sqlite3")
        argv = remote.session.argv(["dd", f"of={copy}", "conv=excl", "oflag=nofollow", "bs=1M", "status=none"])

        def feed(write, close):
            with unpack.open_plain(store_of(plan.backup), f"{plan.backup.prefix}/{art.name}",
                                   on_progress=progress(ctx, f"restoring {art.name}"),
                                   **artifact_kwargs(plan.backup, art, keyring_for(plan.backup))) as chunks:
                for chunk in chunks:
                    write(chunk)

        _pipe_to_host(remote, argv, art, copy, feed)
        step = journal.add({"type": "db_fresh", "engine": "sqlite", "db": art.source, "new": None, "live": live,
                            "host": True})
        answer = remote.call("engines.hostrestore.sqlite_fresh", live, copy, tag, root)
    finally:
        with contextlib.suppress(RemoteError):
            remote.call("engines.hostside.remove_copy_dir", folder)
    if not (isinstance(answer, list) and len(answer) == 2 and isinstance(answer[0], str) and
            isinstance(answer[1], dict)):
        raise RemoteError(f"{remote.where} answered something that is not a restored SQLite file: not trusted")
    new, counts = answer
    if os.path.dirname(new) != os.path.dirname(live):
        raise RemoteError(f"{remote.where} answered a restored SQLite file outside {os.path.dirname(live)}: not "
                          "trusted")
    step["new"] = new
    journal.save()
    expected = (art.details or {}).get("row_counts")
    if expected is not None:
        diffs = dbrestore.compare_counts(expected, counts)
        if diffs:
            raise OperationError(f"{art.name}: the restored database does not match the manifest: "
                                 + "; ".join(diffs[:10]))
    swap = journal.add({"type": "db_swap", "engine": "sqlite", "db": art.source, "new": new, "old": None,
                        "done": False, "live": live, "host": True})
    old = remote.call("engines.hostrestore.sqlite_swap", live, new, tag, root)
    if old is not None and (not isinstance(old, str) or os.path.dirname(old) != os.path.dirname(live)):
        raise RemoteError(f"{remote.where} answered a previous SQLite file outside {os.path.dirname(live)}: not "
                          "trusted")
    swap.update(old=old, done=True)
    journal.save()
    ctx.info(f"database {art.source}: {len(counts)} tables, {sum(counts.values())} rows, row counts match the "
             f"manifest; swapped in on {remote.host.name} ({live})")


# --- swap ------------------------------------------------------------------------------------------------------
def _specs(plan, local: Steps) -> list[procman.ServiceSpec]:
    """The touched services as the host runs them (identity resolved there, see engines.hostrestore.services)."""
    return local.touched_specs(plan, host_journals.service_specs(plan.customer, str(plan.root)))


def _services(ctx: RunContext, remote: RemoteHost, plan, specs, action: str) -> None:
    host_journals.services(ctx, remote, plan.customer.run_as, specs, action)


def _swap_in(ctx: RunContext, plan, remote: RemoteHost, staging: str | None, journal: Journal, local: Steps,
             facts: dict, in_place=False) -> int | None:
    from customers import runtime

    specs = _specs(plan, local)
    healthy_before = runtime.healthy_now(specs, checker=remote.check_health)
    ctx.phase("stop")
    ctx.info(f"stopping {len(specs)} service(s) on {remote.host.name}: {', '.join(s.name for s in specs) or 'none'}")
    journal.add({"type": "services_stopped", "healthy_before": healthy_before, "services": [s.name for s in specs]})
    _services(ctx, remote, plan, specs, "stop")
    way_back = dbswap.way_back(ctx, plan, local.safety_backup) if in_place else None
    ctx.phase("swap")
    if staging is not None:
        _swap_files(ctx, plan, remote, staging, journal)
    for art in plan.artifacts:  # inside the customer's folders: after they are in place (as locally)
        if _sqlite(art):
            _sqlite_in(ctx, plan, remote, art, facts["sqlite"][art.source], journal)
    dbswap.swap_all(ctx, dataclasses.replace(plan, artifacts=[a for a in plan.artifacts if not _sqlite(a)]), journal,
                    way_back=way_back)
    ctx.phase("start")
    ctx.info(f"starting {len(specs)} service(s) on {remote.host.name}")
    _services(ctx, remote, plan, specs, "start")
    ctx.phase("health")
    runtime.check_health(ctx, specs, checker=remote.check_health)
    return way_back


def _swap_files(ctx: RunContext, plan, remote: RemoteHost, staging: str, journal: Journal) -> None:
    from engines import paths, sources

    root = str(plan.root)
    excludes = (plan.backup.manifest or {}).get("excludes", list(sources.DEFAULT_EXCLUDES))
    for kind in ("service", "config"):
        for art in plan.artifacts:
            if art.kind != kind:
                continue
            unpacked = os.path.join(staging, art.name.split(".", 1)[0])
            if kind == "service":
                rel = paths.relative_inside((art.details or {}).get("path") or art.source, what="service path")
                pairs = [(os.path.join(root, rel), os.path.join(unpacked, rel))]
            else:
                pairs = []
                for rel in (art.details or {}).get("files") or []:
                    rel = paths.relative_inside(rel, what="config file")
                    if remote.call("engines.hostrestore.lexists", root, os.path.join(unpacked, rel)):
                        pairs.append((os.path.join(root, rel), os.path.join(unpacked, rel)))
            for live, staged in pairs:
                parent = os.path.dirname(live)
                if not remote.call("engines.hostrestore.lexists", root, parent):
                    remote.call("engines.hostrestore.makedirs", root, parent)
                for src, dst in remote.call("engines.hostrestore.carry_candidates", root, live, staged, excludes):
                    journal.add({"type": "carry", "from": src, "to": dst})
                    remote.call("engines.hostrestore.rename", root, src, dst)
                step = journal.add({"type": "files", **remote.call("engines.swap.plan", live, staged, root=root)})
                remote.call("engines.swap.apply", step, root=root)
                ctx.info(f"swapped in {os.path.relpath(live, root)} on {remote.host.name}")
        if kind == "service":
            remote_parts.relink(ctx, plan, remote, journal)


# --- undo and clean up (backups.host_journals: shared with the replay of a journal a lost host kept) -------
def _undo(ctx: RunContext, plan, remote: RemoteHost, journal: Journal, local: Steps) -> bool:
    return host_journals.undo(ctx, remote, journal, plan.customer, str(plan.root), _specs(plan, local))
