"""Rebuild the backup catalogue from what is on storage (disaster recovery of Kasa itself).

Every finished backup has a `backup.json` beside its artifacts (docs/FORMAT.md).
Reading those manifests is enough to list and restore every backup on a fresh
Kasa install that has the storage credentials and KASA_BACKUP_KEYS. A folder
without a manifest is an unfinished backup and is skipped; a manifest whose
artifacts are missing or of the wrong size is reported and not imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import transaction

from customers.models import Customer, DatabaseConnection, Service, Team

from .models import Backup, BackupArtifact, StorageTarget

MANIFEST = "backup.json"
IMPORT_TEAM = "Imported"
MAX_MANIFEST = 16 * 1024 * 1024  # a manifest is a few kB; refuse to read anything absurd into memory


@dataclass
class ImportResult:
    imported: list[dict] = field(default_factory=list)
    known: int = 0
    customers_created: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def document(self) -> dict:
        return {"imported": self.imported, "already_known": self.known, "customers_created": self.customers_created,
                "problems": self.problems}


def backup_import(target: StorageTarget, *, log=lambda msg: None) -> ImportResult:
    store = target.store()
    result = ImportResult()
    known = set(Backup.objects.filter(target=target).values_list("prefix", flat=True))
    manifests = sorted(n for n in store.list("") if n.rsplit("/", 1)[-1] == MANIFEST)
    log(f"{len(manifests)} manifest(s) on {target.name} ({store.location('')})")
    for name in manifests:
        prefix = name.rsplit("/", 1)[0]
        if prefix in known:
            result.known += 1
            continue
        try:
            manifest = _read_manifest(store, name)
            _check_artifacts(store, prefix, manifest)
            bk = _import_one(target, prefix, manifest, result)
        except (ValueError, KeyError, TypeError) as exc:
            result.problems.append(f"{prefix}: {exc}; not imported")
            log(f"skipped {prefix}: {exc}")
            continue
        result.imported.append({"id": bk.pk, "customer": bk.customer.domain, "prefix": prefix,
                                "finished_at": bk.finished_at.isoformat(), "size": bk.size})
        log(f"imported {prefix} as backup #{bk.pk}")
    return result


def _read_manifest(store, name: str) -> dict:
    if store.size(name) > MAX_MANIFEST:
        raise ValueError("manifest is larger than 16 MB")
    with store.open_read(name) as fh:
        data = fh.read(MAX_MANIFEST + 1)
    manifest = json.loads(data)
    if manifest.get("format") != "kasa-backup":
        raise ValueError("backup.json is not a Kasa manifest")
    if int(manifest.get("format_version", 0)) > 1:
        raise ValueError(f"manifest format {manifest['format_version']} is newer than this Kasa understands")
    return manifest


def _check_artifacts(store, prefix: str, manifest: dict) -> None:
    arts = manifest.get("artifacts") or []
    if not arts:
        raise ValueError("the manifest lists no artifact")
    for a in arts:
        name = f"{prefix}/{a['name']}"
        try:
            size = store.size(name)
        except Exception:
            raise ValueError(f"artifact {a['name']} is missing") from None
        if size != a["size"]:
            raise ValueError(f"artifact {a['name']} is {size} bytes, the manifest says {a['size']}")


@transaction.atomic
def _import_one(target: StorageTarget, prefix: str, m: dict, result: ImportResult) -> Backup:
    customer = _customer_for(m, result)
    bk = Backup.objects.create(
        customer=customer, status=Backup.Status.SUCCEEDED, scope=m.get("scope", "full"),
        services=m.get("services") or [], compression=m.get("compression", "zstd"),
        encrypted=bool(m.get("encrypted")), target=target, prefix=prefix, trigger=Backup.Trigger.IMPORT,
        started_at=datetime.fromisoformat(m["started_at"]), finished_at=datetime.fromisoformat(m["finished_at"]),
        size=sum(a["size"] for a in m["artifacts"]), manifest=m,
    )
    for a in m["artifacts"]:
        details = a.get("database") or ({"path": a["path"]} if "path" in a else {}) or (
            {"files": a["files"]} if "files" in a else {})
        BackupArtifact.objects.create(backup=bk, name=a["name"], kind=a["kind"], source=a["source"], size=a["size"],
                                      sha256=a["sha256"], compression=a.get("compression", bk.compression),
                                      key_id=a.get("key_id") or "", details=details)
    return bk


def _customer_for(m: dict, result: ImportResult) -> Customer:
    domain = m["customer"]["domain"]
    customer = Customer.objects.filter(domain=domain).first()
    if customer:
        return customer
    inst = m.get("instance") or {}
    team, _ = Team.objects.get_or_create(name=IMPORT_TEAM)
    root = inst.get("root") or str(settings.KASA_CUSTOMERS_ROOT / domain)
    customer = Customer.objects.create(domain=domain, name=m["customer"].get("name", ""), team=team, root=root,
                                       versions=m.get("component_versions") or {})
    for s in inst.get("services") or []:
        Service.objects.create(customer=customer, **{k: s[k] for k in (
            "name", "path", "process_manager", "app_name", "start_command", "stop_command", "health_url") if k in s})
    for d in inst.get("databases") or []:
        # No password is ever in a manifest: the operator sets it before restoring in place.
        DatabaseConnection.objects.create(customer=customer, **{k: d[k] for k in (
            "name", "engine", "host", "port", "database", "user", "sqlite_path") if k in d})
    result.customers_created.append(domain)
    return customer
