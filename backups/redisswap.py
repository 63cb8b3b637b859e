"""The Redis side of drills and restores (engines.redisdump does the work; this module journals and logs it).

A Redis artifact is the whole server's snapshot (RDB); its manifest holds the keys of each logical database.

- **Drill**: the RDB is loaded into a scratch redis-server (engines.redisdump.ScratchRedis), which checks it as
  it loads; the keys of every logical database must match the manifest (keys with an expiry may have expired).
- **Restore in place** of the connection's logical database:
  1. staging (the services still run): the snapshot is loaded and counted in a scratch server first — the target
     is not touched before that passed; then an empty spare logical database of the target is chosen (refused,
     target untouched, when there is none) and the keys are copied into it (DUMP/RESTORE). Step `redis_spare`
     (undo: FLUSHDB of the spare, which held nothing before).
  2. swap (the services stopped): one SWAPDB exchanges the spare with the live logical database. Step
     `redis_swap` (undo: SWAPDB again).
  3. the restore holds: the spare, now the previous data, is flushed (FLUSHDB ASYNC).
A Redis that Kasa controls as a service (its RDB file replaced while it is stopped) is not built.
"""

from __future__ import annotations

import time

from engines import redisdump, unpack
from operations.context import OperationError, RunContext

from .models import Backup, BackupArtifact
from .reading import artifact_kwargs, progress

STEPS = ("redis_spare", "redis_swap")
_SWAP_UNDONE_FAILED = "redis swap undo failed"


def _databases_of(art: BackupArtifact) -> int:
    """How many logical databases the scratch server needs to load the snapshot (its highest number + 1)."""
    counts = (art.details or {}).get("key_counts") or {}
    return max([int(db) + 1 for db in counts if str(db).isdigit()] + [16])


def _check(art: BackupArtifact, got: dict[str, int]) -> str:
    """OperationError when the loaded keys differ from the manifest; else how they were checked, for the log."""
    details = art.details or {}
    expected = details.get("key_counts")
    total = sum(got.values())
    if expected is None:
        return (f"{total} keys loaded in {len(got)} logical database(s); the backup recorded no key counts "
                f"({details.get('counts_problem') or 'none'})")
    diffs = redisdump.compare_counts(expected, details.get("expiring_counts") or {}, got)
    if diffs:
        raise OperationError(f"{art.name}: the snapshot loaded differs from the manifest: " + "; ".join(diffs[:10]))
    return f"{total} keys in {len(got)} logical database(s), key counts match the manifest"


def drill(ctx: RunContext, bk: Backup, store, keyring, art: BackupArtifact) -> dict:
    try:
        with redisdump.ScratchRedis(databases=_databases_of(art)) as server, \
                unpack.open_plain(store, f"{bk.prefix}/{art.name}", on_progress=progress(ctx, f"drill {art.name}"),
                                  **artifact_kwargs(bk, art, keyring)) as chunks:
            got = server.load(chunks)
    except (redisdump.RedisError, unpack.ArtifactError) as exc:
        raise OperationError(f"{art.name}: {exc}") from None
    ctx.info(f"{art.name}: loaded into a scratch redis-server {server.version}: {_check(art, got)}")
    return {"artifact": art.name, "keys": sum(got.values()), "logical_databases": len(got)}


# --- restore ------------------------------------------------------------------------------------------------------
def stage(ctx: RunContext, plan, store, keyring, art: BackupArtifact, journal, target, stop=None) -> None:
    live = int(target.dbname or 0)
    source_db = int((art.details or {}).get("database") or live)
    name = f"{plan.backup.prefix}/{art.name}"
    ctx.info(f"{art.name}: loading the snapshot into a scratch redis-server before {target.display()} is touched")
    try:
        with redisdump.ScratchRedis(databases=_databases_of(art)) as server:
            with unpack.open_plain(store, name, on_progress=progress(ctx, f"loading {art.name}", stop),
                                   **artifact_kwargs(plan.backup, art, keyring)) as chunks:
                got = server.load(chunks)
            ctx.info(f"{art.name}: {_check(art, got)}")
            spare = _spare(target, live, server.version, _taken(plan, journal, target))
            step = journal.add({"type": "redis_spare", "engine": "redis", "db": art.source, "spare": spare,
                                "live": live, "keys": None})
            ctx.info(f"{art.name}: copying the {got.get(str(source_db), 0)} keys of logical database "
                     f"{source_db} into the empty logical database {spare} of {target.display()}")
            with server.client(source_db) as src, redisdump.connect(target, db=spare) as dst:
                moved = redisdump.copy_keys(src, dst, on_batch=_alive_every(ctx, stop))
            size = redisdump.dbsize(target, spare)
    except (redisdump.RedisError, unpack.ArtifactError) as exc:
        raise OperationError(f"{art.name}: {exc}") from None
    except redisdump.redis.RedisError as exc:
        raise OperationError(f"{art.name}: Redis: {redisdump._said(exc)}") from None
    if size != moved:
        raise OperationError(f"{art.name}: logical database {spare} holds {size} keys after {moved} were copied "
                             "into it: something else writes there")
    step["keys"] = moved
    journal.save()
    ctx.info(f"{art.name}: {moved} keys staged in logical database {spare}, swapped in once the services stop")


