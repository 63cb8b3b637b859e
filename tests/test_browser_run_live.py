"""A run page opened while the run runs reaches its final state without a reload (issue 12, point 2).

Debian's Chromium, a real daphne and a real qcluster worker: a backup is running (waiting for the host's only
backup slot, which the test holds) when the page opens; once let go, the page shows, live,
`#run-status[data-status=succeeded]`, the Finished time and the link to the backup the run produced.
"""

from __future__ import annotations

import contextlib
import re
import threading
import uuid

import pytest
from django.db import connection

from backups.models import Backup
from backups.services import backup_start
from operations.models import Run
from tests.conftest import holding_host_slots, wait_for_run, wait_until
from tests.test_browser import PASSWORD, SLOW_MS, chromium, demo_customer, log_in  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_running_backups_page_reaches_succeeded_finished_and_its_backup_link_without_reload(
        asgi_server, start_worker, demo_customer, django_user_model, chromium, tmp_path):  # noqa: F811
    customer = demo_customer
    admin = django_user_model.objects.create_superuser(f"admin-{uuid.uuid4().hex[:6]}", password=PASSWORD)
    # The host's only backup slot is held here: the backup runs, waiting in its first phase, until we let go.
    held = contextlib.ExitStack()
    held.enter_context(holding_host_slots(customer, 1))
    run = backup_start(customer, requested_by=admin, via="admin")
    worker = start_worker(KASA_MAX_BACKUPS_PER_HOST=1)
    wait_until(lambda: Run.objects.filter(pk=run.pk, status="running", phase="wait for a slot").exists(), 60,
               what="the backup waiting for a slot")

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        log_in(page, asgi_server.url, admin.username)
        page.goto(f"{asgi_server.url}/operations/run/{run.pk}/change/")
        assert page.get_attribute("#run-status", "data-status") == "running"
        assert page.text_content("#run-finished") == "—"
        assert page.text_content("#run-phase") == "wait for a slot"
        assert page.text_content("#run-phase-step") == "1 of 3"
        page.evaluate("window.__marker = 1")  # gone if the page reloads
        # Let go of the slot (rows in the database) from another thread: Playwright's event loop runs in this one,
        # and Django's ORM refuses to run under it.
        def let_go():
            try:
                held.close()
            finally:
                connection.close()  # this thread's own

        letting_go = threading.Thread(target=let_go)
        letting_go.start()
        letting_go.join()
        try:
            page.wait_for_selector("#run-status[data-status=succeeded]", timeout=SLOW_MS)
            page.wait_for_function("document.getElementById('run-finished').textContent.endsWith(' UTC')",
                                   timeout=SLOW_MS)
            page.wait_for_selector("#run-links a[href*='/backups/backup/']", timeout=SLOW_MS)
        except Exception:
            page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
            raise AssertionError(worker.output()[-3000:] + asgi_server.output()[-3000:]) from None
        assert page.evaluate("window.__marker") == 1, "the page was reloaded"
        assert page.text_content("#run-status").strip() == "Succeeded"
        assert page.get_attribute("#run-status", "class") == "kasa-status kasa-status-succeeded"
        link = page.get_attribute("#run-links a", "href")
        started = page.text_content("#run-started")
        summary = page.text_content("#run-summary")
        took = page.text_content("#run-took")
        percent = page.text_content("#run-progress-text")
        page.screenshot(path=str(tmp_path / "run-live.png"), full_page=True)

    bk = Backup.objects.get(run_id=run.pk)
    assert link.endswith(f"/backups/backup/{bk.pk}/change/")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", started)
    assert summary.startswith(f"backup #{bk.pk}: ") and "{" not in summary
    assert re.fullmatch(r" \(took [\d.]+ s\)| \(took \d+ min \d\d s\)", took), took
    assert percent == "100 %"
    assert wait_for_run(run.pk).status == "succeeded"
