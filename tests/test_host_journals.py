"""Issue 14, losing a host mid-operation: a remote restore in place whose host is lost mid-way (the session's sshd
child killed and the host cut off the network) fails naming the host and leaves its journal on the host; once the
host answers again, the replay of that journal (backups.host_journals — from the host's probe, or from the reaper
for a worker that died) puts the customer back exactly as it was, restarts what the journal stopped, and removes
the journal. A journal that cannot be trusted is refused and left alone.

Real parts only: simulated hosts in network namespaces with OpenSSH's sshd (tests/hosts.py), PM2 on the host as
the customer's user. The cut is made at a known point by wrapping one step of backups.remote_restore (the step
runs for real, then the connection dies), as tests/test_remote_restore.py does."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path

import pytest
from django.core.management import call_command

from audit.models import AuditEntry
from backups.models import Backup
from engines import hostrestore
from engines.procbase import REPO_ROOT
from tests.conftest import kill_pm2_under, wait_until
from tests.remote_fixtures import in_thread, make_host, remote_customer
from tests.restore_helpers import tree_state
from tests.test_remote_restore import _answers, _backup_ok, _customer, _journals, _restore

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fast(settings):
    """tests/test_remote_restore.py's short timings, and a lost host given up on within 2 s."""
    settings.KASA_REMOTE_PM2 = str(REPO_ROOT / "node_modules" / ".bin" / "pm2")
    settings.KASA_PM2_SETTLE = 0.5
    settings.KASA_HEALTH_STREAK = 1
    settings.KASA_HEALTH_TIMEOUT = 2.5
    settings.KASA_HEALTH_INTERVAL = 0.2
    settings.KASA_SSH_CONNECT_TIMEOUT = 2
    return settings


def _hits(root: Path) -> int:
    with sqlite3.connect(root / "data" / "cache.sqlite3") as con:
        return con.execute("SELECT count(*) FROM hits").fetchone()[0]


def _changed_since_backup(customer) -> tuple[Backup, dict, int]:
    """A backup, then the customer changed after it (a file, a deleted one, rows): (backup, tree, rows) as the
    customer is now, which is what a failed restore must leave."""
    root = Path(customer.root)
    assert _backup_ok(customer)
    bk = Backup.objects.filter(customer=customer, status="succeeded").latest("pk")
    (root / "backend" / "src" / "app.js").write_text("console.log('now')\n")
    (root / "backend" / "run.sh").unlink()
    with sqlite3.connect(root / "data" / "cache.sqlite3") as con:
        con.execute("DELETE FROM hits WHERE id > 25")
    return bk, tree_state(root), 25


def _lose(h) -> None:
    """The session's sshd child dies, then the host drops off the network. The moment between lets the connection's
    end reach the worker's SSH master: cut at once, the master may instead wait out its keepalives (30 s) on a dead
    link before the run learns the host is gone — the same outcome, later."""
    h.kill_sessions()
    time.sleep(0.3)
    h.cut()


def _restore_cut(h, bk, monkeypatch, step: str, when=lambda *a: True):
    """Run a restore of `bk` in which backups.remote_restore.`step` runs for real and then the host is lost (its
    session's sshd child killed, its link down); the run, failed."""
    from backups import remote_restore

    real = getattr(remote_restore, step)
    cut = []

    def then_lose_the_host(*args, **kwargs):
        result = real(*args, **kwargs)
        if not cut and when(*args):
            cut.append(True)
            _lose(h)
        return result

    monkeypatch.setattr(remote_restore, step, then_lose_the_host)
    t, box = in_thread(_restore, bk, safety_backup=False)
    t.join(120)
    run = box.get("result")
    assert run is not None, box.get("error")
    assert cut and run.status == "failed", run.error
    return run


def _log(run) -> str:
    return "\n".join(line.text for line in run.log_lines.all())


def _replayed_by_the_probe(h, host, run):
    """The host answers again; its probe (the periodic pass) finds the journal and has it replayed."""
    from hosts.tasks import probe_host

    h.restore()
    assert _journals(h) == [f"run-{run.pk}.json"]
    assert "journal(s) found there handed over for replay" in probe_host(host.pk)
    run.refresh_from_db()
    return _log(run)


