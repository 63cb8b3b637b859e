"""The host's side of an upgrade or rollback of a customer on a remote host (upgrades.remote), run there through
engines.hostcall by the SSH login user: Kasa's own code, shipped for the run, standard library only.

What a local upgrade does below the customer's root (upgrades.release_files) is done here on the host, with the
same engines functions: every path reached from the root's descriptor without following a link (engines.beneath,
engines.layout), what the customer's user must own given to that user *as this host knows it* (uids differ
between machines: the worker sends the user's name, never a uid of its own).

- staging: `stage_begin` makes the hidden staging folder (0700, the customer's user's) that tar fills, run by
  engines.hostrestore.TAR_LAUNCHER as that user; `stage_end` checks the tree tar made against the worker's
  scanner (engines.treecheck) and renames it into `releases/<version>/<component>`: complete or absent.
- `write_env` writes the merged .env (the worker merged it from the live one read here with `read_env_text`).
- `write_ecosystem` writes Kasa's PM2 ecosystem file (the previous one kept beside it, for the way back).
- `undo_files` / `after_undo` / `cleanup`: the file steps of the journal undone, or what a held upgrade set aside
  removed, as upgrades.rollback and upgrades.release_files do locally.
- `HOOK_LAUNCHER`: what the worker runs on the host for a release's hook: it reads the hook's environment (the
  merged .env's values: secrets, so never in argv) as one JSON line from stdin, enters the release folder through
  descriptors opened without following a link, drops to the customer's user (no supplementary groups, umask 027)
  and executes the hook there with a clean environment — the host-side twin of engines.runas + procman's
  service_env for a local hook.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import beneath, ecosystem, envfile, hostrestore, layout, runas, trees

# argv: root, folder (relative to root), user, timeout (s), then the hook's argv; stdin: {"env": {...}}\n. Kept
# short: it travels in argv. HOME is the user's own home when it exists, else the customer's root (as service_env
# does). The hook runs in a session of its own, as the user; this launcher (the login user) waits for it and kills
# its whole group when the timeout passes, the connection goes (SIGHUP/SIGPIPE/SIGTERM) or the hook has exited
# (what it left running would hold the connection open): a hook never outlives its run on the host.
HOOK_LAUNCHER = r"""
import json, os, pwd, signal, sys
root, rel, user, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
values = json.loads(sys.stdin.buffer.readline() or b"{}").get("env") or {}
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
pw = pwd.getpwnam(user)
if pw.pw_uid == 0:
    sys.exit("kasa: refused user " + user)
flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
fd = os.open(root, flags)
for name in rel.split("/"):
    if name in ("", ".", ".."):
        sys.exit("kasa: refused folder " + rel)
    nfd = os.open(name, flags, dir_fd=fd)
    os.close(fd)
    fd = nfd
env = {k: v for k, v in os.environ.items() if k in ("LANG", "LANGUAGE", "TZ") or k.startswith("LC_")}
env["PATH"] = os.environ.get("PATH") or os.defpath
env.update(HOME=pw.pw_dir if pw.pw_dir and os.path.isdir(pw.pw_dir) else root, USER=user, LOGNAME=user)
env.update({str(k): str(v) for k, v in values.items()})
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    try:
        os.setsid()
        os.fchdir(fd)
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        os.umask(0o027)
        os.execvpe(sys.argv[5], sys.argv[5:], env)
    except BaseException as exc:
        os.write(2, ("kasa: cannot run " + sys.argv[5] + ": " + str(exc) + "\n").encode())
    os._exit(127)
expired = []
def stop(signum, frame):
    expired.append(signum)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
for sig in (signal.SIGALRM, signal.SIGHUP, signal.SIGPIPE, signal.SIGTERM):
    signal.signal(sig, stop)
signal.setitimer(signal.ITIMER_REAL, limit)
status = os.waitpid(pid, 0)[1]
stop(0, None)
if signal.SIGALRM in expired:
    os.write(2, ("kasa: the hook did not finish within %g s and was killed\n" % limit).encode())
    sys.exit(124)
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


