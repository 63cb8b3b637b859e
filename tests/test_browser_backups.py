"""The backup admin flow in a real browser (issue 3, point 10 and the Done-when).

Debian's Chromium, a real daphne and a real qcluster worker: from the customer page, "Back up now",
choose the scope, start; the run page then shows progress (MB, MB/s, ETA), the log and "Succeeded"
over the WebSocket without a reload; the customer page lists the backup and draws the chart.
Screenshots land in the test's tmp_path (and KASA_SCREENSHOTS, when set, to look at them).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from backups.models import Backup, BackupPolicy
from backups.services import default_target
from tests.conftest import wait_for_run
from tests.test_browser import PASSWORD, SLOW_MS, chromium, demo_customer, log_in  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
MiB = 1 << 20


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("KASA_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def _no_horizontal_overflow(page, selector: str = "") -> None:
    """The page (or one element of it) fits the viewport's width: nothing scrolls sideways."""
    if not selector:
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the page scrolls sideways: {width}"
        return
    right, scroll, client, viewport = page.evaluate("""s => { const e = document.querySelector(s);
        return [e.getBoundingClientRect().right, e.scrollWidth, e.clientWidth, window.innerWidth]; }""", selector)
    assert right <= viewport and scroll <= client, f"{selector} overflows: {[right, scroll, client, viewport]}"


