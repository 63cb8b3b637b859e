"""Which artifacts a backup holds, and how to open the process chain of each."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from django.conf import settings

from core.secrets import reveal
from customers.models import Customer, DatabaseConnection
from engines import credentials, fileindex, redisdump, sources
from engines.dbbase import DbTarget
from engines.streams import ProcessChain, Stage
from engines.unpack import open_plain

from .models import BackupArtifact

ENCRYPTED_SUFFIX = ".enc"


@dataclass
class ArtifactSpec:
    name: str
    kind: str  # service | config | database
    source: str
    opener: Callable  # () -> context manager yielding (ProcessChain, details dict)
    secrets: list[str] = field(default_factory=list)


OUTWARD_EXAMPLES = 5  # links named in the run's warning and the manifest; the count covers them all


def note_refusals(details: dict, found: dict) -> None:
    """Put what sources.restore_refusals found in an artifact's details: outward_links (symlinks) and unrestorable
    (FIFOs, devices, overlong paths), each {count, examples}; the run warns, a restore refuses the artifact."""
    links, special = found.get("links") or [], found.get("special") or []
    if links:
        details["outward_links"] = {"count": len(links), "examples": [
            f"{_text(p)} -> {_text(t)}" for p, t in links[:OUTWARD_EXAMPLES]]}
    if special:
        details["unrestorable"] = {"count": len(special), "examples": [
            f"{_text(p)} ({why[:100]})" for p, why in special[:OUTWARD_EXAMPLES]]}


def _text(name: str) -> str:
    """A file name as the catalogue can store it (JSON text): bytes that are not UTF-8 shown as \\udcXX."""
    return name[:300].encode("utf-8", "backslashreplace").decode("utf-8")


def restore_refusal(details: dict | None) -> str:
    """Why a restore refuses this artifact as it is (the backup run warned), or ""."""
    details = details or {}
    parts = []
    if links := details.get("outward_links"):
        parts.append(f"{links['count']} symbolic link(s) pointing outside its folder ({', '.join(links['examples'])})")
    if special := details.get("unrestorable"):
        parts.append(f"{special['count']} file(s) a restore never creates ({', '.join(special['examples'])})")
    return " and ".join(parts)


def _name(base: str, compression: str, encrypted: bool) -> str:
    return base + sources.COMPRESSIONS[compression] + (ENCRYPTED_SUFFIX if encrypted else "")


def _compressor(compression: str):
    level = settings.KASA_ZSTD_LEVEL if compression == "zstd" else settings.KASA_GZIP_LEVEL
    return sources.compressor_stage(compression, level=level)


def _chain(stages: list[Stage | None], **kw) -> ProcessChain:
    return ProcessChain([s for s in stages if s is not None], **kw)


def excludes_of(params: dict) -> list[str]:
    """tar --exclude patterns of a backup: log folders unless asked for, plus the policy's own."""
    excludes = [] if params.get("include_logs") else list(sources.DEFAULT_EXCLUDES)
    return excludes + list(params.get("excludes") or [])


def plan(customer: Customer, params: dict, chain=None, absent: list[dict] | None = None) -> list[ArtifactSpec]:
    """The artifacts of one backup. `chain` (backups.chains.Decision, with the store and key ring to read the full's
    file indexes): a differential's service archives hold only what changed since that full.

    A service whose folder does not exist is refused (SourceError): a backup that quietly left a service out would
    hide the loss of its files. Only a safety backup passes `absent` (a list): such a service is then left out and
    {"source", "path"} appended to it, so that the way back records the folder as absent (docs/FORMAT.md)."""
    scope, compression, encrypted = params["scope"], params["compression"], params["encrypt"]
    root = str(customer.root_path())
    chosen = params.get("services") or []
    services = [s for s in customer.services.all() if not chosen or s.name in chosen]
    excludes = excludes_of(params)
    specs: list[ArtifactSpec] = []

    big = _big_trees(customer) if scope in ("full", "files") else set()
    if scope in ("full", "files"):
        for svc in services:
            folder = str(svc.folder())
            rel = os.path.relpath(folder, root)
            if not os.path.lexists(folder):
                if absent is None:
                    raise sources.SourceError(
                        f"the folder of service {svc.name}, {rel}, does not exist in {root}: nothing was backed up "
                        "(a backup never leaves a service out silently). Restore it, or remove the service from "
                        "the customer if it is gone for good")
                absent.append({"source": svc.name, "path": rel})
                continue
            details = {"path": rel}
            declared = os.path.join(root, svc.path or ".")
            if os.path.islink(declared):  # an upgraded service: its path is a symlink to releases/<v>/<name>
                details["link"] = {"path": os.path.relpath(declared, root), "target": os.readlink(declared)}

            base_art = chain.indexes.get(svc.name) if chain is not None and chain.base is not None else None
            if base_art is not None and (base_art.details or {}).get("path") != rel:
                base_art = None  # the service moved (an upgrade's release link): its full archive is of another folder

            @contextlib.contextmanager
            def open_service(rel=rel, details=details, base_art=base_art, big_tree=svc.name in big):
                # What a restore would refuse, listed while tar streams rather than before it starts.
                pool = ThreadPoolExecutor(1, thread_name_prefix="kasa-links")
                listing = pool.submit(sources.restore_refusals, root, rel, excludes=excludes)
                pool.shutdown(wait=False)
                with _file_lists(root, rel, excludes, details, chain, base_art, big_tree) as tar:
                    yield _chain([tar, _compressor(compression)]), details
                note_refusals(details, listing.result())

            specs.append(ArtifactSpec(_name(f"{svc.name}.tar", compression, encrypted), "service", svc.name,
                                      open_service))

    if scope in ("full", "config"):
        members = sources.config_members(root, [s.path for s in customer.services.all()],
                                         params.get("config_paths") or [])
        if members:
            @contextlib.contextmanager
            def open_config(members=members):
                yield _chain([sources.tar_stage(root, members, no_recursion=True),
                              _compressor(compression)]), {"files": members}

            specs.append(ArtifactSpec(_name("config.tar", compression, encrypted), "config", "config", open_config))

    if scope in ("full", "database") and not chosen:
        for db in customer.databases.all():
            specs.append(_database_spec(db, compression, encrypted))
    return specs


