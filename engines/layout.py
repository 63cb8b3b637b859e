"""Release folders of a customer: staging, the atomic symlink switch, keep-N pruning, the merged .env.

Pure Python (no Django): the `upgrades` app journals each step's plan before applying it, so a worker
killed at any point leaves a plan that `undo_switch` puts back exactly.

Layout (Capistrano-like, one folder per version and component)::

    <root>/releases/<version>/<component>/   a staged release, unpacked from the component's zip
    <root>/<service path>  ->  releases/<version>/<component>     a relative symlink, switched atomically

The first upgrade of a service finds a plain folder at its path: it is renamed (same filesystem, so
instant and exact) to `releases/<current version>/<component>` — `releases/unversioned/<component>` when
no version was recorded — and the symlink takes its place. Undo renames it back.

A switch between two releases is `symlink(new, tmp); rename(tmp, live)`: rename(2) replaces the old link
in one step, so a reader sees the old release or the new one, never a gap.

Every path here lies below the customer's root, where the customer's user owns the release folders' contents
(and, in a root that does not follow the ownership model, perhaps more): each is reached from the root's
descriptor without following a link (engines.beneath), and the renames, links and removals are made on those
descriptors. A link in the way is refused (beneath.LinkRefused) before anything changes; a switch refused so
is marked `refused` in its journal step by the caller and has nothing to undo.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from . import beneath, envfile, trees
from .trees import TRASH_PREFIX

RELEASES = "releases"
UNVERSIONED = "unversioned"  # the version name of a plain folder whose version nobody recorded
STAGE_MARK = ".kasa-stage-"
ASIDE_MARK = ".kasa-aside-"
_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,99}\Z")


class LayoutError(RuntimeError):
    """A release folder or symlink is not what the plan expects; the message says what was left as it was."""


def _checked_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise LayoutError(f"{what} {value!r} cannot name a release folder (letters, digits, '.', '+', '_', '-')")
    return value


def release_dir(root: str | os.PathLike, version: str, component: str) -> Path:
    """<root>/releases/<version>/<component> (names checked: they become folder names)."""
    return Path(root) / RELEASES / _checked_name(version, "version") / _checked_name(component, "component")


# --- what is live ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveState:
    kind: str  # "link" | "dir" | "none" | "other"
    target: str = ""  # the link's text, for a link
    version: str = ""  # for a link into releases/<version>/<component>: that version

    def as_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "version": self.version}


def live_state(root: str | os.PathLike, live: str | os.PathLike) -> LiveState:
    """What the service path holds now. A link must lead into <root>/releases/, else kind is "other"."""
    live = os.fspath(live)
    st = beneath.lstat(root, live)
    if st is None:
        return LiveState("none")
    if stat.S_ISLNK(st.st_mode):
        target = beneath.readlink(root, live) or ""
        resolved = Path(os.path.normpath(os.path.join(os.path.dirname(live), target)))
        releases = Path(root) / RELEASES
        try:
            rel = resolved.relative_to(releases)
        except ValueError:
            return LiveState("other", target)
        parts = rel.parts
        return LiveState("link", target, parts[0] if len(parts) == 2 else "")
    if stat.S_ISDIR(st.st_mode):
        return LiveState("dir")
    return LiveState("other")


def link_text(live: str | os.PathLike, target_dir: str | os.PathLike) -> str:
    """The relative link text from the service path to a release folder (survives moving the whole root)."""
    return os.path.relpath(os.fspath(target_dir), os.path.dirname(os.fspath(live)))


# --- staging ---------------------------------------------------------------------------------------
def staging_path(dest: str | os.PathLike, tag: str) -> Path:
    """Where a release folder is unpacked before it is renamed to `dest` (engines.zipunpack.stage_zip)."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}{STAGE_MARK}{tag}"


# --- the switch ------------------------------------------------------------------------------------
def _point_at(fd: int, name: str, target: str) -> None:
    """Make `name` in the folder `fd` a symlink to `target` in one step (replacing a previous link atomically)."""
    tmp = f"{name}.kasa-link-{os.getpid()}"
    try:
        os.unlink(tmp, dir_fd=fd)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp, dir_fd=fd)
    try:
        os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)  # EISDIR when it is a real folder: never replaced
    except BaseException:
        os.unlink(tmp, dir_fd=fd)
        raise
    beneath.fsync(fd)