def test_back_up_now_from_the_customer_page_to_a_listed_backup(
        asgi_server, start_worker, demo_customer, django_user_model, chromium, tmp_path):  # noqa: F811
    customer = demo_customer
    # Enough incompressible data, and a bandwidth limit, for the progress to be seen while it runs.
    media = Path(customer.root) / "backend" / "media.bin"
    with open(media, "wb") as fh:
        for _ in range(40):
            fh.write(os.urandom(MiB))
    BackupPolicy.objects.create(customer=customer, target=default_target(), bandwidth_limit_mbps=12)
    # Two earlier backups: the ETA comes from the previous size, the chart gets more than one point.
    now = timezone.now()
    for days, size, secs in ((2, 38_000_000, 6.0), (1, 44_000_000, 5.0)):
        Backup.objects.create(customer=customer, target=default_target(), status="succeeded", scope="full",
                              size=size, started_at=now - timedelta(days=days),
                              finished_at=now - timedelta(days=days) + timedelta(seconds=secs),
                              prefix=f"{customer.domain}/earlier-{days}", trigger="schedule")
    admin = django_user_model.objects.create_superuser(f"admin-{uuid.uuid4().hex[:6]}", password=PASSWORD)

    seen_progress = []
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        log_in(page, asgi_server.url, admin.username)
        page.goto(f"{asgi_server.url}/customers/customer/{customer.pk}/change/")
        assert page.is_visible("text=Check now")
        with page.expect_navigation():
            page.click("#backup-now")
        assert page.url.endswith(f"/customers/customer/{customer.pk}/backup/")
        # The form: every service offered, the policy's defaults chosen, the warning only without encryption.
        for svc in ("backend", "admin", "store"):
            assert page.is_visible(f"input[name=services][value={svc}]")
        assert page.is_checked("input[name=encrypt]")
        assert page.is_hidden("#encrypt-warning")
        page.uncheck("input[name=encrypt]")
        assert page.is_visible("#encrypt-warning")
        _shot(page, tmp_path, "backup-now-unencrypted.png")
        page.check("input[name=encrypt]")
        assert page.is_hidden("#encrypt-warning")
        page.check("input[name=scope][value=full]")
        _shot(page, tmp_path, "backup-now.png")
        _no_horizontal_overflow(page)
        with page.expect_navigation():
            page.click("#backup-start")

        match = re.search(r"/operations/run/(\d+)/change/$", page.url)
        assert match, page.url
        run_url = page.url
        page.wait_for_function("document.getElementById('run-connection').textContent === 'live'")
        assert page.text_content("#run-status").strip() == "Pending"
        page.evaluate("window.__marker = 1")  # gone if the page reloads

        worker = start_worker()
        try:
            # While it runs: bytes, throughput and the ETA, as a percentage and words, not raw byte counts.
            page.wait_for_function("/[1-9][\\d.]* [kM]?B at [\\d.]+ [kM]?B\\/s, about [\\d.]+ s left/.test("
                                   "document.getElementById('run-message').textContent)", timeout=SLOW_MS)
            seen_progress.append(page.text_content("#run-message"))
            assert page.text_content("#run-phase") == "write artifacts"
            _shot(page, tmp_path, "run-progress.png")
            page.wait_for_function("document.getElementById('run-status').textContent.trim() === 'Succeeded'",
                                   timeout=SLOW_MS)
            page.wait_for_function("[...document.querySelectorAll('#run-log .kasa-line')]"
                                   ".some(l => / succeeded$/.test(l.textContent.trim()))", timeout=SLOW_MS)
        except Exception:
            _shot(page, tmp_path, "failed.png")
            raise AssertionError(worker.output()[-3000:] + asgi_server.output()[-3000:]) from None
        assert page.evaluate("window.__marker") == 1, "the page was reloaded"
        assert page.url == run_url
        log = page.text_content("#run-log")
        assert re.search(r"backup #\d+ \(full, zstd, encrypted with key ", log)
        assert re.search(r"backup #\d+ complete: 6 artifacts", log), log
        assert page.get_attribute("#run-status", "class") == "kasa-status kasa-status-succeeded"
        done_text = page.text_content("#run-progress-text")
        assert done_text == "100 %" and page.text_content("#run-eta") == "", done_text
        progress_box = page.locator("#run-message").bounding_box()
        assert progress_box and progress_box["width"] > 100 and progress_box["height"] < 40  # one readable line
        # Without a reload: the run's times, the link to its backup, the result in words.
        assert page.get_attribute("#run-status", "data-status") == "succeeded"
        assert page.text_content("#run-finished").endswith(" UTC")
        assert page.locator("#run-links a", has_text="backup #").count() == 1
        assert re.match(r"backup #\d+: 6 artifact\(s\), ", page.text_content("#run-summary"))
        _shot(page, tmp_path, "run-done.png")
        _no_horizontal_overflow(page)

        page.goto(f"{asgi_server.url}/customers/customer/{customer.pk}/change/")
        section = page.locator("#customer-backups")
        first_row = section.locator("tbody tr").first
        assert "Succeeded" in first_row.text_content() and admin.username in first_row.text_content()
        assert section.locator("tbody tr").count() == 3
        chart = page.locator("#backup-chart svg").bounding_box()
        assert chart and chart["width"] > 400 and chart["height"] > 100
        assert page.locator("#backup-chart circle.kasa-chart-size-dot").count() == 3
        page.locator("#customer-backups").scroll_into_view_if_needed()
        _shot(page, tmp_path, "customer-backups.png")
        page.locator("#customer-backups").screenshot(path=str(tmp_path / "customer-backups-section.png"))
        if os.environ.get("KASA_SCREENSHOTS"):
            shutil.copy(tmp_path / "customer-backups-section.png", os.environ["KASA_SCREENSHOTS"])
        # The Backups section fits; (the Services inline above it is wider than 1280 px on its own).
        _no_horizontal_overflow(page, "#customer-backups")
        _no_horizontal_overflow(page, "#customer-backups .kasa-table-wrap")
        page.evaluate("document.querySelectorAll('.inline-group').forEach(e => { e.style.display = 'none'; })")
        _no_horizontal_overflow(page)  # without the wide inlines, the whole page fits

        # The backup's own page: a Download link per artifact.
        with page.expect_navigation():
            first_row.locator("td a").first.click()
        assert page.locator("#artifacts-group a.kasa-download").count() == 6 or \
            page.locator("a.kasa-download").count() >= 6
        _shot(page, tmp_path, "backup-page.png")
        _no_horizontal_overflow(page)
        # Through daphne: the biggest artifact streams in full (async chunks), bytes matching the catalogue.
        row = page.locator("tr", has=page.locator("a.kasa-download")).filter(has_text="backend.tar.zst.enc")
        href = row.locator("a.kasa-download").get_attribute("href")
        sha = row.locator("code[title]").get_attribute("title")
        download = page.request.get(f"{asgi_server.url}{href}")
        assert download.status == 200 and download.headers["content-disposition"] == \
            'attachment; filename="backend.tar.zst.enc"'
        body = download.body()
        assert len(body) > 40 * MiB and hashlib.sha256(body).hexdigest() == sha

    run = wait_for_run(int(match.group(1)))
    assert run.status == "succeeded"
    bk = Backup.objects.get(run=run)
    assert bk.scope == "full" and bk.encrypted and bk.requested_by == admin and bk.artifacts.count() == 6
    assert re.search(r"\S+: [1-9][\d.]* [kM]?B at [\d.]+ [kM]?B/s, about [\d.]+ s left", seen_progress[0]), \
        seen_progress