BIG_INDEX = 64 * 1024  # stored bytes of a file index (≈ 5,000 paths): above, the next walk runs in a child process


def _big_trees(customer: Customer) -> set[str]:
    """Services whose last file index was large: their walks run in a child process (engines.fileindex), on a
    core of their own; a small folder is walked in the worker, where starting a process would cost more."""
    sizes: dict[str, int] = {}
    for source, details in (BackupArtifact.objects.filter(backup__customer=customer, kind="service",
                                                          backup__status="succeeded")
                            .order_by("-pk").values_list("source", "details")[:50]):
        if source not in sizes and (details or {}).get("index"):
            sizes[source] = details["index"]["size"]
    return {source for source, size in sizes.items() if size > BIG_INDEX}


@contextlib.contextmanager
def _file_lists(root: str, rel: str, excludes: list[str], details: dict, chain, base_art, big: bool = False):
    """The tar stage of a service archive, and the file list it needs (a 0600 file in a private scratch folder,
    removed after): for a full, the folder's file index (written before tar reads a byte, so a file changed
    while tar runs is newer than the index says and goes into the next differential); for a differential, the
    member and change lists from the full's index and a walk of the folder (engines.fileindex).
    `details["sidecars"]` names the lists that backups.operations stores beside the archive."""
    settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.KASA_SCRATCH_DIR, prefix="filelist-") as tmp:
        if base_art is None:
            index = os.path.join(tmp, "index")
            try:
                if big:
                    fileindex.write_index_file(root, rel, index, excludes=excludes)
                else:
                    with open(index, "wb", buffering=1 << 20) as out:
                        for rec in fileindex.index_records(fileindex.walk(root, rel, excludes=excludes)):
                            out.write(rec)
            except OSError as exc:
                raise sources.SourceError(f"the file index of {rel}: {exc}") from None
            details["sidecars"] = {"index": index}
            yield sources.tar_stage(root, [rel], excludes=excludes, sort=True)
            return
        base, idx = chain.base, base_art.details["index"]
        members, changes = os.path.join(tmp, "members"), os.path.join(tmp, "changes")
        with open_plain(chain.store, f"{base.prefix}/{idx['name']}", sha256=idx["sha256"], size=idx["size"],
                        encrypted=base.encrypted, keyring=chain.keyring,
                        compression=idx.get("compression", base_art.compression)) as chunks:
            try:
                if big or idx["size"] > BIG_INDEX:
                    counts = fileindex.write_differential_files(root, rel, chunks, members, changes,
                                                                excludes=excludes)
                else:
                    with open(members, "wb", buffering=1 << 20) as m, open(changes, "wb", buffering=1 << 20) as c:
                        counts = fileindex.write_differential(fileindex.read_index(chunks), fileindex.walk(
                            root, rel, excludes=excludes), m, c)
            except fileindex.IndexError_ as exc:
                raise sources.SourceError(f"the file index of full backup #{base.pk} is unusable: {exc}") from None
            except OSError as exc:
                raise sources.SourceError(f"the differential of {rel}: {exc}") from None
        details["differential"] = {
            "base": {"backup_id": base.pk, "prefix": base.prefix, "name": base_art.name, "sha256": base_art.sha256,
                     "size": base_art.size, "compression": base_art.compression},
            "added": counts.added, "changed": counts.changed, "deleted": counts.deleted, "bytes": counts.bytes,
            "unchanged": counts.unchanged,
        }
        details["sidecars"] = {"changes": changes}
        yield sources.tar_stage(root, [], excludes=excludes, no_recursion=True, files_from=members)


