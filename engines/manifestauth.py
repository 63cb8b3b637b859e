"""Authentication of backup manifests (backup.json; format: docs/FORMAT.md, "Manifest authentication").

Whoever can write to a storage target can write a backup.json. The manifest
says which customer a backup belongs to, where its folders go and which
artifacts it holds, so `backup_import` must know that Kasa wrote it: the
manifest carries an HMAC-SHA256 tag over its canonical form, under a key
derived from the backup keys (KASA_BACKUP_KEYS) with an HKDF `info` of its own,
and the id of that key (the same id the artifacts name, so one id tells an
operator which key string a whole backup needs).

The canonical form is the manifest without its "auth" member, as compact
JSON with sorted keys and only ASCII: what a reader parses is exactly what it
checks, whatever whitespace or key order the file has.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable

from engines.backupcrypto import derive_by_id
from engines.secretbox import SecretKeyError, parse_keys

AUTH_FIELD = "auth"
ALGORITHM = "HMAC-SHA256"
MAC_INFO = b"kasa manifest mac v1"
_HEX_TAG = re.compile(r"[0-9a-f]{64}")


class ManifestAuthError(ValueError):
    """The manifest's tag is wrong, malformed or cannot be checked. The message never holds a key."""


class ManifestUnsigned(ManifestAuthError):
    """The manifest carries no tag at all (made before manifests were signed, or without backup keys)."""


class ManifestKeys:
    """The MAC keys derived from KASA_BACKUP_KEYS, newest first, by key id."""

    def __init__(self, keys: str | Iterable[str]):
        try:
            parsed = parse_keys(keys)
        except SecretKeyError as exc:
            raise ManifestAuthError(f"KASA_BACKUP_KEYS: {exc}") from None
        self._macs = derive_by_id(parsed, MAC_INFO)  # the artifacts' key ids: one id per key
        self.current_id = next(iter(self._macs))

    @property
    def ids(self) -> list[str]:
        return list(self._macs)

    def mac_key(self, key_id: str) -> bytes | None:
        return self._macs.get(key_id)

    def __repr__(self) -> str:
        return f"<ManifestKeys ids={self.ids}>"


def canonical(manifest: dict) -> bytes:
    """The bytes the tag covers: every member but "auth", compact, keys sorted, ASCII only.

    Raises ManifestAuthError for what JSON cannot carry faithfully (NaN, infinities, non-string keys).
    """
    if not isinstance(manifest, dict):
        raise ManifestAuthError("the manifest is not a JSON object")
    body = {k: v for k, v in manifest.items() if k != AUTH_FIELD}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ManifestAuthError(f"the manifest has no canonical form: {exc}") from None
    return text.encode("ascii")


def tag(manifest: dict, mac_key: bytes) -> str:
    return hmac.new(mac_key, canonical(manifest), hashlib.sha256).hexdigest()


def sign(manifest: dict, keys: ManifestKeys) -> dict:
    """A copy of `manifest` with its "auth" member: algorithm, key id, tag (hex) under the newest key."""
    key_id = keys.current_id
    return {**{k: v for k, v in manifest.items() if k != AUTH_FIELD},
            AUTH_FIELD: {"alg": ALGORITHM, "key_id": key_id, "tag": tag(manifest, keys.mac_key(key_id))}}


def verify(manifest: dict, keys: ManifestKeys | None) -> str:
    """Check the manifest's tag; returns the key id it was made with.

    ManifestUnsigned when there is no "auth" member; ManifestAuthError when there is one that does not prove
    the manifest (wrong tag, unknown key, malformed), or when no backup keys are configured to check it.
    """
    if not isinstance(manifest, dict):
        raise ManifestAuthError("the manifest is not a JSON object")
    auth = manifest.get(AUTH_FIELD)
    if auth is None:
        raise ManifestUnsigned("the manifest is not signed (no authentication tag)")
    if not isinstance(auth, dict) or auth.get("alg") != ALGORITHM:
        raise ManifestAuthError(f"the manifest's authentication is not {ALGORITHM}")
    key_id, given = auth.get("key_id"), auth.get("tag")
    if not isinstance(key_id, str) or not isinstance(given, str):
        raise ManifestAuthError("the manifest's authentication has no key id or no tag")
    if keys is None:
        raise ManifestAuthError(f"the manifest is signed with key id {key_id} and KASA_BACKUP_KEYS is not set: "
                                "it cannot be checked")
    mac_key = keys.mac_key(key_id)
    if mac_key is None:
        raise ManifestAuthError(f"the manifest is signed with key id {key_id}, which is not in KASA_BACKUP_KEYS "
                                f"(configured: {', '.join(keys.ids)}): it cannot be checked")
    if not _HEX_TAG.fullmatch(given) or not hmac.compare_digest(tag(manifest, mac_key), given):
        raise ManifestAuthError("the manifest's authentication tag does not match: it was altered, or not written "
                                "by Kasa")
    return key_id
