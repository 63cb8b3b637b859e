"""Health endpoints and Prometheus metrics."""

import json
import shutil
import subprocess
import sys
import time

import pytest
from django.test import override_settings

from tests.conftest import free_port, port_open, require, wait_until


@pytest.mark.smoke
@pytest.mark.django_db
def test_live_and_ready_answer_ok_on_the_embedded_defaults(client):
    assert client.get("/health/live/").json() == {"status": "ok"}
    response = client.get("/health/ready/")
    assert response.status_code == 200, response.content
    detail = client.get("/health/").json()
    assert set(detail["checks"]) == {"database", "broker", "channel_layer", "storage"}
    assert all(c["ok"] for c in detail["checks"].values())


@pytest.fixture
def own_redis(tmp_path):
    """A private Redis server we may stop (the shared one stays up for others)."""
    require(shutil.which("redis-server"), "redis-server")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    wait_until(lambda: port_open("127.0.0.1", port, 0.2), 10, what="private redis")
    yield proc, f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait()


def _redis_settings(url):
    return override_settings(
        REDIS_URL=url,
        CHANNEL_LAYERS={"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [url]}}},
    )


@pytest.mark.django_db
def test_ready_names_a_stopped_redis(client, own_redis):
    proc, url = own_redis
    with _redis_settings(url):
        assert client.get("/health/ready/").status_code == 200
        proc.kill()
        proc.wait()
        response = client.get("/health/ready/")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["broker", "channel_layer"]
    assert "Connection" in body["detail"]["broker"] or "refused" in body["detail"]["broker"].lower()


def test_ready_names_a_stopped_control_database(tmp_path):
    """A Kasa process whose PostgreSQL is down answers 503 naming the database (and the ORM broker on it)."""
    port = free_port()  # nothing listens: the server is stopped
    code = (
        "import django, json; django.setup();"
        "from django.test import Client;"
        "r = Client().get('/health/ready/');"
        "print(json.dumps({'status': r.status_code, 'body': r.json()}))"
    )
    env = {"DJANGO_SETTINGS_MODULE": "config.settings", "PATH": "/usr/bin:/bin", "KASA_VAR_DIR": str(tmp_path),
           "DATABASE_URL": f"postgres://kasa:pw@127.0.0.1:{port}/kasa", "ALLOWED_HOSTS": "testserver"}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["status"] == 503
    assert "database" in doc["body"]["failing"]
    assert "pw@" not in out.stdout
    assert time.monotonic() - started < 60


@pytest.mark.smoke
@pytest.mark.django_db
def test_metrics_count_runs_by_kind_and_status_with_durations(client, make_customer):
    from customers.services import customer_check_start
    from operations.services import run_execute

    run = customer_check_start(make_customer(), via="cli")
    run_execute(run.pk)
    text = client.get("/metrics").content.decode()
    assert 'kasa_runs{kind="check",status="succeeded"} 1.0' in text
    assert 'kasa_run_duration_seconds_count{kind="check",status="succeeded"} 1.0' in text
    assert 'kasa_customers{status="active"} 1.0' in text


@pytest.mark.smoke
@pytest.mark.django_db
def test_metrics_can_require_a_bearer_token(client, settings):
    settings.KASA_METRICS_TOKEN = "t0ken-for-prometheus"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer t0ken-for-prometheus"}).status_code == 200


def test_s3_default_storage_by_environment_alone(s3_server, tmp_path):
    """KASA_S3_BUCKET switches Django's default storage to S3 (django-storages); /health/ready/ probes it."""
    code = (
        "import django, json; django.setup();"
        "from django.core.files.base import ContentFile; from django.core.files.storage import default_storage;"
        "from django.test import Client;"
        "name = default_storage.save('probe/hello.txt', ContentFile(b'hi'));"
        "r = Client().get('/health/');"
        "from django.core.files.storage import storages;"
        "print(json.dumps({'cls': type(storages['default']).__name__, 'name': name,"
        " 'storage': r.json()['checks']['storage']}))"
    )
    env = {"DJANGO_SETTINGS_MODULE": "config.settings", "PATH": "/usr/bin:/bin", "KASA_VAR_DIR": str(tmp_path),
           "ALLOWED_HOSTS": "testserver", "KASA_S3_BUCKET": s3_server.bucket,
           "KASA_S3_ENDPOINT_URL": s3_server.endpoint, "KASA_S3_REGION": s3_server.region,
           "KASA_S3_ACCESS_KEY_ID": s3_server.access_key,
           "KASA_S3_SECRET_ACCESS_KEY": s3_server.secret_key, "KASA_S3_PREFIX": "kasa"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["cls"] == "S3Storage" and doc["storage"]["ok"] and "S3Storage" in doc["storage"]["detail"], doc
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"kasa/{doc['name']}")["Body"].read()
    assert body == b"hi"
