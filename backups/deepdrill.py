"""The deep drill: start the services of a backup's scratch copy and require their health URLs to answer.

A drill (backups.verify) proves that every artifact restores; a deep drill (BackupPolicy.deep_drill) also
proves the restored application starts. After the drill's checks pass it builds a scratch copy beside the
customer's root (`.kasa-drill-<run>` in the same folder: reachable by the customer's user, as its root is):

1. the service folders and config files of the backup, unpacked as the customer's user (`run_as`);
2. the databases, restored into scratch databases that live as long as the drill: PostgreSQL into a private
   scratch cluster (engines.scratchdb; the app gets a role of its own there, never the superuser),
   MySQL/MariaDB into a private throwaway MariaDB server on 127.0.0.1 (engines.scratchmysql; the app gets an
   account with ALL on its database alone; never the live server, where the app would hold the live
   credentials), SQLite into the copy's own file. Each database is thus restored twice in a deep drill: once
   by the drill's own check (backups.verify), once into the copy;
3. the copy's `.env` files pointed at them (backups.envfiles), each service's port (its health URL's, its
   PORT) moved to a free port, and paths into the live root pointed into the copy (engines.drillcopy);
4. its PM2 and command services started as the customer's user, PM2 from an ecosystem file Kasa writes into
   the copy with a PM2 home inside the copy (never the customer's live PM2 daemon, ecosystem file or ports);
   a command service is stopped by Kasa (its process session), never by the customer's stop command, which
   may well stop the live one. systemd units and services without a manager are not started;
5. every health URL, on its new port, must answer KASA_HEALTH_STREAK times in a row.

Whatever happens, the copy's services are stopped, its PM2 daemon killed, any process left working in the
copy killed, the scratch databases dropped with their servers (stopped, their folders removed) and the copy
removed (try/finally). The run log
names the ports and URLs checked.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

from customers import runtime
from customers.models import Customer
from engines import (
    beneath,
    dbrestore,
    drillcopy,
    ecosystem,
    envfile,
    ownership,
    paths,
    procman,
    runas,
    scratchdb,
    scratchmysql,
    trees,
    unpack,
)
from operations.context import OperationError, RunContext
from operations.models import Run

from . import envfiles
from .models import Backup
from .reading import artifact_kwargs, keyring_for, progress, store_of
from .services import policy_for

COPY_PREFIX = ".kasa-drill-"
STARTED_KINDS = ("pm2", "command")  # the managers that run the customer's own code from its folders
_DB_KEY = re.compile(r"DB|DATABASE|PG|MYSQL|POSTGRES|REDIS", re.I)  # database settings: pointed, not moved


def wanted(ctx: RunContext, bk: Backup) -> bool:
    """Whether this drill goes deep: the run's `deep` parameter when given, else the customer's policy."""
    deep = (ctx.run.params or {}).get("deep")
    wanted = bool(policy_for(bk.customer).deep_drill if deep is None else deep)
    if wanted and not bk.customer.host.is_local:
        # The copy would start the customer's code on this worker, beside a root that is another machine's, as
        # a run_as user of that machine: not built. The plain drill (every artifact restored) still runs.
        why = f"{bk.customer} lives on host {bk.customer.host.name}: deep drills run for customers on local only"
        if deep:
            raise OperationError(f"deep drill refused: {why}")
        ctx.warning(f"no deep drill: {why}; every artifact is still restored into scratch and checked")
        return False
    if wanted and bk.artifacts.filter(kind="database", details__engine="redis").exists():
        # The copy's app would need a Redis of its own: a scratch server for the copy is not built yet.
        why = f"backup #{bk.pk} holds a Redis database, which deep drills do not start for the copy yet"
        if deep:
            raise OperationError(f"deep drill refused: {why}")
        ctx.warning(f"no deep drill: {why}; every artifact is still restored into scratch and checked")
        return False
    return wanted


def copy_root_for(customer: Customer, run_id: int) -> Path:
    return customer.root_path().parent / f"{COPY_PREFIX}{run_id}"


def deep_drill(ctx: RunContext, bk: Backup) -> dict:
    """Run the deep drill of `bk`; OperationError (with what failed) when the copy does not come up healthy."""
    customer = bk.customer
    services = [s for s in sorted(customer.services.all(), key=lambda s: s.name)
                if s.process_manager in STARTED_KINDS]
    if not services:
        ctx.info("deep drill: no service runs under PM2 or a start command: nothing to start")
        return {"services": [], "checked": []}
    identity = runtime.run_identity(customer, needed=True)
    arts = list(bk.artifacts.order_by("pk"))
    have = {a.source for a in arts if a.kind == "service"}
    missing = [s.name for s in services if s.name not in have]
    if missing:
        raise OperationError(f"deep drill: backup #{bk.pk} holds no folder of {', '.join(missing)} (scope "
                             f"{bk.scope}): a deep drill needs a backup of the service folders")
    if any(a.kind == "database" and (a.details or {}).get("engine") == "mysql" for a in arts):
        try:  # a worker without a MariaDB server fails here, before anything is built
            scratchmysql.server_programs()
        except dbrestore.RestoreError as exc:
            raise OperationError(f"deep drill: backup #{bk.pk} holds a MySQL/MariaDB database, which needs a "
                                 f"private MariaDB server: {exc}") from None
    root = copy_root_for(customer, ctx.run.pk)
    live_root = customer.root_path()
    sweep_stale(ctx, root.parent)
    with ExitStack() as stack:
        if os.path.lexists(root):  # a crash's leftover of this very run id
            trees.remove_tree(root, ignore_errors=True)
        os.mkdir(root, 0o700)
        stack.callback(_remove_copy, ctx, root)
        _unpack(ctx, bk, arts, root, identity)
        to_databases = _databases(ctx, bk, arts, root, identity, stack)
        envfiles.rewrite_clone(ctx, _CopyPlan(customer, root, to_databases))
        ports = _move_ports(ctx, customer, services, root, live_root)
        specs = _specs(ctx, customer, services, root, identity, ports)
        if identity is not None:
            ownership.hand_over(root, identity, service_paths=[s.path for s in customer.services.all()],
                                files=[ecosystem.FILE_NAME])
        mgrs = runtime.managers(runner=ctx.runner())
        stack.callback(_stop, ctx, specs, mgrs, root, identity)
        return _start_and_check(ctx, specs, mgrs, ports)


class _CopyPlan:
    """What backups.envfiles.rewrite_clone reads of a restore's plan."""

    def __init__(self, customer: Customer, root: Path, to_databases: dict[str, str]):
        self.customer, self.root, self.to_databases = customer, root, to_databases


