"""Rebuild the backup catalogue from what is on storage (disaster recovery of Kasa itself).

Every finished backup has a `backup.json` beside its artifacts (docs/FORMAT.md).
Reading those manifests is enough to list and restore every backup on a fresh
Kasa install that has the storage credentials and KASA_BACKUP_KEYS. A folder
without a manifest is an unfinished backup and is skipped; a manifest whose
artifacts are missing or of the wrong size is reported and not imported.

Whoever can write to a storage target can write a manifest, so storage is
untrusted input:

- a manifest must carry a valid authentication tag under a key of
  KASA_BACKUP_KEYS (engines.manifestauth). One without a tag (made before
  manifests were signed, or by a Kasa without backup keys) is imported only
  with `trust_unsigned`, and its backup is marked unsigned; a tag that does not
  match is never accepted;
- even a signed manifest is checked field by field (backups.manifests), and a
  customer it re-creates is validated by the models as the admin validates it
  (domain, root confinement and overlap, service and SQLite paths, database
  engine and port);
- it attaches to an existing customer only when that customer's UUID is the
  one it names (a domain is easy to forge). A customer it creates comes without
  runtime fields (process manager, commands, health URLs, run as): a superuser
  sets them before anything of it runs;
- a manifest saying its artifacts are plaintext is refused where the backup
  policy encrypts.

A refused manifest imports nothing at all, from any folder: the storage holds
something Kasa did not write, and an operator must look first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction

from customers.models import Customer, Team
from customers.services import CustomerInputError, customer_create
from engines import manifestauth
from engines.dburl import DatabaseURL

from .manifests import MANIFEST, ManifestRefused, validate
from .models import Backup, BackupArtifact, StorageTarget
from .services import policy_for

IMPORT_TEAM = "Imported"
MAX_MANIFEST = 16 * 1024 * 1024  # a manifest is a few kB; refuse to read anything absurd into memory

__all__ = ["IMPORT_TEAM", "ImportResult", "ManifestRefused", "backup_import"]


@dataclass
class ImportResult:
    imported: list[dict] = field(default_factory=list)
    known: int = 0
    customers_created: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def document(self) -> dict:
        return {"imported": self.imported, "already_known": self.known, "customers_created": self.customers_created,
                "problems": self.problems, "refused": self.refused}


@dataclass
class _Session:
    """What one import has done so far."""

    keys: manifestauth.ManifestKeys | None
    trust_unsigned: bool
    result: ImportResult
    log: object
    # Customers this import created from manifests that name no UUID (made before manifests did): the later
    # backups of the same customer in the same import belong to it.
    created_without_uuid: dict[str, int] = field(default_factory=dict)


def backup_import(target: StorageTarget, *, trust_unsigned: bool = False, log=lambda msg: None) -> ImportResult:
    store = target.store()
    keys = manifestauth.ManifestKeys(settings.KASA_BACKUP_KEYS) if settings.KASA_BACKUP_KEYS else None
    result = ImportResult()
    session = _Session(keys, trust_unsigned, result, log)
    known = set(Backup.objects.filter(target=target).values_list("prefix", flat=True))
    if getattr(store, "versioned", None) and store.versioned():
        # A versioned (locked) bucket: each key's first version is Kasa's own write (Kasa never writes a key
        # twice); newer versions and delete markers — an attacker's, with Kasa's keys — are ignored.
        names = store.first_versions("")
        store.pins.update(names)
        log(f"versioned bucket: reading the first version of each of {len(names)} object(s)")
    else:
        names = store.list("")
    manifests = sorted(n for n in names if n.rsplit("/", 1)[-1] == MANIFEST)
    log(f"{len(manifests)} manifest(s) on {target.name} ({store.location('')})")
    with transaction.atomic():
        for name in manifests:
            prefix = name.rsplit("/", 1)[0]
            if prefix in known:
                result.known += 1
                continue
            try:
                with transaction.atomic():
                    bk = _import_one(session, target, store, prefix, name)
            except ManifestRefused as exc:
                result.refused.append(f"{prefix} ({store.location(prefix)}): {exc}")
                log(f"REFUSED {prefix}: {exc}")
                continue
            except (ValueError, KeyError, TypeError) as exc:
                result.problems.append(f"{prefix}: {exc}; not imported")
                log(f"skipped {prefix}: {exc}")
                continue
            result.imported.append({"id": bk.pk, "customer": bk.customer.domain, "prefix": prefix,
                                    "finished_at": bk.finished_at.isoformat(), "size": bk.size,
                                    "unsigned": bk.unsigned})
            log(f"imported {prefix} as backup #{bk.pk}" + (" (UNSIGNED: trusted by --trust-unsigned)"
                                                            if bk.unsigned else ""))
        if result.refused:
            transaction.set_rollback(True)  # nothing at all: storage holds what Kasa did not write
            result.imported, result.customers_created = [], []
            log("nothing was imported")
    return result


def _import_one(session: _Session, target: StorageTarget, store, prefix: str, name: str) -> Backup:
    raw = _read_manifest(store, name)
    signed = _authenticate(session, raw)
    m = validate(raw)
    _check_artifacts(store, prefix, m)
    customer = _customer_for(session, raw, m)
    policy = policy_for(customer)
    if policy.encrypt and not m["encrypted"]:
        raise ManifestRefused(f"the manifest says its artifacts are not encrypted, but the backup policy of "
                              f"{customer.domain} encrypts: a plaintext artifact is never accepted there (if this "
                              "backup was made with --no-encrypt on purpose, import it under a policy that does not "
                              "encrypt)")
    base = _base_of(session, target, store, m, prefix)
    bk = Backup.objects.create(
        customer=customer, status=Backup.Status.SUCCEEDED, scope=m["scope"], services=m["services"],
        kind=m["kind"], base=base,
        compression=m["compression"], encrypted=m["encrypted"], target=target, prefix=prefix,
        trigger=Backup.Trigger.IMPORT, started_at=m["started_at"], finished_at=m["finished_at"],
        size=sum(a["size"] for a in m["artifacts"]), manifest=raw, unsigned=not signed,
        **_lock_of(target, store, prefix),
    )
    for a in m["artifacts"]:
        details = a.get("database") or ({"path": a["path"]} if "path" in a else {}) or (
            {"files": a["files"]} if "files" in a else {})
        for key in ("outward_links", "unrestorable", "index", "changes", "differential"):  # chain: backups.chains
            if a.get(key) is not None:
                details[key] = a[key]
        BackupArtifact.objects.create(backup=bk, name=a["name"], kind=a["kind"], source=a["source"], size=a["size"],
                                      sha256=a["sha256"], compression=a.get("compression", bk.compression),
                                      key_id=a.get("key_id") or "", details=details)
    return bk


def _lock_of(target: StorageTarget, store, prefix: str) -> dict:
    """The versions read (pinned above) and, on a locked target, the lock the manifest's version carries."""
    versions = {k: v for k, v in getattr(store, "pins", {}).items() if k.startswith(prefix + "/")}
    fields: dict = {"versions": versions} if versions else {}
    if target.immutable and versions:
        got = store.retention(f"{prefix}/{MANIFEST}", versions.get(f"{prefix}/{MANIFEST}"))
        if got:
            fields.update(lock_mode=got[0].lower(), locked_until=got[1])
    return fields