def _alive_every(ctx: RunContext, stop, seconds: float = 2.0):
    """A copy's per-batch callback: a cancel, a lost run or the other lane's failure stops it (asked at most every
    `seconds`: each question is a query of the control database)."""
    last = [time.monotonic()]

    def check(_restored: int) -> None:
        if stop is not None and stop.is_set():
            raise OperationError("stopped: the other lane of the restore failed")
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            ctx.check_alive()

    return check


def _taken(plan, journal, target) -> set[int]:
    """Logical databases of the same server no spare may be: the live ones of the customer's other Redis
    connections (one may be empty now), and the spares this run already chose (one may have stayed empty)."""
    taken = {int(s["spare"]) for s in journal.steps if s.get("type") == "redis_spare"}
    for db in plan.customer.databases.all():
        if db.engine == "redis" and (db.host, db.port) == (target.host, target.port) and db.database.isdigit():
            taken.add(int(db.database))
    return taken


def _spare(target, live: int, scratch_version: str, taken: set[int]) -> int:
    """The spare logical database, or OperationError (nothing touched) saying why there is none to use."""
    with redisdump.connect(target) as con:
        theirs = redisdump.server_version(con)
    if redisdump.version_of(theirs) < redisdump.version_of(scratch_version):
        raise OperationError(f"Redis {theirs} at {target.display()} cannot read the keys as this worker's "
                             f"redis-server {scratch_version} writes them (DUMP/RESTORE): restore onto Redis "
                             f"{'.'.join(map(str, redisdump.version_of(scratch_version)))} or newer; nothing was "
                             "touched")
    spare = redisdump.find_spare(target, live, taken=taken)
    if spare is None:
        raise OperationError(f"no empty logical database on {target.display()} to restore into beside "
                             f"logical database {live} (every other one holds keys): empty one, or raise "
                             "`databases` in its configuration; nothing was touched")
    return spare


def swap(ctx: RunContext, art, target, journal, staged: dict) -> None:
    spare, live = staged["spare"], staged["live"]
    try:
        if redisdump.dbsize(target, spare) != staged["keys"]:
            raise OperationError(f"database {art.source}: logical database {spare} changed since the keys were "
                                 "copied into it: something else writes there")
        step = journal.add({"type": "redis_swap", "engine": "redis", "db": art.source, "spare": spare,
                            "live": live, "keys": staged["keys"], "live_keys": redisdump.dbsize(target, live),
                            "done": False})
        with redisdump.connect(target) as con:
            con.swapdb(spare, live)
        step["done"] = True
        journal.save()
    except redisdump.RedisError as exc:
        raise OperationError(f"database {art.source}: {exc}") from None
    except redisdump.redis.RedisError as exc:
        raise OperationError(f"database {art.source}: Redis: {redisdump._said(exc)}") from None
    ctx.info(f"database {art.source}: logical database {live} swapped with {spare} (SWAPDB); the previous keys "
             f"are kept in {spare} until the restore holds")


def undo(ctx: RunContext, step: dict, target) -> None:
    if step["type"] == "redis_swap":
        try:
            _unswap(ctx, step, target)
        except Exception:
            ctx.held[(_SWAP_UNDONE_FAILED, step["db"])] = True  # the spare may hold the previous data: keep it
            raise
        return
    if ctx.held.get((_SWAP_UNDONE_FAILED, step["db"])):
        ctx.warning(f"database {step['db']}: logical database {step['spare']} is kept (the swap could not be undone)")
        return
    with redisdump.connect(target, db=step["spare"]) as con:
        con.flushdb()
    ctx.info(f"database {step['db']}: the keys copied into logical database {step['spare']} were removed")


def _unswap(ctx: RunContext, step: dict, target) -> None:
    with redisdump.connect(target) as con:
        if not step.get("done"):
            # The worker died around SWAPDB (the services were stopped: nothing else writes). The key counts on
            # each side tell whether it happened, unless both sides held as many keys.
            now = (redisdump.dbsize(target, step["live"]), redisdump.dbsize(target, step["spare"]))
            if step["keys"] == step["live_keys"] or now not in ((step["live_keys"], step["keys"]),
                                                                  (step["keys"], step["live_keys"])):
                raise OperationError(f"database {step['db']}: the run stopped around SWAPDB and the key counts "
                                     f"cannot tell whether logical databases {step['live']} and {step['spare']} "
                                     "were exchanged: an operator must look")
            if now == (step["live_keys"], step["keys"]):
                ctx.info(f"database {step['db']}: the run stopped before SWAPDB; logical database {step['live']} "
                         "is as it was")
                return
        con.swapdb(step["spare"], step["live"])
    ctx.info(f"database {step['db']}: logical database {step['live']} is back as it was (SWAPDB again)")


def finish(ctx: RunContext, step: dict, target) -> None:
    if step["type"] != "redis_swap":
        return
    with redisdump.connect(target, db=step["spare"]) as con:
        con.flushdb(asynchronous=True)
    ctx.info(f"database {step['db']}: the previous keys (logical database {step['spare']}) were removed")
