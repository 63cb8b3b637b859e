"""Upgrades in the admin (issue 5, point 6), with Django's test client: the Versions card and the upgrade history
on the customer page, "Upgrade to…" (preflight, release notes, the masked .env diff, typed confirmation), "Roll
back", the quarantine banner and its resolution, the read-only Upgrade pages — each scoped to the user's teams.

The customer is laid out from the upgrade tests' release package (tests/upgrade_fixtures.py), in plain folders
and without a running service: these pages only read it. The whole flow on real services is in
tests/test_browser_upgrades.py.
"""

from __future__ import annotations

import re
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from customers.models import Team
from operations.models import Run
from releases.models import Release
from upgrades.models import BadRelease, Upgrade, UpgradeStep

pytestmark = pytest.mark.django_db

DB_PASSWORD = "Pg-Pass-Secret-9"
FAKE_PG_URL = f"postgresql://app:{DB_PASSWORD}@127.0.0.1:5432/app"


@pytest.fixture
def releases(db, tmp_path):
    from tests.upgrade_fixtures import sync_releases

    return sync_releases(tmp_path)


@pytest.fixture
def site(db, releases, staff_user):
    """Blue (alice) has a customer at 2.4.0 laid out in plain folders; red (bob) one too."""
    from customers.services import customer_create
    from tests.upgrade_fixtures import lay_out_customer

    made = {}
    for color in ("blue", "red"):
        team = Team.objects.create(name=f"{color}-{uuid.uuid4().hex[:6]}")
        root = Path(settings.KASA_CUSTOMERS_ROOT) / f"ua-{color}-{uuid.uuid4().hex[:8]}"
        lay_out_customer(root, port=1, pg_url=FAKE_PG_URL)
        made[color] = customer_create(domain=f"{color}-{uuid.uuid4().hex[:6]}.example.com", root=str(root),
                                      team=team, services=[("backend", "backend"), ("store", "store")],
                                      versions={"backend": "2.4.0", "store": "2.4.0"})
        made[f"{color}_team"] = team
    made["alice"], made["bob"] = staff_user(made["blue_team"]), staff_user(made["red_team"])
    made["releases"] = releases
    yield made
    for color in ("blue", "red"):
        shutil.rmtree(made[color].root, ignore_errors=True)


def get(client, url: str, status: int = 200) -> str:
    response = client.get(url)
    assert response.status_code == status, (url, response.status_code)
    return response.content.decode()


def api_secret(customer) -> str:
    text = (Path(customer.root) / "backend" / ".env").read_text()
    return re.search(r"^API_SECRET=(.+)$", text, re.M)[1]


def fake_upgrade(customer, *, status=Upgrade.Status.SUCCEEDED, release=None, user=None, **fields) -> Upgrade:
    """An upgrade row as a finished run leaves it (the real runs are in the browser test and test_upgrades)."""
    now = timezone.now()
    run_status = "succeeded" if status == Upgrade.Status.SUCCEEDED else "failed"
    run = Run.objects.create(customer=customer, kind="upgrade", status=run_status, requested_by=user,
                             started_at=now - timedelta(seconds=42), finished_at=now)
    return Upgrade.objects.create(customer=customer, run=run, status=status, to_release=release,
                                  from_versions={"backend": "2.4.0", "store": "2.4.0"},
                                  to_versions={"backend": "2.5.0", "store": "2.5.0"},
                                  started_at=now - timedelta(seconds=42), finished_at=now, **fields)


def test_customer_page_shows_versions_offered_releases_and_an_upgrade_link(client, site):
    blue = site["blue"]
    client.force_login(site["alice"])
    html = get(client, f"/customers/customer/{blue.pk}/change/")
    assert 'id="customer-versions"' in html and 'id="upgrade-to"' in html
    current = re.search(r'id="versions-current".*?</table>', html, re.S)[0]
    assert "backend" in current and "2.4.0" in current
    assert 'id="current-release">2.4<' in html
    rows = dict(re.findall(r'<tr data-release="([^"]+)" class="([^"]*)"', html))
    assert rows == {"2.6": "kasa-release-allowed", "2.5": "kasa-release-allowed", "2.4": ""}
    assert "already installed" in html  # why 2.4 is not allowed
    assert f"/customers/customer/{blue.pk}/upgrade/?release=2.5" in html
    assert 'id="rollback-link"' not in html  # nothing to roll back yet
    assert "No upgrades yet." in html


