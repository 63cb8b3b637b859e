"""Readiness checks of the parts Kasa needs: each returns (ok, detail).

Probes are anonymous and may come in floods, so no check writes anything (storage is probed by a read-only
call) and each answer is kept for KASA_PROBE_CACHE_SECONDS in Django's cache: a flood runs the checks about
once per period, whatever its size.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.core.files.storage import FileSystemStorage, storages
from django.db import connection
from django.utils import timezone

CACHE_KEY = "kasa:health:checks"
# Used only while the cache itself is unreachable (Redis down): probes stay cheap in this process.
_fallback: dict = {}


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
    import redis  # only with REDIS_URL set: the ORM broker needs no Redis client loaded

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
    from django_q.models import OrmQ  # only without Redis (the ORM broker's queue)

    queued = OrmQ.objects.count()
    return f"orm broker ok ({queued} queued)"


def check_channel_layer() -> str:
    if settings.REDIS_URL:
        return _redis_ping(settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0])
    return "in-memory layer (live logs poll the database)"


def _local_folder(location: Path) -> str:
    """Could Kasa write here? Asked of the file system (access(2)), without writing anything."""
    if location.is_dir():
        if not os.access(location, os.R_OK | os.W_OK | os.X_OK):
            raise PermissionError(f"{location} is not writable")
        return "writable"
    if location.exists() or location.is_symlink():
        raise NotADirectoryError(f"{location} is not a folder")
    # Created by the first upload: the nearest existing parent must let us create it.
    parent = next(p for p in location.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {location}")
    return "writable (folder created on first use)"


def check_storage() -> str:
    storage = storages["default"]
    kind = type(storage).__name__
    if isinstance(storage, FileSystemStorage):
        return f"{kind} {_local_folder(Path(storage.location))}"
    bucket = getattr(storage, "bucket_name", None)
    if bucket:
        # S3 (django-storages): one listing of at most one key proves the bucket, the credentials and the
        # prefix. exists() would not: a HEAD in a missing bucket is a 404 like a missing key.
        storage.connection.meta.client.list_objects_v2(Bucket=bucket, Prefix=storage.location, MaxKeys=1)
        return f"{kind} bucket readable"
    storage.exists(".kasa-health")  # any other backend: one read-only call of its own API
    return f"{kind} reachable"


CHECKS = {
    "database": check_database,
    "broker": check_broker,
    "channel_layer": check_channel_layer,
    "storage": check_storage,
}


def run_checks() -> dict:
    return {name: _timed(fn) for name, fn in CHECKS.items()}


def _fresh() -> dict:
    return {"checked_at": timezone.now().isoformat(timespec="seconds"), "checks": run_checks()}


def _get(ttl: float) -> dict | None:
    try:
        return cache.get(CACHE_KEY)
    except Exception:  # the cache is Redis and Redis is down (the broker check says so)
        stamp, answer = _fallback.get("answer", (0.0, None))
        return answer if time.monotonic() - stamp < ttl else None


def _put(answer: dict, ttl: float) -> None:
    try:
        cache.set(CACHE_KEY, answer, ttl)
    except Exception:
        _fallback["answer"] = (time.monotonic(), answer)


def cached_checks() -> dict:
    """{"checked_at": ISO time, "checks": {name: {ok, detail, ms}}}, at most KASA_PROBE_CACHE_SECONDS old."""
    ttl = settings.KASA_PROBE_CACHE_SECONDS
    if ttl <= 0:
        return _fresh()
    answer = _get(ttl)
    if answer is None:
        answer = _fresh()
        _put(answer, ttl)
    return answer


def all_ok(answer: dict) -> bool:
    return all(r["ok"] for r in answer["checks"].values())