# --- building the copy -------------------------------------------------------------------------------------------
def _unpack(ctx: RunContext, bk: Backup, arts, root: Path, identity: runas.Identity | None) -> None:
    """The service folders and config files of the backup, at their places in the copy's root."""
    store, keyring = store_of(bk), keyring_for(bk)
    staging = root / ".kasa-drill-staging"
    beneath.mkdir(root, staging, mode=0o700)
    for art in arts:
        if art.kind not in ("service", "config"):
            continue
        ctx.check_alive()
        unpacked = staging / art.name.split(".", 1)[0]
        try:
            unpack.extract_artifact(store, f"{bk.prefix}/{art.name}", dest=str(unpacked), owner=identity, root=root,
                                    on_progress=progress(ctx, f"deep drill: unpacking {art.name}"),
                                    **artifact_kwargs(bk, art, keyring))
        except unpack.ArtifactError as exc:
            raise OperationError(str(exc)) from None
        details = art.details or {}
        rels = [details.get("path") or art.source] if art.kind == "service" else list(details.get("files") or [])
        for rel in rels:
            rel = drillcopy_rel(rel)
            if not beneath.lexists(root, unpacked / rel):
                continue
            beneath.makedirs(root, (root / rel).parent, mode=ownership.KASA_DIR_MODE)
            if beneath.lexists(root, root / rel) and not beneath.is_dir(root, root / rel):
                beneath.unlink(root, root / rel)  # a config file a service folder brought: the config's copy wins
            beneath.rename(root, unpacked / rel, root / rel)
        link = details.get("link") if art.kind == "service" else None
        if link and not beneath.lexists(root, root / drillcopy_rel(link["path"])):
            beneath.makedirs(root, (root / link["path"]).parent, mode=ownership.KASA_DIR_MODE)
            beneath.symlink(root, link["target"], root / drillcopy_rel(link["path"]))
    trees.remove_tree(staging, ignore_errors=True, root=root)
    ctx.info(f"deep drill: the backup's service folders and config files unpacked into the copy {root}")


