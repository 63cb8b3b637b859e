"""Readiness checks of the parts Kasa needs: each returns (ok, detail)."""

from __future__ import annotations

import time
import uuid

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import connection


def _timed(fn):
    started = time.monotonic()
    try:
        detail = fn()
        ok = True
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {_short(exc)}"
    return {"ok": ok, "detail": detail, "ms": round((time.monotonic() - started) * 1000, 1)}


def _short(exc: Exception) -> str:
    # First line only; connection errors can be long, and never include a URL with credentials.
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""


def _redis_ping(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    finally:
        client.close()
    return "redis ok"


def check_database() -> str:
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    return f"{connection.vendor} ok"


def check_broker() -> str:
    if settings.REDIS_URL:
        return _redis_ping(settings.REDIS_URL)
    from django_q.models import OrmQ

    queued = OrmQ.objects.count()
    return f"orm broker ok ({queued} queued)"


def check_channel_layer() -> str:
    if settings.REDIS_URL:
        return _redis_ping(settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0])
    return "in-memory layer (live logs poll the database)"


def check_storage() -> str:
    name = default_storage.save(f".kasa-health/{uuid.uuid4().hex}", ContentFile(b"ok"))
    default_storage.delete(name)
    from django.core.files.storage import storages

    return f"{type(storages['default']).__name__} writable"


CHECKS = {
    "database": check_database,
    "broker": check_broker,
    "channel_layer": check_channel_layer,
    "storage": check_storage,
}


def run_checks() -> dict:
    return {name: _timed(fn) for name, fn in CHECKS.items()}
