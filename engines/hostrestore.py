"""The host's side of a restore in place on a remote host (backups.remote_restore), run there through
engines.hostcall by the SSH login user: Kasa's own code, shipped for the run, standard library only.

Everything below a customer's root goes through engines.beneath (descriptors from the root, no link followed), as
a local restore's does (backups.restore_files): the staging folder, each extraction folder given to the customer's
user, the swaps (engines.swap, called directly through the helper), the log folders carried over, the undo.

- `identity`: the run_as user as *this host* knows it (uids differ between machines), refused when missing, root or
  the login user (engines.runas.lookup).
- `TAR_LAUNCHER`: what the worker runs on the host to receive the checked tar stream: it enters the extraction
  folder through descriptors opened from the root without following a link, drops to the customer's user (no
  supplementary groups, umask 027) and executes GNU tar there — the host-side twin of engines.unpack's _Tar.
- `link_beside`: the link of a release put back (an upgraded service's path -> releases/<version>/<name>), made
  beside the live one for engines.swap to exchange; `undo_step` removes it again.
- `check_tree`: engines.treecheck on the host, after tar, against the counts the worker's scanner listed.
- `services`: engines.procman's stop_all/start_all on the host, each PM2 call as the customer's user resolved
  here, the host's own `pm2` binary.
- The journal: `journal_write`/`journal_read`/`journal_remove` keep the run's steps in a 0700 folder of the login
  user's under the host's customers root (`.kasa-journals/run-<id>.json`, 0600, written atomically and fsynced),
  authenticated with an HMAC-SHA256 under a key the worker derives for this host alone (it never holds a backup
  key): engines.localjournal's envelope, folder rules and atomic write, on the host. `journal_list`,
  `journal_load` and `journal_claim` serve the replay of journals a lost host kept (backups.host_journals).
"""

from __future__ import annotations

import fnmatch
import os

from . import beneath, localjournal, proc, procman, runas, swap, treecheck, trees
from .tarcheck import Listing

JOURNALS = ".kasa-journals"
# PM2's own switch: no attempt to reach a PM2.io agent's socket (a `pm2 start` that spawns the daemon otherwise pings
# one, and crashes now and then when that socket cannot be looked at).
NO_INTERACTION = {"PM2_NO_INTERACTION": "true"}

# argv: root, folder (relative to root), uid, gid, then tar's argv. Kept short: it travels in argv.
TAR_LAUNCHER = r"""
import os, sys
root, rel, uid, gid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
fd = os.open(root, flags)
for name in rel.split("/"):
    if name in ("", ".", ".."):
        sys.exit("kasa: refused folder " + rel)
    nfd = os.open(name, flags, dir_fd=fd)
    os.close(fd)
    fd = nfd
os.fchdir(fd)
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
os.umask(0o027)
os.execvp(sys.argv[5], sys.argv[5:])
"""


def identity(name: str) -> dict:
    """The customer's user on this host: {"user", "uid", "gid", "home"} (RunAsError when it cannot run code)."""
    who = runas.lookup(name)
    return {"user": who.user, "uid": who.uid, "gid": who.gid, "home": who.home}


def _identity(who: dict | None) -> runas.Identity | None:
    return None if not who else runas.Identity(user=who["user"], uid=int(who["uid"]), gid=int(who["gid"]),
                                               home=who["home"])


# --- files -----------------------------------------------------------------------------------------------------
def make_staging(root: str, staging: str) -> None:
    beneath.mkdir(root, staging, mode=0o700)


def prepare_dest(root: str, dest: str, uid: int, gid: int) -> None:
    """An empty 0700 extraction folder in the staging folder, given to the customer's user."""
    beneath.mkdir(root, dest, mode=0o700)
    with beneath.folder(root, dest) as fd:
        if os.listdir(fd):
            raise OSError(f"the extraction folder {dest} is not empty")
        os.fchmod(fd, 0o700)
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)


def check_tree(root: str, dest: str, counts: dict, uid: int) -> None:
    """engines.treecheck's check of what tar extracted, on this host; the folder is removed when refused."""
    listing = Listing(**{k: int(counts[k]) for k in ("members", "files", "dirs", "symlinks", "hardlinks",
                                                      "total_size")})
    try:
        with beneath.folder(root, dest):  # reached without following a link before it is walked
            pass
        treecheck.check_tree(dest, listing, uid=uid)
    except BaseException:
        trees.remove_tree(dest, ignore_errors=True, root=root)
        raise


def remove_tree(root: str, path: str) -> None:
    trees.remove_tree(path, ignore_errors=True, root=root)


def lexists(root: str, path: str) -> bool:
    return beneath.lexists(root, path)


def is_dir(root: str, path: str) -> bool:
    return beneath.is_dir(root, path)


def makedirs(root: str, path: str) -> None:
    beneath.makedirs(root, path, mode=0o755)