def sidecar_name(source: str, what: str, compression: str, encrypted: bool) -> str:
    """The object beside a service archive that holds its file index or change list."""
    return _name(f"{source}.{what}", compression, encrypted)


def _database_spec(db: DatabaseConnection, compression: str, encrypted: bool) -> ArtifactSpec:
    comp = _compressor(compression)
    if db.engine == DatabaseConnection.Engine.POSTGRESQL:
        password = reveal(db.password)

        @contextlib.contextmanager
        def open_pg():
            with sources.pg_snapshot(host=db.host, port=db.port, user=db.user, password=password,
                                     dbname=db.database) as snap:
                pg_dump, client = sources.pg_tool_for(snap.server_major)
                with credentials.pg_env(host=db.host, port=db.port, user=db.user, password=password,
                                    dbname=db.database) as env:
                    stage = sources.pg_dump_stage(pg_dump, dbname=db.database, snapshot=snap.snapshot, env=env)
                    yield _chain([stage, comp]), {
                        "engine": "postgresql", "database": db.database, "format": "pg_dump custom",
                        "server_version": snap.server_version, "client_version": client,
                        "row_counts": snap.row_counts,
                    }

        return ArtifactSpec(_name(f"db-{db.name}.pgdump", compression, encrypted), "database", db.name, open_pg,
                            secrets=[password])

    if db.engine == DatabaseConnection.Engine.MYSQL:
        password = reveal(db.password)

        @contextlib.contextmanager
        def open_mysql():
            settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
            with credentials.mysql_defaults_file(host=db.host, port=db.port, user=db.user, password=password) as cnf, \
                    tempfile.TemporaryDirectory(dir=settings.KASA_SCRATCH_DIR, prefix="rowcount-") as tmp:
                version = sources.mysql_query(cnf, db.database, "SELECT VERSION()")[0][0]
                stage = sources.mysql_dump_stage(cnf, db.database)
                # Rows are counted in the dump as it streams (a separate COUNT(*) cannot see the dump's snapshot)
                counts_path = os.path.join(tmp, "counts.json")
                details = {"engine": "mysql", "database": db.database, "format": "sql", "server_version": version,
                           "client_version": sources.client_version_of(stage.argv[0]), "row_counts": None}
                yield _chain([stage, sources.mysql_count_stage(counts_path), comp]), details
                details["row_counts"] = sources.read_counts(counts_path)

        return ArtifactSpec(_name(f"db-{db.name}.sql", compression, encrypted), "database", db.name, open_mysql,
                            secrets=[password])

    if db.engine == DatabaseConnection.Engine.REDIS:
        return _redis_spec(db, comp, compression, encrypted)

    @contextlib.contextmanager
    def open_sqlite():
        settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=settings.KASA_SCRATCH_DIR, prefix="sqlite-") as tmp:
            copy = os.path.join(tmp, "copy.sqlite3")
            counts = sources.sqlite_online_copy(str(db.sqlite_file()), copy)
            stages = [comp or Stage(["cat"], name="cat")]
            yield _chain(stages, stdin_path=copy), {
                "engine": "sqlite", "path": db.sqlite_path, "format": "sqlite3 file",
                "server_version": sources.sqlite_version(), "row_counts": counts,
            }

    return ArtifactSpec(_name(f"db-{db.name}.sqlite3", compression, encrypted), "database", db.name, open_sqlite)


def _redis_spec(db: DatabaseConnection, comp: Stage | None, compression: str, encrypted: bool) -> ArtifactSpec:
    """The whole server's snapshot (Redis cannot snapshot one logical database), its keys counted per logical
    database as it streams (engines/rdbstream.py): a restore brings back the connection's own logical database."""
    target = DbTarget(engine="redis", host=db.host, port=db.port or 6379, user=db.user, password=reveal(db.password),
                      dbname=db.database or "0", tls=db.tls, tls_ca=settings.KASA_REDIS_CA_FILE)

    @contextlib.contextmanager
    def open_redis():
        settings.KASA_SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=settings.KASA_SCRATCH_DIR, prefix="rdbcount-") as tmp:
            counts_path = os.path.join(tmp, "counts.json")
            details = {"engine": "redis", "database": db.database or "0", "format": "rdb", "tls": db.tls,
                       "server_version": None, "rdb_version": None, "key_counts": None, "expiring_counts": None}
            yield _chain([redisdump.snapshot_stage(target, counts_path), comp]), details
            try:
                details.update(redisdump.read_counts(counts_path))
            except redisdump.RedisError as exc:
                raise sources.SourceError(str(exc)) from None

    return ArtifactSpec(_name(f"db-{db.name}.rdb", compression, encrypted), "database", db.name, open_redis,
                        secrets=[target.password])
