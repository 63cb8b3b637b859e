"""Backups in the admin (issue 3, point 10): "Back up now", the customer's Backups section and chart,
downloads (streamed or presigned), pin/unpin/delete — each scoped to the user's teams."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import connection
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEntry
from backups.models import Backup, BackupArtifact, BackupPolicy, StorageTarget
from backups.services import backup_start, default_target, global_policy
from backups.views import STREAM_CHUNK
from customers.models import Team
from operations.models import Run
from operations.services import run_execute


@pytest.fixture
def two_teams(make_customer, staff_user, tmp_path):
    """Blue (alice) has a customer with two service folders and a SQLite database; red (bob) one service."""
    blue, red = Team.objects.create(name=f"Blue-{tmp_path.name}"), Team.objects.create(name=f"Red-{tmp_path.name}")
    roots = {}
    for name in ("blue", "red"):
        roots[name] = Path(settings.KASA_CUSTOMERS_ROOT) / f"{name}-{tmp_path.name}"
        roots[name].mkdir(parents=True, exist_ok=True)
    for svc in ("backend", "admin"):
        (roots["blue"] / svc).mkdir()
        (roots["blue"] / svc / "app.js").write_text(f"console.log('{svc}')\n" * 200)
    (roots["blue"] / "backend" / "media.bin").write_bytes(os.urandom(3 << 19))  # 1.5 MiB, incompressible
    (roots["blue"] / ".env").write_text("SECRET=blue\n")
    lite = roots["blue"] / "backend" / "data.sqlite3"
    con = sqlite3.connect(lite)
    con.execute("CREATE TABLE t (n INTEGER)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50)])
    con.commit()
    con.close()
    tag = uuid.uuid4().hex[:8]
    blue_c = make_customer(f"blue-{tag}.example.com", services=("backend", "admin"),
                           databases=[("main", f"sqlite:///{lite}")], team_=blue, root=roots["blue"])
    red_c = make_customer(f"red-{tag}.example.com", team_=red, root=roots["red"])
    yield {"blue": blue_c, "red": red_c, "alice": staff_user(blue), "bob": staff_user(red)}
    import shutil

    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)


def run_backup(customer, **kwargs) -> Backup:
    """A backup executed in this process, as a worker would."""
    run = backup_start(customer, via="cli", enqueue=False, **kwargs)
    assert run_execute(run.pk) == "succeeded", Run.objects.get(pk=run.pk).error
    return Backup.objects.get(run=run)


def page(client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return response.content.decode()


def messages_of(response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in response.context["messages"]:
        out.setdefault(m.level_tag, []).append(str(m))
    return out


# --- "Back up now" ------------------------------------------------------------------------------
@pytest.mark.django_db
def test_customer_page_has_the_button_and_the_form_offers_services_and_policy_defaults(client, two_teams):
    blue = two_teams["blue"]
    policy = global_policy()
    client.force_login(two_teams["alice"])
    html = page(client, f"/customers/customer/{blue.pk}/change/")
    assert f'href="/customers/customer/{blue.pk}/backup/"' in html and ">Back up now<" in html
    assert ">Check now<" in html and "Recent operations" in html and "No backups yet." in html

    html = page(client, f"/customers/customer/{blue.pk}/backup/")
    for svc in ("backend", "admin"):
        assert re.search(rf'<input type="checkbox" name="services" value="{svc}"[^>]*>', html)
    assert re.search(r'<input type="radio" name="scope" value="full"[^>]*checked', html)
    for scope in ("files", "database", "config"):
        assert f'name="scope" value="{scope}"' in html
    assert re.search(rf'<input type="radio" name="compression" value="{policy.compression}"[^>]*checked', html)
    assert re.search(r'<input type="checkbox" name="encrypt"[^>]*checked', html)  # on by default
    assert re.search(rf'<option value="{policy.target.name}" selected>', html)
    assert 'id="encrypt-warning"' in html and "Not encrypted" in html


@pytest.mark.django_db
def test_post_starts_a_backup_run_with_the_chosen_scope_and_services(client, two_teams):
    blue, alice = two_teams["blue"], two_teams["alice"]
    client.force_login(alice)
    response = client.post(f"/customers/customer/{blue.pk}/backup/", {
        "scope": "files", "services": ["backend"], "compression": "gzip", "encrypt": "on", "target": "local"})
    run = Run.objects.get(customer=blue, kind="backup")
    assert response.status_code == 302 and response["Location"] == f"/operations/run/{run.pk}/change/"
    assert run.requested_by == alice and run.requested_via == "admin" and run.status == "pending"
    assert run.params["scope"] == "files" and run.params["services"] == ["backend"]
    assert run.params["compression"] == "gzip" and run.params["encrypt"] is True and run.params["target"] == "local"

    # A second one while the first is pending: refused, shown as an error, nothing started.
    response = client.post(f"/customers/customer/{blue.pk}/backup/", {
        "scope": "full", "compression": "zstd", "encrypt": "on", "target": "local"}, follow=True)
    errors = messages_of(response).get("error", [])
    assert errors and f"#{run.pk}" in errors[0]
    assert Run.objects.filter(customer=blue, kind="backup").count() == 1


@pytest.mark.django_db
def test_bad_choices_and_no_encryption(client, two_teams):
    blue = two_teams["blue"]
    client.force_login(two_teams["alice"])
    url = f"/customers/customer/{blue.pk}/backup/"
    # Services with scope "database": the service refuses (BackupInputError), the page says why.
    response = client.post(url, {"scope": "database", "services": ["backend"], "compression": "zstd",
                                 "encrypt": "on", "target": "local"})
    assert response.status_code == 200 and "cannot be combined with scope" in messages_of(response)["error"][0]
    # A service that is not the customer's, and a scope that does not exist: form errors.
    response = client.post(url, {"scope": "everything", "services": ["nope"], "compression": "zstd",
                                 "target": "local"})
    assert response.status_code == 400 and set(response.context["form"].errors) == {"scope", "services"}
    assert not Run.objects.filter(customer=blue).exists()
    # Encryption off: allowed, with a warning.
    response = client.post(url, {"scope": "config", "compression": "none", "target": "local"}, follow=True)
    run = Run.objects.get(customer=blue, kind="backup")
    assert run.params["encrypt"] is False and run.params["scope"] == "config"
    assert "WITHOUT encryption" in messages_of(response)["warning"][0]


@pytest.mark.django_db
def test_another_teams_customer_has_no_button_and_its_backup_page_is_404(client, two_teams):
    red = two_teams["red"]
    client.force_login(two_teams["alice"])
    response = client.get(f"/customers/customer/{red.pk}/change/", follow=True)
    assert response.redirect_chain and f"/customers/customer/{red.pk}/backup/" not in response.content.decode()
    assert client.get(f"/customers/customer/{red.pk}/backup/").status_code == 404
    response = client.post(f"/customers/customer/{red.pk}/backup/", {
        "scope": "full", "compression": "zstd", "encrypt": "on", "target": "local"})
    assert response.status_code == 404
    client.post("/customers/customer/", {"action": "backup_action", "_selected_action": [red.pk]})
    assert not Run.objects.filter(customer=red).exists()
    client.force_login(two_teams["bob"])  # bob's team: the button is there
    assert f"/customers/customer/{red.pk}/backup/" in page(client, f"/customers/customer/{red.pk}/change/")


@pytest.mark.django_db
def test_changelist_action_one_customer_opens_the_form_several_start_with_defaults(client, two_teams, admin_user):
    blue, red = two_teams["blue"], two_teams["red"]
    client.force_login(admin_user)
    response = client.post("/customers/customer/", {"action": "backup_action", "_selected_action": [blue.pk]})
    assert response.status_code == 302 and response["Location"] == f"/customers/customer/{blue.pk}/backup/"
    assert not Run.objects.exists()
    response = client.post("/customers/customer/", {"action": "backup_action",
                                                    "_selected_action": [blue.pk, red.pk]}, follow=True)
    runs = Run.objects.filter(kind="backup")
    assert {r.customer_id for r in runs} == {blue.pk, red.pk}
    policy = global_policy()
    assert all(r.params["scope"] == policy.scope and r.requested_by == admin_user for r in runs)
    assert len(messages_of(response)["success"]) == 2


# --- downloads ----------------------------------------------------------------------------------
def _streamed(response) -> bytes:
    assert response.streaming
    return b"".join(response.streaming_content)


@pytest.mark.django_db(transaction=True)
def test_download_streams_the_stored_bytes_and_is_scoped_and_audited(client, two_teams):
    blue, alice = two_teams["blue"], two_teams["alice"]
    bk = run_backup(blue)
    arts = list(bk.artifacts.all())
    assert {a.kind for a in arts} == {"service", "config", "database"}
    client.force_login(alice)
    html = page(client, f"/backups/backup/{bk.pk}/change/")
    for a in arts:
        assert f'href="/backups/{bk.pk}/download/{a.name}"' in html
    assert f'href="/backups/{bk.pk}/download/backup.json"' in html

    for a in arts:
        response = client.get(f"/backups/{bk.pk}/download/{a.name}")
        assert response.status_code == 200
        assert response["Content-Disposition"] == f'attachment; filename="{a.name}"'
        assert int(response["Content-Length"]) == a.size
        chunks = list(response.streaming_content)
        assert max(len(c) for c in chunks) <= STREAM_CHUNK  # read in bounded chunks, never whole
        assert hashlib.sha256(b"".join(chunks)).hexdigest() == a.sha256
    manifest_response = client.get(f"/backups/{bk.pk}/download/backup.json")
    manifest = _streamed(manifest_response)
    assert int(manifest_response["Content-Length"]) == len(manifest)
    assert f'"{arts[0].sha256}"'.encode() in manifest
    # Over ASGI (daphne in production) the body is an async iterator of bounded chunks: Django would
    # otherwise drain a synchronous one into a list before sending the first byte.
    big = max(arts, key=lambda a: a.size)
    assert big.size > STREAM_CHUNK
    async_client = AsyncClient()
    async_client.cookies = client.cookies
    response = async_to_sync(async_client.get)(f"/backups/{bk.pk}/download/{big.name}")
    assert response.status_code == 200 and response.is_async

    async def drain(it):
        return [c async for c in it]

    chunks = async_to_sync(drain)(response.streaming_content)
    assert len(chunks) > 1 and max(len(c) for c in chunks) <= STREAM_CHUNK
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == big.sha256
    entries = AuditEntry.objects.filter(action="backup.download", object_id=str(bk.pk))
    assert entries.count() == len(arts) + 2
    assert {e.changes["artifact"] for e in entries} == {a.name for a in arts} | {"backup.json"}
    assert entries.filter(changes__how="stream").count() == entries.count()
    assert all(e.actor == alice and e.customer == blue for e in entries)

    # Unknown names and traversals never reach the storage.
    for name in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", f"{arts[0].name}/../../../etc/passwd", "nope.tar",
                 f"../{bk.pk}/{arts[0].name}", "/etc/passwd"):
        assert client.get(f"/backups/{bk.pk}/download/{name}").status_code == 404, name
    # Another team: 404, not 403. Nobody logged in: the login page.
    client.force_login(two_teams["bob"])
    assert client.get(f"/backups/{bk.pk}/download/{arts[0].name}").status_code == 404
    assert client.get(f"/backups/backup/{bk.pk}/change/").status_code == 302  # "doesn't exist"
    client.logout()
    response = client.get(f"/backups/{bk.pk}/download/{arts[0].name}")
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert AuditEntry.objects.filter(action="backup.download").count() == len(arts) + 2

    # A deleted backup offers nothing.
    Backup.objects.filter(pk=bk.pk).update(status=Backup.Status.DELETED)
    client.force_login(alice)
    assert client.get(f"/backups/{bk.pk}/download/{arts[0].name}").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_download_from_s3_redirects_to_a_working_presigned_link(client, two_teams, admin_user, s3_server):
    StorageTarget.objects.create(name="s3", kind="s3", bucket=s3_server.bucket, endpoint_url=s3_server.endpoint,
                                 region="us-east-1", access_key=s3_server.access_key,
                                 secret_key=s3_server.secret_key)
    bk = run_backup(two_teams["blue"], target="s3", scope="files")
    art = bk.artifacts.first()
    client.force_login(admin_user)
    response = client.get(f"/backups/{bk.pk}/download/{art.name}")
    assert response.status_code == 302
    url = response["Location"]
    assert url.startswith(f"{s3_server.endpoint}/{s3_server.bucket}/{bk.prefix}/{art.name}?")
    assert "X-Amz-Expires=900" in url and s3_server.secret_key not in url.split("?")[0]
    with urllib.request.urlopen(url, timeout=30) as fh:  # noqa: S310 (the local SeaweedFS server)
        assert hashlib.sha256(fh.read()).hexdigest() == art.sha256
    entry = AuditEntry.objects.get(action="backup.download")
    assert entry.changes == {"artifact": art.name, "how": "presigned link"}


# --- pin, unpin, delete ---------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_pin_unpin_and_delete_with_confirmation(client, two_teams):
    blue, alice = two_teams["blue"], two_teams["alice"]
    bk = run_backup(blue, scope="config")
    folder = Path(default_target().path) / bk.prefix
    assert (folder / "backup.json").is_file()
    client.force_login(alice)
    html = page(client, "/backups/backup/")
    assert f"/backups/backup/{bk.pk}/change/" in html and 'class="kasa-status kasa-status-succeeded"' in html

    client.post("/backups/backup/", {"action": "pin", "_selected_action": [bk.pk]})
    bk.refresh_from_db()
    assert bk.pinned and alice.username in bk.pin_reason

    # Delete: the confirmation page first, nothing removed yet.
    response = client.post("/backups/backup/", {"action": "delete_backups", "_selected_action": [bk.pk]})
    assert response.status_code == 200 and "Yes, delete them" in response.content.decode()
    assert "pinned: will be refused" in response.content.decode()
    assert folder.is_dir()
    # Confirmed while pinned: refused.
    response = client.post("/backups/backup/", {"action": "delete_backups", "_selected_action": [bk.pk],
                                                "confirm": "yes"}, follow=True)
    assert "is pinned" in messages_of(response)["error"][0]
    bk.refresh_from_db()
    assert bk.status == "succeeded" and folder.is_dir()

    client.post("/backups/backup/", {"action": "unpin", "_selected_action": [bk.pk]})
    bk.refresh_from_db()
    assert not bk.pinned
    # Another team cannot act on it.
    client.force_login(two_teams["bob"])
    client.post("/backups/backup/", {"action": "pin", "_selected_action": [bk.pk]})
    client.post("/backups/backup/", {"action": "delete_backups", "_selected_action": [bk.pk], "confirm": "yes"})
    bk.refresh_from_db()
    assert not bk.pinned and bk.status == "succeeded" and folder.is_dir()

    client.force_login(alice)
    response = client.post("/backups/backup/", {"action": "delete_backups", "_selected_action": [bk.pk],
                                                "confirm": "yes"}, follow=True)
    assert "object(s) removed" in messages_of(response)["success"][0]
    bk.refresh_from_db()
    assert bk.status == "deleted" and not folder.exists()
    assert list(AuditEntry.objects.filter(object_id=str(bk.pk), action__startswith="backup.")
                .order_by("ts").values_list("action", flat=True)) == ["backup.pin", "backup.unpin", "backup.delete"]


# --- the customer's Backups section and chart; a cheap changelist -----------------------------------
def _fake_backups(customer, n: int, start_index: int = 0) -> list[Backup]:
    target = default_target()
    now = timezone.now()
    made = []
    for i in range(start_index, start_index + n):
        started = now - timedelta(days=10 - i)
        bk = Backup.objects.create(customer=customer, target=target, status=Backup.Status.SUCCEEDED,
                                   scope="full", size=(i + 1) * 5_000_000, started_at=started,
                                   finished_at=started + timedelta(seconds=10 + 5 * i), prefix=f"x/{i}",
                                   verified_at=now if i == 0 else None, trigger="schedule" if i % 2 else "manual")
        BackupArtifact.objects.create(backup=bk, name="backend.tar.zst", kind="service", source="backend",
                                      size=bk.size, sha256="0" * 64, compression="zstd")
        made.append(bk)
    return made


@pytest.mark.django_db
def test_backups_section_and_chart_on_the_customer_page(client, two_teams):
    blue = two_teams["blue"]
    made = _fake_backups(blue, 3)
    Backup.objects.create(customer=blue, target=default_target(), status="failed", scope="files",
                          started_at=timezone.now(), finished_at=timezone.now(), error="disk full")
    client.force_login(two_teams["alice"])
    html = page(client, f"/customers/customer/{blue.pk}/change/")
    section = html[html.index('id="customer-backups"'):]
    for bk in made:
        assert f'href="/backups/backup/{bk.pk}/change/"' in section
    assert section.count("<tr>") == 1 + 4  # header + 3 succeeded + 1 failed
    assert "kasa-status-failed" in section and "schedule" in section and "15.0 MB" in section
    assert "Check now" in html and "Recent operations" in html  # the rest of the page is intact
    chart = section[section.index("<svg"):section.index("</svg>")]
    assert chart.count('class="kasa-chart-size-dot"') == 3 == chart.count('class="kasa-chart-duration-dot"')
    points = re.search(r'class="kasa-chart-size" points="([^"]+)"', chart).group(1).split()
    assert len(points) == 3
    ys = [float(p.split(",")[1]) for p in points]
    assert ys[0] > ys[1] > ys[2]  # sizes grow: higher on the chart (smaller y)
    assert "15.0 MB" in chart or "20.0 MB" in chart  # the size axis' top label
    # Another customer's page has no chart of blue's backups.
    client.force_login(two_teams["bob"])
    html = page(client, f"/customers/customer/{two_teams['red'].pk}/change/")
    assert "No backups yet." in html and 'id="backup-chart"' not in html


@pytest.mark.django_db
def test_backups_changelist_columns_and_constant_queries(client, two_teams, admin_user):
    blue = two_teams["blue"]
    _fake_backups(blue, 3)
    client.force_login(admin_user)

    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            html = page(client, "/backups/backup/")
        return len(ctx.captured_queries), html

    few, html = count()
    assert "Verified?" in html and "kasa-verify-never" in html and "Never verified" in html
    assert "schedule" in html and "kasa-status-succeeded" in html
    _fake_backups(blue, 6, start_index=3)
    many, _ = count()
    assert many == few
    # A user without the team sees no rows; with it, all of them, read-only.
    client.force_login(two_teams["bob"])
    assert f"{blue.domain}" not in page(client, "/backups/backup/")
    client.force_login(two_teams["alice"])
    assert page(client, "/backups/backup/").count(f">{blue.domain}<") == 9


@pytest.mark.django_db
def test_policy_defaults_follow_a_customer_policy(client, two_teams):
    blue = two_teams["blue"]
    other = StorageTarget.objects.create(name="other", kind="local", path=str(settings.KASA_VAR_DIR / "other"))
    BackupPolicy.objects.create(customer=blue, target=other, scope="database", compression="gzip", encrypt=False)
    client.force_login(two_teams["alice"])
    html = page(client, f"/customers/customer/{blue.pk}/backup/")
    assert re.search(r'name="scope" value="database"[^>]*checked', html)
    assert re.search(r'name="compression" value="gzip"[^>]*checked', html)
    assert not re.search(r'<input type="checkbox" name="encrypt"[^>]*checked', html)
    assert re.search(r'<option value="other" selected>', html)
