"""The demo of the README, walked in the admin as a newcomer would (issue 12, point 1 and its Done-when).

Set up as `make run` sets it up on a bare machine (`kasa_setup`: the admin login, the demo customer with its
SQLite database and its services running under a real PM2, as the demo's own user when Kasa runs as root), the
example release of docs/releases-example synced, a real daphne and a real qcluster worker; then, in Debian's
Chromium at 1366×768: check, back up, verify, restore in place, upgrade to the example release and roll back.
No page scrolls sideways, and each run page reaches its final state without a reload (the live status of
`#run-status[data-status]`). With KASA_SCREENSHOTS set to a folder, the README's screenshots are saved there.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.test_browser import PASSWORD, SLOW_MS, chromium, log_in  # noqa: F401 (fixtures)
from tests.test_browser_backups import _no_horizontal_overflow, _shot
from tests.test_demo_upgrade import assert_serving, build_example, make_demo

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
VIEWPORT = {"width": 1366, "height": 768}


@pytest.fixture
def made_demo(transactional_db, monkeypatch, settings, tmp_path):
    """`kasa_setup --sqlite-demo` (the bare machine's demo) on free ports, and the example release synced."""
    from releases.services import release_sync

    monkeypatch.setenv("KASA_ADMIN_PASSWORD", PASSWORD)
    with make_demo(settings, monkeypatch) as customer:
        release_sync(build_example(tmp_path / "example"))
        yield customer


def _load(page, url: str) -> None:
    page.goto(url)
    assert "{#" not in page.text_content("body"), f"{url} shows a template comment"
    _no_horizontal_overflow(page)


def _follow(page, worker, tmp_path, name: str, *, running_shot: str = "") -> int:
    """On a run page: wait, without reloading, until the run succeeded; the run's id."""
    match = re.search(r"/operations/run/(\d+)/change/$", page.url)
    assert match, page.url
    _no_horizontal_overflow(page)
    page.evaluate("window.__kasaMarker = 1")  # gone if the page reloads
    if running_shot:
        # The first log lines arrive while the run works (a restore's verification and safety backup come first).
        page.wait_for_selector("#run-log .kasa-line", timeout=SLOW_MS)
        _shot(page, tmp_path, running_shot)
    try:
        page.wait_for_selector("#run-status[data-status=succeeded]", timeout=SLOW_MS)
    except Exception:
        _shot(page, tmp_path, f"{name}-failed.png")
        raise AssertionError(f"{name}: the run page did not reach succeeded\n" + worker.output()[-3000:]
                             + page.text_content("#run-log")[-4000:]) from None
    assert page.evaluate("window.__kasaMarker") == 1, f"{name}: the run page was reloaded"
    _no_horizontal_overflow(page)
    return int(match[1])


def test_the_readme_demo_in_the_admin_check_backup_verify_restore_upgrade_and_roll_back(
        asgi_server, start_worker, made_demo, chromium, tmp_path):  # noqa: F811
    from operations.models import Run
    from upgrades.models import Upgrade

    customer = made_demo
    domain = customer.domain
    worker = start_worker(KASA_HEALTH_STREAK=2, KASA_HEALTH_INTERVAL=0.2, KASA_HEALTH_TIMEOUT=20)
    base = asgi_server.url
    customer_url = f"{base}/customers/customer/{customer.pk}/change/"
    runs = {}

    with chromium() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        log_in(page, base, os.environ.get("KASA_ADMIN_USER", "admin"))
        _load(page, f"{base}/")
        _shot(page, tmp_path, "index.png")

        # Check.
        _load(page, customer_url)
        _shot(page, tmp_path, "customer.png")
        with page.expect_navigation():
            page.click("#check-now")
        runs["check"] = _follow(page, worker, tmp_path, "check")

        # Back up (the whole customer).
        _load(page, customer_url)
        with page.expect_navigation():
            page.click("#backup-now")
        _no_horizontal_overflow(page)
        page.check("input[name=scope][value=full]")
        with page.expect_navigation():
            page.click("#backup-start")
        runs["backup"] = _follow(page, worker, tmp_path, "backup")

        # Verify that backup, from its page.
        _load(page, f"{base}/backups/backup/?customer__id__exact={customer.pk}")
        with page.expect_navigation():
            page.locator("#result_list tbody tr").first.locator("a").first.click()
        _no_horizontal_overflow(page)
        backup_url = page.url
        with page.expect_navigation():
            page.click("#verify-now")
        runs["verify"] = _follow(page, worker, tmp_path, "verify")

        # Restore it in place.
        _load(page, backup_url)
        with page.expect_navigation():
            page.click("#restore-link")
        _no_horizontal_overflow(page)
        page.fill("#id_confirm", domain)
        with page.expect_navigation():
            page.click("#restore-start")
        runs["restore"] = _follow(page, worker, tmp_path, "restore", running_shot="restore-running.png")

        # Upgrade to the example release: its preflight passes every check.
        _load(page, customer_url)
        with page.expect_navigation():
            page.click("#upgrade-to")
        _no_horizontal_overflow(page)
        page.check("input[name=release][value='2.4.0']")
        with page.expect_navigation():
            page.click("#preflight-run")
        _no_horizontal_overflow(page)
        assert page.text_content("#preflight-result") == "every check passed"
        assert "admin: server.js" in page.text_content("#preflight tr[data-check=start]")
        _shot(page, tmp_path, "upgrade-preflight.png")
        page.fill("#id_confirm", domain)
        with page.expect_navigation():
            page.click("#upgrade-start")
        runs["upgrade"] = _follow(page, worker, tmp_path, "upgrade")

        # And back.
        _load(page, customer_url)
        with page.expect_navigation():
            page.click("#rollback-link")
        _no_horizontal_overflow(page)
        page.fill("#id_confirm", domain)
        with page.expect_navigation():
            page.click("#rollback-start")
        runs["rollback"] = _follow(page, worker, tmp_path, "rollback")
        _load(page, customer_url)

    # (The ORM only outside Playwright's block: its sync API runs an event loop in this thread.)
    assert {k: Run.objects.get(pk=pk).status for k, pk in runs.items()} == dict.fromkeys(runs, "succeeded")
    assert [(u.kind, u.status) for u in Upgrade.objects.filter(customer=customer).order_by("pk")] == [
        ("upgrade", "succeeded"), ("rollback", "succeeded")]
    customer.refresh_from_db()
    assert customer.versions == {"backend": "1.0.0", "admin": "1.0.0", "store": "1.0.0"}
    assert_serving(customer, {"backend": "1.0.0", "admin": "1.0.0", "store": "1.0.0"})
