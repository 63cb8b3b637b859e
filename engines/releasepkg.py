"""Release packages: releases.json, semantic versions and version ranges.

Pure Python (no Django): the `releases` app calls validate_package() and writes nothing unless it passes.

releases.json (an annotated example with its zips: docs/releases-example/README.md)::

    {"backend": [{"version": "2.5.0", "file": "backend-2.5.0.zip", "requires": {"from": ">=2.4.0"}}],
     "admin": [...], "compatMatrix": [{"release": "2.5", "backend": "2.5.0", "admin": "2.5.0"}]}

Every top-level key other than compatMatrix is a component (a lowercase slug: it becomes a storage folder);
its value must be a list of versions. A compatMatrix row is one release: component → version, each naming a
version listed above; a component may be left out (the release does not change it). A row without "release"
is named by its backend version. A version's keys: version, file (relative to the JSON), and optional sha256,
requires, hooks ({install|migrate|build: argv list}, run in the staged component folder) and notes. Unknown keys
are refused so that a typo ("hook") is not silently ignored.

`requires` are preconditions on the customer's *current* versions, checked before moving to this version:
"from" is the current version of this same component (the upgrade path), any other key the current version
of that component. A component that a release leaves unchanged is not checked again.

Range grammar (npm-like, a subset)::

    range      := and-set ( "||" and-set )*
    and-set    := comparator ( " " comparator )*        all must hold
    comparator := "*" | op version | full-version       a bare full version means ==
    op         := ">=" | ">" | "<=" | "<" | "==" | "=" | "^" | "~"

`>=` and `<` accept a partial version (">=2.4", "<3" mean >=2.4.0, <3.0.0); `>`, `<=`, `==` need a full
one, because a partial one is ambiguous there. `^1.2.3` := >=1.2.3 <2.0.0 (^0.2.3 := <0.3.0, ^0.0.3 :=
<0.0.4); `~1.2.3` := >=1.2.3 <1.3.0 (~1 := <2.0.0). As in npm, a pre-release (2.5.0-rc.1) satisfies a
range only when a comparator of the same and-set names a pre-release of the same major.minor.patch, so
"<3" never lets 3.0.0-rc.1 through and ">=2.4.0" never offers a release candidate by accident.

Zip checks: engines.zipcheck (check_zip, ZipReport, ZipRefused and Limits are re-exported here).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engines import paths
from engines.zipcheck import GiB, Limits, MiB, ZipRefused, ZipReport, check_zip  # noqa: F401 (re-exported)

HOOKS = ("install", "migrate", "build")  # run in this order, before the services stop
SMOKE = "smoke"  # run once the new release answers (blue-green: beside the live one), with KASA_SMOKE_URL
ALL_HOOKS = (*HOOKS, SMOKE)
MATRIX = "compatMatrix"
_RESERVED = {MATRIX, "release", "notes", "from"}  # cannot be component names: they mean something in rows/requires
_COMPONENT = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_ENTRY_KEYS = ("version", "file", "sha256", "requires", "hooks", "notes")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_IDENT = r"(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(rf"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-({_IDENT}(?:\.{_IDENT})*))?"
                     r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?\Z")
_PARTIAL = re.compile(r"(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?\Z")
_OP = re.compile(r"(>=|<=|==|=|>|<|\^|~)?(.*)\Z", re.S)
MAX_VERSION_LEN = 100


class VersionError(ValueError):
    """Not a semantic version (or not a valid range); the message quotes the text."""


class PackageError(ValueError):
    """releases.json or one of its zips is refused; `problems` lists every problem found, each one sentence."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(text)


