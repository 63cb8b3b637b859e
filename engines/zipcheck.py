"""Checks on a component zip, before anything of it is stored or unpacked.

A valid, unencrypted zip; every member relative, without `..`, backslashes or drive letters, no duplicate
names; no device/FIFO members; total declared size and member count under Limits; every member read once so
CRCs are checked and a member can never yield more than its declared size.

Symlinks are judged where they will live: in the component folder, after the zip's single top folder (if
any) is stripped, as staging unpacks it. Each link is resolved as the kernel would, from the folder it is
extracted into and through the zip's other links (`l -> .` makes `l/l/..` climb from the folder itself, not
from `l`); one that leads above the component folder, or a loop, refuses the whole zip. No member may be
written through a link (`l/file` where `l` is a link): staging creates links last, so it could only fail.

Setuid/setgid bits in a member's Unix mode (external_attr) are listed in `ZipReport.setid`; staging never
applies them (engines.zipunpack), and the upgrade's log names each one.

Pure Python (no Django). engines.releasepkg re-exports check_zip, ZipReport, ZipRefused and Limits (which also
carries the releases.json size limit, so that one object holds every limit of a package).
"""

from __future__ import annotations

import posixpath
import re
import stat
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from engines import envfile
from engines.streams import CHUNK, sha256_of

MiB, GiB = 1 << 20, 1 << 30


class ZipRefused(ValueError):
    """A zip is not a valid component package; the message names the member and the rule."""


@dataclass
class Limits:
    max_json_bytes: int = 5 * MiB
    max_zip_bytes: int = 1 * GiB
    max_unpacked_bytes: int = 2 * GiB  # total declared uncompressed size of one zip (zip bombs)
    max_members: int = 200_000
    max_link_target: int = 4096
    max_env_example: int = 1 * MiB
    max_link_hops: int = 40  # as Linux's MAXSYMLINKS


@dataclass
class ZipReport:
    sha256: str
    size: int
    members: int
    unpacked_size: int
    root: str  # the single top-level folder holding everything, or "" when files sit at the top
    env_example: list[str]  # keys of <root>/.env.example, in file order (values are not kept)
    setid: list[tuple[str, int]] = field(default_factory=list)  # (member, mode) with setuid/setgid bits


# --- zips ------------------------------------------------------------------------------------------------------
def check_zip(path: str | Path, *, limits: Limits | None = None) -> ZipReport:
    """Check one component zip (see the module docstring) and describe it. Raises ZipRefused."""
    limits = limits or Limits()
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_zip_bytes:
        raise ZipRefused(f"is {size} bytes, more than the {limits.max_zip_bytes} allowed")
    with open(path, "rb") as fh:
        sha, _ = sha256_of(fh)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_members:
                raise ZipRefused(f"has {len(infos)} members, more than the {limits.max_members} allowed")
            declared = sum(i.file_size for i in infos)
            if declared > limits.max_unpacked_bytes:
                raise ZipRefused(f"would unpack to {declared} bytes, more than the {limits.max_unpacked_bytes} "
                                 "allowed (zip bomb?)")
            names, links = _check_names(zf, infos, limits)
            root = _root_folder(names)
            prefix = f"{root}/" if root else ""
            # What staging makes of it: names relative to the component folder (the top folder itself is dropped).
            inside = {n[len(prefix):]: n for n in names if n != root}
            confine(list(inside), {n[len(prefix):]: t for n, t in links.items()}, limits=limits,
                    shown=inside.get)
            for info in infos:
                if not info.is_dir():
                    _read_all(zf, info)
            env_keys = _env_example(zf, names, links, root, limits)
    except zipfile.BadZipFile as exc:
        raise ZipRefused(f"is not a valid zip file ({exc})") from None
    except (NotImplementedError, RuntimeError) as exc:  # unsupported compression method, encryption
        raise ZipRefused(f"cannot be read: {exc}") from None
    setid = [(n, unix_mode(i)) for n, i in names.items() if unix_mode(i) & SETID and n not in links]
    return ZipReport(sha256=sha, size=size, members=len(infos), unpacked_size=declared, root=root,
                     env_example=env_keys, setid=setid)


SETID = stat.S_ISUID | stat.S_ISGID


