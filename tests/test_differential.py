"""Differential backups (issue 15, points 1-3): a differential stores what changed since the full, restores
exactly the tree of its moment, and its chain is never broken (retention, pins, deletion, a missing or corrupt
full). Real backups and restores through the management commands, on the local target."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from backups.models import Backup
from backups.services import BackupInputError, backup_delete, backup_pin, global_policy, prune_customer
from operations.models import RunLogLine
from tests.restore_helpers import command_json, tree_state

pytestmark = pytest.mark.django_db(transaction=True)


def _log(run_id: int) -> str:
    return "\n".join(RunLogLine.objects.filter(run_id=run_id).values_list("text", flat=True))


def _seed(root: Path) -> None:
    for svc in ("backend", "admin"):
        d = root / svc
        (d / "src" / "lib").mkdir(parents=True, exist_ok=True)
        (d / "src" / "app.js").write_text(f"console.log('{svc}')\n")
        (d / "src" / "lib" / "big.bin").write_bytes(os.urandom(400_000))
        (d / "gone").mkdir(exist_ok=True)
        (d / "gone" / "old.txt").write_text("old\n")
        (d / "empty").mkdir(exist_ok=True)
        (d / "current").symlink_to("src")
        (d / ".env").write_text("PORT=3000\n")


def _change(root: Path) -> None:
    time.sleep(0.02)  # a new mtime and ctime, even on a coarse clock
    b = root / "backend"
    (b / "src" / "app.js").write_text("console.log('backend v2')\n")
    shutil.rmtree(b / "gone")
    (b / "new" / "deeper").mkdir(parents=True)
    (b / "new" / "deeper" / "n.txt").write_text("new\n")
    (b / "new-empty").mkdir()
    os.chmod(b / "src" / "lib", 0o750)
    (b / "current").unlink()
    (b / "current").symlink_to("new")
    os.link(b / "src" / "app.js", b / "app-link.js")


@pytest.fixture
def customer(make_customer):
    c = make_customer(services=("backend", "admin"))
    _seed(c.root_path())
    return c


def _backup(customer, *args):
    code, doc = command_json("backup", customer.domain, *args)
    assert code == 0, doc
    return doc


def test_a_differential_restores_exactly_the_tree_of_its_moment(customer):
    root = customer.root_path()
    full = _backup(customer)
    assert full["kind"] == "full" and full["base"] is None
    _change(root)
    expected = tree_state(root)

    diff = _backup(customer)
    assert diff["kind"] == "differential" and diff["base"]["id"] == full["id"]
    names = {a["name"] for a in diff["artifacts"]}
    assert "backend.tar.zst.enc" in names
    assert diff["size"] < full["size"] / 3  # admin unchanged, backend's big file unchanged
    assert "differential on full backup #" in _log(diff["run"])

    time.sleep(0.02)
    (root / "backend" / "src" / "app.js").write_text("changed after the differential\n")
    (root / "admin" / "later.txt").write_text("made after\n")
    shutil.rmtree(root / "backend" / "new")

    code, run = command_json("restore", str(diff["id"]), "--yes")
    assert code == 0, run
    assert tree_state(root) == expected

    code, drill = command_json("verify", str(diff["id"]))
    assert code == 0, drill


def test_an_unchanged_tree_gives_a_differential_of_almost_nothing(customer):
    full = _backup(customer, "--scope", "files")
    diff = _backup(customer, "--scope", "files")
    assert diff["kind"] == "differential"
    bk = Backup.objects.get(pk=diff["id"])
    archives = {a.source: a for a in bk.artifacts.filter(kind="service")}
    for art in archives.values():
        d = art.details["differential"]
        assert (d["added"], d["changed"], d["deleted"]) == (0, 0, 0)
    full_files = sum(a["size"] for a in full["artifacts"] if a["kind"] == "service")
    assert sum(a.size for a in archives.values()) < full_files / 100


def test_the_kind_can_be_forced_and_a_differential_without_a_full_is_a_full_that_says_so(customer):
    first = _backup(customer, "--differential")
    assert first["kind"] == "full"
    assert "a differential was asked, but there is no full backup" in _log(first["run"])
    forced = _backup(customer, "--full")
    assert forced["kind"] == "full"
    assert _backup(customer, "--differential")["kind"] == "differential"
    policy = global_policy()
    policy.full_every_days = 0
    policy.save()
    assert _backup(customer)["kind"] == "full"

    code, out = command_json("backup_list", customer.domain)
    assert code == 0
    assert [(d["kind"], (d["base"] or {}).get("id")) for d in out].count(("differential", forced["id"])) == 1


def test_retention_keeps_the_full_a_kept_differential_needs_and_deleting_it_is_refused(customer):
    policy = global_policy()
    policy.keep_last = 1
    policy.save()
    full = _backup(customer)
    diff = _backup(customer)
    plan = prune_customer(customer, dry_run=True)
    assert full["id"] in plan.keep and any("differential #" in r for r in plan.keep[full["id"]])
    with pytest.raises(BackupInputError, match=f"differential\\(s\\) #{diff['id']}"):
        backup_delete(Backup.objects.get(pk=full["id"]))

    # A pinned differential keeps its full when newer chains push both out of keep_last.
    backup_pin(Backup.objects.get(pk=diff["id"]), pinned=True, reason="audit")
    _backup(customer, "--full")
    newest = _backup(customer)
    plan = prune_customer(customer)
    assert set(plan.keep) == {full["id"], diff["id"], newest["id"], newest["base"]["id"]}
    assert Backup.objects.get(pk=full["id"]).status == "succeeded"


def test_a_corrupt_full_fails_the_differentials_restore_before_anything_is_touched(customer):
    root = customer.root_path()
    full = _backup(customer)
    _change(root)
    diff = _backup(customer)
    before = tree_state(root)
    bk = Backup.objects.get(pk=full["id"])
    path = Path(bk.target.path) / bk.prefix / "backend.tar.zst.enc"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    code, run = command_json("restore", str(diff["id"]), "--yes")
    assert code == 1, run
    assert f"full backup #{full['id']} this differential needs" in run["error"], run["error"]
    assert "corrupt" in run["error"] and "nothing else was touched" in run["error"]
    assert tree_state(root) == before


def test_a_missing_full_fails_the_differentials_drill_clearly(customer):
    full = _backup(customer)
    diff = _backup(customer)
    bk = Backup.objects.get(pk=full["id"])
    (Path(bk.target.path) / bk.prefix / "admin.tar.zst.enc").unlink()
    code, run = command_json("verify", str(diff["id"]))
    assert code == 1, run
    assert f"full backup #{full['id']} this differential needs" in run["error"] and "missing" in run["error"]


def test_a_differential_whose_full_was_deleted_is_refused_by_name(customer):
    full = _backup(customer)
    diff = _backup(customer)
    Backup.objects.filter(pk=full["id"]).update(status=Backup.Status.DELETED)
    code, run = command_json("restore", str(diff["id"]), "--yes")
    assert code == 1, run
    assert f"differential of full backup #{full['id']}, which is deleted" in run["error"]


def test_the_manifest_records_the_chain(customer):
    full = _backup(customer)
    diff = _backup(customer)
    bk = Backup.objects.get(pk=diff["id"])
    manifest = json.loads((Path(bk.target.path) / bk.prefix / "backup.json").read_text())
    assert manifest["kind"] == "differential"
    assert manifest["base"]["backup_id"] == full["id"] and len(manifest["base"]["manifest_sha256"]) == 64
    backend = next(a for a in manifest["artifacts"] if a["source"] == "backend")
    assert backend["differential"]["base"]["name"] == "backend.tar.zst.enc"
    assert backend["changes"]["name"] == "backend.changes.gz.enc"
    assert (Path(bk.target.path) / bk.prefix / "backend.changes.gz.enc").exists()


@pytest.fixture
def dr(tmp_path):
    from backups.models import StorageTarget

    return StorageTarget.objects.create(name="dr", kind="local", path=str(tmp_path / "dr"))


def test_backup_import_rebuilds_the_chain(customer, dr):
    from tests.test_backup_import import fresh_install

    full = _backup(customer, "--target", "dr")
    _change(customer.root_path())
    expected = tree_state(customer.root_path())
    diff = _backup(customer, "--target", "dr")
    assert diff["kind"] == "differential"
    fresh_install()
    code, doc = command_json("backup_import", "--target", "dr")
    assert code == 0, doc
    new_full = Backup.objects.get(prefix__endswith=f"-{full['id']}")
    new_diff = Backup.objects.get(prefix__endswith=f"-{diff['id']}")
    assert new_diff.kind == "differential" and new_diff.base_id == new_full.pk
    shutil.rmtree(customer.root_path() / "backend" / "src")
    code, run = command_json("restore", str(new_diff.pk), "--yes")
    assert code == 0, run
    assert tree_state(customer.root_path()) == expected


def test_an_imported_differential_without_its_full_is_refused_by_name(customer, dr, tmp_path):
    from tests.test_backup_import import fresh_install

    full = _backup(customer, "--target", "dr")
    diff = _backup(customer, "--target", "dr")
    bk = Backup.objects.get(pk=full["id"])
    shutil.move(Path(dr.path) / bk.prefix, tmp_path / "held-back")
    fresh_install()
    code, doc = command_json("backup_import", "--target", "dr")
    assert any("imported without its chain" in p for p in doc["problems"]), doc
    new_diff = Backup.objects.get(prefix__endswith=f"-{diff['id']}")
    code, run = command_json("restore", str(new_diff.pk), "--yes")
    assert code == 1 and "is not in the catalogue" in run["error"], run


def test_the_admin_shows_the_kind_and_the_restore_page_the_chain(customer, admin_client):
    full = _backup(customer)
    _change(customer.root_path())
    diff = _backup(customer)
    listing = admin_client.get("/backups/backup/").content.decode()
    assert f'diff. of <a href="/backups/backup/{full["id"]}/change/">#{full["id"]}</a>' in listing
    page = admin_client.get(f"/backups/backup/{diff['id']}/restore/").content.decode()
    assert 'id="restore-chain"' in page and f"#{full['id']}</a>" in page
    assert "<code>backend</code>: 5 new, 4 changed, 1 deleted" in " ".join(page.split())
    assert "<code>admin</code>: 0 new, 0 changed, 0 deleted" in " ".join(page.split())
    form = admin_client.get(f"/customers/customer/{customer.pk}/backup/").content.decode()
    assert 'value="differential"' in form
    response = admin_client.post(f"/customers/customer/{customer.pk}/backup/", {
        "scope": "files", "compression": "zstd", "encrypt": "on", "target": "local", "kind": "full"})
    assert response.status_code == 302
    run_id = int(response["Location"].rstrip("/").split("/")[-2])
    from operations.models import Run

    assert Run.objects.get(pk=run_id).params["kind"] == "full"


def test_the_documented_by_hand_restore_of_a_chain_gives_the_same_tree(customer, tmp_path):
    """docs/FORMAT.md's shell recipe ("Chains", "By hand"), run as written, with `dec` from its Python recipe:
    no Kasa code reads the backup."""
    import subprocess

    from django.conf import settings

    full = _backup(customer)
    _change(customer.root_path())
    expected = {k: v for k, v in tree_state(customer.root_path() / "backend").items()}
    diff = _backup(customer)
    doc = (Path(settings.BASE_DIR) / "docs" / "FORMAT.md").read_text()
    recipe = next(b for b in doc.split("```python\n")[1:] if "def decrypt_artifact" in b).split("```")[0]
    chain = doc.split("## Chains")[1]
    script = chain.split("```sh\n")[1].split("```")[0]
    (tmp_path / "dec.py").write_text(recipe + "\nimport sys, tempfile\nwith tempfile.TemporaryDirectory() as t:\n"
                                     "    decrypt_artifact(sys.argv[1], t + '/p', sys.argv[2])\n"
                                     "    sys.stdout.buffer.write(open(t + '/p', 'rb').read())\n")
    for name, d in (("full", full), ("diff", diff)):
        (tmp_path / name).symlink_to(d["location"])
    (tmp_path / "out").mkdir()
    key = settings.KASA_BACKUP_KEYS.split(",")[0].strip()
    shell = f'set -euo pipefail\ndec() {{ {os.sys.executable} dec.py "$1" "$KEY"; }}\n{script}'
    subprocess.run(["bash", "-c", shell], cwd=tmp_path, check=True, env={**os.environ, "KEY": key})
    assert tree_state(tmp_path / "out" / "backend") == expected


def test_a_full_whose_file_index_is_gone_gives_a_full_that_says_why(customer):
    full = _backup(customer)
    bk = Backup.objects.get(pk=full["id"])
    (Path(bk.target.path) / bk.prefix / "admin.index.gz.enc").unlink()
    again = _backup(customer, "--differential")
    assert again["kind"] == "full"
    assert "admin.index.gz.enc of the newest full" in _log(again["run"])


def test_retention_keeps_the_full_a_running_differential_builds_on(customer):
    full = _backup(customer)
    newer = _backup(customer, "--full")
    policy = global_policy()
    policy.keep_last = 1
    policy.save()
    Backup.objects.create(customer=customer, status=Backup.Status.RUNNING, kind="differential",
                          base_id=full["id"], target=Backup.objects.get(pk=full["id"]).target)
    plan = prune_customer(customer, dry_run=True)
    assert full["id"] in plan.keep and newer["id"] in plan.keep
    assert any("running backup" in r for r in plan.keep[full["id"]])