def point(root: str | os.PathLike, live: str | os.PathLike, target: str) -> None:
    """Make `live` (below `root`) a symlink to `target` in one step (replacing a previous link atomically)."""
    with beneath.parent(root, live) as (fd, name):
        _point_at(fd, name, target)


def plan_switch(root: str | os.PathLike, live: str | os.PathLike, new_dir: str | os.PathLike | None, *,
                component: str, previous_version: str) -> dict:
    """The journal step for making `live` point at `new_dir` (None: no link at all). Record it, then apply.

    A plain folder at `live` moves to releases/<previous_version>/<component>; a link is replaced; nothing
    at `live` is fine too (an install)."""
    live = os.fspath(live)
    state = live_state(root, live)
    new = link_text(live, new_dir) if new_dir is not None else None
    step: dict = {"type": "switch", "component": component, "live": live, "new": new, "before": state.as_dict()}
    if state.kind == "other":
        raise LayoutError(f"{live} is neither a folder nor a link into {Path(root) / RELEASES}; nothing was switched")
    if state.kind == "dir":
        moved_to = release_dir(root, previous_version or UNVERSIONED, component)
        if beneath.lexists(root, moved_to):
            raise LayoutError(f"cannot keep {live} as the previous release: {moved_to} exists already; "
                              "nothing was switched")
        step["before"]["moved_to"] = str(moved_to)
    return step


def apply_switch(step: dict, *, root: str | os.PathLike) -> None:
    """Make the switch. Both folders are reached first (beneath.LinkRefused then: nothing was changed)."""
    live, before, new = step["live"], step["before"], step["new"]
    with contextlib.ExitStack() as stack:
        if new is None:
            try:
                lfd, lname = stack.enter_context(beneath.parent(root, live))
            except (FileNotFoundError, NotADirectoryError):
                return  # nothing there to take away
        else:
            lfd, lname = stack.enter_context(beneath.parent(root, live, create=True, mode=0o755))
        if before["kind"] == "dir":
            mfd, mname = stack.enter_context(beneath.parent(root, before["moved_to"], create=True, mode=0o755))
            os.rename(lname, mname, src_dir_fd=lfd, dst_dir_fd=mfd)
            beneath.fsync(mfd)
        if new is None:
            if stat.S_ISLNK(_lmode(lfd, lname)):
                os.unlink(lname, dir_fd=lfd)
                beneath.fsync(lfd)
            return
        _point_at(lfd, lname, new)


def undo_switch(step: dict, *, root: str | os.PathLike) -> bool:
    """Put the service path back as the step found it. Idempotent; True when something changed."""
    if step.get("refused"):
        return False  # refused before anything changed (beneath.LinkRefused)
    live, before = step["live"], step["before"]
    if before["kind"] == "dir" and not beneath.is_dir(root, before["moved_to"]):
        if beneath.is_dir(root, live):
            return False  # never moved, or already back
        raise LayoutError(f"cannot put back {live}: the previous folder is not at {before['moved_to']}")
    with beneath.parent(root, live) as (lfd, lname):
        mode = _lmode(lfd, lname)
        if before["kind"] == "link":
            if stat.S_ISLNK(mode) and os.readlink(lname, dir_fd=lfd) == before["target"]:
                return False
            if mode and not stat.S_ISLNK(mode):
                raise LayoutError(f"cannot put back the link {live}: something else is there now")
            _point_at(lfd, lname, before["target"])
            return True
        if before["kind"] == "dir":
            if stat.S_ISDIR(mode):
                return False  # already back
            with beneath.parent(root, before["moved_to"]) as (mfd, mname):
                if stat.S_ISLNK(mode):
                    os.unlink(lname, dir_fd=lfd)
                os.rename(mname, lname, src_dir_fd=mfd, dst_dir_fd=lfd)
                beneath.fsync(lfd)
            return True
        if before["kind"] == "none" and stat.S_ISLNK(mode):
            os.unlink(lname, dir_fd=lfd)
            beneath.fsync(lfd)
            return True
    return False