def _base_of(session: _Session, target: StorageTarget, store, m: dict, prefix: str) -> Backup | None:
    """A differential's full, found by its folder on this target (imported earlier in this pass, or known) and
    checked against the manifest's sha256 the differential recorded. Not found or not matching: the differential
    is imported without it, and its restores and drills refuse by name (backups.chains.refuse_broken)."""
    if m["kind"] != "differential":
        return None
    want = m["base"]
    base = Backup.objects.filter(target=target, prefix=want["prefix"]).exclude(status=Backup.Status.DELETED).first()
    problem = None
    if base is None:
        problem = f"the full backup it applies on ({want['prefix']}) is not on {target.name}"
    else:
        try:
            with store.open_read(f"{want['prefix']}/{MANIFEST}") as fh:
                digest = hashlib.sha256(fh.read(MAX_MANIFEST + 1)).hexdigest()
        except Exception:  # noqa: BLE001
            digest = None
        if digest != want["manifest_sha256"]:
            problem = f"the manifest of its full backup {want['prefix']} is not the one it was made on"
            base = None
    if problem:
        session.result.problems.append(f"{prefix}: a differential, imported without its chain: {problem}; it "
                                       "cannot be restored until that full is imported")
        session.log(f"{prefix}: {problem}")
    return base


def _read_manifest(store, name: str) -> dict:
    if store.size(name) > MAX_MANIFEST:
        raise ManifestRefused("manifest is larger than 16 MB")
    with store.open_read(name) as fh:
        data = fh.read(MAX_MANIFEST + 1)
    try:
        manifest = json.loads(data)
    except ValueError:
        raise ManifestRefused("backup.json is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "kasa-backup":
        raise ManifestRefused("backup.json is not a Kasa manifest")
    try:
        version = int(manifest.get("format_version", 0))
    except (TypeError, ValueError):
        raise ManifestRefused("format_version is not a number") from None
    if version > 1:  # not an attack: this Kasa is older than the one that made the backup
        raise ValueError(f"manifest format {version} is newer than this Kasa understands")
    return manifest


def _authenticate(session: _Session, manifest: dict) -> bool:
    """True when the manifest's tag proves Kasa wrote it; False for an unsigned one the operator trusts."""
    try:
        manifestauth.verify(manifest, session.keys)
    except manifestauth.ManifestUnsigned:
        if session.trust_unsigned:
            return False
        raise ManifestRefused("the manifest is not signed, so nothing proves Kasa wrote it. A backup made before "
                              "manifests were signed (or without KASA_BACKUP_KEYS) is imported only with "
                              "--trust-unsigned") from None
    except manifestauth.ManifestAuthError as exc:
        raise ManifestRefused(str(exc)) from None
    return True


def _check_artifacts(store, prefix: str, m: dict) -> None:
    for a in m["artifacts"]:
        name = f"{prefix}/{a['name']}"
        try:
            size = store.size(name)
        except Exception:
            raise ValueError(f"artifact {a['name']} is missing") from None
        if size != a["size"]:
            raise ValueError(f"artifact {a['name']} is {size} bytes, the manifest says {a['size']}")


def _customer_for(session: _Session, raw: dict, m: dict) -> Customer:
    domain, wanted = m["domain"], m["uuid"]
    if wanted is not None and (same := Customer.objects.filter(uuid=wanted).first()):
        return same
    existing = Customer.objects.filter(domain=domain).first()
    if existing is not None:
        if wanted is None and session.created_without_uuid.get(domain) == existing.pk:
            return existing  # re-created by this import from an older backup of the same customer
        raise ManifestRefused(
            f"the manifest names customer {domain} with " + (f"UUID {wanted}" if wanted else "no UUID")
            + f", but {domain} here is another customer: a backup attaches to an existing customer only when the "
            "customer's UUID matches")
    return _create_customer(session, raw, m)


def _create_customer(session: _Session, raw: dict, m: dict) -> Customer:
    """The customer as the manifest describes it, validated as the admin validates it, without what runs."""
    inst = raw.get("instance") or {}
    domain = m["domain"]
    team, _ = Team.objects.get_or_create(name=IMPORT_TEAM)
    databases = []
    for d in inst.get("databases") or []:
        # No password is ever in a manifest: the operator sets it before restoring in place.
        databases.append((d["name"], DatabaseURL(engine=d["engine"], host=d.get("host") or "", port=d.get("port"),
                                                 name=d.get("database") or "", user=d.get("user") or "",
                                                 path=d.get("sqlite_path") or "", tls=d.get("tls") is True)))
    try:
        customer = customer_create(
            domain=domain, root=inst.get("root") or str(settings.KASA_CUSTOMERS_ROOT / domain),
            name=raw["customer"].get("name", ""), team=team, uuid=m["uuid"],
            services=[(s["name"], s.get("path") or "") for s in inst.get("services") or []],
            databases=databases, versions=raw.get("component_versions") or {},
        )
    except CustomerInputError as exc:
        raise ManifestRefused(f"the customer it describes is not valid here: {exc}") from None
    if m["uuid"] is None:
        session.created_without_uuid[domain] = customer.pk
    session.result.customers_created.append(domain)
    session.log(f"created customer {domain} in team {IMPORT_TEAM}, without runtime fields: a superuser sets "
                "its process managers, commands, health URLs and run-as user before it is restored in place")
    return customer