# --- semantic versions -----------------------------------------------------------------------------------------
@functools.total_ordering
@dataclass(frozen=True, eq=False)
class Version:
    """A semantic version (semver.org 2.0.0) with its precedence order: 2.10.0 > 2.9.0, 2.5.0-rc.1 < 2.5.0,
    1.0.0-alpha < 1.0.0-alpha.1 < 1.0.0-beta. Build metadata (+…) is kept but ignored by ordering and
    equality, as the specification says; two versions of one component may not differ only by it."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text) -> Version:
        if not isinstance(text, str):
            raise VersionError(f"{text!r} is not a semantic version (expected a string such as \"2.4.0\")")
        m = _SEMVER.match(text) if len(text) <= MAX_VERSION_LEN else None
        if not m:
            hint = " (without the leading 'v')" if text[:1] in "vV" and _SEMVER.match(text[1:]) else ""
            raise VersionError(f"{text!r} is not a semantic version MAJOR.MINOR.PATCH[-pre][+build]{hint}")
        pre = tuple(m[4].split(".")) if m[4] else ()
        build = tuple(m[5].split(".")) if m[5] else ()
        return cls(int(m[1]), int(m[2]), int(m[3]), pre, build)

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    @property
    def core(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def _key(self):
        if not self.prerelease:
            return (*self.core, (1,))
        # Numeric identifiers sort numerically and before alphanumeric ones; a longer list sorts after its prefix.
        idents = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (*self.core, (0, idents))

    def __eq__(self, other):
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other):
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __hash__(self):
        return hash(self._key())

    def __str__(self):
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    def __repr__(self):
        return f"Version({str(self)!r})"


# --- ranges ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A parsed range (see the module docstring for the grammar). `str()` gives the text it was parsed from."""

    text: str
    sets: tuple[tuple[tuple[str, Version, bool], ...], ...]  # OR of AND-sets of (op, version, written-by-user)

    @classmethod
    def parse(cls, text) -> Range:
        if not isinstance(text, str) or not text.strip():
            raise VersionError(f"{text!r} is not a version range (expected e.g. \">=2.4.0 <3\")")
        sets = []
        for alternative in text.split("||"):
            tokens = alternative.split()
            if not tokens:
                raise VersionError(f"range {text!r} has an empty alternative around '||'")
            comparators: list[tuple[str, Version, bool]] = []
            i = 0
            while i < len(tokens):
                token = tokens[i]
                if token in (">=", "<=", "==", "=", ">", "<", "^", "~") and i + 1 < len(tokens):
                    token, i = token + tokens[i + 1], i + 1  # ">= 2.4.0" written with a space
                if token == "-":
                    raise VersionError(f"range {text!r}: hyphen ranges are not supported, write >=A <=B")
                comparators.extend(_comparator(token, text))
                i += 1
            sets.append(tuple(comparators))
        return cls(text.strip(), tuple(sets))

    def satisfied_by(self, version: Version) -> bool:
        return any(_set_allows(s, version) for s in self.sets)

    def __str__(self):
        return self.text


def _comparator(token: str, text: str) -> list[tuple[str, Version, bool]]:
    if token in ("*", "x", "X"):
        return []
    op, rest = _OP.match(token).groups()
    op = "==" if op in (None, "=") else op
    if _SEMVER.match(rest):
        v = Version.parse(rest)
        if op == "^":
            upper = (v.major + 1, 0, 0) if v.major else (0, v.minor + 1, 0) if v.minor else (0, 0, v.patch + 1)
            return [(">=", v, True), ("<", Version(*upper), False)]
        if op == "~":
            return [(">=", v, True), ("<", Version(v.major, v.minor + 1, 0), False)]
        return [(op, v, True)]
    m = _PARTIAL.match(rest)
    if not m:
        raise VersionError(f"range {text!r}: {token!r} is not a comparator (e.g. >=2.4.0, <3, ^2.4, ~2.4.1)")
    major, minor = int(m[1]), (int(m[2]) if m[2] is not None else None)
    low = Version(major, minor or 0, 0)
    if op in (">=", "<"):
        return [(op, low, True)]
    if op == "^":
        upper = (major + 1, 0, 0) if major or minor is None else (0, minor + 1, 0)
        return [(">=", low, True), ("<", Version(*upper), False)]
    if op == "~":
        upper = (major + 1, 0, 0) if minor is None else (major, minor + 1, 0)
        return [(">=", low, True), ("<", Version(*upper), False)]
    shown = "" if op == "==" else op
    raise VersionError(f"range {text!r}: {token!r} is ambiguous with a partial version: write a full one "
                       f"(e.g. {shown}{low}) or use ^/~ for a series")


