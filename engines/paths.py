"""Containment checks for customer folders.

Every path Kasa touches on a customer's behalf must lie inside a base folder.
We refuse `..` components outright (even when they would resolve inside) because
they make intent unreadable, and resolve symlinks so that a link pointing out of
the base is caught.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


class PathEscapeError(ValueError):
    pass


def _has_parent_ref(raw: str) -> bool:
    return ".." in PurePosixPath(raw).parts


def resolve_inside(raw: str | os.PathLike, base: str | os.PathLike, *, what: str = "path") -> Path:
    """Return the resolved absolute path of `raw`, which must lie inside `base`.

    `raw` may be absolute or relative to `base`. It need not exist yet.
    """
    raw_s = os.fspath(raw)
    if not raw_s or "\x00" in raw_s:
        raise PathEscapeError(f"{what} is empty or contains a NUL byte")
    if _has_parent_ref(raw_s):
        raise PathEscapeError(f"{what} {raw_s!r} contains '..'")
    base_r = Path(base).resolve()
    candidate = Path(raw_s) if os.path.isabs(raw_s) else base_r / raw_s
    resolved = candidate.resolve()
    if resolved != base_r and base_r not in resolved.parents:
        raise PathEscapeError(f"{what} {raw_s!r} resolves to {str(resolved)!r}, outside {str(base_r)!r}")
    return resolved


def resolve_strictly_inside(raw: str | os.PathLike, base: str | os.PathLike, *, what: str = "path") -> Path:
    """Like resolve_inside, but the path may not be the base itself."""
    resolved = resolve_inside(raw, base, what=what)
    if resolved == Path(base).resolve():
        raise PathEscapeError(f"{what} {os.fspath(raw)!r} is the base folder itself")
    return resolved


def relative_inside(raw: str, *, what: str = "relative path") -> str:
    """Validate a relative path (no absolute, no `..`) and return it normalised."""
    if not raw or "\x00" in raw:
        raise PathEscapeError(f"{what} is empty or contains a NUL byte")
    if os.path.isabs(raw):
        raise PathEscapeError(f"{what} {raw!r} must be relative")
    if _has_parent_ref(raw):
        raise PathEscapeError(f"{what} {raw!r} contains '..'")
    norm = os.path.normpath(raw)
    return "" if norm == "." else norm


def overlap(a: Path, b: Path) -> str | None:
    """How folder `a` overlaps folder `b`: "is", "lies inside", "contains", or None (customer roots may not)."""
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None
