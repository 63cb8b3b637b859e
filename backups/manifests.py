"""A backup.json read from storage, checked field by field before anything is built from it.

Storage is untrusted input (backups.catalogue): even a manifest whose tag is
valid is checked here, so that a bug or an old format can never turn into a
path outside a customer's root, an artifact name that reads another backup's
objects, or a value the models would not accept. The customer a manifest
re-creates is validated again by the models themselves (customer_create:
domain, root confinement and overlap, service and SQLite paths, database
engine and port), exactly as the admin validates it.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime

from django.core.exceptions import ValidationError
from django.core.validators import DomainNameValidator

from customers.models import DatabaseConnection, slug_validator
from engines import paths
from engines.manifestauth import AUTH_FIELD

from .models import BackupPolicy

MANIFEST = "backup.json"
KINDS = ("service", "config", "database")
_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class ManifestRefused(ValueError):
    """Storage holds a manifest Kasa must not build anything from; the message says which field and why."""


def _fail(field: str, why: str):
    raise ManifestRefused(f"{field}: {why}")


def _str(value, field: str, *, max_len: int = 1024, blank: bool = True) -> str:
    if not isinstance(value, str) or len(value) > max_len or "\x00" in value or (not blank and not value):
        _fail(field, f"expected {'a non-empty' if not blank else 'a'} string of at most {max_len} characters")
    return value


def _int(value, field: str, *, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        _fail(field, f"expected a whole number from {low}" + (f" to {high}" if high is not None else ""))
    return value


def _list(value, field: str) -> list:
    if not isinstance(value, list):
        _fail(field, "expected a list")
    return value


def _dict(value, field: str) -> dict:
    if not isinstance(value, dict):
        _fail(field, "expected an object")
    return value


def _slug(value, field: str) -> str:
    try:
        slug_validator(_str(value, field, max_len=63, blank=False))
    except ValidationError as exc:
        _fail(field, f"{value!r}: {' '.join(exc.messages)}")
    return value


def _relative(value, field: str) -> str:
    try:
        return paths.relative_inside(_str(value, field, blank=False), what=field)
    except paths.PathEscapeError as exc:
        raise ManifestRefused(str(exc)) from None


def _moment(value, field: str) -> datetime:
    try:
        moment = datetime.fromisoformat(_str(value, field, max_len=64, blank=False))
    except ValueError:
        _fail(field, f"{value!r} is not an ISO 8601 date and time")
    if moment.tzinfo is None:
        _fail(field, f"{value!r} has no time zone")
    return moment


def _choice(value, field: str, choices) -> str:
    if value not in list(choices):
        _fail(field, f"{value!r} is not one of {', '.join(choices)}")
    return value


def validate(m: dict) -> dict:
    """The manifest's fields, checked; returns the values an import uses (datetimes parsed)."""
    _dict(m, "manifest")
    customer = _dict(m.get("customer"), "customer")
    domain = _str(customer.get("domain"), "customer.domain", max_len=253, blank=False)
    try:
        DomainNameValidator(accept_idna=False)(domain)
    except ValidationError:
        _fail("customer.domain", f"{domain!r} is not a domain name")
    _str(customer.get("name", ""), "customer.name", max_len=200)
    customer_uuid = None
    if customer.get("uuid") is not None:
        try:
            customer_uuid = uuid.UUID(_str(customer["uuid"], "customer.uuid", max_len=64))
        except ValueError:
            _fail("customer.uuid", f"{customer['uuid']!r} is not a UUID")
    scope = _choice(m.get("scope", "full"), "scope", BackupPolicy.Scope.values)
    kind = _choice(m.get("kind", "full"), "kind", ("full", "differential"))
    base = None
    if kind == "differential":
        base = _dict(m.get("base"), "base")
        _relative(_str(base.get("prefix"), "base.prefix", blank=False), "base.prefix")
        _int(base.get("backup_id"), "base.backup_id", low=1)
        if not isinstance(base.get("manifest_sha256"), str) or not _SHA256.fullmatch(base["manifest_sha256"]):
            _fail("base.manifest_sha256", "expected 64 lowercase hexadecimal digits")
    services = [_slug(s, "services[]") for s in _list(m.get("services") or [], "services")]
    compression = _choice(m.get("compression", "zstd"), "compression", BackupPolicy.Compression.values)
    encrypted = m.get("encrypted")
    if not isinstance(encrypted, bool):
        _fail("encrypted", "expected true or false")
    started, finished = _moment(m.get("started_at"), "started_at"), _moment(m.get("finished_at"), "finished_at")
    versions = _dict(m.get("component_versions") or {}, "component_versions")
    for comp, version in versions.items():
        _slug(comp, "component_versions")
        _str(version, f"component_versions.{comp}", max_len=64, blank=False)
    for pattern in _list(m.get("excludes") or [], "excludes"):
        _str(pattern, "excludes[]", max_len=1024, blank=False)
    _instance(m.get("instance") or {})
    artifacts = _list(m.get("artifacts"), "artifacts")
    if not artifacts:
        _fail("artifacts", "the manifest lists no artifact")
    names = set()
    for i, a in enumerate(artifacts):
        _artifact(_dict(a, f"artifacts[{i}]"), f"artifacts[{i}]", encrypted=encrypted)
        if a["name"] in names:
            _fail(f"artifacts[{i}].name", f"{a['name']!r} is listed twice")
        names.add(a["name"])
    return {"domain": domain, "uuid": customer_uuid, "scope": scope, "kind": kind, "base": base, "services": services,
            "compression": compression, "encrypted": encrypted, "started_at": started, "finished_at": finished,
            "artifacts": artifacts}


