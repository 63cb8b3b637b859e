"""A fleet rollout driven from the admin in a real browser (issue 13, point 9 and its Done-when).

Debian's Chromium at 1366×768, a real daphne, two fleet customers (tests/rollout_fixtures.py: a Node app under real
PM2 with a SQLite database). No worker: the test drives the rollouts in a thread, as the workers' scheduler does
(rollouts.driver.advance, each upgrade run executed at once). From the customers changelist: the action, the
preview, the typed release; the rollout page then follows the rollout live, without a reload (its WebSocket),
through the first wave, its bake, Pause, Resume and Promote, to completed with both customers upgraded.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlparse

import pytest
from django.contrib.auth.models import Permission
from django.db import connection

from tests import rollout_fixtures
from tests.test_browser import PASSWORD, SLOW_MS, chromium, log_in  # noqa: F401 (fixtures)
from tests.test_browser_backups import _shot
from tests.test_browser_layout import SIDEWAYS, VIEWPORT

fleet = rollout_fixtures.fleet  # the fixture (tests/rollout_fixtures.py)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


class Ticker(threading.Thread):
    """What the workers' scheduler does, every 0.2 s: tick every active rollout, its runs executed at once."""

    def __init__(self):
        super().__init__(name="rollout-ticker", daemon=True)
        self.halt = threading.Event()
        self.errors: list[BaseException] = []

    def run(self):
        from operations.services import run_execute
        from rollouts import driver
        from rollouts.models import Rollout

        try:
            while not self.halt.is_set():
                for pk in Rollout.objects.filter(status__in=Rollout.ACTIVE).values_list("pk", flat=True):
                    driver.advance(pk, start_run=lambda run: run_execute(run.pk))
                time.sleep(0.2)
        except BaseException as exc:  # shown by the test
            self.errors.append(exc)
        finally:
            connection.close()

    def stop(self):
        self.halt.set()
        self.join(60)


def _fits(page) -> None:
    sideways = page.evaluate(SIDEWAYS)
    assert not sideways, f"{page.url} scrolls sideways at 1366×768: {sideways}"


def _wait(page, js: str, what: str, tmp_path, ticker) -> None:
    try:
        page.wait_for_function(js, timeout=SLOW_MS)
    except Exception:
        _shot(page, tmp_path, "rollout-failed.png")
        raise AssertionError(f"{what}: {ticker.errors} {page.text_content('#rollout-live')[-3000:]}") from None


STATUS = "document.getElementById('rollout-status').dataset.status === '{}'"


def test_roll_out_to_two_customers_from_the_customers_action_and_follow_it_live_with_pause_resume_promote(
        asgi_server, fleet, team, staff_user, chromium, tmp_path):  # noqa: F811 (chromium)
    from customers.models import Customer

    customers = fleet.make(sqlite=2)
    operator = staff_user(team, password=PASSWORD)  # a team member: the operators group, plus the rollout rights
    for code in ("view_rollout", "add_rollout", "control_rollout"):
        operator.user_permissions.add(Permission.objects.get(content_type__app_label="rollouts", codename=code))
    base = asgi_server.url
    ticker = Ticker()
    ticker.start()
    try:
        with chromium() as browser:
            page = browser.new_page(viewport=VIEWPORT)
            log_in(page, base, operator.username)
            page.goto(f"{base}/customers/customer/")
            for c in customers:
                page.check(f"input[name=_selected_action][value='{c.pk}']")
            page.select_option("select[name=action]", "rollout_action")
            with page.expect_navigation():
                page.click("button[name=index]")
            domains = page.input_value("#id_domains").split()
            assert sorted(domains) == sorted(c.domain for c in customers)

            page.select_option("#id_release", "1.1")
            page.fill("#id_waves", "50,100")
            page.fill("#id_bakes", "10m,0")
            with page.expect_navigation():
                page.click("#rollout-preview")
            plan = page.locator("#rollout-plan")
            assert "2 customers in 2 waves" in plan.locator("h2").text_content()
            assert plan.locator(".kasa-rollout-member").count() == 2
            _fits(page)
            _shot(page, tmp_path, "rollout-preview.png")
            page.fill("#id_confirm", "1.2")  # the wrong release: nothing starts
            with page.expect_navigation():
                page.click("#rollout-start")
            assert "type 1.1 exactly" in page.text_content("#rollout-confirm")
            page.fill("#id_confirm", "1.1")
            with page.expect_navigation():
                page.click("#rollout-start")
            assert urlparse(page.url).path.startswith("/rollouts/rollout/"), page.url

            # The page follows the first wave's upgrade into its bake, without a reload.
            page.wait_for_function("document.getElementById('rollout-connection').textContent === 'live'")
            page.evaluate("window.__marker = 1")  # gone if the page reloads
            _wait(page, "document.querySelector('[data-wave=\"1\"]').dataset.state === 'baking'", "wave 1 baking",
                  tmp_path, ticker)
            assert page.evaluate("window.__marker") == 1
            assert "left" in page.text_content("[data-wave='1'] .kasa-rollout-bake")
            assert page.locator("[data-wave='1'] tr[data-state=upgraded]").count() == 1
            assert page.locator("[data-wave='1'] [data-gate=failures][data-result=successful]").count() == 1
            _fits(page)
            _shot(page, tmp_path, "rollout-baking.png")

            # Pause during the bake; the buttons follow the status.
            with page.expect_navigation():
                page.click("#rollout-pause")
            assert page.locator("#rollout-status").get_attribute("data-status") == "paused"
            assert "paused by" in page.text_content("#rollout-reason")
            assert page.locator("#rollout-pause").is_hidden() and page.locator("#rollout-resume").is_visible()
            with page.expect_navigation():
                page.click("#rollout-resume")
            assert page.locator("#rollout-status").get_attribute("data-status") == "progressing"
            with page.expect_navigation():
                page.click("#rollout-promote")  # the bake ends now: wave 2 follows
            page.wait_for_function("document.getElementById('rollout-connection').textContent === 'live'")
            page.evaluate("window.__marker = 2")
            _wait(page, STATUS.format("completed"), "the rollout completed", tmp_path, ticker)
            assert page.evaluate("window.__marker") == 2  # no reload: the WebSocket brought it
            assert page.text_content("#rollout-progress") == "2 of 2 upgraded"
            rows = page.locator("tr[data-state=upgraded]")
            assert rows.count() == 2
            for i in range(2):
                assert rows.nth(i).locator(".kasa-rollout-now").text_content() == "app 1.1.0"
                assert rows.nth(i).locator("a.kasa-rollout-run").count() == 1
            assert page.locator("#rollout-pause").is_hidden() and page.locator("#rollout-abort").is_hidden()
            page.click("[data-wave='1'] [data-gate=health] summary")  # the evidence, collapsible
            assert "/health" in page.text_content("[data-wave='1'] [data-gate=health] pre")
            _fits(page)
            _shot(page, tmp_path, "rollout-completed.png")
    finally:
        ticker.stop()
    assert not ticker.errors, ticker.errors
    for c in customers:
        assert Customer.objects.get(pk=c.pk).versions == {"app": "1.1.0"}
