"""Storage targets for backups: a local folder, an S3 bucket, an SFTP server.

All backup code talks to the small `Store` interface in base.py and never to
boto3 or paramiko directly, so a backup, a replica copy, a verification pass or
a cleanup after failure is written once for every kind of target. Names are
'/'-separated keys relative to the target's root, the same on every kind.

boto3 and paramiko are imported only when a target of that kind is built.
"""

from __future__ import annotations

from .base import Store, StoreError, StoreLocked, StoreNotFound, StoreWriter, clean_name, clean_prefix
from .local import LocalStore

KINDS = ("local", "s3", "sftp")

__all__ = ["KINDS", "LocalStore", "Store", "StoreError", "StoreLocked", "StoreNotFound", "StoreWriter", "clean_name",
           "clean_prefix", "store_from_config"]


def _text(value) -> str | None:
    """Secrets may arrive as engines.secretbox.Secret (reveal()) or plain strings; empty means absent."""
    if value is None:
        return None
    value = value.reveal() if hasattr(value, "reveal") else str(value)
    return value or None


def store_from_config(kind: str, config: dict, secrets: dict) -> Store:
    """Build a store from a target's plain settings and its decrypted secrets.

    config: path, bucket, prefix, endpoint_url, region, host, port, username, host_key (and for S3
    optionally part_size, max_inflight, lock_mode, lock_days). secrets: access_key, secret_key (S3), password or
    secret_key (the SFTP password), private_key (SFTP).
    """
    config = {k: v for k, v in (config or {}).items() if v not in (None, "")}
    secrets = secrets or {}
    if kind == "local":
        if not config.get("path"):
            raise StoreError("local target: a folder path is required")
        owner = config.get("owner")
        return LocalStore(config["path"], owner=tuple(owner) if owner else None)
    if kind == "s3":
        from .s3 import S3Store

        extra = {k: int(config[k]) for k in ("part_size", "max_inflight", "lock_days") if k in config}
        return S3Store(
            config.get("bucket", ""), prefix=config.get("prefix", ""), endpoint_url=config.get("endpoint_url"),
            region=config.get("region"), access_key=_text(secrets.get("access_key")),
            secret_key=_text(secrets.get("secret_key")), lock_mode=config.get("lock_mode"), **extra,
        )
    if kind == "sftp":
        from .sftp import SFTPStore

        return SFTPStore(
            config.get("host", ""), config.get("port"), config.get("username", ""),
            password=_text(secrets.get("password")) or _text(secrets.get("secret_key")),
            private_key=_text(secrets.get("private_key")), path=config.get("path", ""),
            host_key=config.get("host_key"),
        )
    raise StoreError(f"unknown storage kind {kind!r} (expected one of {', '.join(KINDS)})")
