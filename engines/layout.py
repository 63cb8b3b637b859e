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
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import envfile, trees
from .trees import TRASH_PREFIX, discard

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
    if os.path.islink(live):
        target = os.readlink(live)
        resolved = Path(os.path.normpath(os.path.join(os.path.dirname(live), target)))
        releases = Path(root) / RELEASES
        try:
            rel = resolved.relative_to(releases)
        except ValueError:
            return LiveState("other", target)
        parts = rel.parts
        return LiveState("link", target, parts[0] if len(parts) == 2 else "")
    if os.path.isdir(live):
        return LiveState("dir")
    if os.path.lexists(live):
        return LiveState("other")
    return LiveState("none")


def link_text(live: str | os.PathLike, target_dir: str | os.PathLike) -> str:
    """The relative link text from the service path to a release folder (survives moving the whole root)."""
    return os.path.relpath(os.fspath(target_dir), os.path.dirname(os.fspath(live)))


# --- staging ---------------------------------------------------------------------------------------
def staging_path(dest: str | os.PathLike, tag: str) -> Path:
    """Where a release folder is unpacked before it is renamed to `dest` (engines.zipunpack.stage_zip)."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}{STAGE_MARK}{tag}"


# --- the switch ------------------------------------------------------------------------------------
def point(live: str | os.PathLike, target: str) -> None:
    """Make `live` a symlink to `target` in one step (replacing a previous link atomically)."""
    live = os.fspath(live)
    tmp = f"{live}.kasa-link-{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    try:
        os.rename(tmp, live)  # EISDIR when live is a real folder: a link never silently replaces one
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(live))


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
        if os.path.lexists(moved_to):
            raise LayoutError(f"cannot keep {live} as the previous release: {moved_to} exists already; "
                              "nothing was switched")
        step["before"]["moved_to"] = str(moved_to)
    return step


def apply_switch(step: dict) -> None:
    live, before, new = step["live"], step["before"], step["new"]
    if before["kind"] == "dir":
        moved_to = before["moved_to"]
        os.makedirs(os.path.dirname(moved_to), mode=0o755, exist_ok=True)
        os.rename(live, moved_to)
        _fsync_dir(os.path.dirname(moved_to))
    if new is None:
        if os.path.islink(live):
            os.unlink(live)
            _fsync_dir(os.path.dirname(live))
        return
    os.makedirs(os.path.dirname(live), mode=0o755, exist_ok=True)
    point(live, new)


def undo_switch(step: dict) -> bool:
    """Put the service path back as the step found it. Idempotent; True when something changed."""
    live, before = step["live"], step["before"]
    if before["kind"] == "link":
        if os.path.islink(live) and os.readlink(live) == before["target"]:
            return False
        if os.path.lexists(live) and not os.path.islink(live):
            raise LayoutError(f"cannot put back the link {live}: something else is there now")
        point(live, before["target"])
        return True
    if before["kind"] == "dir":
        moved_to = before["moved_to"]
        if os.path.isdir(live) and not os.path.islink(live):
            return False  # never moved, or already back
        if not os.path.isdir(moved_to):
            raise LayoutError(f"cannot put back {live}: the previous folder is not at {moved_to}")
        if os.path.islink(live):
            os.unlink(live)
        os.rename(moved_to, live)
        _fsync_dir(os.path.dirname(live))
        return True
    if before["kind"] == "none" and os.path.islink(live):
        os.unlink(live)
        _fsync_dir(os.path.dirname(live))
        return True
    return False


# --- keep N ----------------------------------------------------------------------------------------
def present_versions(root: str | os.PathLike, component: str) -> list[str]:
    """Versions with a release folder of `component` (staging and trash folders are not releases)."""
    base = Path(root) / RELEASES
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir()
                  if not p.name.startswith(".") and (p / component).is_dir() and not (p / component).is_symlink())


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
    if not os.path.lexists(path):
        return False
    discard(path)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # other components of that version still live there
    return True


def sweep(root: str | os.PathLike) -> list[str]:
    """Remove trash and half-staged folders under <root>/releases left by a crash; returns what was removed."""
    base = Path(root) / RELEASES
    removed = []
    if not base.is_dir():
        return removed
    for version in base.iterdir():
        candidates = [version] + (list(version.iterdir()) if version.is_dir() and not version.is_symlink() else [])
        for p in candidates:
            if (p.name.startswith(TRASH_PREFIX) or STAGE_MARK in p.name) and p.is_dir() and not p.is_symlink():
                trees.remove_tree(p, ignore_errors=True)
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


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
