"""Encryption of secrets at rest (database passwords, storage credentials).

Keys are operator-supplied strings (>= 32 characters, newest first). Each is
stretched with HKDF into a Fernet key so that a passphrase-like string is never
used directly as key material. MultiFernet encrypts with the newest key and
decrypts with any of them, which is what makes rotation possible: add a key in
front, run `rotate_secrets`, then drop the old key.
"""

from __future__ import annotations

import base64
import secrets as _secrets
from collections.abc import Iterable

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_KEY_LENGTH = 32
_HKDF_INFO = b"kasa secrets at rest v1"


class SecretKeyError(ValueError):
    """The configured keys are unusable (too short, none given)."""


class SecretDecryptError(ValueError):
    """A stored secret cannot be decrypted with any configured key."""


class Secret:
    """A decrypted secret that refuses to show itself.

    str(), repr() and format() all give a mask, so a Secret that ends up in a
    log line, an exception message or a debugger dump shows nothing. Code that
    really needs the value calls reveal(), on purpose and visibly.
    """

    __slots__ = ("_value",)
    MASK = "********"

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return self.MASK

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return self.MASK

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return _secrets.compare_digest(self._value, other._value)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):  # never pickle the clear text by accident
        raise TypeError("Secret values cannot be pickled")


def parse_keys(raw: str | Iterable[str]) -> list[str]:
    keys = [k.strip() for k in raw.split(",")] if isinstance(raw, str) else [k.strip() for k in raw]
    keys = [k for k in keys if k]
    if not keys:
        raise SecretKeyError("no secret keys configured")
    for i, key in enumerate(keys):
        if len(key) < MIN_KEY_LENGTH:
            raise SecretKeyError(f"secret key #{i + 1} is shorter than {MIN_KEY_LENGTH} characters")
    return keys


def derive_fernet_key(key: str, *, info: bytes = _HKDF_INFO) -> bytes:
    material = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key.encode())
    return base64.urlsafe_b64encode(material)


def generate_key() -> str:
    return _secrets.token_urlsafe(48)


class SecretBox:
    def __init__(self, keys: str | Iterable[str]):
        self._keys = parse_keys(keys)
        self._fernet = MultiFernet([Fernet(derive_fernet_key(k)) for k in self._keys])

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def encrypt(self, value: str | Secret) -> str:
        plain = value.reveal() if isinstance(value, Secret) else value
        return self._fernet.encrypt(plain.encode()).decode("ascii")

    def decrypt(self, token: str) -> Secret:
        try:
            return Secret(self._fernet.decrypt(token.encode("ascii")).decode())
        except (InvalidToken, ValueError, UnicodeError):
            # Never include the token or any key in the message.
            raise SecretDecryptError(
                "a stored secret cannot be decrypted with the configured KASA_SECRET_KEYS "
                "(was a key removed before `manage.py rotate_secrets` ran?)"
            ) from None

    def rotate(self, token: str) -> str:
        """Re-encrypt a token under the newest key without exposing the clear text."""
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, ValueError):
            raise SecretDecryptError("a stored secret cannot be decrypted with any configured key") from None

    def is_current(self, token: str) -> bool:
        """True when the newest key decrypts the token (nothing to rotate)."""
        try:
            Fernet(derive_fernet_key(self._keys[0])).decrypt(token.encode("ascii"))
            return True
        except (InvalidToken, ValueError):
            return False
