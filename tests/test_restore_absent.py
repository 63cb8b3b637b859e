"""A service folder deleted outright: the restore's safety backup records it as absent instead of failing, the
restore brings every file and row back, and the way back (restoring that safety backup) makes it absent again.
An ordinary backup still refuses a missing folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from backups.models import Backup, BackupPolicy
from backups.services import global_policy
from operations.models import Run, RunLogLine
from tests.restore_helpers import command_json, my_state, pg_exec, pg_state, tree_state
from tests.test_backups import _backup_json, full_customer  # noqa: F401 (fixture)
from tests.test_restore import restorable  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db(transaction=True)


def _digest(tree: dict) -> str:
    """One sha256 over every entry of a tree_state: type, mode, content or link target."""
    return hashlib.sha256(json.dumps(sorted(tree.items())).encode()).hexdigest()


def _held(tree: dict) -> dict:
    """What a backup holds of a tree: log folders are left out of every backup (docs/FORMAT.md), so the logs of
    a folder deleted outright are gone for good; everything else comes back."""
    return {k: v for k, v in tree.items() if not k.startswith("admin/logs")}


def _break(customer, pg) -> None:
    """The attack: one service folder gone outright, files of another overwritten, rows dropped."""
    root = customer.root_path()
    shutil.rmtree(root / "admin")
    (root / "backend" / "src" / "app.js").write_bytes(b"owned\n")
    (root / "backend" / "src" / "util.js").write_bytes(b"\x00" * 4096)
    pg_exec(pg, "DELETE FROM orders WHERE id % 3 = 0", as_owner=True)


def _state(customer, pg, my) -> dict:
    tree = tree_state(customer.root_path())
    return {"digest": _digest(tree), "tree": tree, "pg": pg_state(pg), "my": my_state(my)}


def _log(run_id: int, level: str | None = None) -> list[str]:
    lines = RunLogLine.objects.filter(run_id=run_id).order_by("seq")
    return list((lines.filter(level=level) if level else lines).values_list("text", flat=True))


@pytest.mark.parametrize("safety_kind", ["differential", "full"])
def test_restore_in_place_with_a_service_folder_deleted_brings_back_every_file_and_row(
        restorable, pg_database, mysql_database, safety_kind):  # noqa: F811
    customer, doc, _ = restorable
    if safety_kind == "full":  # every backup a full one: the safety backup's tar would meet the missing folder
        BackupPolicy.objects.filter(pk=global_policy().pk).update(full_every_days=1)
    good = _state(customer, pg_database, mysql_database)
    _break(customer, pg_database)
    assert not (customer.root_path() / "admin").exists()
    assert pg_state(pg_database) != good["pg"]

    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 0, run
    assert run["status"] == "succeeded"
    after = _state(customer, pg_database, mysql_database)
    assert after["tree"] == _held(good["tree"])  # every file byte for byte, modes and links too
    assert _digest(after["tree"]) == _digest(_held(good["tree"]))
    assert after["tree"]["backend/src/app.js"] == good["tree"]["backend/src/app.js"]
    assert after["pg"] == good["pg"] and after["my"] == good["my"]

    # The safety backup records the folder as absent, in its manifest (catalogue and backup.json), with no archive.
    safety = Backup.objects.get(pk=run["result"]["safety_backup"])
    assert safety.status == "succeeded" and safety.pinned and safety.trigger == "restore"
    assert safety.kind == safety_kind
    assert safety.manifest["absent"] == [{"source": "admin", "path": "admin"}]
    stored = json.loads((Path(safety.target.path) / safety.prefix / "backup.json").read_text())
    assert stored["absent"] == [{"source": "admin", "path": "admin"}]
    assert not safety.artifacts.filter(source="admin").exists()
    assert safety.artifacts.filter(source="backend").exists()
    # … and the run's log says so, as a warning.
    warnings = [line for line in _log(run["id"], "warning") if "service admin" in line]
    assert warnings and "does not exist" in warnings[0] and "absent" in warnings[0]


def test_restoring_the_safety_backup_makes_the_folder_absent_again(restorable, pg_database,  # noqa: F811
                                                                    mysql_database):
    customer, doc, _ = restorable
    _break(customer, pg_database)
    broken = _state(customer, pg_database, mysql_database)
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 0, run
    assert (customer.root_path() / "admin").is_dir()

    # The way back: the state before the restore, the deleted folder deleted again (not left as the restore made it).
    code, back = command_json("restore", str(run["result"]["safety_backup"]), "--yes")
    assert code == 0, back
    now = _state(customer, pg_database, mysql_database)
    assert not (customer.root_path() / "admin").exists()
    assert now["tree"] == broken["tree"] and now["digest"] == broken["digest"]
    assert now["pg"] == broken["pg"]
    log = _log(back["id"])
    assert any("removed admin" in line for line in log)
    assert any(line.startswith("not starting admin") for line in log)
    assert not [p for p in customer.root_path().iterdir() if p.name.startswith(".kasa-")
                and p.name != ".kasa-pm2"]


def test_a_failed_way_back_puts_the_removed_folder_back(restorable, pg_database, mysql_database,  # noqa: F811
                                                         settings):
    from tests.conftest import free_port

    customer, doc, _ = restorable
    _break(customer, pg_database)
    code, run = command_json("restore", str(doc["id"]), "--yes")
    assert code == 0, run
    restored = _state(customer, pg_database, mysql_database)
    svc = customer.services.get(name="backend")
    svc.health_url = f"http://127.0.0.1:{free_port()}/health"  # nothing listens: never healthy
    svc.save()
    settings.KASA_HEALTH_TIMEOUT = 1.0
    code, back = command_json("restore", str(run["result"]["safety_backup"]), "--yes")
    assert code == 1 and "pre-restore state was put back" in back["error"]
    assert _state(customer, pg_database, mysql_database) == restored  # admin is back where it was
    assert not Run.objects.get(pk=back["id"]).result.get("journal")


def test_restoring_only_the_deleted_service_takes_a_safety_backup_of_its_absence(  # noqa: F811
        restorable, pg_database, mysql_database, staff_user, team):  # noqa: F811
    from django.test import Client

    customer, doc, _ = restorable
    good = tree_state(customer.root_path())
    shutil.rmtree(customer.root_path() / "admin")
    code, run = command_json("restore", str(doc["id"]), "--only", "admin", "--yes")
    assert code == 0, run
    assert tree_state(customer.root_path()) == _held(good)
    safety = Backup.objects.get(pk=run["result"]["safety_backup"])
    assert safety.artifacts.count() == 0 and safety.manifest["absent"] == [{"source": "admin", "path": "admin"}]
    # The Restore page offers the absence like an artifact, ticked.
    client = Client()
    client.force_login(staff_user(team))
    page = client.get(f"/backups/backup/{safety.pk}/restore/")
    assert page.status_code == 200
    assert "absent when the backup was taken: its folder admin is removed" in page.content.decode()
    # Its way back, asked by name: the folder goes again.
    code, back = command_json("restore", str(safety.pk), "--only", "admin", "--yes")
    assert code == 0, back
    assert not (customer.root_path() / "admin").exists()


@pytest.mark.parametrize("kind", ["full", "differential"])
def test_a_regular_backup_of_a_customer_missing_a_service_folder_fails_clearly(full_customer, kind):  # noqa: F811
    if kind == "differential":
        _backup_json(full_customer.domain)  # the full it would build on
    shutil.rmtree(full_customer.root_path() / "admin")
    with pytest.raises(CommandError) as err:
        call_command("backup", full_customer.domain, f"--{kind}")
    assert err.value.returncode == 1
    bk = Backup.objects.filter(customer=full_customer).latest("id")
    assert bk.status == "failed" and bk.trigger == "manual"
    assert "service admin" in bk.error and "does not exist" in bk.error and "nothing was backed up" in bk.error
    assert "service admin" in str(err.value)
    assert not (Path(bk.target.path) / bk.prefix).exists() or not any((Path(bk.target.path) / bk.prefix).iterdir())