def drillcopy_rel(rel: str) -> str:
    """A relative path of a manifest, refused when it would leave the copy's root."""
    return paths.relative_inside(rel, what="path in the backup")


def _databases(ctx: RunContext, bk: Backup, arts, root: Path, identity: runas.Identity | None,
               stack: ExitStack) -> dict[str, str]:
    """Restore each database into a scratch database that lives until `stack` closes; {source: URL} of the
    PostgreSQL and MySQL/MariaDB ones (an SQLite copy sits where the live file sits, in the copy's root)."""
    store, keyring = store_of(bk), keyring_for(bk)
    customer = bk.customer
    server = my_server = None
    urls: dict[str, str] = {}
    for art in arts:
        if art.kind != "database":
            continue
        engine = (art.details or {}).get("engine")
        db = customer.databases.filter(name=art.source).first()
        name = f"{bk.prefix}/{art.name}"
        try:
            with unpack.open_plain(store, name, on_progress=progress(ctx, f"deep drill: restoring {art.name}"),
                                   **artifact_kwargs(bk, art, keyring)) as chunks:
                if engine == "postgresql":
                    if server is None:
                        server = stack.enter_context(scratchdb.ScratchPostgres())
                        ctx.add_secret(server.password)
                    dbname = (db.database if db is not None and db.database else art.source)
                    counts = dbrestore.pg_restore_fresh(server, dbname, chunks, privileges=False,
                                                        extra_args=["--no-subscriptions"])
                    app = scratchdb.app_role(server, dbname)
                    ctx.add_secret(app.password)
                    urls[art.source] = (f"postgresql://{quote(app.user)}:{quote(app.password, safe='')}@"
                                        f"{app.host}:{app.port}/{quote(dbname)}")
                    where = f"a scratch PostgreSQL server on 127.0.0.1:{server.port}"
                elif engine == "mysql":
                    if my_server is None:  # never the live server: the app there would hold the live credentials
                        mariadb = scratchmysql.ScratchMariaDB()
                        my_server = stack.enter_context(mariadb)
                        ctx.add_secret(my_server.password)
                        ctx.info(f"deep drill: a private MariaDB server started on 127.0.0.1:{my_server.port} "
                                 f"(folder {mariadb.folder}, pid {mariadb.pid})")
                    dbname = (db.database if db is not None and db.database else art.source)
                    counts = dbrestore.mysql_restore_fresh(my_server, dbname, chunks)
                    app = scratchmysql.app_user(my_server, dbname)
                    ctx.add_secret(app.password)
                    urls[art.source] = (f"mysql://{quote(app.user)}:{quote(app.password, safe='')}@"
                                        f"{app.host}:{app.port}/{quote(dbname)}")
                    where = f"the private MariaDB server on 127.0.0.1:{my_server.port}"
                elif engine == "sqlite" and db is not None:
                    live = db.sqlite_file()
                    path = root / live.relative_to(customer.root_path())
                    beneath.makedirs(root, path.parent, mode=ownership.KASA_DIR_MODE)
                    new, counts = dbrestore.sqlite_restore_fresh(str(path), chunks, root=str(root))
                    beneath.rename(root, new, path)
                    if identity is not None:
                        beneath.chown(root, path, identity.uid, identity.gid)
                    where = str(path)
                else:
                    raise OperationError(f"deep drill: {art.name} ({engine}) cannot be restored into the copy")
        except (dbrestore.RestoreError, unpack.ArtifactError) as exc:
            raise OperationError(f"deep drill: {art.name}: {exc}") from None
        diffs = dbrestore.compare_counts((art.details or {}).get("row_counts") or {}, counts)
        if diffs:
            raise OperationError(f"deep drill: {art.name} differs from the manifest: " + "; ".join(diffs[:10]))
        ctx.info(f"deep drill: database {art.source} restored into {where} for the copy ({len(counts)} tables)")
    return urls


