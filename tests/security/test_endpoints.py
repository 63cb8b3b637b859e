"""Attacks on Kasa's anonymous endpoints: /metrics, /health/ and the probes (issue 11, point 8).

Each test failed on the code before the fix (metrics open when deployed without a token, /health/ and
/health/ready/ detailing every failure to anyone, the storage check writing and deleting an object on every
probe, no deployment check for the token) and passes after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import BASE_DIR, serving_asgi
from tests.test_settings import manage, production_env

TOKEN = "prometheus-" + uuid.uuid4().hex + uuid.uuid4().hex  # 75 characters


def _get(url: str, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture
def production_daphne(subprocess_env, tmp_path):
    """Kasa as deployed (KASA_ENV=production, no metrics token, as docker-compose's default), served by daphne
    on the test database."""
    env = {**subprocess_env, "KASA_ENV": "production", "ALLOWED_HOSTS": "127.0.0.1"}
    for name in ("KASA_METRICS_TOKEN", "DEBUG", "SECURE_SSL_REDIRECT"):
        env.pop(name, None)
    with serving_asgi(env, tmp_path / "daphne.log") as p:
        yield p


def test_deployed_metrics_refuse_anonymous_callers_and_name_no_customer(
        production_daphne, make_customer, staff_user, team, client):
    from customers.models import Team

    ours = make_customer()
    theirs = make_customer(team_=Team.objects.create(name=f"other-{uuid.uuid4().hex[:6]}"))
    url = f"{production_daphne.url}/metrics"

    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer guess"}, {"Authorization": "x"}):
        status, body = _get(url, headers)
        assert status == 401, (headers, status, body[:300])
        assert ours.domain not in body and theirs.domain not in body and "kasa_" not in body

    # The way in that stays: a staff session, which sees its own teams' customers only.
    staff = staff_user(team)
    client.force_login(staff)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    status, body = _get(url, {"Cookie": cookie})
    assert status == 200, production_daphne.output()[-2000:]
    assert f'customer="{ours.domain}"' in body and theirs.domain not in body


@pytest.mark.django_db
def test_detailed_health_refuses_anonymous_callers_and_non_staff_users(client, settings, django_user_model):
    settings.KASA_METRICS_TOKEN = TOKEN
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = client.get("/health/", headers=headers)
        assert response.status_code == 401
        body = response.content.decode()
        assert "checks" not in body and "storage" not in body and settings.KASA_VERSION not in body
    user = django_user_model.objects.create_user("not-staff", password="pw-Secret-123")
    client.force_login(user)
    response = client.get("/health/")
    assert response.status_code == 403 and "checks" not in response.content.decode()


@pytest.mark.django_db
def test_anonymous_ready_probe_says_unavailable_without_naming_the_failing_part(client, settings, tmp_path):
    settings.KASA_PROBE_CACHE_SECONDS = 0
    settings.KASA_METRICS_TOKEN = TOKEN
    not_a_folder = tmp_path / "storage"
    not_a_folder.write_text("a file where the storage folder should be")
    settings.STORAGES = {**settings.STORAGES, "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(not_a_folder)}}}
    response = client.get("/health/ready/")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}
    # The detail is still there for who may see it.
    detail = client.get("/health/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert detail.status_code == 503 and "NotADirectoryError" in detail.json()["checks"]["storage"]["detail"]


# The probes run in a Kasa process of their own whose default storage is either a local folder or an S3
# bucket (versioned, so that even an object written and deleted again leaves a trace), with the answer cache
# off: every probe really checks storage.
PROBE_FLOOD = (
    "import django, json, os; django.setup();"
    "from django.test import Client;"
    "c = Client(); token = {'Authorization': 'Bearer ' + os.environ['KASA_METRICS_TOKEN']};"
    "ready = [c.get('/health/ready/').status_code for _ in range(25)];"
    "live = [c.get('/health/live/').status_code for _ in range(5)];"
    "detail = [c.get('/health/', headers=token) for _ in range(25)];"
    "anonymous = [c.get('/health/').status_code for _ in range(5)];"
    "print(json.dumps({'ready': sorted(set(ready)), 'storage': detail[-1].json()['checks']['storage']}))"
)


def _local_snapshot(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*")) + [
        folder.stat().st_mtime_ns]


def _s3_snapshot(server) -> list:
    client = server.client()
    seen = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=server.bucket):
        seen += [("version", v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
        seen += [("delete-marker", m["Key"], m["VersionId"]) for m in page.get("DeleteMarkers", [])]
    return sorted(seen)


def _drop_versions(server) -> None:
    client = server.client()
    for page in client.get_paginator("list_object_versions").paginate(Bucket=server.bucket):
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            client.delete_object(Bucket=server.bucket, Key=v["Key"], VersionId=v["VersionId"])


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_probes_never_write_to_storage(kind, subprocess_env, tmp_path, request):
    env = {**subprocess_env, "KASA_METRICS_TOKEN": TOKEN, "KASA_PROBE_CACHE_SECONDS": "0",
           "ALLOWED_HOSTS": "testserver"}
    if kind == "local":
        folder = tmp_path / "storage"
        folder.mkdir()
        (folder / "upload.txt").write_text("an upload")
        env["KASA_STORAGE_DIR"] = str(folder)
        snapshot = lambda: _local_snapshot(folder)  # noqa: E731
    else:
        server = request.getfixturevalue("s3_server")
        client = server.client()
        client.put_bucket_versioning(Bucket=server.bucket, VersioningConfiguration={"Status": "Enabled"})
        request.addfinalizer(lambda: _drop_versions(server))  # before s3_server drops the bucket
        client.put_object(Bucket=server.bucket, Key="kasa/upload.txt", Body=b"an upload")
        env.update(KASA_S3_BUCKET=server.bucket, KASA_S3_ENDPOINT_URL=server.endpoint, KASA_S3_REGION=server.region,
                   KASA_S3_ACCESS_KEY_ID=server.access_key, KASA_S3_SECRET_ACCESS_KEY=server.secret_key,
                   KASA_S3_PREFIX="kasa")
        snapshot = lambda: _s3_snapshot(server)  # noqa: E731
    before = snapshot()
    out = subprocess.run([sys.executable, "-c", PROBE_FLOOD], capture_output=True, text=True, env=env, timeout=120,
                         cwd=str(BASE_DIR))
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["storage"]["ok"], doc  # storage was really checked, and found usable
    assert doc["ready"] == [200], doc
    assert snapshot() == before


# Unset, or empty as docker-compose passes an optional variable.
@pytest.mark.parametrize(("kasa_env", "token"), [("production", None), ("staging", "")])
def test_check_deploy_warns_when_deployed_without_a_metrics_token(tmp_path, kasa_env, token):
    env = production_env(tmp_path, KASA_ENV=kasa_env)
    if token is None:
        del env["KASA_METRICS_TOKEN"]
    else:
        env["KASA_METRICS_TOKEN"] = token
    res = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert res.returncode != 0, res.stdout
    assert "kasa.W001" in res.stdout + res.stderr and "KASA_METRICS_TOKEN" in res.stdout + res.stderr
