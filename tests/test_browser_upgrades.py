"""An upgrade and its rollback driven in the admin, in a real browser (issue 5, point 6 and its Done-when).

Debian's Chromium, a real daphne, a real qcluster worker, a real PM2 running the customer's backend and a real
PostgreSQL database (tests/upgrade_fixtures.py). From the customer page: "Upgrade to…" shows the preflight and the
.env diff with secrets masked, the typed domain starts the upgrade, its run page follows the steps live to
Succeeded, the Versions card and the history show it; then "Roll back" brings the old release back.
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from tests.conftest import require
from tests.test_browser import PASSWORD, SLOW_MS, chromium, log_in  # noqa: F401 (fixtures)
from tests.test_browser_backups import _no_horizontal_overflow, _shot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def running_customer(transactional_db, team, pg_database, tmp_path):
    """A customer at release 2.4 (backend under PM2, answering /health) with a seeded PostgreSQL database."""
    from engines import procman
    from tests.restore_helpers import pg_databases_like, pg_exec
    from tests.upgrade_fixtures import make_running_customer, seed_database, stop_app, sync_releases

    require(os.path.exists(procman.pm2_binary()), "PM2 from npm (make install)")
    sync_releases(tmp_path)
    seed_database(pg_database)
    # The rollback restores the database into a fresh one, then swaps it in: the role needs CREATEDB.
    pg_exec(pg_database, f'ALTER ROLE "{pg_database["user"]}" CREATEDB', dbname="postgres")
    root = Path(settings.KASA_CUSTOMERS_ROOT) / f"ub-{uuid.uuid4().hex[:8]}"
    customer = make_running_customer(team, root, pg_database)
    try:
        yield customer
    finally:
        stop_app(customer)
        shutil.rmtree(root, ignore_errors=True)
        for name in pg_databases_like(pg_database, pg_database["name"] + "__kasa_%"):
            pg_exec(pg_database, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', dbname="postgres")


def _get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return resp.read().decode()


def _follow_run(page, worker, tmp_path, name: str) -> str:
    """Wait on the run page until the run succeeded; its log."""
    assert re.search(r"/operations/run/\d+/change/$", page.url), page.url
    try:
        page.wait_for_function("document.getElementById('run-status').textContent.trim() === 'Succeeded'",
                               timeout=SLOW_MS)
    except Exception:
        _shot(page, tmp_path, f"{name}-failed.png")
        raise AssertionError(worker.output()[-3000:] + page.text_content("#run-log")[-4000:]) from None
    _shot(page, tmp_path, f"{name}-run.png")
    return page.text_content("#run-log")


def test_upgrade_and_roll_back_from_the_customer_page(asgi_server, start_worker, running_customer, team, pg_database,
                                                       staff_user, chromium, tmp_path):  # noqa: F811
    from customers.models import Customer
    from upgrades.models import BadRelease, Upgrade

    customer = running_customer
    env_text = (Path(customer.root) / "backend" / ".env").read_text()
    secret = re.search(r"^API_SECRET=(.+)$", env_text, re.M)[1]
    db_password = pg_database["password"]
    operator = staff_user(team, password=PASSWORD)  # a team member, not a superuser
    worker = start_worker(KASA_HEALTH_STREAK=2, KASA_HEALTH_INTERVAL=0.2, KASA_HEALTH_TIMEOUT=20)
    base = asgi_server.url
    customer_url = f"{base}/customers/customer/{customer.pk}/change/"

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        log_in(page, base, operator.username)
        page.goto(customer_url)
        card = page.locator("#customer-versions")
        assert card.locator("tr[data-component=backend] .kasa-version").text_content() == "2.4.0"
        assert card.locator("tr[data-release='2.5'] td").nth(2).text_content() == "yes"
        assert page.locator("#rollback-link").count() == 0
        _shot(page, tmp_path, "customer-before.png")

        # "Upgrade to…": choose 2.5, see the preflight, the notes and the .env diff with secrets masked.
        with page.expect_navigation():
            page.click("#upgrade-to")
        page.check("input[name=release][value='2.5']")
        with page.expect_navigation():
            page.click("#preflight-run")
        assert page.text_content("#preflight-result") == "every check passed"
        checks = page.locator("#preflight tbody tr")
        assert checks.count() >= 7
        assert page.locator("#preflight tr.kasa-check-failed").count() == 0
        assert "healthy now: backend" in page.text_content("#preflight tr[data-check=health]")
        diff = page.locator("#env-diff")
        assert "exports" in diff.locator("tr.kasa-env-added[data-key=EXPORT_DIR]").text_content()
        assert "********" in diff.locator("tr[data-key=API_SECRET]").text_content()
        assert ":********@" in diff.locator("tr[data-key=DATABASE_URL]").text_content()
        html = page.content()
        assert secret not in html and db_password not in html
        _shot(page, tmp_path, "upgrade-page.png")
        _no_horizontal_overflow(page)

        # A mistyped domain starts nothing; the domain itself starts the upgrade and opens its run.
        page.fill("#id_confirm", "wrong.example.com")
        with page.expect_navigation():
            page.click("#upgrade-start")
        assert f"type {customer.domain} exactly" in page.text_content("#upgrade-form")
        page.fill("#id_confirm", customer.domain)
        with page.expect_navigation():
            page.click("#upgrade-start")
        log = _follow_run(page, worker, tmp_path, "upgrade")
        for step in ("preflight", "backup", "stage", "env", "migrate", "build", "stop", "switch", "start", "health",
                     "record"):
            assert f"— {step}" in log, step
        assert secret not in log and db_password not in log
        assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.5.0"

        # The Versions card and the history show it; its page lists every step.
        page.goto(customer_url)
        card = page.locator("#customer-versions")
        assert card.locator("tr[data-component=backend] .kasa-version").text_content() == "2.5.0"
        assert page.text_content("#current-release") == "2.5"
        row = page.locator("#customer-upgrades tbody tr").first
        assert "Succeeded" in row.text_content() and "2.4.0" in row.locator(".kasa-from").text_content()
        assert "2.5.0" in row.locator(".kasa-to").text_content()
        assert row.locator("a[href*='/backups/backup/']").count() == 1  # the pinned backup taken before
        _shot(page, tmp_path, "customer-upgraded.png")
        with page.expect_navigation():
            row.locator("a[href*='/upgrades/upgrade/']").click()
        page.wait_for_function("document.querySelectorAll('#upgrade-steps-body td:last-child')[0]"
                               ".textContent.endsWith(' s')")
        steps = page.locator("#upgrade-steps-body tr")
        assert steps.count() >= 11
        assert page.locator("#upgrade-steps-body .kasa-status-succeeded").count() == steps.count()
        _shot(page, tmp_path, "upgrade-detail.png")

        # "Roll back": what comes back, the typed domain, then the run.
        page.goto(customer_url)
        with page.expect_navigation():
            page.click("#rollback-link")
        assert "2.4.0" in page.text_content("#rollback-changes")
        assert "EXPORT_DIR" in page.text_content("#env-diff") and secret not in page.content()
        _shot(page, tmp_path, "rollback-page.png")
        page.fill("#id_confirm", customer.domain)
        with page.expect_navigation():
            page.click("#rollback-start")
        log = _follow_run(page, worker, tmp_path, "rollback")
        assert "— switch" in log and "— database" in log
        assert _get(f"http://127.0.0.1:{customer.port}/version") == "2.4.0"

        page.goto(customer_url)
        card = page.locator("#customer-versions")
        assert card.locator("tr[data-component=backend] .kasa-version").text_content() == "2.4.0"
        assert "bad release" in card.locator("tr[data-release='2.5']").text_content()
        rows = page.locator("#customer-upgrades tbody tr")
        assert rows.count() == 2 and "Rollback" in rows.first.text_content()
        assert "Succeeded" in rows.first.text_content()
        assert page.locator("#rollback-link").count() == 0
        _shot(page, tmp_path, "customer-rolled-back.png")

    # (The ORM only outside Playwright's block: its sync API runs an event loop in this thread.)
    assert Customer.objects.get(pk=customer.pk).versions == {"backend": "2.4.0", "store": "2.4.0"}
    ups = list(Upgrade.objects.filter(customer=customer).order_by("pk"))
    assert [(u.kind, u.status, u.run.requested_by_id) for u in ups] == [
        ("upgrade", "succeeded", operator.pk), ("rollback", "succeeded", operator.pk)]
    assert ups[1].rolls_back_id == ups[0].pk and ups[0].backup.pinned
    assert BadRelease.objects.filter(customer=customer, release__name="2.5").exists()