def _move_ports(ctx: RunContext, customer: Customer, services, root: Path, live_root: Path) -> dict[int, int]:
    """Free ports for the ports the services use (their health URLs', their .env's PORT); the copy's .env files
    rewritten to them and to the copy's root. Returns {live port: copy port}."""
    used: set[int] = set()
    for s in services:
        if s.health_url:
            try:
                used.add(drillcopy.health_port(s.health_url))
            except drillcopy.CopyError as exc:
                raise OperationError(f"deep drill: service {s.name}'s health URL {exc}") from None
        own = _env_of(root, root / (s.path or "."))
        if own.get("PORT", "").strip().isdigit():
            used.add(int(own["PORT"]))
    ports = dict(zip(sorted(used), drillcopy.free_ports(len(used), avoid=used), strict=True))
    for path in envfiles.env_files(root):
        data = beneath.read_file(root, path)
        if data is None:
            continue
        text = data.decode("utf-8", errors="replace")
        values = envfile.parse(text)
        updates = drillcopy.updates_for(values, ports=ports, live_root=str(live_root), copy_root=str(root),
                                        skip={k for k in values if _DB_KEY.search(k)})
        if updates:
            st = beneath.lstat(root, path)
            beneath.write_file(root, path, drillcopy.rewrite(text, updates).encode("utf-8"),
                               mode=st.st_mode & 0o7777 if st else 0o600,
                               owner=(st.st_uid, st.st_gid) if st else None)
            ctx.info(f"deep drill: {os.path.relpath(path, root)}: {drillcopy.shown_updates(updates)}")
    return ports


def _env_of(root: Path, folder: Path) -> dict[str, str]:
    """The environment a service of the copy gets: the root's .env, then its folder's."""
    env: dict[str, str] = {}
    for base in dict.fromkeys((root, folder)):
        data = beneath.read_file(root, base / ".env")
        if data is not None:
            env.update(envfile.parse(data.decode("utf-8", errors="replace")))
    return env


def _moved_argv(argv, ports: dict[int, int]) -> list[str]:
    """A start command with the moved ports in place (`8000`, `--port=8000`, `127.0.0.1:8000`)."""
    out = []
    for arg in argv:
        m = re.fullmatch(r"(.*[=:])?(\d+)", arg)
        if m and int(m[2]) in ports:
            arg = f"{m[1] or ''}{ports[int(m[2])]}"
        out.append(arg)
    return out


def _specs(ctx: RunContext, customer: Customer, services, root: Path, identity: runas.Identity | None,
           ports: dict[int, int]) -> list[procman.ServiceSpec]:
    """The copy's services, and Kasa's ecosystem file in the copy for the PM2 ones."""
    state = root / ".kasa-drill-state"  # the command services' logs and pid files: Kasa's, never the live ones
    beneath.mkdir(root, state, mode=0o700)
    specs, apps = [], []
    for s in services:
        folder = root / (s.path or ".")
        env = _env_of(root, folder)
        start = _moved_argv(s.start_command or (), ports)
        url = drillcopy.with_port(s.health_url, ports[drillcopy.health_port(s.health_url)]) if s.health_url else ""
        if url:
            port = str(ports[drillcopy.health_port(s.health_url)])
            if not any(drillcopy.is_port_key(k) and v == port for k, v in env.items()) and port not in " ".join(start):
                raise OperationError(f"deep drill: service {s.name} listens on the port of its health URL "
                                     f"{s.health_url}, which is set neither as PORT in its .env nor in its start "
                                     "command: the copy cannot be moved to a free port; nothing was started")
        if s.process_manager == "pm2":
            try:
                apps.append(ecosystem.app(s.app_name, cwd=folder, folder=folder, start_command=start, env=env))
            except ecosystem.EcosystemError as exc:
                raise OperationError(f"deep drill: service {s.name}: {exc}") from None
        specs.append(procman.ServiceSpec(
            name=s.name, folder=str(folder), manager=s.process_manager, app_name=s.app_name,
            start_command=tuple(start), stop_command=(), health_url=url, env=env,
            ecosystem=str(root / ecosystem.FILE_NAME) if s.process_manager == "pm2" else None,
            root=str(root), identity=identity, pm2_home=procman.pm2_home_for(root), state_dir=str(state)))
    if apps:
        ecosystem.write(root / ecosystem.FILE_NAME, apps, owner=identity, root=root)
    return specs


