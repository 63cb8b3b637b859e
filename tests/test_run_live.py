"""One truth per page, live (issue 12, point 2).

A run page's every field — status, times, worker, result summary, links to what the run produced, named phases
with their overall percentage — arrives over the WebSocket as typed messages while a real handler runs; a page
opened mid-run shows the current phase; the percentage of a real restore never goes down and ends at 100; the
confirmation pages estimate the duration from the customer's history.
"""

from __future__ import annotations

import contextlib
import re
import threading
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection, connections
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from backups.models import Backup
from backups.services import backup_start
from customers.models import Team
from operations.context import RunContext
from operations.models import Run
from operations.selectors import estimate_text, remaining_seconds, typical_seconds
from operations.services import run_execute
from tests.conftest import holding_host_slots
from tests.restore_helpers import command_json
from tests.test_backups import full_customer  # noqa: F401 (fixture)
from tests.test_live_logs import SLOW, communicator, receive_until_complete, running_run, session_cookie
from tests.test_restore import restorable  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db(transaction=True)


def _execute_elsewhere(run_id: int) -> None:
    """The worker's role, in another thread with its own database connection: the real handler."""

    def work():
        try:
            run_execute(run_id)
        finally:
            connections.close_all()

    t = threading.Thread(target=work)
    t.start()
    return t


def _finished_runs(customer, kind: str, seconds: list[float]) -> None:
    now = timezone.now()
    for i, s in enumerate(seconds):
        start = now - timedelta(hours=i + 1)
        Run.objects.create(customer=customer, kind=kind, status=Run.Status.SUCCEEDED, mutating=False,
                           started_at=start, finished_at=start + timedelta(seconds=s), requested_via="cli")