def _who(user: str) -> runas.Identity:
    return runas.lookup(user)


# --- what is there -------------------------------------------------------------------------------------------
def live_states(root: str, lives: list[str]) -> dict:
    """{live: engines.layout.LiveState as a dict} for each service path; {"error": ...} for one behind a link."""
    out = {}
    for live in lives:
        try:
            out[live] = layout.live_state(root, live).as_dict()
        except beneath.BeneathError as exc:
            out[live] = {"error": str(exc)}
    return out


def read_env_text(root: str, folder: str, user: str) -> str | None:
    """The .env of a service folder as text, when it is the customer's user's own regular file (never through a
    link to another's); None when there is none."""
    path = os.path.join(folder, ".env")
    if not beneath.lexists(root, path):
        return None
    try:
        return runas.read_owned(path, _who(user), limit=16 << 20).decode("utf-8", "replace")
    except runas.NotOwned as exc:
        raise OSError(f"{path} was not read: {exc}") from None


def read_env(root: str, folder: str, user: str) -> dict:
    text = read_env_text(root, folder, user)
    return envfile.parse(text) if text is not None else {}


def env_fingerprints(folders: list[str]) -> dict:
    """sha256 of each folder's .env (None: absent), as upgrades.journal.env_fingerprints does locally."""
    out = {}
    for folder in folders:
        try:
            with open(os.path.join(folder, ".env"), "rb") as fh:
                out[folder] = hashlib.sha256(fh.read()).hexdigest()
        except FileNotFoundError:
            out[folder] = None
    return out


# --- staging -------------------------------------------------------------------------------------------------
def stage_begin(root: str, dest: str, tag: str, user: str) -> str:
    """The hidden, empty staging folder beside `dest` (the customer's user's, 0700) that tar fills; its path.
    `dest` must not exist (the worker set an earlier one aside first)."""
    who = _who(user)
    if beneath.lexists(root, dest):
        raise layout.LayoutError(f"{dest} exists already; nothing was staged")
    tmp = str(layout.staging_path(dest, tag))
    beneath.makedirs(root, os.path.dirname(dest), mode=0o755)
    if beneath.lexists(root, tmp):  # left by an earlier attempt of this very run
        trees.remove_tree(tmp, ignore_errors=True, root=root)
    hostrestore.prepare_dest(root, tmp, who.uid, who.gid)
    return tmp


def stage_end(root: str, tmp: str, dest: str, counts: dict, user: str) -> None:
    """engines.treecheck on what tar made (removed when refused), then the folder opened to the services' user
    (0755) and renamed into place."""
    who = _who(user)
    hostrestore.check_tree(root, tmp, counts, who.uid)
    with beneath.folder(root, tmp) as fd:
        os.fchmod(fd, 0o755)
    beneath.rename(root, tmp, dest)
    open_releases(root)


def open_releases(root: str) -> None:
    """releases/ and releases/<version>/ stay Kasa's but let the customer's user through (0755), as
    upgrades.release_files.open_releases does locally."""
    try:
        top = beneath.open_dir(root, Path(root) / layout.RELEASES)
    except OSError:
        return
    try:
        os.fchmod(top, 0o755)
        for name in os.listdir(top):
            try:
                fd = os.open(name, beneath.DIR_FLAGS, dir_fd=top)
            except OSError:
                continue
            try:
                os.fchmod(fd, 0o755)
            finally:
                os.close(fd)
    finally:
        os.close(top)


def write_env(root: str, folder: str, text: str, user: str, write: bool) -> bool:
    """The merged .env into the staged folder (0600, the customer's user's); True when the release shipped a
    .env of its own, which the customer's replaces."""
    who = _who(user)
    target = os.path.join(folder, ".env")
    shipped = beneath.lexists(root, target)
    if shipped:
        beneath.unlink(root, target)
    if write:
        beneath.write_file(root, target, text.encode("utf-8"), mode=0o600, owner=(who.uid, who.gid))
    return shipped


