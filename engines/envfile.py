""".env files: read, compare and rewrite them without losing a line or showing a secret.

The format is the common one (dotenv): `KEY=value`, optional `export `, quotes,
comments and blank lines. We keep every line as it was and only ever replace
the value part of a line we mean to change, so comments, order and quoting of
everything else survive a rewrite.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from . import runas

_LINE = re.compile(r"^(?P<lead>\s*(?:export\s+)?)(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)(?P<eq>\s*=\s*)(?P<value>.*?)\s*$")
# Keys whose values are shown only as a mask anywhere Kasa displays them.
_SECRET = re.compile(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL|PRIVATE|DSN|AUTH|SALT|COOKIE|SESSION|CERT", re.I)
MASK = "********"


@dataclass(frozen=True)
class Change:
    key: str
    status: str  # added | removed | changed | same
    old: str | None  # shown values: masked when secret
    new: str | None


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if " #" in value:  # an unquoted value ends at a comment
        value = value.split(" #", 1)[0].rstrip()
    return value


def is_env_name(name: str) -> bool:
    """A .env-like file, by its name (the last component): `.env`, `.env.<anything>` or `<anything>.env`."""
    base = name.rsplit("/", 1)[-1]
    return base == ".env" or base.startswith(".env.") or base.endswith(".env")


def parse(text: str) -> dict[str, str]:
    """KEY -> value (unquoted). A key given twice keeps its last value, as dotenv loaders do."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and not line.lstrip().startswith("#"):
            out[m["key"]] = unquote(m["value"])
    return out


def read(path: str | os.PathLike, *, owner: runas.Identity | None = None) -> dict[str, str]:
    """The file's keys ({} when it is missing). With `owner` (the customer's user, whose folder it lies in):
    only a regular file of that user's is read, never a link or a file of Kasa's the user pointed it at
    (runas.NotOwned)."""
    if owner is not None:
        try:
            return parse(runas.read_owned(path, owner, limit=16 << 20).decode("utf-8", "replace"))
        except runas.NotOwned as exc:
            if exc.errno == errno.ENOENT:
                return {}
            raise
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return parse(fh.read())
    except FileNotFoundError:
        return {}


def is_secret(key: str, value: str = "") -> bool:
    return bool(_SECRET.search(key)) or _url_password(value) is not None


def _url_password(value: str) -> str | None:
    if "://" not in value or "@" not in value:
        return None
    try:
        return urlsplit(value).password
    except ValueError:
        return None


def shown(key: str, value: str | None) -> str | None:
    """The value as Kasa may display it: secret keys masked whole, a password inside a URL masked."""
    if value is None:
        return None
    if _SECRET.search(key):
        return MASK if value else ""
    pw = _url_password(value)
    if pw:
        parts = urlsplit(value)
        netloc = parts.netloc.replace(f":{pw}@", f":{MASK}@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return value


def diff(old: dict[str, str], new: dict[str, str], *, include_same: bool = False) -> list[Change]:
    """Key by key, in the new file's order then the removed keys; values already masked."""
    changes = []
    for key, value in new.items():
        if key not in old:
            changes.append(Change(key, "added", None, shown(key, value)))
        elif old[key] != value:
            old_shown, new_shown = shown(key, old[key]), shown(key, value)
            if old_shown == new_shown:  # two different secrets: say it changed without showing either
                old_shown, new_shown = MASK + " (old)", MASK + " (new)"
            changes.append(Change(key, "changed", old_shown, new_shown))
        elif include_same:
            changes.append(Change(key, "same", shown(key, value), shown(key, value)))
    for key, value in old.items():
        if key not in new:
            changes.append(Change(key, "removed", shown(key, value), None))
    return changes


def replace_values(text: str, updates: dict[str, str]) -> str:
    """The same text with the values of `updates`' keys replaced (quoted when needed); other lines untouched."""
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body):]
        m = _LINE.match(body)
        if m and not body.lstrip().startswith("#") and m["key"] in updates:
            body = f"{m['lead']}{m['key']}{m['eq']}{_quote(updates[m['key']])}"
        out.append(body + ending)
    return "".join(out)


def _quote(value: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:@%+,=?&-]*", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