def carry_candidates(root: str, live: str, staged: str, patterns: list[str]) -> list[list[str]]:
    """(from, to) of what the backup left out on purpose (logs) and the staged tree has room for: the worker
    journals each, then moves it (engines.beneath.rename). As backups.restore_files.carry_excluded walks it."""
    if not (beneath.is_dir(root, live) and beneath.is_dir(root, staged)):
        return []
    found = []
    with beneath.folder(root, live) as top:
        for dirpath, dirnames, filenames, _fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            rel_dir = os.path.normpath(dirpath)
            for name in list(dirnames) + filenames:
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if not any(fnmatch.fnmatch(rel if "/" in p else name, p) for p in patterns):
                    continue
                if name in dirnames:
                    dirnames.remove(name)
                target = os.path.join(staged, rel)
                if not beneath.is_dir(root, os.path.join(staged, os.path.dirname(rel))) or \
                        beneath.lexists(root, target):
                    continue
                found.append([os.path.join(live, rel), target])
    return found


def rename(root: str, src: str, dst: str) -> None:
    beneath.rename(root, src, dst)


def link_beside(root: str, live: str, target: str, tmp: str) -> bool:
    """A release link put back (backups.remote_parts.relink): a new link `tmp` -> `target` beside the live path,
    made here through the root's descriptors, for engines.swap to exchange with the live one. False when the
    live path already is that link (nothing made)."""
    if beneath.readlink(root, live) == target:
        return False
    if beneath.lexists(root, tmp):  # left by an earlier run cut short: never live, never journalled
        beneath.unlink(root, tmp)
    beneath.symlink(root, target, tmp)
    return True


def undo_step(root: str, step: dict) -> bool:
    """Undo one file step (files, carry, staging) of a remote restore's journal, as restore_files.undo does."""
    kind = step.get("type")
    if kind == "files":
        moved = swap.undo(step, root=root)
        if step.get("beside"):  # a release link put back: the link this run made goes too
            try:
                if beneath.is_link(root, step["staged"]):
                    beneath.unlink(root, step["staged"])
            except beneath.BeneathError:
                if not step.get("refused"):
                    raise
        return moved
    if kind == "carry":
        if step.get("refused"):
            return False
        if beneath.lexists(root, step["to"]) and not beneath.lexists(root, step["from"]):
            beneath.rename(root, step["to"], step["from"])
            return True
        return False
    if kind == "staging":
        trees.remove_tree(step["path"], ignore_errors=True, root=root)
        return True
    return False


# --- SQLite ---------------------------------------------------------------------------------------------------
def sqlite_fresh(live_path: str, source: str, tag: str, root: str) -> list:
    """The streamed copy (`source`, in a private folder of the login user's) written beside the live file under a
    hidden name, with the live file's owner and mode, and its rows counted (engines.dbrestore_sqlite): [path,
    counts]."""
    from . import dbrestore_sqlite

    with open(source, "rb") as fh:
        new, counts = dbrestore_sqlite.sqlite_restore_fresh(live_path, iter(lambda: fh.read(1 << 20), b""), tag=tag,
                                                            root=root)
    return [new, counts]


def sqlite_swap(live_path: str, new_path: str, tag: str, root: str) -> str | None:
    from . import dbrestore_sqlite

    return dbrestore_sqlite.sqlite_swap(live_path, new_path, tag=tag, root=root)


def sqlite_undo(step: dict, live_path: str, tag: str, root: str) -> str:
    """Undo a remote restore's SQLite step (db_fresh: the staged file goes; db_swap: the previous file is live
    again, also after a swap cut short)."""
    from . import dbrestore_sqlite

    if step.get("type") == "db_fresh":
        if step.get("new"):
            dbrestore_sqlite.sqlite_remove(step["new"], root)
        return "removed"
    old, new = step.get("old"), step.get("new")
    if not step.get("done"):
        found = dbrestore_sqlite.sqlite_repair(live_path, new, tag=tag, root=root)
        if found is None:
            return "never swapped"
        old = found or None
    dbrestore_sqlite.sqlite_unswap(live_path, old, new, root=root)
    return "put back"


def sqlite_remove(path: str, root: str) -> None:
    from . import dbrestore_sqlite

    dbrestore_sqlite.sqlite_remove(path, root)


def free_bytes(path: str) -> int:
    import shutil

    return shutil.disk_usage(path).free