def _instance(inst: dict) -> None:
    """Types only: the values themselves are validated by the models when a customer is created from them."""
    _dict(inst, "instance")
    if "root" in inst:
        _str(inst["root"], "instance.root", blank=False)
    for i, s in enumerate(_list(inst.get("services") or [], "instance.services")):
        _dict(s, f"instance.services[{i}]")
        _slug(s.get("name"), f"instance.services[{i}].name")
        _relative(s.get("path") or ".", f"instance.services[{i}].path")
    for i, d in enumerate(_list(inst.get("databases") or [], "instance.databases")):
        field = f"instance.databases[{i}]"
        _dict(d, field)
        _slug(d.get("name"), f"{field}.name")
        _choice(d.get("engine"), f"{field}.engine", DatabaseConnection.Engine.values)
        for key in ("host", "database", "user", "sqlite_path"):
            _str(d.get(key) or "", f"{field}.{key}", max_len=1024 if key == "sqlite_path" else 255)
        if d.get("port") is not None:
            _int(d["port"], f"{field}.port", low=1, high=65535)
        if d.get("tls") is not None and not isinstance(d["tls"], bool):
            _fail(f"{field}.tls", "expected true or false")


def _object(value, field: str) -> dict:
    """A file index or change list beside a service archive: {name, size, sha256}."""
    obj = _dict(value, field)
    name = _str(obj.get("name"), f"{field}.name", max_len=200, blank=False)
    if not _ARTIFACT_NAME.fullmatch(name) or name in (MANIFEST, AUTH_FIELD):
        _fail(f"{field}.name", f"{name!r} is not an artifact file name (one name, no folder)")
    _int(obj.get("size"), f"{field}.size")
    if not isinstance(obj.get("sha256"), str) or not _SHA256.fullmatch(obj["sha256"]):
        _fail(f"{field}.sha256", "expected 64 lowercase hexadecimal digits")
    if obj.get("compression") is not None:
        _choice(obj["compression"], f"{field}.compression", BackupPolicy.Compression.values)
    return obj


def _chain_fields(a: dict, field: str) -> None:
    """A service archive's part in a chain (backups.chains): its index, or its change list and the full's archive
    it applies on (which lies in another backup's folder on the same target)."""
    for key in ("index", "changes"):
        if a.get(key) is not None:
            _object(a[key], f"{field}.{key}")
    if a.get("differential") is None:
        return
    d = _dict(a["differential"], f"{field}.differential")
    if a.get("changes") is None:
        _fail(f"{field}.changes", "a differential archive names its change list")
    base = _object(d.get("base"), f"{field}.differential.base")
    _relative(_str(base.get("prefix"), f"{field}.differential.base.prefix", blank=False),
              f"{field}.differential.base.prefix")
    _int(base.get("backup_id"), f"{field}.differential.base.backup_id", low=1)
    _choice(base.get("compression", "zstd"), f"{field}.differential.base.compression",
            BackupPolicy.Compression.values)
    for key in ("added", "changed", "deleted", "bytes", "unchanged"):
        _int(d.get(key, 0), f"{field}.differential.{key}")


def _artifact(a: dict, field: str, *, encrypted: bool) -> None:
    name = _str(a.get("name"), f"{field}.name", max_len=200, blank=False)
    if not _ARTIFACT_NAME.fullmatch(name) or name == MANIFEST or name == AUTH_FIELD:
        _fail(f"{field}.name", f"{name!r} is not an artifact file name (one name, no folder)")
    kind = _choice(a.get("kind"), f"{field}.kind", KINDS)
    if kind == "config":
        _str(a.get("source"), f"{field}.source", max_len=63, blank=False)
        for rel in _list(a.get("files") or [], f"{field}.files"):
            _relative(rel, f"{field}.files[]")
    else:
        _slug(a.get("source"), f"{field}.source")
    if kind == "service" and a.get("path") is not None:
        _relative(a["path"], f"{field}.path")
    if kind == "service":
        _chain_fields(a, field)
    for key in ("outward_links", "unrestorable"):
        if kind == "service" and a.get(key) is not None:
            links = _dict(a[key], f"{field}.{key}")
            _int(links.get("count"), f"{field}.{key}.count")
            for example in _list(links.get("examples") or [], f"{field}.{key}.examples"):
                _str(example, f"{field}.{key}.examples[]", max_len=4096)
    if kind == "database":
        details = _dict(a.get("database") or {}, f"{field}.database")
        if details.get("engine") is not None:
            _choice(details["engine"], f"{field}.database.engine", DatabaseConnection.Engine.values)
        for table, rows in _dict(details.get("row_counts") or {}, f"{field}.database.row_counts").items():
            _int(rows, f"{field}.database.row_counts.{table}")
        for counts in ("key_counts", "expiring_counts"):  # Redis: keys per logical database
            for db, keys in _dict(details.get(counts) or {}, f"{field}.database.{counts}").items():
                _int(keys, f"{field}.database.{counts}.{db}")
    _int(a.get("size"), f"{field}.size")
    if not isinstance(a.get("sha256"), str) or not _SHA256.fullmatch(a["sha256"]):
        _fail(f"{field}.sha256", "expected 64 lowercase hexadecimal digits")
    _choice(a.get("compression", "zstd"), f"{field}.compression", BackupPolicy.Compression.values)
    if a.get("encrypted", encrypted) is not encrypted:
        _fail(f"{field}.encrypted", "differs from the manifest's own 'encrypted'")
    if a.get("key_id") is not None and not (isinstance(a["key_id"], str) and _KEY_ID.fullmatch(a["key_id"])):
        _fail(f"{field}.key_id", "expected 16 hexadecimal digits")
    if encrypted and not a.get("key_id"):
        _fail(f"{field}.key_id", "an encrypted artifact names the key it needs")