def test_another_teams_customer_and_upgrades_are_404(client, site):
    blue, red = site["blue"], site["red"]
    up = fake_upgrade(blue, release=site["releases"]["2.5"])
    client.force_login(site["bob"])
    for url in (f"/customers/customer/{blue.pk}/upgrade/", f"/customers/customer/{blue.pk}/upgrade/?release=2.5",
                f"/customers/customer/{blue.pk}/rollback/", f"/upgrades/upgrade/{up.pk}/steps/",
                f"/upgrades/upgrade/{up.pk}/resolve/"):
        assert client.get(url).status_code == 404, url
    response = client.get(f"/upgrades/upgrade/{up.pk}/change/")  # the admin's own "doesn't exist"
    assert response.status_code == 302 and response["Location"] == "/"
    for url in (f"/customers/customer/{blue.pk}/upgrade/", f"/customers/customer/{blue.pk}/rollback/",
                f"/upgrades/upgrade/{up.pk}/resolve/"):
        response = client.post(url, {"release": "2.5", "confirm": blue.domain, "note": "mine now"})
        assert response.status_code == 404, url
    assert blue.domain not in get(client, "/upgrades/upgrade/")
    assert Upgrade.objects.count() == 1 and Run.objects.count() == 1
    # Bob's own customer works.
    assert "Run the preflight" in get(client, f"/customers/customer/{red.pk}/upgrade/")


def test_upgrade_page_shows_preflight_release_notes_and_the_env_diff_masked(client, site):
    blue = site["blue"]
    Release.objects.filter(name="2.5").update(notes="Orders can be exported.")
    client.force_login(site["alice"])
    html = get(client, f"/customers/customer/{blue.pk}/upgrade/")
    assert re.findall(r'name="release" value="([^"]+)"', html) == ["2.6", "2.5"]
    assert 'id="preflight"' not in html  # nothing chosen yet
    html = get(client, f"/customers/customer/{blue.pk}/upgrade/?release=2.5")
    checks = {name: result for result, name in re.findall(r'<tr class="kasa-check-(\w+)" data-check="([^"]+)"', html)}
    assert {"release", "services", "env", "disk", "health", "exclusive", "backup"} <= set(checks)
    assert set(checks.values()) == {"ok"}, checks
    assert 'id="preflight-result">every check passed' in html
    assert "Orders can be exported." in html
    diff = re.search(r'id="env-diff".*?</fieldset>', html, re.S)[0]
    assert re.search(r'<tr class="kasa-env-added" data-key="EXPORT_DIR">.*?exports', diff, re.S)
    assert re.search(r'data-key="API_SECRET">.*?\*{8}.*?\*{8}', diff, re.S)
    assert re.search(r'data-key="DATABASE_URL">.*?app:\*{8}@127\.0\.0\.1', diff, re.S)
    assert "no longer listed" in diff.lower() and "OLD_SETTING" in diff
    assert api_secret(blue) not in html and DB_PASSWORD not in html
    assert 'id="upgrade-start"' in html and "disabled" not in re.search(r'<input[^>]*id="upgrade-start"[^>]*>', html)[0]
    assert not Run.objects.exists()  # the page only looks


def test_upgrade_starts_only_with_the_typed_domain_and_lands_on_the_run(client, site):
    blue = site["blue"]
    client.force_login(site["alice"])
    url = f"/customers/customer/{blue.pk}/upgrade/"
    response = client.post(url, {"release": "2.5", "force": "False", "confirm": "wrong.example.com"})
    assert response.status_code == 400
    assert f"type {blue.domain} exactly to confirm" in response.content.decode()
    response = client.post(url, {"release": "2.5", "force": "False"})
    assert response.status_code == 400 and not Run.objects.exists()
    response = client.post(url, {"release": "9.9", "confirm": blue.domain})
    assert response.status_code == 400 and "there is no release" in response.content.decode()
    response = client.post(url, {"release": "2.4", "confirm": blue.domain})
    assert response.status_code == 400 and "already installed" in response.content.decode()
    assert not Run.objects.exists()
    response = client.post(url, {"release": "2.5", "force": "False", "confirm": blue.domain.upper()})
    run = Run.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/operations/run/{run.pk}/change/"
    up = Upgrade.objects.get(run=run)
    assert (run.kind, run.status, run.requested_by, run.requested_via) == ("upgrade", "pending", site["alice"],
                                                                           "admin")
    assert up.to_release.name == "2.5" and not up.force and not up.dry_run
    # While it is pending, the customer page says so and the upgrade page's preflight refuses a second one.
    html = get(client, f"/customers/customer/{blue.pk}/change/")
    assert 'id="upgrade-active"' in html and f"run #{run.pk}" in html
    assert 'data-check="exclusive"' in get(client, f"{url}?release=2.6")
    response = client.post(url, {"release": "2.6", "confirm": blue.domain})
    assert response.status_code == 400 and "the preflight failed" in response.content.decode()
    assert Run.objects.count() == 1


