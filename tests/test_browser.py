"""The admin in a real browser (issue point 13, and the browser half of points 6 and 9).

Playwright drives Debian's Chromium (never a downloaded one) against a real
daphne and a real qcluster worker on the embedded defaults. The worker is
started only once the run page is open and marked, so every log line and the
final status must arrive over the WebSocket, without a reload.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from customers.demo import DEMO_DOMAIN, demo_seed, demo_start
from customers.services import customer_check_start
from tests.conftest import free_ports, kill_pm2_under, require, wait_for_run

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "pw-Browser-123"
SLOW_MS = 90_000  # worker boot and the whole check: generous, this is not what is measured


@pytest.fixture
def chromium():
    """Opens Chromium as a context manager. Use the database before or after it, not inside:
    sync Playwright keeps an event loop in this thread, which Django's ORM refuses to run under."""
    path = shutil.which("chromium")
    require(bool(path), "Debian chromium")
    from playwright.sync_api import sync_playwright

    @contextlib.contextmanager
    def launch():
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                browser.close()

    return launch


@pytest.fixture
def demo_customer(transactional_db, monkeypatch):
    monkeypatch.setenv("KASA_DEMO_PORT", str(free_ports()))  # its health URLs: never another demo's ports
    folder = Path(settings.KASA_CUSTOMERS_ROOT) / DEMO_DOMAIN
    shutil.rmtree(folder, ignore_errors=True)  # left over from an interrupted run (the test var dir)
    try:
        customer, created = demo_seed(prefer_postgres=False)
        assert created
        assert "run under PM2" in demo_start(customer)  # as kasa_setup does: its health URLs answer
        yield customer
    finally:
        kill_pm2_under(folder)  # a restore starts the demo's services, under its own PM2 daemon
        shutil.rmtree(folder, ignore_errors=True)


def log_in(page, base_url: str, username: str) -> None:
    page.goto(f"{base_url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#user-tools")


def test_check_from_the_admin_streams_log_and_status_without_reload(
        asgi_server, start_worker, demo_customer, django_user_model, chromium, tmp_path):
    admin = django_user_model.objects.create_superuser(f"admin-{uuid.uuid4().hex[:6]}", password=PASSWORD)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        log_in(page, asgi_server.url, admin.username)
        page.goto(f"{asgi_server.url}/customers/customer/")
        page.locator("#result_list tr", has_text=DEMO_DOMAIN).locator("input.action-select").check()
        page.select_option("select[name=action]", "check_action")
        with page.expect_navigation():
            page.click("button[name=index]")

        # The action redirected to the run's page; nothing has run yet (no worker).
        match = re.search(r"/operations/run/(\d+)/change/$", page.url)
        assert match, page.url
        run_url = page.url
        page.wait_for_function("document.getElementById('run-connection').textContent === 'live'")
        assert page.text_content("#run-status").strip() == "Pending"
        assert page.text_content("#run-log") == ""
        page.evaluate("window.__marker = 1")  # gone if the page reloads

        worker = start_worker()
        try:
            page.wait_for_function("document.getElementById('run-status').textContent.trim() === 'Succeeded'",
                                   timeout=SLOW_MS)
            # run_execute's last line comes just after the status.
            page.wait_for_function("[...document.querySelectorAll('#run-log .kasa-line')]"
                                   ".some(l => / succeeded$/.test(l.textContent.trim()))", timeout=SLOW_MS)
        except Exception:
            page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
            raise AssertionError(worker.output()[-3000:] + asgi_server.output()[-3000:]) from None

        assert page.evaluate("window.__marker") == 1, "the page was reloaded"
        assert page.url == run_url
        log = page.text_content("#run-log")
        assert "started on" in log
        assert "database main: ok, server" in log
        for service in ("backend", "admin", "store"):
            assert f"service {service}: folder" in log
        assert page.get_attribute("#run-status", "class") == "kasa-status kasa-status-succeeded"
        progress = page.evaluate("(b => [b.value, b.max])(document.getElementById('run-progress'))")
        assert progress == [100, 100]  # phases: root folder, one database, three services
        assert page.text_content("#run-progress-text") == "100 %"
        assert page.is_hidden("#run-error")
        assert page.get_attribute("#run-status", "data-status") == "succeeded"
        # The fields above follow too: times, worker, the result in words.
        assert page.text_content("#run-finished").endswith(" UTC")
        assert page.text_content("#run-summary").startswith("everything reachable")
        page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

        # Reloading on purpose now: the finished run is rendered and its whole log replayed.
        page.reload()
        page.wait_for_function("document.getElementById('run-connection').textContent.startsWith('finished')")
        assert page.evaluate("window.__marker") is None
        assert page.text_content("#run-status").strip() == "Succeeded"
        assert page.text_content("#run-log") == log
        assert page.text_content("#run-worker").strip() not in ("", "—")
    run = wait_for_run(int(match.group(1)))
    assert run.status == "succeeded"
    assert log.count("\n") == run.log_lines.count()  # every stored line shown once


def test_staff_of_another_team_sees_nothing_of_the_customer(
        asgi_server, demo_customer, staff_user, team, chromium):
    run = customer_check_start(demo_customer, via="cli")  # stays pending: no worker here
    outsider = staff_user(team, password=PASSWORD)  # `team` is not the demo customer's team
    with chromium() as browser:
        page = browser.new_page()
        log_in(page, asgi_server.url, outsider.username)

        page.goto(f"{asgi_server.url}/customers/customer/")
        assert DEMO_DOMAIN not in page.content()
        page.goto(f"{asgi_server.url}/operations/run/")
        assert DEMO_DOMAIN not in page.content()

        page.goto(f"{asgi_server.url}/operations/run/{run.pk}/change/")
        assert "/operations/run/" not in page.url  # the admin redirects away from an object it won't show
        assert "doesn’t exist" in page.text_content(".messagelist")

        # The WebSocket, opened from a page of the same origin with the outsider's session cookie.
        closed = page.evaluate("""runId => new Promise(resolve => {
            const ws = new WebSocket(`ws://${location.host}/ws/runs/${runId}/`);
            let messages = 0;
            ws.onmessage = () => { messages += 1; };
            ws.onclose = ev => resolve({code: ev.code, messages});
        })""", run.pk)
        assert closed == {"code": 4403, "messages": 0}