def unix_mode(info: zipfile.ZipInfo) -> int:
    """The member's Unix mode (type and permission bits) when a Unix zip tool wrote one, else 0."""
    return info.external_attr >> 16 if info.create_system == 3 else 0


def confine(members: list[str], links: dict[str, str], *, limits: Limits | None = None, shown=None) -> None:
    """Refuse (ZipRefused) a link among `links` (name -> target) that resolves outside the folder holding
    `members` (every name, links included, relative to that folder), a loop of links, and a member placed
    under a link. `shown(name)` gives the name to put in messages (the zip's own, top folder included)."""
    limits = limits or Limits()
    show = (lambda n: shown(n) or n) if shown else (lambda n: n)
    for name, target in links.items():
        _resolve(posixpath.join(posixpath.dirname(name), target), links, limits,
                 what=f"symlink {show(name)!r} → {target!r}")
    for name in members:
        parts = name.split("/")
        for k in range(1, len(parts)):
            folder = "/".join(parts[:k])
            if folder in links:
                raise ZipRefused(f"member {show(name)!r} would be written through the symlink {show(folder)!r}")


def _check_names(zf: zipfile.ZipFile, infos, limits: Limits) -> tuple[dict[str, zipfile.ZipInfo], dict[str, str]]:
    names: dict[str, zipfile.ZipInfo] = {}
    links: dict[str, str] = {}
    for info in infos:
        raw = info.filename
        if not raw or "\\" in raw or raw.startswith("/") or re.match(r"[A-Za-z]:", raw):
            raise ZipRefused(f"member {raw!r} is not a relative path inside the component folder "
                             "(absolute, drive letter or backslash)")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ZipRefused(f"member {raw!r} escapes the component folder ('..')")
        if not parts:
            raise ZipRefused(f"member {raw!r} names the component folder itself")
        if info.flag_bits & 0x1:
            raise ZipRefused(f"member {raw!r} is encrypted")
        name = "/".join(parts)
        if name in names:
            raise ZipRefused(f"member {name!r} appears twice")
        names[name] = info
        mode = unix_mode(info)
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            if info.file_size > limits.max_link_target:
                raise ZipRefused(f"symlink {raw!r} has a target longer than {limits.max_link_target} bytes")
            target = zf.read(info).decode("utf-8", "replace")
            if not target or "\x00" in target or target.startswith("/") or "\\" in target:
                raise ZipRefused(f"symlink {raw!r} → {target!r} points outside the component folder "
                                 "(absolute, empty or with a backslash)")
            links[name] = target
        elif kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise ZipRefused(f"member {raw!r} is a device, FIFO or socket, which a package may not contain")
    return names, links


def _resolve(path: str, links: dict[str, str], limits: Limits, *, what: str) -> None:
    """Follow `path` through the zip's own symlinks as the kernel would after extraction; refuse when it
    climbs above the component folder (a lexical check alone is fooled by a link to '.' used as 'l/l/..')."""
    resolved: list[str] = []
    queue = deque(p for p in path.split("/") if p not in ("", "."))
    hops = 0
    while queue:
        part = queue.popleft()
        if part == "..":
            if not resolved:
                raise ZipRefused(f"{what} leads outside the component folder")
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is not None:
            hops += 1
            if hops > limits.max_link_hops:
                raise ZipRefused(f"{what} goes through more than {limits.max_link_hops} symlinks (a loop?)")
            resolved.pop()
            queue.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))


def _read_all(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    # zipfile stops at the declared size and checks the CRC at the end: a lying header fails here, not later.
    with zf.open(info) as member:
        while member.read(CHUNK):
            pass


def _root_folder(names: dict[str, zipfile.ZipInfo]) -> str:
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1:
        return ""
    top = tops.pop()
    nested = any("/" in n for n in names)
    return top if nested and (top not in names or names[top].is_dir()) else ""


def _env_example(zf, names, links, root: str, limits: Limits) -> list[str]:
    name = f"{root}/.env.example" if root else ".env.example"
    info = names.get(name)
    if info is None or name in links or info.is_dir() or info.file_size > limits.max_env_example:
        return []
    return list(envfile.parse(zf.read(info).decode("utf-8", "replace")))