# --- the WebSocket: every field of a real backup run ---------------------------------------------------------
@pytest.mark.smoke
def test_a_backup_runs_status_times_worker_result_and_link_arrive_as_typed_messages(make_customer, staff_user,
                                                                                     team, settings):
    customer = make_customer(services=("backend",))
    (customer.root_path() / "backend" / "app.js").write_text("console.log('hi')\n")
    user = staff_user(team)
    run = backup_start(customer, encrypt=False, requested_by=None, via="cli", enqueue=False)
    cookie = session_cookie(user)
    # The host's only backup slot is taken: the run waits, running, in its first phase until we let it go.
    settings.KASA_MAX_BACKUPS_PER_HOST = 1
    held = contextlib.ExitStack()
    held.enter_context(holding_host_slots(customer, 1))

    async def scenario():
        comm = communicator(run.pk, cookie)
        assert (await comm.connect(timeout=SLOW))[0]
        first = [await comm.receive_json_from(timeout=SLOW) for _ in range(2)]
        assert [m["type"] for m in first] == ["progress", "status"]
        assert first[1]["status"] == "pending" and first[1]["started"] == "" and first[1]["links"] == []
        worker = _execute_elsewhere(run.pk)
        got = []
        while not any(m["type"] == "phase" and m["phase"] == "wait for a slot" for m in got):
            got.append(await comm.receive_json_from(timeout=SLOW))
        await sync_to_async(held.close)()  # (the slot is a row: released through the ORM)
        got += await receive_until_complete(comm)
        worker.join(SLOW)
        await comm.disconnect()
        return got

    got = async_to_sync(scenario)()
    bk = Backup.objects.get(run=run)
    statuses = [m for m in got if m["type"] == "status"]
    running = next(m for m in statuses if m["status"] == "running")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", running["started"]), running
    assert running["worker"] and running["finished_text"] == ""
    last = statuses[-1]
    assert last["status"] == "succeeded" and last["finished"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", last["finished_text"])
    assert last["duration_text"].endswith(" s")
    assert last["summary"].startswith(f"backup #{bk.pk}: ") and "{" not in last["summary"]  # words, not JSON
    assert {"label": f"backup #{bk.pk}", "url": reverse("admin:backups_backup_change", args=[bk.pk])} in last["links"]
    assert last["error"] == ""
    phases = [m for m in got if m["type"] == "phase"]
    plan = ["wait for a slot", "write artifacts", "manifest and replicas"]
    assert phases[-1]["phases"] == plan
    seen = list(dict.fromkeys(m["phase"] for m in phases))  # sampled: a short phase may pass between two reads
    assert seen[0] == "wait for a slot" and seen == [n for n in plan if n in seen], seen
    percents = [m["percent"] for m in phases]
    assert percents == sorted(percents) and percents[-1] == 100.0, percents


def test_a_page_opened_mid_run_shows_the_current_phase(make_customer, staff_user, team):
    customer = make_customer()
    user = staff_user(team)
    run = running_run(customer)
    ctx = RunContext(run)
    ctx.phases(("verify and unpack", 6), ("stop", 1), ("swap", 1), ("start", 1), ("health", 1))
    ctx.phase("verify and unpack")
    ctx.progress(50, 100, "unpacking backend.tar.zst: 50 B")
    ctx.phase("swap")
    # The page as it renders: the phase, its place, the overall percentage.
    client = Client()
    client.force_login(user)
    html = client.get(reverse("admin:operations_run_change", args=[run.pk])).content.decode()
    assert re.search(r'id="run-phase">swap<', html)
    assert re.search(r'id="run-phase-step"[^>]*>3 of 5<', html)
    assert 'value="70.0"' in html  # (6 + 1) of 10
    assert 'id="run-status" class="kasa-status kasa-status-running" data-status="running"' in html
    # The WebSocket of a page opened now: the current phase as a typed message, with the state.
    cookie = session_cookie(user)

    async def scenario():
        comm = communicator(run.pk, cookie)
        assert (await comm.connect(timeout=SLOW))[0]
        msgs = [await comm.receive_json_from(timeout=SLOW) for _ in range(3)]
        await comm.disconnect()
        return msgs

    msgs = async_to_sync(scenario)()
    assert [m["type"] for m in msgs] == ["progress", "phase", "status"]
    assert msgs[1] == {**msgs[1], "phase": "swap", "index": 2, "percent": 70.0, "running": True}


def test_phase_progress_never_goes_back_and_a_passed_phase_does_not_move_it(make_customer):
    run = running_run(make_customer())
    ctx = RunContext(run)
    ctx.phases(("a", 1), ("b", 3))
    ctx.phase("a")
    ctx.progress(1, 2)
    seen = [Run.objects.get(pk=run.pk).percent]
    ctx.phase("b")
    seen.append(Run.objects.get(pk=run.pk).percent)
    ctx.progress(10, 10)
    seen.append(Run.objects.get(pk=run.pk).percent)
    ctx.phase("a")  # an earlier phase again (a retry): the bar stays where it was
    seen.append(Run.objects.get(pk=run.pk).percent)
    assert seen == [12.5, 25.0, 100.0, 100.0]


# --- a real restore: the overall percentage, every write of it -------------------------------------------------
@pytest.fixture
def percent_log(transactional_db):
    """Every change of a run's phase or percentage, as PostgreSQL sees it written (a trigger)."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL triggers")
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE test_run_percent (id serial PRIMARY KEY, run_id int, phase text, percent float8)")
        cur.execute("""CREATE FUNCTION test_run_percent_fn() RETURNS trigger AS $$ BEGIN
            IF NEW.percent IS DISTINCT FROM OLD.percent OR NEW.phase IS DISTINCT FROM OLD.phase THEN
              INSERT INTO test_run_percent (run_id, phase, percent) VALUES (NEW.id, NEW.phase, NEW.percent);
            END IF; RETURN NEW; END $$ LANGUAGE plpgsql""")
        cur.execute("CREATE TRIGGER test_run_percent_tr AFTER UPDATE ON operations_run FOR EACH ROW "
                    "EXECUTE FUNCTION test_run_percent_fn()")

    def read(run_id: int) -> list[tuple[str, float]]:
        with connection.cursor() as cur:
            cur.execute("SELECT phase, percent FROM test_run_percent WHERE run_id = %s ORDER BY id", [run_id])
            return cur.fetchall()

    yield read
    with connection.cursor() as cur:
        cur.execute("DROP TRIGGER IF EXISTS test_run_percent_tr ON operations_run")
        cur.execute("DROP FUNCTION IF EXISTS test_run_percent_fn()")
        cur.execute("DROP TABLE IF EXISTS test_run_percent")


def test_a_real_restore_goes_through_its_named_phases_monotonically_to_100(restorable, percent_log):  # noqa: F811

    customer, doc, _ = restorable
    code, out = command_json("restore", str(doc["id"]), "--yes")
    assert code == 0, out
    run = Run.objects.get(pk=out["id"])
    writes = percent_log(run.pk)
    percents = [p for _, p in writes]
    assert percents == sorted(percents), writes  # never back
    assert percents[-1] == 100.0 and run.percent == 100.0
    # No freeze before the end: the last phase was reached with most of the bar done.
    names = [n for n, _ in run.phase_plan]
    order = [n for n, _ in writes if n]
    seen = list(dict.fromkeys(order))
    assert seen == [n for n in names if n in seen], (seen, names)  # in the declared order
    for expected in ("verify and unpack", "safety backup", "stop", "swap", "start", "health"):
        assert expected in seen, seen
    before_health = [p for n, p in writes if n == "health"]
    assert before_health and before_health[0] >= 85.0, writes


# --- estimates before a run starts ---------------------------------------------------------------------------
@pytest.mark.smoke
def test_estimate_is_the_median_of_the_customers_successful_runs_of_that_kind(make_customer):
    customer = make_customer()
    other = make_customer()
    assert typical_seconds(customer.pk, "backup") is None and estimate_text(customer.pk, "backup") == ""
    _finished_runs(customer, "backup", [30, 40, 500])
    _finished_runs(customer, "restore", [5])
    _finished_runs(other, "backup", [1, 1, 1])
    Run.objects.create(customer=customer, kind="backup", status=Run.Status.FAILED, mutating=False,
                       started_at=timezone.now() - timedelta(seconds=900), finished_at=timezone.now())
    assert typical_seconds(customer.pk, "backup") == 40.0
    assert estimate_text(customer.pk, "backup") == "usually about 40.0 s"
    # During a run: the history until the run's own pace says enough, then the pace.
    assert remaining_seconds(1.0, 10.0, 40.0) == 30.0
    assert remaining_seconds(50.0, 10.0, 40.0) == 10.0
    assert remaining_seconds(1.0, 10.0, None) is None


@pytest.mark.smoke
def test_back_up_now_page_shows_an_estimate_only_with_history(make_customer, staff_user, team):
    customer = make_customer()
    client = Client()
    client.force_login(staff_user(team))
    url = reverse("admin:customers_customer_backup", args=[customer.pk])
    page = client.get(url)
    assert page.status_code == 200 and b'id="run-estimate"' not in page.content
    _finished_runs(customer, "backup", [42, 38, 40])
    page = client.get(url).content.decode()
    assert re.search(r'id="run-estimate">Usually about 40.0 s, judging by this customer', page), page


def test_restore_and_verify_pages_show_the_estimate_from_their_own_kind(make_customer, staff_user, team):
    from backups.services import default_target

    customer = make_customer()
    bk = Backup.objects.create(customer=customer, target=default_target(), status="succeeded", scope="full",
                               size=1000, started_at=timezone.now(), finished_at=timezone.now(),
                               prefix=f"{customer.domain}/x")
    client = Client()
    client.force_login(staff_user(team))
    restore_url = reverse("admin:backups_backup_restore", args=[bk.pk])
    change_url = reverse("admin:backups_backup_change", args=[bk.pk])
    assert b'id="run-estimate"' not in client.get(restore_url).content
    assert b'id="run-estimate"' not in client.get(change_url).content
    _finished_runs(customer, "restore", [12])
    _finished_runs(customer, "verify", [3])
    assert "Usually about 12.0 s" in client.get(restore_url).content.decode()
    assert "Verify now: usually about 3.0 s" in client.get(change_url).content.decode()
    # Another team sees neither page (nor the estimate).
    outsider = Client()
    outsider.force_login(staff_user(Team.objects.create(name="others")))
    assert outsider.get(restore_url).status_code == 404
    assert outsider.get(change_url).status_code in (302, 404)


def test_the_run_page_renders_the_same_fields_for_its_team_only(make_customer, staff_user, team):
    customer = make_customer()
    run = running_run(customer)
    url = reverse("admin:operations_run_change", args=[run.pk])
    member = Client()
    member.force_login(staff_user(team))
    html = member.get(url).content.decode()
    for element in ("run-status", "run-started", "run-finished", "run-worker", "run-summary", "run-links",
                    "run-phase", "run-eta"):
        assert f'id="{element}"' in html, element
    assert html.count("test-worker:1") == 1
    outsider = Client()
    outsider.force_login(staff_user(Team.objects.create(name="others")))
    assert outsider.get(url).status_code in (302, 404)


def test_a_failed_runs_error_is_shown_once(make_customer, staff_user, team):
    run = running_run(make_customer())
    run.fail("the dump failed: connection refused")
    client = Client()
    client.force_login(staff_user(team))
    html = client.get(reverse("admin:operations_run_change", args=[run.pk])).content.decode()
    assert html.count("the dump failed: connection refused") == 1
