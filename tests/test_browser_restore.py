"""Restore, verification drills and the fleet dashboard in a real browser (issue 4, points 5, 6, 8).

Debian's Chromium, a real daphne and a real qcluster worker. From a backup's page: "Restore…" shows what
will change (artifacts, target, the .env diff with secret values masked), refuses a mistyped domain, then
restores with the live log; "Verify now" runs a drill; the admin index's fleet overview follows.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from backups.models import Backup
from tests.conftest import wait_for_run
from tests.test_backups import _backup_json
from tests.test_browser import PASSWORD, SLOW_MS, chromium, demo_customer, log_in  # noqa: F401 (fixtures)
from tests.test_browser_backups import _no_horizontal_overflow, _shot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
NEW_SECRET = "Sup3r-New-Secret-Value-42"


def test_restore_and_drill_from_the_admin(asgi_server, start_worker, demo_customer, django_user_model,  # noqa: F811
                                          chromium, tmp_path):  # noqa: F811
    customer = demo_customer
    root = Path(customer.root)
    app = root / "backend" / "server.js"
    original = app.read_text()
    doc = _backup_json(customer.domain)
    # After the backup: a broken deploy and a new secret in .env.
    app.write_text("broken\n")
    env = root / "backend" / ".env"
    env.write_text(env.read_text() + f"API_TOKEN={NEW_SECRET}\n")
    admin = django_user_model.objects.create_superuser(f"admin-{uuid.uuid4().hex[:6]}", password=PASSWORD)
    worker = start_worker()

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        log_in(page, asgi_server.url, admin.username)

        # The fleet overview: the demo customer has a backup, never verified: it needs attention.
        page.goto(f"{asgi_server.url}/")
        fleet = page.locator("#kasa-fleet")
        assert "1 never verified" in fleet.text_content() and "1 outside RPO" in fleet.text_content()
        row = fleet.locator(f"#fleet-attention tr[data-customer='{customer.domain}']")
        assert "never verified" in row.locator(".kasa-rpo").text_content()
        _shot(page, tmp_path, "fleet-before.png")

        page.goto(f"{asgi_server.url}/backups/backup/{doc['id']}/change/")
        with page.expect_navigation():
            page.click("#restore-link")
        assert page.url.endswith(f"/backups/backup/{doc['id']}/restore/")
        # What will change: every artifact ticked, the target, and the .env diff with the secret masked.
        assert page.locator("#restore-artifacts input[type=checkbox]:checked").count() == len(doc["artifacts"])
        diff = page.locator("#env-diff")
        assert "backend/.env" in diff.text_content()
        removed = diff.locator("tr.kasa-env-removed", has_text="API_TOKEN")
        assert removed.count() == 1 and "********" in removed.text_content()
        assert NEW_SECRET not in page.content()
        _shot(page, tmp_path, "restore-page.png")
        _no_horizontal_overflow(page)

        # A mistyped domain is refused and nothing starts.
        page.fill("#id_confirm", "wrong.example.com")
        with page.expect_navigation():
            page.click("#restore-start")
        assert "type " + customer.domain in page.text_content("#restore-form")
        assert app.read_text() == "broken\n"

        page.fill("#id_confirm", customer.domain)
        with page.expect_navigation():
            page.click("#restore-start")
        assert "/operations/run/" in page.url
        try:
            page.wait_for_function("document.getElementById('run-status').textContent.trim() === 'Succeeded'",
                                   timeout=SLOW_MS)
        except Exception:
            _shot(page, tmp_path, "restore-failed.png")
            raise AssertionError(worker.output()[-3000:] + page.text_content("#run-log")[-3000:]) from None
        log = page.text_content("#run-log")
        assert "safety backup" in log and "swapped in backend" in log and NEW_SECRET not in log
        _shot(page, tmp_path, "restore-run.png")
        assert app.read_text() == original
        assert NEW_SECRET not in env.read_text()

        # The drill: from the backup's page, then its result on the page and on the dashboard.
        page.goto(f"{asgi_server.url}/backups/backup/{doc['id']}/change/")
        with page.expect_navigation():
            page.click("#verify-now")
        run_id = int(page.url.rstrip("/").split("/")[-2])
        page.wait_for_function("document.getElementById('run-status').textContent.trim() === 'Succeeded'",
                               timeout=SLOW_MS)
        assert "row counts match the manifest" in page.text_content("#run-log")
        page.goto(f"{asgi_server.url}/backups/backup/?customer__id__exact={customer.pk}")
        assert "Verified" in page.locator(f"#result_list tr:has(a:text-is('{doc['id']}'))").text_content()

        page.goto(f"{asgi_server.url}/")
        fleet = page.locator("#kasa-fleet")
        assert "0 never verified" in fleet.text_content() and "0 outside RPO" in fleet.text_content()
        assert "1 healthy" in fleet.text_content()
        assert fleet.locator(f"tr[data-customer='{customer.domain}']").count() == 0  # nothing to look at
        _shot(page, tmp_path, "fleet-after.png")

        # The customer page lists the restore and the drill with the measured RTO.
        page.goto(f"{asgi_server.url}/customers/customer/{customer.pk}/change/")
        section = page.locator("#customer-restores")
        assert section.locator("tbody tr").count() == 2
        assert "RTO measured" in section.text_content() and "never verified" not in section.text_content()
        _shot(page, tmp_path, "customer-restores.png")

    # (The ORM only outside Playwright's block: its sync API runs an event loop in this thread.)
    assert wait_for_run(run_id).status == "succeeded"
    assert Backup.objects.get(pk=doc["id"]).verify_status == "passed"
