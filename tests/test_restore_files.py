"""Restored files are tamed (issue 11, point 5): owned by the customer's run_as user, never a setuid/setgid bit
(stripped, each member named in a warning), never a device (the restore is refused, the customer untouched).
Real backups, real GNU tar, real OS users; a device node is planted in a backup with Python's tarfile.
"""

from __future__ import annotations

import io
import os
import pwd
import stat
import tarfile

import pytest
from django.conf import settings

from backups.models import Backup
from engines.artifact import write_artifact
from engines.backupcrypto import KeyRing
from engines.sources import compressor_stage
from engines.streams import ProcessChain, Stage
from operations.models import RunLogLine
from tests.restore_helpers import command_json, tree_state

pytestmark = pytest.mark.django_db(transaction=True)


def _warnings(run_id: int) -> list[str]:
    return list(RunLogLine.objects.filter(run_id=run_id, level="warning").values_list("text", flat=True))


@pytest.fixture
def backed_up(make_customer, customer_users):
    """A customer whose run_as is a customer user, with a setuid file in its backend, and one backup of it."""
    customer = make_customer(services=("backend",))
    customer.run_as = customer_users[0]
    customer.save()
    backend = customer.root_path() / "backend"
    (backend / "app.js").write_text("console.log('hi')\n")
    (backend / "helper").write_text("#!/bin/sh\n")
    os.chmod(backend / "helper", 0o6755)
    code, doc = command_json("backup", customer.domain)
    assert code == 0, doc
    return customer, doc


def _plant(bk: Backup, art_name: str, members: list[tuple[tarfile.TarInfo, bytes]], tmp_path) -> None:
    """Replace one artifact of a backup by a tar of `members`, compressed and encrypted as Kasa writes it, and
    record it in the catalogue: what someone with the backup keys could store."""
    art = bk.artifacts.get(name=art_name)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    (tmp_path / "planted.tar").write_bytes(raw.getvalue())
    store, name = bk.target.store(), f"{bk.prefix}/{art.name}"
    store.delete(name)
    chain = ProcessChain([Stage(["cat"]), compressor_stage(art.compression)], stdin_path=str(tmp_path / "planted.tar"))
    res = write_artifact(chain, store, name, keyring=KeyRing(settings.KASA_BACKUP_KEYS))
    art.sha256, art.size = res.sha256, res.size
    art.save()


def test_a_backup_holding_a_device_node_is_refused_and_the_customer_left_as_it_was(backed_up, tmp_path):
    customer, doc = backed_up
    bk = Backup.objects.get(pk=doc["id"])
    top = tarfile.TarInfo("backend")
    top.type, top.mode = tarfile.DIRTYPE, 0o755
    node = tarfile.TarInfo("backend/sda")
    node.type, node.devmajor, node.devminor, node.mode = tarfile.BLKTYPE, 8, 0, 0o666
    _plant(bk, "backend.tar.zst.enc", [(top, b""), (tarfile.TarInfo("backend/app.js"), b"x"), (node, b"")], tmp_path)
    before = tree_state(customer.root_path())

    code, run = command_json("restore", str(doc["id"]), "--yes")

    assert code == 1, run
    assert "member 'backend/sda' refused: it is a block device" in run["error"], run["error"]
    assert "nothing was touched" in run["error"]
    assert tree_state(customer.root_path()) == before
    assert not [p for p in customer.root_path().iterdir() if p.name.startswith(".kasa-restore-")]


def test_a_drill_names_each_setid_member_and_leaves_no_trace(backed_up):
    _, doc = backed_up
    code, run = command_json("verify", str(doc["id"]))
    assert code == 0, run
    assert _warnings(run["id"]) == [
        "backend.tar.zst.enc: 'backend/helper' had the setuid and setgid bit (mode 6755): unpacked without it "
        "(mode 0755)"]


def test_a_restore_without_run_as_keeps_the_files_the_workers_but_never_setid(backed_up):
    customer, doc = backed_up
    customer.run_as = ""
    customer.save()
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 0, run
    helper = customer.root_path() / "backend" / "helper"
    assert helper.stat().st_uid == os.geteuid() and stat.S_IMODE(helper.stat().st_mode) == 0o755
    assert any("'backend/helper' had the setuid and setgid bit" in w for w in _warnings(run["id"]))


def test_a_restore_for_a_run_as_user_that_does_not_exist_is_refused_before_anything(backed_up):
    customer, doc = backed_up
    customer.run_as = "kasa-t-nobody-here"
    customer.save()
    with pytest.raises(KeyError):
        pwd.getpwnam("kasa-t-nobody-here")
    before = tree_state(customer.root_path())
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 1, run
    assert "run_as user 'kasa-t-nobody-here' does not exist" in run["error"] and "nothing was touched" in run["error"]
    assert tree_state(customer.root_path()) == before