# --- running it --------------------------------------------------------------------------------------------------
def _start_and_check(ctx: RunContext, specs, mgrs, ports: dict[int, int]) -> dict:
    moved = ", ".join(f"{a} → {b}" for a, b in ports.items()) or "none"
    who = specs[0].identity or "Kasa's own user (development)"
    ctx.info(f"deep drill: starting {', '.join(s.name for s in specs)} of the copy as {who}, PM2 home "
             f"{procman.pm2_home_for(specs[0].root)}; ports moved {moved}")
    try:
        procman.start_all(specs, mgrs)
    except procman.ProcessError as exc:
        raise OperationError(f"deep drill: the copy did not start: {exc}") from None
    checked = [s for s in specs if s.health_url]
    runtime.check_health(ctx, specs, label="deep drill: ", what="health checks of the copy",
                         failure="deep drill: the copy's services did not answer their health URLs")
    return {"services": [s.name for s in specs], "ports": {str(a): b for a, b in ports.items()},
            "checked": [{"service": s.name, "url": s.health_url} for s in checked]}


def _stop(ctx: RunContext, specs, mgrs, root: Path, identity: runas.Identity | None) -> None:
    """Stop everything of the copy, whatever state it is in; never raises."""
    for spec in reversed(specs):
        if spec.manager == "command":
            try:
                mgrs["command"].stop(spec)
            except procman.ProcessError as exc:
                ctx.warning(f"deep drill: {exc}")
    home = procman.pm2_home_for(root)
    try:
        procman.pm2_kill(home, runner=ctx.runner(), identity=identity)
    except Exception as exc:  # noqa: BLE001 — the processes are killed below anyway
        ctx.warning(f"deep drill: pm2 kill in {home}: {exc}")
    killed = kill_processes_in(root)
    if killed:
        ctx.warning(f"deep drill: killed {len(killed)} process(es) still working in the copy: {killed}")


def kill_processes_in(folder: Path) -> list[int]:
    """SIGKILL every process whose working folder lies in `folder` (what a copy's app left behind); their pids."""
    folder = str(folder).rstrip("/")
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == folder or cwd.startswith(folder + "/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed


def sweep_stale(ctx: RunContext, parent: Path) -> None:
    """Copies a killed worker left in `parent` (their run no longer active): their PM2 daemon and processes
    ended, the folder removed."""
    for entry in sorted(parent.glob(f"{COPY_PREFIX}*")):
        run_id = entry.name[len(COPY_PREFIX):]
        if not run_id.isdigit() or Run.objects.filter(pk=int(run_id), status__in=Run.ACTIVE).exists():
            continue
        home = procman.pm2_home_for(entry)
        try:
            owner = runas.Identity(user=f"uid {os.lstat(home).st_uid}", uid=os.lstat(home).st_uid,
                                   gid=os.lstat(home).st_gid, home="")
            procman.pm2_kill(home, identity=None if owner.uid == os.geteuid() else owner)
        except Exception:  # noqa: BLE001 — no PM2 home, or a daemon already gone: the processes go below
            pass
        kill_processes_in(entry)
        trees.remove_tree(entry, ignore_errors=True)
        ctx.warning(f"deep drill: removed {entry}, left by run #{run_id}")


def _remove_copy(ctx: RunContext, root: Path) -> None:
    trees.remove_tree(root, ignore_errors=True)
    if os.path.lexists(root):
        ctx.warning(f"deep drill: the copy {root} could not be removed entirely")
    else:
        ctx.info(f"deep drill: the copy's services stopped, its PM2 daemon killed, its databases dropped and {root} "
                 "removed")