# --- services --------------------------------------------------------------------------------------------------
def services(action: str, specs: list[dict], run_as: str, pm2: str, timeout: float = 60.0,
             settle: float = 2.0) -> dict:
    """Stop ("stop") or start ("start") the customer's PM2 and start-command services on this host, each PM2 call
    and each command as `run_as` (as this host knows it). {"ok", "error", "lines", "running"}; "running": the
    services that were running (stop)."""
    who = runas.lookup(run_as) if run_as else None
    lines: list[str] = []
    built = [procman.ServiceSpec(name=s["name"], folder=s["folder"], manager=s["manager"], app_name=s["app_name"],
                                 start_command=tuple(s.get("start_command") or ()),
                                 stop_command=tuple(s.get("stop_command") or ()), root=s["root"],
                                 ecosystem=s.get("ecosystem"), identity=who, pm2_home=procman.pm2_home_for(s["root"]),
                                 env=dict(NO_INTERACTION), state_dir=service_state_dir(s["root"]))
             for s in specs]

    def runner(argv, **kw):
        lines.append("$ " + " ".join(argv[:8]))
        result = proc.run(argv, **kw)  # masked as locally (the manager passes the secrets)
        if not result.ok:
            lines.extend(f"  {line}"[:300] for line in (result.stderr_tail or result.stdout_tail)[-8:])
        return result

    mgrs = {"pm2": procman.Pm2Manager(binary=pm2, timeout=timeout, log=lines.append, runner=runner, settle=settle),
            # Start commands: the launcher is the host's python3 with Kasa's program text (nothing installed).
            "command": procman.CommandManager("", runner=runner, timeout=timeout, settle=settle,
                                              launcher=["python3", "-I", "-c", procman.LAUNCH_PROGRAM]),
            "none": procman.NoManager()}
    try:
        if action == "stop":
            running = procman.stop_all(built, mgrs)
        elif action == "start":
            running = procman.start_all(built, mgrs)
        else:
            raise ValueError(f"unknown action {action!r}")
    except procman.ProcessError as exc:
        return {"ok": False, "error": str(exc), "lines": lines, "running": []}
    return {"ok": True, "error": "", "lines": lines, "running": list(running or [])}


def service_state_dir(root: str) -> str:
    """Where a start command's log and pid file live on a host: `<root>/.kasa-services`, made by the login user
    (0700) in the customer's root, which the customer's user may enter but not change (engines.ownership): its
    code can neither read nor forge the pid file that says which processes Kasa stops (the worker keeps these
    under KASA_VAR_DIR for local customers; a host has no folder of Kasa's but this one)."""
    return os.path.join(root, ".kasa-services")


# --- the journal -----------------------------------------------------------------------------------------------
# engines.localjournal's envelope, folder rules and atomic, durable write, kept on the host's disk under a key the
# worker derives for this host alone (key id "host").
HOST_KEY_ID = "host"


def _folder(customers_root: str) -> str:
    return os.path.join(customers_root, JOURNALS)


def journal_path(customers_root: str, run_id: int) -> str:
    return str(localjournal.path_for(_folder(customers_root), run_id))


def journal_write(customers_root: str, run_id: int, body: dict, key_hex: str) -> str:
    """Replace the run's journal on this host, atomically and durably; its path."""
    localjournal.write(_folder(customers_root), run_id, {**body, "run": int(run_id)},
                       [(HOST_KEY_ID, bytes.fromhex(key_hex))])
    return journal_path(customers_root, run_id)


def journal_read(customers_root: str, run_id: int, key_hex: str) -> dict | None:
    """The run's journal body, None when there is none; localjournal.JournalRefused when it cannot be trusted."""
    return localjournal.read(_folder(customers_root), run_id, [(HOST_KEY_ID, bytes.fromhex(key_hex))])


def journal_remove(customers_root: str, run_id: int) -> None:
    localjournal.remove(_folder(customers_root), run_id)
    claim = _CLAIMS.pop(journal_path(customers_root, run_id), None)
    if claim is not None:
        claim.release()


def journal_list(customers_root: str) -> list[int]:
    """The runs whose journal is on this host, oldest first."""
    return localjournal.listed(_folder(customers_root))


def journal_load(customers_root: str, run_id: int, key_hex: str) -> dict:
    """{"body": the journal's body or None} or {"refused": why}: a journal that cannot be trusted is an *answer*
    here, not an error, so that the worker tells a forged or corrupt journal (left alone, reported) from a
    connection that failed (tried again later)."""
    try:
        return {"body": journal_read(customers_root, run_id, key_hex)}
    except localjournal.JournalRefused as exc:
        return {"refused": str(exc)}


# Claims held by this helper process: the flock goes with the process, so a replayer whose session dies never
# leaves a journal claimed for good.
_CLAIMS: dict[str, localjournal.Lock] = {}


def journal_claim(customers_root: str, run_id: int) -> bool | None:
    """Take the run's journal for one replay (flock on run-<id>.lock, held as long as this helper lives or until
    journal_remove); False when another session holds it (a replay of that journal already under way), None when
    there is no journal."""
    path = journal_path(customers_root, run_id)
    if path in _CLAIMS:
        return True
    if not os.path.lexists(path):
        return None  # nothing to replay: no lock file is left behind for it
    lock = localjournal.Lock(_folder(customers_root), run_id)
    if not lock.acquire():
        return False
    _CLAIMS[path] = lock
    return True
