"""The local journal (engines.localjournal, operations.offline/reconcile): written atomically and durably,
authenticated, refused when corrupt, forged or unsafe, and preferred by the reaper when the run's `result` lags.

The end-to-end proof — the control database stopped in the middle of an undo — is
tests/security/test_undo_without_control_db.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
from django.utils import timezone

from engines import localjournal
from tests.conftest import NOBODY, wait_dead

pytestmark = pytest.mark.smoke  # none of it needs PostgreSQL as the control database

KEYS = localjournal.derive_keys(["k" * 40])
OTHER_KEYS = localjournal.derive_keys(["o" * 40])


def _body(run_id: int = 7, **extra) -> dict:
    return {"run": run_id, "doc": {"journal": [{"type": "staging", "path": "/srv/c/.kasa-restore-7"}]}, **extra}


# --- writing -------------------------------------------------------------------------------------------------
def test_local_journal_round_trips_in_a_private_folder_with_a_private_file(tmp_path):
    folder = tmp_path / "journals"
    localjournal.write(folder, 7, _body(), KEYS)
    assert localjournal.read(folder, 7, KEYS) == _body()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    path = localjournal.path_for(folder, 7)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert localjournal.listed(folder) == [7]
    assert sorted(os.listdir(folder)) == ["run-7.json"]  # no temporary file left beside it


def test_local_journal_is_fsynced_before_it_replaces_the_previous_one_and_its_folder_after(tmp_path, monkeypatch):
    """Durable before the change it announces: the new content reaches the disk, then takes the old one's place,
    then the rename itself reaches the disk."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    localjournal.write(tmp_path, 7, _body(), KEYS)
    assert calls == [("fsync", "file"), ("replace", "run-7.json"), ("fsync", "dir")]


def test_a_writer_killed_at_any_moment_leaves_a_whole_journal_old_or_new(tmp_path):
    """A child rewrites a large journal as fast as it can and is SIGKILLed mid-way: what is left always reads back
    whole and authenticated, and the next write succeeds (a crash's temporary file is never taken for the journal)."""
    localjournal.write(tmp_path, 7, _body(version=0), KEYS)
    filler = "x" * 2_000_000
    pid = os.fork()
    if pid == 0:
        try:
            for version in range(1, 10_000):
                localjournal.write(tmp_path, 7, _body(version=version, filler=filler), KEYS)
        finally:
            os._exit(0)
    time.sleep(0.4)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    body = localjournal.read(tmp_path, 7, KEYS)
    assert body["run"] == 7 and isinstance(body["version"], int)
    assert body["version"] == 0 or body["filler"] == filler
    localjournal.write(tmp_path, 7, _body(version=-1), KEYS)
    assert localjournal.read(tmp_path, 7, KEYS)["version"] == -1
    assert localjournal.listed(tmp_path) == [7]


def test_a_journal_written_under_an_older_key_reads_after_a_key_rotation(tmp_path):
    localjournal.write(tmp_path, 7, _body(), OTHER_KEYS)
    assert localjournal.read(tmp_path, 7, KEYS + OTHER_KEYS) == _body()


# --- refusing --------------------------------------------------------------------------------------------------
def _written(tmp_path) -> Path:
    localjournal.write(tmp_path, 7, _body(), KEYS)
    return localjournal.path_for(tmp_path, 7)


def _refused(tmp_path, match: str) -> None:
    with pytest.raises(localjournal.JournalRefused, match=match):
        localjournal.read(tmp_path, 7, KEYS)