def test_a_bad_release_is_offered_only_with_force(client, site):
    blue, rel = site["blue"], site["releases"]["2.5"]
    BadRelease.objects.create(customer=blue, release=rel, reason="health check failed at 10:00")
    client.force_login(site["alice"])
    html = get(client, f"/customers/customer/{blue.pk}/change/")
    assert re.search(r'<tr data-release="2.5" class="kasa-release-bad">.*?bad release.*?health check failed at 10:00',
                     html, re.S)
    assert "upgrade/?release=2.5&amp;force=1" in html
    url = f"/customers/customer/{blue.pk}/upgrade/"
    html = get(client, url)
    assert re.findall(r'name="release" value="([^"]+)"', html) == ["2.6"]
    assert 'id="bad-hidden">Not offered: 2.5 (health check failed at 10:00)' in html
    html = get(client, f"{url}?release=2.5", status=400)
    assert "failed for" in html and "tick &quot;force&quot;" in html and 'id="preflight"' not in html
    response = client.post(url, {"release": "2.5", "confirm": blue.domain})
    assert response.status_code == 400 and not Run.objects.exists()
    # With force: offered, marked, and the preflight's release check passes (forced).
    html = get(client, f"{url}?force=1")
    assert re.findall(r'name="release" value="([^"]+)"', html) == ["2.6", "2.5"]
    html = get(client, f"{url}?release=2.5&force=1")
    assert re.search(r'data-check="release">.*?forced: health check failed', html, re.S)
    assert 'name="force" value="True"' in html and "this upgrade is forced" in html
    response = client.post(url, {"release": "2.5", "force": "True", "confirm": blue.domain})
    assert response.status_code == 302
    assert Upgrade.objects.get().force


def test_rollback_page_shows_what_comes_back_and_needs_the_typed_domain(client, site):
    blue = site["blue"]
    client.force_login(site["alice"])
    url = f"/customers/customer/{blue.pk}/rollback/"
    html = get(client, url, status=404)
    assert "no successful upgrade to roll back" in html
    assert client.post(url, {"confirm": blue.domain}).status_code == 400 and not Run.objects.exists()
    # As an upgrade to 2.5 leaves the layout: releases/2.4.0/backend kept, releases/2.5.0/backend live.
    root = Path(blue.root)
    before, after = root / "releases" / "2.4.0" / "backend", root / "releases" / "2.5.0" / "backend"
    shutil.copytree(root / "backend", before)
    after.mkdir(parents=True)
    (after / ".env").write_text((before / ".env").read_text() + "EXPORT_DIR=exports\nEXPORT_TOKEN=tok-Secret-77\n")
    layout = {"backend": {"service": "backend", "live": str(root / "backend"), "before_dir": str(before),
                          "before_version": "2.4.0", "after_dir": str(after), "after_version": "2.5.0"}}
    up = fake_upgrade(blue, release=site["releases"]["2.5"], layout=layout, user=site["alice"])
    html = get(client, f"/customers/customer/{blue.pk}/change/")
    assert 'id="rollback-link"' in html and f"Roll back undoes upgrade #{up.pk}" in html
    history = re.search(r'id="customer-upgrades".*?</fieldset>', html, re.S)[0]
    assert f"#{up.pk}" in history and "kasa-status-succeeded" in history and "42.0 s" in history
    assert f"/operations/run/{up.run_id}/change/" in history
    html = get(client, url)
    assert "undoes upgrade" in html and "2.5.0" in html and str(before) in html
    diff = re.search(r'id="env-diff".*?</fieldset>', html, re.S)[0]
    assert re.search(r'<tr class="kasa-env-removed" data-key="EXPORT_DIR">', diff)
    assert re.search(r'data-key="EXPORT_TOKEN">.*?\*{8}', diff, re.S) and "tok-Secret-77" not in html
    response = client.post(url, {"confirm": "nope"})
    assert response.status_code == 400 and f"type {blue.domain} exactly" in response.content.decode()
    assert Run.objects.count() == 1
    response = client.post(url, {"confirm": blue.domain})
    run = Run.objects.get(kind="rollback")
    assert response.status_code == 302 and response["Location"] == f"/operations/run/{run.pk}/change/"
    rb = Upgrade.objects.get(run=run)
    assert rb.kind == "rollback" and rb.rolls_back == up and rb.status == "pending"
    assert not rb.switch_back and 'id="switch-back"' not in html  # no standby: only the full rollback


