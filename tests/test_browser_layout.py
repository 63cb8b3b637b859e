"""Every admin page fits a 1366×768 screen (issue 12, point 8): Debian's Chromium, a real daphne, data on every
page (the demo customer, releases, backups, runs, upgrades, a quarantine, the audit trail), and each
changelist, add and change page and each of Kasa's own pages is opened: none scrolls sideways, and no request for
a favicon fails."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

import pytest
from django.contrib import admin
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone

from audit.models import AuditEntry
from backups.models import Backup, BackupArtifact, BackupPolicy
from backups.services import default_target
from customers.changes import service_save
from customers.models import MaintenanceConnection, Service
from customers.services import customer_check_start
from hosts.models import Host
from operations.models import Run
from tests.test_browser import PASSWORD, chromium, demo_customer, log_in  # noqa: F401 (fixtures)
from upgrades.models import BadRelease, Upgrade

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

VIEWPORT = {"width": 1366, "height": 768}
# The page, and any box inside it that would scroll sideways (a changelist's results, a wide table's wrapper):
# columns hidden behind an inner scrollbar are cut off too. Form inputs scroll their own text, as they should.
SIDEWAYS = """() => {
  const found = [];
  if (document.documentElement.scrollWidth > window.innerWidth)
    found.push(`page ${document.documentElement.scrollWidth} > ${window.innerWidth}`);
  for (const e of document.querySelectorAll("body *")) {
    if (["INPUT", "TEXTAREA", "SELECT"].includes(e.tagName)) continue;
    const o = getComputedStyle(e).overflowX;
    const name = `${e.tagName.toLowerCase()}${e.id ? "#" + e.id : ""}.${[...e.classList].join(".")}`;
    if ((o === "auto" || o === "scroll") && e.scrollWidth > e.clientWidth + 1)
      found.push(`${name} ${e.scrollWidth} > ${e.clientWidth}`);
    // Cut off: a box running past the right edge of the screen, clipped by an ancestor instead of scrolling.
    const box = e.getBoundingClientRect();
    if (box.width > 0 && box.height > 0 && box.right > window.innerWidth + 1 && !e.closest("[hidden]"))
      found.push(`${name} ends at ${Math.round(box.right)} px`);
  }
  return found;
}"""
LONG = "x" * 20  # a long word: error texts and paths must wrap, not widen the page


def _seed(customer, other, tmp_path) -> dict:
    """Rows on every admin page, the widest of their kind: long commands, errors, paths."""
    from tests.upgrade_fixtures import sync_releases

    releases = sync_releases(tmp_path)
    service_save(Service(customer=customer, name="worker-with-a-long-name", path="backend",
                         process_manager="command", app_name="demo-worker-app",
                         start_command=["/usr/bin/node", "--max-old-space-size=4096", "server/worker-entrypoint.js",
                                        "--queue=emails,exports,webhooks,thumbnails"],
                         stop_command=["/usr/bin/pkill", "-f", "worker-entrypoint.js"],
                         health_url="http://127.0.0.1:4199/health/deep?include=queues,database,cache"))
    now = timezone.now()
    target = default_target()
    BackupPolicy.objects.create(customer=customer, target=target)
    good = Backup.objects.create(customer=customer, target=target, status="succeeded", scope="full", size=123_456_789,
                                 started_at=now - timedelta(hours=2), finished_at=now - timedelta(hours=2, seconds=-42),
                                 prefix=f"{customer.domain}/20260101T000000Z-{LONG}", trigger="schedule")
    BackupArtifact.objects.create(backup=good, name="backend.tar.zst", kind="files", source="backend", size=99_000_000,
                                  sha256="ab" * 32, compression="zstd")
    BackupArtifact.objects.create(backup=good, name="db-main.sql.zst", kind="database", source="main", size=24_456_789,
                                  sha256="cd" * 32, compression="zstd")
    Backup.objects.create(customer=customer, target=target, status="failed", scope="full", trigger="manual",
                          started_at=now - timedelta(hours=1), finished_at=now - timedelta(hours=1, seconds=-3),
                          prefix=f"{customer.domain}/failed", error=f"pg_dump: error: connection to server failed: "
                                                                    f"/var/run/postgresql/{LONG * 6}.sock")
    check = customer_check_start(customer, via="cli")  # stays pending: no worker here
    failed = Run.objects.create(kind="restore", customer=customer, status="failed", requested_via="cli",
                                started_at=now - timedelta(minutes=30), finished_at=now - timedelta(minutes=29),
                                params={"backup": good.pk}, error=f"restore refused: {LONG * 8}",
                                result={"safety_backup": good.pk, "note": LONG * 5})
    up_run = Run.objects.create(kind="upgrade", customer=customer, status="succeeded", requested_via="admin",
                                started_at=now - timedelta(minutes=20), finished_at=now - timedelta(minutes=19))
    upgrade = Upgrade.objects.create(customer=customer, run=up_run, kind="upgrade", status="succeeded",
                                     from_versions={"backend": "2.4.0"}, to_versions={"backend": "2.5.0"},
                                     to_release=releases["2.5"], backup=good,
                                     started_at=up_run.started_at, finished_at=up_run.finished_at)
    q_run = Run.objects.create(kind="upgrade", customer=other, status="failed", requested_via="admin",
                               started_at=now - timedelta(minutes=10), finished_at=now - timedelta(minutes=9),
                               error="health check failed and the rollback failed too: " + LONG * 6)
    quarantined = Upgrade.objects.create(customer=other, run=q_run, kind="upgrade", status="quarantined",
                                         to_release=releases["2.6"], to_versions={"backend": "2.6.0"},
                                         error="rollback failed: " + LONG * 8)
    BadRelease.objects.create(customer=other, release=releases["2.6"], upgrade=quarantined,
                              reason="health check failed: " + LONG * 6)
    MaintenanceConnection.objects.create(engine="postgresql", host="127.0.0.1", port=5432, user="postgres",
                                         password="pw-maint")
    from rollouts.models import GateResult, Rollout, RolloutTarget, RolloutWave

    rollout = Rollout.objects.create(release=releases["2.5"], percents=[10, 100], status="halted",
                                     reason="wave 1: 1 failed upgrade(s): " + LONG * 6, started_at=now,
                                     finished_at=now, skipped=[{"domain": other.domain,
                                                                "reason": "pinned to 2.4: " + LONG * 3}])
    wave = RolloutWave.objects.create(rollout=rollout, position=1, percent=10, bake_seconds=1800, state="failed")
    RolloutWave.objects.create(rollout=rollout, position=2, percent=100)
    RolloutTarget.objects.create(rollout=rollout, wave=wave, customer=customer, position=0, state="failed",
                                 upgrade=upgrade, error="health check failed: " + LONG * 5, active=False)
    GateResult.objects.create(rollout=rollout, wave=wave, gate="health", result="failed", final=True,
                              summary="1 health URL(s) of upgraded customers do not answer: " + LONG * 2,
                              evidence={"checked": [{"url": f"http://127.0.0.1:4199/{LONG * 3}", "ok": False}]})
    assert AuditEntry.objects.exists()
    # A remote host with the widest probe results: its page lists the customer moved onto it.
    web = Host.objects.create(
        name=f"web-with-a-long-name-{LONG}", ssh_user="kasa", address="web-server-07.eu-west.example.com",
        port=2222, customers_root=f"/srv/kasa/customers/{LONG}", labels={"dc": "fra1", "tier": "gold"},
        key_file="/etc/kasa/keys/web-server-07", reachable=False, probed_at=now, last_seen=now - timedelta(hours=3),
        last_error=f"host web-server-07 (kasa@web-server-07.eu-west.example.com:2222) is unreachable: {LONG * 4}",
        os="Debian GNU/Linux 12 (bookworm)", free_bytes=123_456_789_012,
        tools={"python3": "3.11.2", "tar": "1.34", "zstd": "missing", "pm2": "5.3.1", "pg_dump": "15.10",
               "mariadb-dump": "10.11.6-MariaDB"})
    type(other).objects.filter(pk=other.pk).update(host=web)
    return {"backup": good, "check": check, "failed": failed, "upgrade": upgrade, "quarantined": quarantined}


def _admin_pages(user, seeded, customer) -> list[str]:
    """Every changelist, add, change, history and delete page the superuser may open, then Kasa's own pages."""
    request = RequestFactory().get("/")
    request.user = user
    urls = []
    for model, model_admin in admin.site._registry.items():
        opts = model._meta
        if not model_admin.has_module_permission(request):
            continue
        urls.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
        if model_admin.has_add_permission(request):
            urls.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_add"))
        obj = model_admin.get_queryset(request).order_by("pk").last()
        if obj is not None:
            urls.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk]))
            urls.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_history", args=[obj.pk]))
            if model_admin.has_delete_permission(request, obj):
                urls.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_delete", args=[obj.pk]))
    for run in (seeded["check"], seeded["failed"], seeded["upgrade"].run):
        urls.append(reverse("admin:operations_run_change", args=[run.pk]))
    urls += [
        reverse("admin:index"),
        reverse("admin:customers_customer_change", args=[customer.pk]),
        reverse("admin:customers_customer_backup", args=[customer.pk]),
        reverse("admin:customers_customer_upgrade", args=[customer.pk]),
        reverse("admin:customers_customer_upgrade", args=[customer.pk]) + "?release=2.4",  # its preflight
        reverse("admin:customers_customer_upgrade", args=[customer.pk]) + "?release=2.5",  # refused
        reverse("admin:customers_customer_rollback", args=[customer.pk]),
        reverse("admin:backups_backup_restore", args=[seeded["backup"].pk]),
        reverse("admin:backups_backup_change", args=[seeded["backup"].pk]),
        reverse("admin:upgrades_upgrade_change", args=[seeded["quarantined"].pk]),
        reverse("admin:upgrades_upgrade_resolve", args=[seeded["quarantined"].pk]),
        reverse("admin:releases_release_upload"),
        reverse("admin:rollouts_rollout_start") + f"?domains={customer.domain}",
        reverse("admin:password_change"),
    ]
    return list(dict.fromkeys(urls))