def _lmode(fd: int, name: str) -> int:
    """The entry's st_mode (a link not followed), 0 when there is none."""
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return 0


# --- keep N ----------------------------------------------------------------------------------------
def present_versions(root: str | os.PathLike, component: str) -> list[str]:
    """Versions with a release folder of `component` (staging and trash folders are not releases)."""
    base = Path(root) / RELEASES
    return sorted(v for v in beneath.listdir(root, base)
                  if not v.startswith(".") and _NAME.match(v) and beneath.is_dir(root, base / v / component))


def prune_plan(present: list[str], *, order: list[str], keep: int, protect: set[str]) -> list[str]:
    """Which versions to delete: everything but the protected ones (the live release, the rollback target)
    and the `keep` most recent others. `order` lists versions most recently live first; a version it does
    not know counts as older than any it knows (it was never live under Kasa), oldest name first."""
    rank = {v: i for i, v in enumerate(order)}
    others = [v for v in present if v not in protect]
    others.sort(key=lambda v: (0, rank[v]) if v in rank else (1, 0))
    return sorted(others[max(keep, 0):])


def remove_release(root: str | os.PathLike, version: str, component: str) -> bool:
    """Delete releases/<version>/<component> (and the version folder once empty)."""
    path = release_dir(root, version, component)
    if not beneath.lexists(root, path):
        return False
    trees.discard(path, root=root)
    beneath.rmdir(root, path.parent)  # kept while other components of that version live there
    return True


def sweep(root: str | os.PathLike) -> list[str]:
    """Remove trash and half-staged folders under <root>/releases left by a crash; returns what was removed."""
    base = Path(root) / RELEASES
    removed = []
    if not beneath.is_dir(root, base):
        return removed
    for version in beneath.listdir(root, base):
        candidates = [base / version]
        if beneath.is_dir(root, base / version):
            candidates += [base / version / name for name in beneath.listdir(root, base / version)]
        for p in candidates:
            if (p.name.startswith(TRASH_PREFIX) or STAGE_MARK in p.name) and beneath.is_dir(root, p):
                trees.remove_tree(p, ignore_errors=True, root=root)
                removed.append(str(p))
    return removed


# --- the .env of a staged release ------------------------------------------------------------------
@dataclass
class EnvMerge:
    text: str
    added: dict[str, str] = field(default_factory=dict)  # key -> the example's value
    removed: list[str] = field(default_factory=list)  # keys the example no longer lists (kept, not deleted)
    missing_required: list[str] = field(default_factory=list)


_LINE_KEY = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=")


def required_keys(example_text: str | None) -> list[str]:
    """Keys a release requires: those its .env.example lists with an EMPTY value (`API_KEY=`), meaning
    "no sensible default: the operator must set it". A key with a value there is a default, added as is."""
    if not example_text:
        return []
    return [k for k, v in envfile.parse(example_text).items() if v == ""]


def merge_env(live_text: str | None, example_text: str | None) -> EnvMerge:
    """The staged .env: the live one unchanged line for line, plus the keys the example adds (with the
    example's own line, so its value and quoting), after a comment saying where they come from.

    Keys the example no longer lists are reported as removed and KEPT: deleting a value an operator set is
    never undoable by Kasa, and an unused key costs nothing. Without an example nothing is added."""
    live_text = live_text or ""
    live = envfile.parse(live_text)
    if example_text is None:
        return EnvMerge(text=live_text)
    example = envfile.parse(example_text)
    lines = {}
    for line in example_text.splitlines():
        m = _LINE_KEY.match(line)
        if m and not line.lstrip().startswith("#"):
            lines[m.group(1)] = line.strip()
    added = {k: v for k, v in example.items() if k not in live}
    text = live_text
    if added:
        if text and not text.endswith("\n"):
            text += "\n"
        text += "# added by Kasa from the release's .env.example\n"
        text += "".join(f"{lines[k]}\n" for k in added)
    merged = envfile.parse(text)
    missing = [k for k in required_keys(example_text) if not merged.get(k)]
    removed = [k for k in live if k not in example]
    return EnvMerge(text=text, added=added, removed=removed, missing_required=missing)
