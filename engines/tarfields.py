"""Fields of tar headers read exactly as GNU tar reads them (numbers, pax decimals, star headers), and
member names fit for messages. Split out of engines.tarcheck, whose scanner uses them."""

from __future__ import annotations

import re

BLOCK = 512
_SPACES = frozenset(b" \t\n\v\f\r")
_OCTAL = re.compile(rb"([0-7]+)(?:[\0 \t\n\v\f\r]|\Z)")
_DIGITS = re.compile(rb"[0-9]{1,19}\Z")


def show(raw: bytes, limit: int = 160) -> str:
    """A member name fit for a message: decoded, control characters escaped, long names shortened."""
    text = raw.decode("utf-8", "backslashreplace")
    if len(text) > limit:
        text = text[: limit // 2] + "…" + text[-limit // 2 :]
    return repr(text)


def _number(fld: bytes, *, octal_only: bool = False) -> int | None:
    """A numeric header field read exactly as GNU tar's from_header reads it; None where GNU tar would
    fail or where it accepts something we do not (base-64, negative base-256)."""
    m = _OCTAL.match(fld)
    if m:  # the common case, as GNU tar writes it: digits, then NUL or space
        return int(m.group(1), 8)
    n, i = len(fld), 0
    if n and fld[0] == 0:
        i = 1  # GNU tar skips one leading NUL left by an overflowing previous field
    while True:
        if i == n:
            return None  # blanks only
        if fld[i] not in _SPACES:
            break
        i += 1
    c, value = fld[i], 0
    if 48 <= c <= 55:
        while i < n and 48 <= fld[i] <= 55:
            value = value * 8 + fld[i] - 48
            i += 1
    elif not octal_only and c == 0x80 and i <= n - 2:
        value = int.from_bytes(fld[i + 1 :], "big")  # positive base-256 uses the whole rest of the field
        return value if value < 1 << 63 else None
    elif not octal_only and c in (0xFF, 0x2B, 0x2D):
        return None  # negative base-256, obsolete base-64
    if i != n and fld[i] != 0 and fld[i] not in _SPACES:
        return None
    return value


def _decimal(value: bytes) -> int | None:
    """A pax number as GNU tar accepts it for an off_t: digits only, below 2**63."""
    return int(value) if _DIGITS.match(value) and int(value) < 1 << 63 else None


def _pad(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _is_star(block: bytes) -> bool:
    """GNU tar's test for a star header (which changes how it reads sparse members and times)."""
    return (block[475] == 0 and 48 <= block[476] <= 55 and block[487] == 32 and 48 <= block[488] <= 55
            and block[499] == 32)