def test_a_corrupt_journal_is_refused(tmp_path):
    path = _written(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # torn
    _refused(tmp_path, "corrupt")
    path.write_bytes(data.replace(b'"staging"', b'"stagiNg"'))  # one flipped bit of the body
    _refused(tmp_path, "authentication tag is wrong")
    path.write_bytes(b"\x00" * 64)
    _refused(tmp_path, "corrupt")


def test_a_journal_forged_without_the_key_is_refused(tmp_path):
    path = _written(tmp_path)
    doc = json.loads(path.read_bytes())
    # A journal that would make Kasa remove /etc: re-tagged under a key of the forger's choosing.
    doc["body"]["doc"]["journal"] = [{"type": "staging", "path": "/etc"}]
    forged_kid, forged_key = OTHER_KEYS[0]
    doc["key"], doc["hmac"] = forged_kid, localjournal._tag(forged_key, forged_kid, doc["body"])
    path.write_text(json.dumps(doc))
    _refused(tmp_path, "not configured")
    doc["key"] = KEYS[0][0]  # claiming the real key id does not help
    path.write_text(json.dumps(doc))
    _refused(tmp_path, "authentication tag is wrong")


def test_another_runs_journal_under_this_runs_name_is_refused(tmp_path):
    localjournal.write(tmp_path, 8, _body(run_id=8), KEYS)
    os.replace(localjournal.path_for(tmp_path, 8), localjournal.path_for(tmp_path, 7))
    _refused(tmp_path, "journal of run 8")


def test_a_journal_that_is_a_link_or_open_to_others_or_not_kasas_is_refused(tmp_path):
    path = _written(tmp_path)
    path.chmod(0o644)
    _refused(tmp_path, "mode 644")
    path.chmod(0o600)
    os.chown(path, NOBODY, NOBODY)
    _refused(tmp_path, "owned by uid 65534")
    os.chown(path, os.geteuid(), os.getegid())
    real = tmp_path / "elsewhere.json"
    os.replace(path, real)
    path.symlink_to(real)
    _refused(tmp_path, "cannot be opened safely")


def test_a_customer_user_cannot_write_into_kasas_journal_folder(unprivileged_dir):
    """Why the journals are not beside the staging folder: there, the customer's own user could write them."""
    from tests.conftest import as_unprivileged

    var = unprivileged_dir / "var"
    var.mkdir(mode=0o755)
    os.chown(var, 0, 0)
    folder = localjournal.ensure_folder(var / "journals")  # reachable up to here; the 0700 folder keeps others out

    def plant():
        try:
            (folder / "run-7.json").write_text("{}")
        except PermissionError:
            return
        raise AssertionError("a journal was planted")

    as_unprivileged(plant)
    assert localjournal.listed(folder) == []


def test_journal_paths_outside_the_runs_root_are_named(tmp_path):
    root = "/srv/customers/a"
    steps = {"journal": [{"type": "files", "live": "/srv/customers/a/web", "staged": "/srv/customers/a/.k/web"},
                         {"type": "staging", "path": "/srv/customers/ab"},
                         {"type": "carry", "from": "/srv/customers/a/../b/x", "to": "/etc/passwd"},
                         {"type": "env_before", "files": {"/srv/customers/b/web": "00"}},
                         {"type": "switch", "new": "releases/1.0/web"}]}
    assert localjournal.outside(steps, root) == ["/srv/customers/ab", "/srv/customers/a/../b/x", "/etc/passwd",
                                                 "/srv/customers/b/web"]
    assert localjournal.outside(steps["journal"][:1], root) == []


# --- the lock that tells a live worker from a dead one --------------------------------------------------------------
def test_a_journals_lock_is_held_while_its_worker_lives_and_free_once_it_is_killed(tmp_path):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        lock = localjournal.Lock(tmp_path, 7)
        assert lock.acquire()
        os.write(ready_w, b"1")
        time.sleep(60)
        os._exit(0)
    os.read(ready_r, 1)
    assert localjournal.held_elsewhere(tmp_path, 7)
    assert not localjournal.Lock(tmp_path, 7).acquire()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    wait_dead(pid)
    assert not localjournal.held_elsewhere(tmp_path, 7)
    assert localjournal.Lock(tmp_path, 7).acquire()


# --- the reaper and the local journal -------------------------------------------------------------------------------
def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.fixture
def dead_restore(make_customer):
    """A restore whose worker died after it had made a staging folder: the run's `result` never got the step
    (the control database lagged behind), its local journal did."""
    from operations.models import Run

    customer = make_customer()
    root = customer.root_path()
    staging = root / ".kasa-restore-x"
    (staging / "backend").mkdir(parents=True)
    (staging / "backend" / "half-unpacked.js").write_text("…")
    run = Run.objects.create(kind=Run.Kind.RESTORE, customer=customer, status=Run.Status.RUNNING, root=str(root),
                             worker=f"{socket.gethostname()}:{_dead_pid()}", heartbeat_at=timezone.now(), result={})
    return run, staging


def _leave_journal(run, doc: dict, *, keys=None, **extra) -> Path:
    from operations import offline

    body = {"run": run.pk, "kind": run.kind, "customer": run.customer_id, "root": run.root, "host": "h",
            "worker": run.worker, "doc": doc, "offline_since": None, "lines": [], "commands": [], "deferred": [],
            "outcome": None, **extra}
    localjournal.write(offline.folder(), run.pk, body, keys or offline.keys())
    return localjournal.path_for(offline.folder(), run.pk)


@pytest.mark.django_db(transaction=True)
def test_the_reaper_undoes_from_the_local_journal_when_the_runs_result_lags_behind_it(dead_restore):
    from operations.services import runs_reap

    run, staging = dead_restore
    path = _leave_journal(run, {"journal": [{"type": "staging", "path": str(staging)}]})
    assert run.pk in runs_reap()
    run.refresh_from_db()
    assert run.status == "failed" and "no longer exists" in run.error
    assert not staging.exists()  # undone from the local journal: the result alone knew nothing of it
    assert not path.exists()
    assert "taken from its local journal" in " ".join(run.log_lines.values_list("text", flat=True))


@pytest.mark.django_db(transaction=True)
def test_the_reaper_never_follows_a_forged_local_journal(dead_restore, customer_root):
    from operations import offline
    from operations.services import runs_reap

    run, staging = dead_restore
    victim = customer_root.parent / f"{customer_root.name}-victim"
    victim.mkdir()
    try:
        # Under a key Kasa does not have: set aside for an operator, and the run's result (empty) is what counts.
        path = _leave_journal(run, {"journal": [{"type": "staging", "path": str(victim)}]}, keys=OTHER_KEYS)
        assert run.pk in runs_reap()
        assert victim.exists() and staging.exists()
        assert not path.exists() and [p.name for p in Path(offline.folder()).glob(f"run-{run.pk}.json.refused-*")]
    finally:
        victim.rmdir()


@pytest.mark.django_db(transaction=True)
def test_the_reaper_never_follows_a_journal_naming_paths_outside_the_runs_root(dead_restore, customer_root):
    from operations.services import runs_reap

    run, staging = dead_restore
    victim = customer_root.parent / f"{customer_root.name}-victim"
    victim.mkdir()
    try:
        _leave_journal(run, {"journal": [{"type": "staging", "path": str(staging)},
                                         {"type": "staging", "path": str(victim)}]})
        assert run.pk in runs_reap()
        assert victim.exists() and staging.exists()  # authenticated, but naming a path outside the run's root:
        # the whole journal is set aside, and the run's result (empty) is what the reaper follows
    finally:
        victim.rmdir()


@pytest.mark.django_db(transaction=True)
def test_the_reaper_records_what_a_dead_worker_logged_offline_and_the_end_it_reached(dead_restore):
    """The worker finished its undo without the control database and exited before it could record it: the reaper
    puts its lines (in order, after the ones already stored) and its end into the database, and the journal goes."""
    from operations.models import RunLogLine
    from operations.services import runs_reap

    run, staging = dead_restore
    RunLogLine.objects.create(run=run, seq=1, text="restoring")
    lines = [{"seq": 2, "ts": "2026-01-01T00:00:00+00:00", "level": "warning", "stream": "kasa",
              "text": "the control database does not answer", "command": None, "command_pk": None},
             {"seq": 3, "ts": "2026-01-01T00:00:01+00:00", "level": "info", "stream": "stdout", "text": "stopped",
              "command": 1, "command_pk": None}]
    commands = [{"id": 1, "argv": ["stop"], "cwd": "/", "started_at": "2026-01-01T00:00:00+00:00", "exit_code": 0,
                 "finished_at": "2026-01-01T00:00:01+00:00", "duration": 1.0}]
    path = _leave_journal(run, {"journal": []}, lines=lines, commands=commands,
                          offline_since="2026-01-01T00:00:00+00:00",
                          outcome={"status": "failed", "error": "restore failed: x; the pre-restore state was put back",
                                   "result": {"safety_backup": None}})
    assert run.pk in runs_reap()
    run.refresh_from_db()
    assert run.status == "failed" and run.error.startswith("restore failed: x; the pre-restore state was put back")
    assert "control database did not answer" in run.error and run.result["safety_backup"] is None
    stored = list(run.log_lines.order_by("seq").values_list("seq", "text", "command__argv"))
    assert [s for s, _, _ in stored] == [1, 2, 3, 4]
    assert stored[2] == (3, "stopped", ["stop"]) and stored[3][1].startswith("reconciled:")
    assert staging.exists()  # the worker had finished its undo: nothing is undone a second time
    assert not path.exists()


@pytest.mark.smoke
def test_a_cleared_journal_is_written_empty_so_the_reaper_undoes_nothing():
    # Upgrades once set doc["journal"] = [] and saved: save() wrote the old list back, so a worker killed after
    # a successful upgrade's cleanup left a way back for the reaper to "undo" a change that holds.
    from types import SimpleNamespace

    from operations.journal import RunJournal

    written = []

    class Ctx:
        run = SimpleNamespace(pk=0)

        def keep_local(self):
            return SimpleNamespace(save_doc=lambda doc: written.append(json.loads(json.dumps(doc))))

        def record(self, fn):
            pass

    doc: dict = {}
    journal = RunJournal(Ctx(), doc)
    journal.add({"type": "switch"})
    journal.clear()
    assert written[-1]["journal"] == [] and doc["journal"] == [] and not journal.has("switch")