# --- the ecosystem file --------------------------------------------------------------------------------------
def write_ecosystem(root: str, path: str, apps: list, user: str, tag: str) -> str | None:
    """Kasa's PM2 ecosystem file, the previous one copied beside it first (the user's again); the copy's path."""
    who = _who(user)
    saved = None
    if beneath.lexists(root, path):
        saved = f"{path}.kasa-prev-{tag}"
        beneath.copy_entry(root, path, saved, owner=(who.uid, who.gid))
    ecosystem.write(path, apps, owner=who, root=root)
    return saved


def ecosystem_apps(root: str, path: str, user: str) -> list[str]:
    """The app names in Kasa's ecosystem file (none when there is none)."""
    if not beneath.lexists(root, path):
        return []
    return [a.get("name") for a in ecosystem.read_apps(path, owner=_who(user))]


# --- undo and clean up ---------------------------------------------------------------------------------------
def undo_files(root: str, steps: list[dict]) -> list[str]:
    """The switches and the ecosystem file of a journal put back, newest first (as upgrades.rollback's
    _undo_files); what was put back, for the log."""
    done = []
    for step in reversed(steps):
        if step.get("type") == "switch":
            if layout.undo_switch(step, root=root):
                done.append(f"{step['live']}: put back")
        elif step.get("type") == "ecosystem":
            saved = step.get("saved")
            if saved and beneath.lexists(root, saved):
                beneath.rename(root, saved, step["path"])
            elif not saved and step.get("written"):
                beneath.unlink(root, step["path"], missing_ok=True)
            done.append(f"{step['path']}: put back")
    tidy(root)
    return done


def after_undo(root: str, steps: list[dict]) -> None:
    """The way back holds: the staged releases and the saved ecosystem file go, a folder set aside before
    staging takes its place again."""
    for step in steps:
        if step.get("type") == "staged":
            trees.remove_tree(step["tmp"], ignore_errors=True, root=root)
            trees.remove_tree(step["path"], ignore_errors=True, root=root)
        elif step.get("type") == "ecosystem" and step.get("saved"):
            beneath.unlink(root, step["saved"], missing_ok=True)
    for step in steps:
        if step.get("type") == "aside" and not step.get("refused") and beneath.lexists(root, step["to"]) and \
                not beneath.lexists(root, step["from"]):
            beneath.rename(root, step["to"], step["from"])
    tidy(root)


def cleanup(root: str, steps: list[dict]) -> None:
    """The upgrade holds: what was set aside and the saved ecosystem file go."""
    for step in steps:
        if step.get("type") == "aside" and not step.get("refused"):
            trees.remove_tree(step["to"], ignore_errors=True, root=root)
        elif step.get("type") == "ecosystem" and step.get("saved"):
            beneath.unlink(root, step["saved"], missing_ok=True)


def tidy(root: str) -> None:
    """Empty version folders (and an empty releases/) removed, as upgrades.rollback._tidy does."""
    base = Path(root) / layout.RELEASES
    try:
        if not beneath.is_dir(root, base):
            return
        for version in beneath.listdir(root, base):
            beneath.rmdir(root, base / version)
        beneath.rmdir(root, base)
    except beneath.BeneathError:
        pass


def ecosystem_app(root: str, name: str, live: str, folder: str, start_command: list, user: str) -> dict:
    """One PM2 app of Kasa's ecosystem file (engines.ecosystem.app), its script found in the release folder and
    its env read from the .env there (the customer's user's own file only), on this host."""
    return ecosystem.app(name, cwd=live, folder=folder, start_command=start_command,
                         env=read_env(root, folder, user))


def present(root: str, folders: list[str]) -> list[str]:
    """The service folders that are there: a folder, or a link into the customer's releases/ that leads to one
    (what a local run asks with os.path.isdir); a link elsewhere is not followed."""
    out = []
    for folder in folders:
        try:
            state = layout.live_state(root, folder)
            if state.kind == "dir":
                out.append(folder)
            elif state.kind == "link":
                target = os.path.normpath(os.path.join(os.path.dirname(folder), state.target))
                if beneath.is_dir(root, target):
                    out.append(folder)
        except beneath.BeneathError:
            continue
    return out