def test_while_a_blue_green_standby_runs_the_rollback_page_offers_to_switch_back_to_it(client, site):
    from datetime import timedelta

    from django.utils import timezone

    blue = site["blue"]
    client.force_login(site["alice"])
    up = fake_upgrade(blue, release=site["releases"]["2.5"], layout={}, user=site["alice"])
    url = f"/customers/customer/{blue.pk}/rollback/"
    assert 'id="switch-back"' not in get(client, url)
    Upgrade.objects.filter(pk=up.pk).update(standby_until=timezone.now() + timedelta(minutes=9), standby={
        "services": {"backend": {"url": "http://127.0.0.1:41234/health", "version": "2.4.0"}}})
    assert "runs beside it as a standby" in get(client, f"/customers/customer/{blue.pk}/change/")
    html = get(client, url)
    assert 'id="switch-back"' in html and "backend 2.4.0 on <code>http://127.0.0.1:41234/health</code>" in html
    response = client.post(url, {"confirm": blue.domain, "switch_back": "1"})
    assert response.status_code == 302
    rb = Upgrade.objects.get(run__kind="rollback")
    assert rb.switch_back and rb.rolls_back == up


def test_a_quarantine_shows_a_banner_until_it_is_resolved(client, site):
    blue = site["blue"]
    up = fake_upgrade(blue, status=Upgrade.Status.QUARANTINED, release=site["releases"]["2.5"],
                      error="upgrade to 2.5 failed at health: 500; ROLLBACK FAILED (disk full): quarantined")
    client.force_login(site["alice"])
    html = get(client, f"/customers/customer/{blue.pk}/change/")
    banner = re.search(r'id="quarantine-banner".*?</div>\s*</div>', html, re.S)[0]
    assert "Quarantined" in banner and "ROLLBACK FAILED (disk full)" in banner
    assert f"/upgrades/upgrade/{up.pk}/resolve/" in banner
    assert "kasa-status-quarantined" in re.search(r'id="customer-upgrades".*?</fieldset>', html, re.S)[0]
    assert "Quarantined" in get(client, f"/customers/customer/{blue.pk}/upgrade/")
    # The upgrade's own page offers "Mark resolved…"; an empty note is refused.
    assert 'id="resolve-link"' in get(client, f"/upgrades/upgrade/{up.pk}/change/")
    url = f"/upgrades/upgrade/{up.pk}/resolve/"
    assert client.post(url, {"note": "  "}).status_code == 400
    response = client.post(url, {"note": "freed disk, checked the customer by hand"})
    assert response.status_code == 302 and response["Location"] == f"/upgrades/upgrade/{up.pk}/change/"
    up.refresh_from_db()
    assert up.resolved_by == site["alice"] and up.resolution.startswith("freed disk")
    assert 'id="quarantine-banner"' not in get(client, f"/customers/customer/{blue.pk}/change/")


def test_upgrade_pages_are_read_only_with_a_live_step_list_and_a_cheap_changelist(client, site, admin_user):
    blue = site["blue"]
    up = fake_upgrade(blue, release=site["releases"]["2.5"],
                      env_diff={"backend": {"added": ["EXPORT_DIR"], "removed_from_example": ["OLD_SETTING"],
                                            "changes": [{"key": "EXPORT_DIR", "status": "added", "old": None,
                                                         "new": "exports"}], "example": True}},
                      preflight={"ok": True, "checks": [{"name": "disk", "ok": True, "detail": "plenty",
                                                         "blocking": True}]})
    t0 = up.started_at
    for i, name in enumerate(("preflight", "backup", "stage")):
        UpgradeStep.objects.create(upgrade=up, position=i + 1, name=name, status="succeeded",
                                   started_at=t0 + timedelta(seconds=i), finished_at=t0 + timedelta(seconds=i + 1))
    client.force_login(site["alice"])
    doc = client.get(f"/upgrades/upgrade/{up.pk}/steps/").json()
    assert [(s["name"], s["status"], s["duration"]) for s in doc["steps"]] == [
        ("preflight", "succeeded", 1.0), ("backup", "succeeded", 1.0), ("stage", "succeeded", 1.0)]
    assert doc["status"] == "succeeded" and doc["active"] is False
    assert client.post(f"/upgrades/upgrade/{up.pk}/steps/").status_code == 405
    html = get(client, f"/upgrades/upgrade/{up.pk}/change/")
    assert 'id="upgrade-steps"' in html and 'data-step="backup"' in html and f'/ws/runs/{up.run_id}/' in html
    assert "EXPORT_DIR" in html and "plenty" in html
    assert 'name="_save"' not in html  # read-only
    assert client.get("/upgrades/upgrade/add/").status_code == 403
    assert client.post(f"/upgrades/upgrade/{up.pk}/delete/").status_code == 403

    client.force_login(admin_user)

    def count():
        with CaptureQueriesContext(connection) as ctx:
            html = get(client, "/upgrades/upgrade/")
        return len(ctx.captured_queries), html

    few, html = count()
    assert "kasa-status-succeeded" in html and "2.5: backend 2.5.0, store 2.5.0" in html
    for _ in range(4):
        fake_upgrade(site["red"], release=site["releases"]["2.6"])
    many, _ = count()
    assert many == few
