"""backup.json is authenticated (docs/FORMAT.md, "Manifest authentication"): HMAC-SHA256 under a key derived from
KASA_BACKUP_KEYS, with the key's id, over the whole manifest."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

from engines import manifestauth
from engines.backupcrypto import KeyRing
from engines.manifestauth import ManifestAuthError, ManifestKeys, ManifestUnsigned, sign, verify

OLD, NEW = "o" * 40, "n" * 40
MANIFEST = {"format": "kasa-backup", "format_version": 1, "customer": {"domain": "shop.example.com", "name": "Ünï"},
            "duration": 4.53, "encrypted": True, "instance": {"root": "/srv/customers/shop", "services": []},
            "artifacts": [{"name": "a.tar.zst.enc", "size": 12, "sha256": "0" * 64}]}


def test_a_signed_manifest_verifies_and_names_its_key():
    keys = ManifestKeys(NEW)
    signed = sign(MANIFEST, keys)
    assert signed["auth"]["alg"] == "HMAC-SHA256" and signed["auth"]["key_id"] == keys.current_id
    assert verify(signed, keys) == keys.current_id
    assert "auth" not in MANIFEST  # the input is left alone


def test_a_manifest_key_id_is_the_artifacts_key_id():
    assert ManifestKeys(f"{NEW},{OLD}").ids == KeyRing(f"{NEW},{OLD}").ids


@pytest.mark.parametrize("change", [
    lambda m: m["customer"].update(domain="other.example.com"),
    lambda m: m["instance"].update(root="/etc"),
    lambda m: m["artifacts"][0].update(size=13),
    lambda m: m.update(encrypted=False),
    lambda m: m.update(extra="added"),
    lambda m: m.pop("duration"),
    lambda m: m["auth"].update(key_id=ManifestKeys(OLD).current_id),
])
def test_any_change_to_a_signed_manifest_breaks_its_tag(change):
    keys = ManifestKeys(f"{NEW},{OLD}")
    signed = copy.deepcopy(sign(MANIFEST, keys))
    change(signed)
    with pytest.raises(ManifestAuthError):
        verify(signed, keys)


def test_layout_and_key_order_of_the_file_do_not_matter():
    keys = ManifestKeys(NEW)
    text = json.dumps(sign(MANIFEST, keys), indent=3, sort_keys=False)
    reordered = dict(reversed(list(json.loads(text).items())))
    assert verify(reordered, keys)


def test_a_manifest_signed_under_an_older_key_verifies_while_that_key_is_listed():
    signed = sign(MANIFEST, ManifestKeys(OLD))
    assert verify(signed, ManifestKeys(f"{NEW},{OLD}")) == ManifestKeys(OLD).current_id
    with pytest.raises(ManifestAuthError, match=r"not in KASA_BACKUP_KEYS \(configured: "):
        verify(signed, ManifestKeys(NEW))
    with pytest.raises(ManifestAuthError, match="KASA_BACKUP_KEYS is not set"):
        verify(signed, None)


def test_a_missing_tag_is_unsigned_and_a_malformed_one_is_wrong():
    keys = ManifestKeys(NEW)
    with pytest.raises(ManifestUnsigned):
        verify(dict(MANIFEST), keys)
    signed = sign(MANIFEST, keys)
    for auth in ({"alg": "none"}, "x", {"alg": "HMAC-SHA256", "key_id": keys.current_id, "tag": "é" * 64},
                 {"alg": "HMAC-SHA256", "key_id": keys.current_id, "tag": signed["auth"]["tag"].upper()}):
        with pytest.raises(ManifestAuthError) as info:
            verify({**signed, "auth": auth}, keys)
        assert not isinstance(info.value, ManifestUnsigned)


def test_a_manifest_json_cannot_carry_faithfully_has_no_tag():
    with pytest.raises(ManifestAuthError, match="no canonical form"):
        sign({**MANIFEST, "duration": float("nan")}, ManifestKeys(NEW))


def _hkdf(key: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key.encode())


@pytest.mark.django_db(transaction=True)
def test_a_real_backups_manifest_checks_by_hand_with_only_the_documented_steps(make_customer, customer_root):
    """docs/FORMAT.md's recipe, with hashlib, hmac, json and cryptography's HKDF: nothing from Kasa."""
    from tests.test_backups import _backup_json

    (customer_root / "backend" / "app.js").parent.mkdir(parents=True, exist_ok=True)
    (customer_root / "backend" / "app.js").write_text("console.log(1)\n")
    customer = make_customer(services=("backend",))
    doc = _backup_json(customer.domain, "--scope", "files")
    manifest = json.loads((Path(doc["location"]) / "backup.json").read_bytes())
    assert manifest["customer"]["uuid"] == str(customer.uuid)
    key = settings.KASA_BACKUP_KEYS.split(",")[0].strip()
    auth = manifest["auth"]
    assert auth["alg"] == "HMAC-SHA256"
    assert auth["key_id"] == hashlib.sha256(_hkdf(key, b"kasa backup key id v1")).hexdigest()[:16]
    assert auth["key_id"] == manifest["key_id"]  # the artifacts name the same key
    body = {k: v for k, v in manifest.items() if k != "auth"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                           allow_nan=False).encode("ascii")
    expected = hmac.new(_hkdf(key, b"kasa manifest mac v1"), canonical, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, auth["tag"])
    body["customer"]["domain"] = "forged.example.com"
    forged = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    assert hmac.new(_hkdf(key, b"kasa manifest mac v1"), forged, hashlib.sha256).hexdigest() != auth["tag"]


@pytest.mark.django_db(transaction=True)
def test_a_backup_without_backup_keys_is_unsigned_and_its_run_says_so(make_customer, customer_root, settings):
    from operations.models import Run, RunLogLine
    from tests.test_backups import _backup_json

    settings.KASA_BACKUP_KEYS = ""
    (customer_root / "backend" / "app.js").parent.mkdir(parents=True, exist_ok=True)
    (customer_root / "backend" / "app.js").write_text("console.log(1)\n")
    customer = make_customer(services=("backend",))
    doc = _backup_json(customer.domain, "--scope", "files", "--no-encrypt")
    manifest = json.loads((Path(doc["location"]) / "backup.json").read_bytes())
    assert manifest_auth_absent(manifest)
    run = Run.objects.get(backup__pk=doc["id"])
    warnings = list(RunLogLine.objects.filter(run=run, level="warning").values_list("text", flat=True))
    assert any("backup.json is NOT signed" in w and "--trust-unsigned" in w for w in warnings), warnings


def manifest_auth_absent(manifest: dict) -> bool:
    return manifestauth.AUTH_FIELD not in manifest
