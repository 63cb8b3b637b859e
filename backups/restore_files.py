"""The files of a restore: the staging folder, the swaps of service folders and config files, the log folders
carried over, the links put back; their undo and their cleanup.

All of it happens below the root (the customer's, or a copy's), in folders the customer's OS user may change
while Kasa's worker, as root, works there. So every path is reached from the root's descriptor without
following a link (engines.beneath) and every change is made on descriptors (renameat2, renameat, mkdirat,
unlinkat): a folder swapped for a link to /var or /etc/systemd between a check and its use is refused
(beneath.LinkRefused), never followed. A step refused so changed nothing: the journal marks it `refused` and
the restore fails and undoes the rest as after any failure.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from customers.roots import trash_dir
from engines import beneath, paths, sources, swap, trees
from operations.context import OperationError, RunContext

STAGING_PREFIX = ".kasa-restore-"


def staging_dir(root: Path, run_id: int) -> Path:
    return root / f"{STAGING_PREFIX}{run_id}"


def make_staging(root: Path, staging: Path) -> None:
    """The staging folder: created in the root's descriptor, the worker's, 0700 (only the folders unpacked into
    it are given to the customer's user): nobody else may enter it until its trees are swapped in."""
    beneath.mkdir(root, staging, mode=0o700)


def applied(journal, step: dict, action) -> None:
    """Make a journalled change; refused before anything changed (a link in the way): the step says so."""
    try:
        action()
    except beneath.BeneathError as exc:
        journal.refuse(step, exc)
        raise


def file_swaps(plan, staging: Path, *, kind: str) -> list[tuple[str, str]]:
    """(live path, staged path) pairs: one per service folder (kind "service") or per config file ("config")."""
    pairs = []
    for art in plan.artifacts:
        if art.kind != kind:
            continue
        unpacked = staging / art.name.split(".", 1)[0]
        if art.kind == "service":
            rel = (art.details or {}).get("path") or art.source
            paths.relative_inside(rel, what="service path")  # a manifest never places a folder outside the root
            pairs.append((str(plan.root / rel), str(unpacked / rel)))
        else:
            for rel in (art.details or {}).get("files") or []:
                paths.relative_inside(rel, what="config file")
                if beneath.lexists(plan.root, unpacked / rel):
                    pairs.append((str(plan.root / rel), str(unpacked / rel)))
    return pairs


def swap_in(ctx: RunContext, plan, staging: Path, journal, *, clone: bool) -> None:
    """Every staged service folder and config file swapped with the live one (journalled, undoable); in place,
    what the backup left out on purpose (logs) is carried into the staged tree first. A copy goes only into an
    empty place."""
    root = plan.root
    excludes = (plan.backup.manifest or {}).get("excludes", list(sources.DEFAULT_EXCLUDES))
    for kind in ("service", "config"):
        for live, staged in file_swaps(plan, staging, kind=kind):
            parent = os.path.dirname(live)
            if clone:
                if beneath.lexists(root, live) and beneath.is_dir(root, staged):
                    raise OperationError(f"{live} already exists in the copy's root: a copy is only made into "
                                         "an empty place")
                # A config file that a service folder brought already is replaced by the config artifact's copy.
                beneath.makedirs(root, parent, mode=0o755)
            else:
                if not beneath.lexists(root, parent):
                    beneath.makedirs(root, parent, mode=0o755)  # Kasa's, like the root: see README "Security model"
                if beneath.is_dir(root, live) and beneath.is_dir(root, staged):
                    carry_excluded(ctx, root, live, staged, excludes, journal)
            step = journal.add({"type": "files", **swap.plan(live, staged, root=root)})
            applied(journal, step, lambda step=step: swap.apply(step, root=root))
            if not clone:
                ctx.info(f"swapped in {os.path.relpath(live, root)}")
        if kind == "service":
            if not clone:
                remove_absent(ctx, plan, staging, journal)
            relink(ctx, plan, journal)


def remove_absent(ctx: RunContext, plan, staging: Path, journal) -> None:
    """The folders the backup records as absent (a safety backup taken while they were gone) are made absent
    again: each live one is moved into the staging folder, journalled like a swap (the undo moves it back), and
    thrown away with the staging folder once the restore holds. Before the config files: none of them lives in
    a folder that was absent."""
    root = plan.root
    for entry in getattr(plan, "absent", None) or []:
        rel = paths.relative_inside(entry["path"], what="service path")
        if rel in ("", "."):  # the root itself is never absent (a manifest saying so is not followed)
            raise OperationError(f"backup #{plan.backup.pk} records the customer's root as absent: refused")
        live = str(root / rel)
        if not beneath.lexists(root, live):
            ctx.info(f"{rel} stays absent, as backup #{plan.backup.pk} recorded it")
            continue
        step = journal.add({"type": "removed", "live": live, "staged": str(staging / f".absent-{entry['source']}")})
        applied(journal, step, lambda step=step: beneath.rename(root, step["live"], step["staged"]))
        ctx.info(f"removed {rel}: absent when backup #{plan.backup.pk} was taken (set aside until the restore holds)")


def relink(ctx: RunContext, plan, journal) -> None:
    """An upgraded service's path is a symlink to its release folder: point it where it pointed at backup
    time (a later upgrade may have moved it), journalled like every swap. Before the config files, which
    are written through the link."""
    root = plan.root
    for art in plan.artifacts:
        link = (art.details or {}).get("link") if art.kind == "service" else None
        if not link:
            continue
        rel, target = paths.relative_inside(link["path"], what="service path"), link["target"]
        paths.relative_inside(os.path.normpath(os.path.join(os.path.dirname(rel), target)), what="link target")
        live = root / rel
        if beneath.readlink(root, live) == target:
            continue
        tmp = f"{live}.kasa-link-{ctx.run.pk}"
        if beneath.lexists(root, tmp):
            beneath.unlink(root, tmp)
        beneath.symlink(root, target, tmp)
        step = journal.add({"type": "files", "beside": True, **swap.plan(str(live), tmp, root=root)})
        applied(journal, step, lambda step=step: swap.apply(step, root=root))
        ctx.info(f"{rel} points at {target} again")


def carry_excluded(ctx: RunContext, root: Path, live: str, staged: str, patterns: list[str], journal) -> None:
    """What the backup left out on purpose (log folders, excluded patterns) stays: it moves into the staged
    tree before the swap, so a restore never deletes today's logs. Undone like every other step.

    The live tree is the customer's user's: it is walked through descriptors (os.fwalk, no link followed), and
    each move is reached again from the root, without following a link, when it is made."""
    carried = 0
    with beneath.folder(root, live) as top:
        for dirpath, dirnames, filenames, _fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            rel_dir = os.path.normpath(dirpath)
            for name in list(dirnames) + filenames:
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if not excluded(rel, name, patterns):
                    continue
                if name in dirnames:
                    dirnames.remove(name)  # carried whole: do not descend
                target_parent = os.path.join(staged, os.path.dirname(rel))
                target = os.path.join(staged, rel)
                if not beneath.is_dir(root, target_parent) or beneath.lexists(root, target):
                    continue  # the restored tree has no such folder, or brings its own: leave the live one aside
                step = journal.add({"type": "carry", "from": os.path.join(live, rel), "to": target})
                applied(journal, step, lambda step=step: beneath.rename(root, step["from"], step["to"]))
                carried += 1
    if carried:
        ctx.info(f"kept {carried} excluded path(s) (logs) of {os.path.basename(live)}")


def excluded(rel: str, name: str, patterns: list[str]) -> bool:
    # GNU tar's --exclude: a pattern without '/' matches any path component; with '/', the path.
    return any(fnmatch.fnmatch(rel if "/" in p else name, p) for p in patterns)


# --- undo and clean up ------------------------------------------------------------------------------------
def undo(ctx: RunContext, step: dict, root: Path) -> bool:
    """Undo one file step of the journal; False when it is not one."""
    kind = step["type"]
    if kind == "files":
        if swap.undo(step, root=root):
            ctx.info(f"put back {step['live']}")
        if step.get("beside"):
            try:
                if beneath.is_link(root, step["staged"]):
                    beneath.unlink(root, step["staged"])  # the link we made
            except beneath.BeneathError:
                if not step.get("refused"):  # else it sits beside a folder swapped away by the customer's user
                    raise
    elif kind == "carry":
        if step.get("refused"):
            return True
        if beneath.lexists(root, step["to"]) and not beneath.lexists(root, step["from"]):
            beneath.rename(root, step["to"], step["from"])
    elif kind == "removed":  # a folder the backup records as absent, set aside (remove_absent)
        if step.get("refused"):
            return True
        if beneath.lexists(root, step["staged"]) and not beneath.lexists(root, step["live"]):
            beneath.rename(root, step["staged"], step["live"])
            ctx.info(f"put back {step['live']}")
    elif kind == "staging":
        trees.remove_tree(step["path"], ignore_errors=True, root=root)
    else:
        return False
    return True


def clean_up(step: dict, root: Path) -> bool:
    """The restore holds: throw away what one file step kept for the way back; False when it is not one.
    Moved at once out of the customer's root into Kasa's trash folder (trash_dir) and removed there by a
    detached `rm -rf` the restore does not wait for: the restore stays as fast, and no `.kasa-trash-*` is left
    in the customer's root once it returns (on another filesystem it is removed before returning instead).
    Trash left by a crash is swept by the next restore."""
    if step["type"] == "staging":
        # it holds the previous trees now
        trees.discard(step["path"], background=True, root=root, trash_dir=trash_dir())
    elif step["type"] == "files" and step.get("beside"):  # the previous link (or folder) set aside
        trees.discard(step["staged"], background=True, root=root, trash_dir=trash_dir())
    elif step["type"] not in ("files", "carry", "removed"):  # a removed folder lies in the staging folder
        return False
    return True


def sweep_trash(root: Path) -> None:
    """Trash folders a crash left in the root, and old ones in Kasa's trash folder."""
    trees.sweep_trash(trash_dir())
    try:
        for name in beneath.listdir(root):
            if name.startswith(trees.TRASH_PREFIX) and beneath.is_dir(root, root / name):
                trees.remove_tree(root / name, ignore_errors=True, root=root)
    except beneath.BeneathError as exc:
        raise OperationError(f"{exc}; nothing was touched") from None


def journal_root(steps: list[dict], *candidates: str) -> Path:
    """The root a dead worker's file steps lie below (a copy's, or the customer's as stored or resolved)."""
    named = [p for s in steps for p in (s.get("live"), s.get("staged"), s.get("from"), s.get("to"), s.get("path"))
             if s.get("type") in ("files", "carry", "removed", "staging") and p]
    for cand in filter(None, candidates):
        try:
            for p in named:
                beneath.parts(cand, p)
        except beneath.NotBeneath:
            continue
        return Path(cand)
    return Path(next(filter(None, candidates)))
