"""Differential backups: which full a backup builds on, and what keeps a chain whole.

A chain is one full backup and the differentials made on it (each differential names its full; there are no
differentials of differentials, so a restore never needs more than two archives per service). The full's
service artifacts carry a file index (engines.fileindex); a differential's carry the change list and the
checksums of the full's archive they apply on. Rules, as pgBackRest and borg users learned them:

- a differential is made only on a full that is whole: succeeded, same target, same encryption, covering
  every service asked, with its file indexes and its manifest on storage; otherwise the backup is a full, and
  the run says why (`--differential` included);
- retention never deletes a full that a kept differential needs, and a pinned differential keeps its full
  (engines.retention: `base_id`); deleting such a full by hand is refused, naming the differentials;
- restore, clone and drill read the chain as one archive (engines.chainread), and check before touching
  anything that the full is still there (refuse_broken).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import timedelta

from django.utils import timezone

from operations.context import OperationError

from .locks import pin
from .models import Backup, BackupArtifact

MANIFEST = "backup.json"
DIFFERENTIAL_SCOPES = ("full", "files")


@dataclass
class Decision:
    kind: str  # Backup.Kind
    base: Backup | None = None
    base_manifest_sha256: str = ""
    reason: str = ""
    # service name → the full's service artifact it builds on (with details["index"])
    indexes: dict[str, BackupArtifact] = field(default_factory=dict)
    store: object = None  # where the full's file indexes are read (the backup's own target)
    keyring: object = None


def decide(customer, p: dict, target, store) -> Decision:
    """Full or differential, and on which full (see the module's rules). `p`: the backup's params."""
    asked = p.get("kind") or "auto"
    full = Backup.Kind.FULL

    def full_because(why: str) -> Decision:
        if asked == "differential":
            why = f"a differential was asked, but {why}: this backup is a full one"
        return Decision(full, reason=why)

    if asked == "full":
        return Decision(full, reason="a full backup was asked")
    if p["scope"] not in DIFFERENTIAL_SCOPES:
        return full_because(f"scope {p['scope']!r} holds no service folders")
    if not customer.host.is_local:
        return full_because(f"differential backups of customers on other hosts ({customer.host.name}) are not "
                            "built yet")
    every = p.get("full_every_days", 7)
    if asked == "auto" and every <= 1:
        return Decision(full, reason="the policy makes every backup a full one")
    base = (Backup.objects.filter(customer=customer, status=Backup.Status.SUCCEEDED, kind=full,
                                  scope__in=DIFFERENTIAL_SCOPES, target=target)
            .order_by("-finished_at", "-pk").first())
    if base is None:
        return full_because(f"there is no full backup of {customer} on {target.name} to build on")
    if base.encrypted != p["encrypt"]:
        return full_because(f"the newest full, #{base.pk}, is {'' if base.encrypted else 'not '}encrypted and "
                            f"this backup is {'' if p['encrypt'] else 'not'}")
    if asked == "auto" and base.finished_at <= timezone.now() - timedelta(days=every):
        age = (timezone.now() - base.finished_at).days
        return Decision(full, reason=f"the newest full, #{base.pk}, is {age} day(s) old (the policy takes a full "
                                     f"every {every} days)")
    chosen = list(p.get("services") or [])
    if base.services and (not chosen or not set(chosen) <= set(base.services)):
        return full_because(f"the newest full, #{base.pk}, holds only {', '.join(base.services)}")
    pin(store, base)  # the full's index and manifest as written, never a version written over them later
    indexes = {a.source: a for a in base.artifacts.filter(kind=BackupArtifact.Kind.SERVICE)
               if (a.details or {}).get("index")}
    if not indexes:
        return full_because(f"the newest full, #{base.pk}, has no file index (made before differential backups)")
    for art in indexes.values():
        try:
            present = store.size(f"{base.prefix}/{art.details['index']['name']}") == art.details["index"]["size"]
        except Exception:  # noqa: BLE001  (missing, or the store cannot say: not usable either way)
            present = False
        if not present:
            return full_because(f"the file index {art.details['index']['name']} of the newest full, #{base.pk}, is "
                                f"missing from {target.name} or not the size recorded")
    try:
        with store.open_read(f"{base.prefix}/{MANIFEST}") as fh:
            digest = hashlib.sha256(fh.read(16 * 1024 * 1024)).hexdigest()
    except Exception as exc:  # noqa: BLE001  (any store failure: the full is not usable, say why)
        return full_because(f"the manifest of the newest full, #{base.pk}, cannot be read from {target.name} "
                            f"({exc})")
    return Decision(Backup.Kind.DIFFERENTIAL, base=base, base_manifest_sha256=digest, indexes=indexes,
                    reason=f"differential on full backup #{base.pk} of {base.finished_at:%Y-%m-%d %H:%M} UTC")


# --- reading a chain --------------------------------------------------------------------------------
def chain_kwargs(bk: Backup, art: BackupArtifact) -> dict:
    """open_plain's `chain` for a differential's service artifact (engines.chainread); {} for any other."""
    d = (art.details or {}).get("differential") if art.kind == BackupArtifact.Kind.SERVICE else None
    if not d:
        return {}
    base = d["base"]
    changes = art.details["changes"]
    label = f"full backup #{bk.base_id}" if bk.base_id else "the full backup"
    return {"chain": {
        "label": label,
        "base": {"name": f"{base['prefix']}/{base['name']}", "sha256": base["sha256"], "size": base["size"],
                 "compression": base["compression"], "encrypted": bk.encrypted},
        "changes": {"name": f"{bk.prefix}/{changes['name']}", "sha256": changes["sha256"], "size": changes["size"],
                    "compression": changes.get("compression", art.compression), "encrypted": bk.encrypted},
    }}


def base_size(arts: list[BackupArtifact]) -> int:
    """Bytes of the full's archives that a differential's restore also reads (for space estimates)."""
    return sum(((a.details or {}).get("differential") or {}).get("base", {}).get("size", 0) for a in arts)


def refuse_broken(arts: list[BackupArtifact], doing: str, tail: str) -> None:
    """Before anything is touched: a differential whose full is gone, failed or not the one it was made on."""
    for art in arts:
        d = (art.details or {}).get("differential") if art.kind == BackupArtifact.Kind.SERVICE else None
        if not d:
            continue
        bk = art.backup
        base = Backup.objects.filter(pk=bk.base_id).first() if bk.base_id else None
        if base is None:
            raise OperationError(f"{art.name} cannot be {doing}: backup #{bk.pk} is a differential and the full "
                                 f"backup it needs ({d['base']['prefix']}) is not in the catalogue (import it "
                                 f"with backup_import){tail}")
        if base.status != Backup.Status.SUCCEEDED:
            raise OperationError(f"{art.name} cannot be {doing}: backup #{bk.pk} is a differential of full backup "
                                 f"#{base.pk}, which is {base.get_status_display().lower()}{tail}")
        full_art = base.artifacts.filter(name=d["base"]["name"]).first()
        if full_art is None or full_art.sha256 != d["base"]["sha256"]:
            raise OperationError(f"{art.name} cannot be {doing}: full backup #{base.pk} does not hold the archive "
                                 f"{d['base']['name']} with the checksum this differential was made on{tail}")


# --- retention and deletion -----------------------------------------------------------------------
def dependents(backup: Backup) -> list[int]:
    """Differentials still restorable that need this full."""
    return list(backup.differentials.exclude(status__in=[Backup.Status.DELETED, Backup.Status.FAILED,
                                                         Backup.Status.EXPIRED])
                .order_by("pk").values_list("pk", flat=True))  # running ones included: they name it already