def test_a_host_lost_mid_stream_of_a_restore_leaves_only_its_staging_folder_which_the_replay_removes(
        netns_hosts, team, customer_users, fast, monkeypatch, parents_open):
    from backups import remote_restore

    h = netns_hosts.make()
    host = make_host(h, "web-streamcut")
    customer, _url = _customer(h, host, team, customer_users[0], parents_open, sqlite=False, health=False)
    root = Path(customer.root)
    bk, before, _rows = _changed_since_backup(customer)
    real, cut = remote_restore._pipe_to_host, []

    def cut_after_the_first_piece(remote, argv, art, dest, feed):
        def feeding(write, close):
            def write_then_cut(piece):
                write(piece)
                if not cut:  # tar on the host has its first bytes; the rest of the stream never arrives
                    cut.append(True)
                    _lose(h)
            return feed(write_then_cut, close)
        return real(remote, argv, art, dest, feeding)

    monkeypatch.setattr(remote_restore, "_pipe_to_host", cut_after_the_first_piece)
    t, box = in_thread(_restore, bk, safety_backup=False)
    t.join(120)
    run = box.get("result")
    assert run is not None and cut and run.status == "failed", box
    assert "ROLLBACK INCOMPLETE on host web-streamcut" in run.error, run.error
    assert tree_state(root) == before  # nothing live was touched ...
    assert [n.name for n in root.iterdir() if n.name.startswith(".kasa-restore-")] == [f".kasa-restore-{run.pk}"]

    log = _replayed_by_the_probe(h, host, run)  # ... and the staging folder goes with the journal
    assert "its journal on host web-streamcut was replayed: nothing had been touched" in log, log
    assert not [n for n in root.iterdir() if n.name.startswith(".kasa-restore-")]
    assert tree_state(root) == before and _journals(h) == []


def test_a_host_lost_during_the_swap_keeps_its_journal_and_its_probe_replays_it_once_the_host_answers(
        netns_hosts, team, customer_users, fast, monkeypatch, parents_open):
    h = netns_hosts.make()
    host = make_host(h, "web-swapcut")
    customer, url = _customer(h, host, team, customer_users[0], parents_open, sqlite=True, health=False)
    root = Path(customer.root)
    try:
        bk, before, rows = _changed_since_backup(customer)
        # Lost right after the SQLite file was swapped in: the folders and the database are the backup's now.
        run = _restore_cut(h, bk, monkeypatch, "_sqlite_in")
        assert "ROLLBACK INCOMPLETE on host web-swapcut" in run.error
        assert tree_state(root) != before and _hits(root) == 37  # half-way: what the backup holds
        doc = json.loads((h.customers_root / hostrestore.JOURNALS / f"run-{run.pk}.json").read_text())
        assert {"files", "db_swap", "services_stopped"} <= {s["type"] for s in doc["body"]["steps"]}

        log = _replayed_by_the_probe(h, host, run)
        assert "its journal on host web-swapcut was replayed: the pre-restore state was put back" in log, log
        assert tree_state(root) == before and _hits(root) == rows
        assert not [n for n in (root / "data").iterdir() if n.name.startswith(".cache.sqlite3.kasa-")]
        assert not [n for n in root.iterdir() if n.name.startswith(".kasa-restore-")]  # the staging folder too
        assert _journals(h) == []
        wait_until(lambda: _answers(url) == 200, 10, what="the service the journal stopped, started again")
        assert AuditEntry.objects.filter(action="run.restore.host_journal", object_id=str(run.pk),
                                         result__startswith="replayed").exists()
    finally:
        h.restore() if not h.answers() else None
        kill_pm2_under(root)


def test_a_host_lost_while_the_restored_services_start_is_put_back_and_restarted_from_its_journal(
        netns_hosts, team, customer_users, fast, monkeypatch, parents_open):
    fast.KASA_HEALTH_TIMEOUT = 1.5
    h = netns_hosts.make()
    host = make_host(h, "web-startcut")
    customer, url = _customer(h, host, team, customer_users[0], parents_open, sqlite=True)
    root = Path(customer.root)
    try:
        bk, before, rows = _changed_since_backup(customer)
        # PM2 started the restored services on the host; then the host is lost before their health is known.
        run = _restore_cut(h, bk, monkeypatch, "_services", when=lambda ctx, remote, plan, specs, action:
                           action == "start")
        assert "ROLLBACK INCOMPLETE on host web-startcut" in run.error and "health" in run.error
        assert tree_state(root) != before

        # The host answers again; an operator replays its journals at once (`host_check NAME --replay`).
        h.restore()
        out = io.StringIO()
        call_command("host_check", "web-startcut", "--replay", stdout=out)
        assert "journals: 1 restore journal(s) left there" in out.getvalue()
        assert f"replay: run {run.pk}: replayed: its journal on host web-startcut was replayed" in out.getvalue()
        run.refresh_from_db()
        assert "the pre-restore state was put back" in _log(run)
        assert tree_state(root) == before and _hits(root) == rows
        assert _journals(h) == []
        # stopped for the undo, started again (PM2, as the customer's user) from the tree as it was
        wait_until(lambda: _answers(url) == 200, 10, what="the service started again")
    finally:
        h.restore() if not h.answers() else None
        kill_pm2_under(root)