_OPS: dict[str, Callable[[Version, Version], bool]] = {
    ">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}


def _set_allows(comparators, version: Version) -> bool:
    if not all(_OPS[op](version, bound) for op, bound, _ in comparators):
        return False
    if not version.is_prerelease:
        return True
    return any(user and bound.is_prerelease and bound.core == version.core for _, bound, user in comparators)


def requirement_problems(requires: Mapping[str, str], component: str, current: Mapping[str, str]) -> list[str]:
    """Why the customer's `current` versions ({"backend": "2.4.0", ...}) do not meet `requires` of a version of
    `component`; an empty list when they do. Each problem is one sentence fragment naming what was found."""
    problems = []
    for key, text in requires.items():
        subject = component if key == "from" else key
        rng = Range.parse(text)
        have = current.get(subject)
        if have in (None, ""):
            problems.append(f"needs {subject} {rng} but the customer has no {subject} version recorded")
            continue
        try:
            have_v = Version.parse(have)
        except VersionError:
            problems.append(f"needs {subject} {rng} but the customer's {subject} version {have!r} is not semver")
            continue
        if not rng.satisfied_by(have_v):
            problems.append(f"needs {subject} {rng} (the customer has {have_v})")
    return problems


# --- releases.json ---------------------------------------------------------------------------------------------
@dataclass
class ComponentEntry:
    component: str
    version: Version
    file: str
    sha256: str = ""  # as declared in releases.json ("" when not given)
    requires: dict[str, str] = field(default_factory=dict)
    hooks: dict[str, list[str]] = field(default_factory=dict)
    notes: str = ""
    path: Path | None = None
    zip: ZipReport | None = None

    @property
    def label(self) -> str:
        return f"{self.component} {self.version}"


@dataclass
class ReleaseEntry:
    name: str
    components: dict[str, Version]
    notes: str = ""


@dataclass
class Package:
    components: list[str]
    entries: list[ComponentEntry]
    releases: list[ReleaseEntry]

    def entry(self, component: str, version: Version) -> ComponentEntry:
        return next(e for e in self.entries if e.component == component and e.version == version)


def load_json(path: str | Path, *, limits: Limits | None = None) -> dict:
    limits = limits or Limits()
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_json_bytes:
            raise PackageError([f"{path.name} is {size} bytes, more than the {limits.max_json_bytes} allowed"])
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise PackageError([f"{path} does not exist"]) from None
    except IsADirectoryError:
        raise PackageError([f"{path} is a folder, not a releases.json file"]) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError([f"{path.name} is not valid UTF-8 JSON ({exc})"]) from None
    except OSError as exc:
        raise PackageError([f"{path} cannot be read ({exc.strerror or exc})"]) from None
    if not isinstance(data, dict):
        raise PackageError([f"{path.name} must hold a JSON object of components and compatMatrix"])
    return data


def parse_package(data: dict) -> Package:
    """Check the shape of a loaded releases.json (no files are read). PackageError lists every problem."""
    package, problems = _parse(data)
    if problems:
        raise PackageError(problems)
    return package


def _parse(data: dict) -> tuple[Package, list[str]]:
    problems: list[str] = []
    components = [k for k in data if k != MATRIX]
    entries: list[ComponentEntry] = []
    for comp in components:
        if not isinstance(comp, str) or not _COMPONENT.match(comp) or comp in _RESERVED:
            problems.append(f"{comp!r} is not a valid component name (lowercase letters, digits, - and _, "
                            f"starting with a letter; not {', '.join(sorted(_RESERVED))})")
            continue
        if not isinstance(data[comp], list):
            problems.append(f"component {comp!r} must be a list of versions, not {type(data[comp]).__name__}")
            continue
        seen: dict[Version, str] = {}
        for i, raw in enumerate(data[comp]):
            entry = _parse_entry(comp, i, raw, components, problems)
            if entry is None:
                continue
            if entry.version in seen:
                problems.append(f"{comp} {entry.version} is listed twice (as {seen[entry.version]!r} "
                                f"and {str(entry.version)!r})")
                continue
            seen[entry.version] = str(entry.version)
            entries.append(entry)
    releases = _parse_matrix(data.get(MATRIX, []), components, entries, problems)
    return Package(components=[c for c in components if isinstance(data.get(c), list)], entries=entries,
                   releases=releases), problems


def _parse_entry(comp: str, i: int, raw, components: list[str], problems: list[str]) -> ComponentEntry | None:
    where = f"{comp}[{i}]"
    if not isinstance(raw, dict):
        problems.append(f"{where} must be an object with version and file")
        return None
    unknown = sorted(set(raw) - set(_ENTRY_KEYS))
    if unknown:
        problems.append(f"{where} has unknown key(s) {', '.join(unknown)} (allowed: {', '.join(_ENTRY_KEYS)})")
    try:
        version = Version.parse(raw.get("version"))
    except VersionError as exc:
        problems.append(f"{where}: version {exc}")
        return None
    where = f"{comp} {version}"
    file = raw.get("file")
    if not isinstance(file, str) or not file:
        problems.append(f"{where}: file must name the zip, relative to releases.json")
        file = ""
    else:
        try:
            file = paths.relative_inside(file, what="file")
        except paths.PathEscapeError as exc:
            problems.append(f"{where}: {exc}")
            file = ""  # never looked at: it may point anywhere
    sha = raw.get("sha256", "")
    if not isinstance(sha, str) or (sha and not _SHA256.match(sha.lower())):
        problems.append(f"{where}: sha256 must be 64 hexadecimal characters")
        sha = ""
    notes = raw.get("notes", "")
    if not isinstance(notes, str):
        problems.append(f"{where}: notes must be a string")
        notes = ""
    requires = _parse_requires(where, raw.get("requires", {}), components, problems)
    hooks = _parse_hooks(where, raw.get("hooks", {}), problems)
    return ComponentEntry(component=comp, version=version, file=file,
                          sha256=sha.lower(), requires=requires, hooks=hooks, notes=notes)


def _parse_requires(where: str, raw, components: list[str], problems: list[str]) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: requires must be an object such as {{\"from\": \">=2.4.0\"}}")
        return {}
    out = {}
    for key, text in raw.items():
        if key != "from" and key not in components:
            problems.append(f"{where}: requires names {key!r}, which is neither 'from' nor a component "
                            f"of this file ({', '.join(components)})")
            continue
        try:
            out[key] = str(Range.parse(text))
        except VersionError as exc:
            problems.append(f"{where}: requires {key}: {exc}")
    return out


def _parse_hooks(where: str, raw, problems: list[str]) -> dict[str, list[str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: hooks must be an object of {', '.join(ALL_HOOKS)} → argv list")
        return {}
    out = {}
    for name, argv in raw.items():
        if name not in ALL_HOOKS:
            problems.append(f"{where}: unknown hook {name!r} (known: {', '.join(ALL_HOOKS)})")
        elif (not isinstance(argv, list) or not argv
              or not all(isinstance(a, str) and a and "\x00" not in a for a in argv)):
            problems.append(f"{where}: hook {name} must be a non-empty list of strings (an argv such as "
                            f"[\"npm\", \"ci\"]), not a shell string")
        else:
            out[name] = list(argv)
    return out


def _parse_matrix(raw, components: list[str], entries: list[ComponentEntry], problems: list[str]):
    if not isinstance(raw, list):
        problems.append(f"{MATRIX} must be a list of rows")
        return []
    known = {(e.component, e.version): e for e in entries}
    releases: list[ReleaseEntry] = []
    names: set[str] = set()
    for i, row in enumerate(raw):
        where = f"{MATRIX}[{i}]"
        if not isinstance(row, dict):
            problems.append(f"{where} must be an object of component → version")
            continue
        before = len(problems)
        versions: dict[str, Version] = {}
        for key, value in row.items():
            if key in ("release", "notes"):
                continue
            if key not in components:
                problems.append(f"{where} names component {key!r}, which is not listed in this file "
                                f"({', '.join(components) or 'none'})")
            else:
                try:
                    v = Version.parse(value)
                except VersionError as exc:
                    problems.append(f"{where}: {key} {exc}")
                    continue
                if (key, v) in known:
                    versions[key] = v
                else:
                    problems.append(f"{where}: {key} {v} is not listed under {key!r}")
        name = row.get("release", str(versions["backend"]) if "backend" in versions else None)
        notes = row.get("notes", "")
        if name is None:
            if len(problems) == before:  # else the backend named was refused above: already reported
                problems.append(f"{where} has no release name and no backend version to be named by")
        elif not isinstance(name, str) or not name.strip() or len(name) > 100 or not name.isprintable():
            problems.append(f"{where}: release must be printable text of 1 to 100 characters")
        elif name.strip() in names:
            problems.append(f"release {name.strip()!r} appears twice in {MATRIX}")
        if not isinstance(notes, str):
            problems.append(f"{where}: notes must be a string")
        if not versions and len(problems) == before:
            problems.append(f"{where} ({name}) names no component version")
        if len(problems) == before:
            names.add(name.strip())
            releases.append(ReleaseEntry(name=name.strip(), components=versions, notes=notes))
    return releases


# --- the whole package -----------------------------------------------------------------------------------------
def validate_package(json_path: str | Path, *, locate: Callable[[str], Path | None] | None = None,
                     missing: str = "", limits: Limits | None = None) -> Package:
    """Load releases.json, check its shape, then every zip it names. Raises PackageError listing every problem;
    nothing is written anywhere. `locate(file)` finds a zip (default: relative to the JSON's folder); `missing`
    ends the message of a zip it does not find (default: "in <the JSON's folder>")."""
    limits = limits or Limits()
    json_path = Path(json_path)
    package, problems = _parse(load_json(json_path, limits=limits))  # then the zips, to list every problem
    locate = locate or (lambda rel: json_path.parent / rel)
    missing = missing or f"in {json_path.parent}"
    for entry in package.entries:
        if not entry.file:
            continue  # already reported
        path = locate(entry.file)
        if path is None or not Path(path).is_file():
            problems.append(f"{entry.label}: zip {entry.file!r} not found {missing}")
            continue
        entry.path = Path(path)
        try:
            entry.zip = check_zip(entry.path, limits=limits)
        except ZipRefused as exc:
            problems.append(f"{entry.label}: {entry.file} {exc}")
            continue
        except OSError as exc:
            problems.append(f"{entry.label}: {entry.file} cannot be read ({exc.strerror or exc})")
            continue
        if entry.sha256 and entry.sha256 != entry.zip.sha256:
            problems.append(f"{entry.label}: {entry.file} has sha256 {entry.zip.sha256}, not the "
                            f"{entry.sha256} releases.json declares (corrupt or replaced file)")
    if problems:
        raise PackageError(problems)
    return package


def release_sort_key(versions: Mapping[str, Version], order: list[str]) -> tuple:
    """Order releases by their component versions, in `order` (backend first, then alphabetical); a component
    a release leaves out counts as older than any version."""
    return tuple((1, versions[c]) if c in versions else (0, None) for c in order)


def component_order(names) -> list[str]:
    names = set(names)
    return (["backend"] if "backend" in names else []) + sorted(names - {"backend"})