def test_every_admin_page_fits_1366_by_768_and_no_favicon_request_fails(
        asgi_server, demo_customer, make_customer, django_user_model, chromium, tmp_path):  # noqa: F811
    other = make_customer("quarantined.example.com")
    seeded = _seed(demo_customer, other, tmp_path)
    user = django_user_model.objects.create_superuser(f"admin-{uuid.uuid4().hex[:6]}", password=PASSWORD)
    pages = _admin_pages(user, seeded, demo_customer)
    assert len(pages) > 30, pages

    too_wide, broken, favicons = [], [], []
    with chromium() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        page.on("response", lambda r: favicons.append((r.url, r.status)) if "favicon" in r.url else None)
        log_in(page, asgi_server.url, user.username)
        for url in pages:
            response = page.goto(asgi_server.url + url)
            page.wait_for_load_state("load")
            if response.status >= 500 or response.status in (403, 404) and "rollback" not in url:
                broken.append((url, response.status))
            sideways = page.evaluate(SIDEWAYS)
            name = (url.strip("/").replace("/", "_").replace("?", "_") or "index") + ".png"
            if sideways:
                page.screenshot(path=str(tmp_path / name), full_page=True)
                too_wide.append((url, sideways, str(tmp_path / name)))
            if os.environ.get("KASA_SCREENSHOTS"):  # to look at them all
                page.screenshot(path=os.path.join(os.environ["KASA_SCREENSHOTS"], name), full_page=True)
        # The address browsers ask for on their own, whatever the page links.
        icon = page.goto(asgi_server.url + "/favicon.ico")
        assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg"), icon.url
    assert not broken, broken
    assert not too_wide, "pages scroll sideways at 1366×768:\n" + "\n".join(map(repr, too_wide))
    assert favicons and all(status < 400 for _, status in favicons if status not in (301, 302)), favicons