def test_a_tampered_or_foreign_host_journal_is_refused_left_alone_and_reported_once(netns_hosts, team):
    from backups.host_journals import host_journal_key, replay_host
    from operations.models import Run

    h = netns_hosts.make()
    host = make_host(h, "web-tampered")
    customer = remote_customer(h, host, team)
    root = Path(customer.root)
    before = tree_state(root)
    runs = [Run.objects.create(kind="restore", customer=customer, status="failed", root=str(root)) for _ in "ab"]
    staged = str(root / ".kasa-restore-1")
    folder = h.customers_root / hostrestore.JOURNALS
    # (a) an authentic journal whose bytes were edited afterwards: a step now points elsewhere
    hostrestore.journal_write(str(h.customers_root), runs[0].pk,
                              {"root": str(root), "steps": [{"type": "staging", "path": staged}]},
                              host_journal_key(host.name))
    edited = (folder / f"run-{runs[0].pk}.json").read_text().replace(staged, str(root / "backend"))
    (folder / f"run-{runs[0].pk}.json").write_text(edited)
    # (b) one signed with the key of this host that names a folder outside the customer's root
    hostrestore.journal_write(str(h.customers_root), runs[1].pk,
                              {"root": str(root), "steps": [{"type": "staging", "path": str(h.customers_root)}]},
                              host_journal_key(host.name))
    files = {p.name: p.read_bytes() for p in folder.glob("run-*.json")}

    outcomes = replay_host(host)
    assert [o.what for o in outcomes] == ["refused", "refused"]
    assert {p.name: p.read_bytes() for p in folder.glob("run-*.json")} == files  # left exactly as they were
    assert tree_state(root) == before
    first, second = (_log(r) for r in runs)
    assert "on host web-tampered was refused, nothing in it was followed" in first
    assert "authentication tag is wrong" in first and "an operator must look" in first
    assert "names paths outside" in second
    replay_host(host)  # the next pass says nothing new on the runs
    assert [_log(r) for r in runs] == [first, second]
    assert AuditEntry.objects.filter(action="run.restore.host_journal_refused").count() == 2


def test_a_worker_that_died_mid_remote_restore_is_failed_by_the_reaper_which_replays_its_host_journal(
        netns_hosts, team, customer_users, fast, monkeypatch, parents_open):
    from django.utils import timezone

    from operations.models import Run
    from operations.services import runs_reap

    h = netns_hosts.make()
    host = make_host(h, "web-deadworker")
    customer, _url = _customer(h, host, team, customer_users[0], parents_open, sqlite=True, health=False)
    root = Path(customer.root)
    try:
        bk, before, rows = _changed_since_backup(customer)
        # The host's journal as a worker leaves it when it dies right after the swap (made here by losing the
        # host there), then the run as the dead worker left it: running, its heartbeat long stale.
        run = _restore_cut(h, bk, monkeypatch, "_sqlite_in")
        h.restore()
        Run.objects.filter(pk=run.pk).update(status="running", error="", finished_at=None, worker="gone-worker:1",
                                             heartbeat_at=timezone.now() - timezone.timedelta(hours=1))
        assert tree_state(root) != before

        assert run.pk in runs_reap(stale_after=60)
        run.refresh_from_db()
        log = _log(run)
        assert run.status == "failed" and "worker lost" in run.error
        assert "its journal on host web-deadworker was replayed: the pre-restore state was put back" in log, log
        assert tree_state(root) == before and _hits(root) == rows
        assert _journals(h) == []
    finally:
        h.restore() if not h.answers() else None
        kill_pm2_under(root)


def test_the_customers_next_restore_replays_a_journal_left_on_its_host_before_touching_anything(
        netns_hosts, team, customer_users, fast, monkeypatch, parents_open):
    h = netns_hosts.make()
    host = make_host(h, "web-nextrun")
    customer, _url = _customer(h, host, team, customer_users[0], parents_open, sqlite=True, health=False)
    root = Path(customer.root)
    try:
        bk, _before, _rows = _changed_since_backup(customer)
        first = _restore_cut(h, bk, monkeypatch, "_swap_files")
        h.restore()  # back before any probe saw it: the next restore of this customer finds the journal first

        again = _restore(bk, safety_backup=False)
        first.refresh_from_db()
        assert again.status == "succeeded", again.error
        assert f"run {first.pk} had left its journal on host web-nextrun; replayed first" in _log(again)
        assert "the pre-restore state was put back" in _log(first)
        assert (root / "backend" / "src" / "app.js").read_text() == "console.log('hi')\n"  # the backup's, whole
        assert (root / "backend" / "run.sh").exists() and _hits(root) == 37
        assert _journals(h) == []
        assert not [n for n in root.iterdir() if n.name.startswith((".kasa-restore-", ".kasa-trash-"))]
    finally:
        h.restore() if not h.answers() else None
        kill_pm2_under(root)
