"""Health endpoints and Prometheus metrics."""

import json
import shutil
import subprocess
import sys
import time

import pytest
from django.test import override_settings

from core import health
from tests.conftest import BASE_DIR, free_port, port_open, require, wait_until

TOKEN = "t0ken-for-prometheus-" + "x" * 24


@pytest.fixture(autouse=True)
def fresh_probe_cache():
    """Each test sees its own probe answers, not those cached by the test before."""
    from django.core.cache import cache

    cache.delete(health.CACHE_KEY)
    health._fallback.clear()
    yield
    cache.delete(health.CACHE_KEY)


@pytest.mark.smoke
@pytest.mark.django_db
def test_live_and_ready_answer_ok_on_the_embedded_defaults(client, staff_user):
    assert client.get("/health/live/").json() == {"status": "ok"}
    response = client.get("/health/ready/")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ok"}
    client.force_login(staff_user())
    detail = client.get("/health/").json()
    assert set(detail["checks"]) == {"database", "broker", "channel_layer", "storage"}
    assert all(c["ok"] for c in detail["checks"].values())
    assert detail["checked_at"] and detail["version"]


@pytest.mark.django_db
def test_detailed_health_answers_the_metrics_token(client, settings):
    settings.KASA_METRICS_TOKEN = TOKEN
    assert client.get("/health/").status_code == 401
    response = client.get("/health/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.json()["checks"]["storage"]["ok"]


@pytest.mark.django_db
def test_a_flood_of_probes_runs_the_checks_once_per_period(client, settings, django_assert_num_queries):
    settings.KASA_PROBE_CACHE_SECONDS = 60
    settings.KASA_METRICS_TOKEN = TOKEN
    with django_assert_num_queries(2):  # SELECT 1, and the ORM broker's queue count
        assert client.get("/health/ready/").status_code == 200
    with django_assert_num_queries(0):
        for _ in range(200):
            assert client.get("/health/ready/").status_code == 200
        detail = client.get("/health/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert detail.status_code == 200 and detail.json()["checks"]["database"]["ok"]


@pytest.mark.django_db
def test_a_missing_local_storage_folder_is_ready_and_left_uncreated(client, settings, tmp_path, staff_user):
    """Django creates the folder on the first upload; the probe only asks whether it could."""
    settings.STORAGES = {**settings.STORAGES, "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(tmp_path / "not-yet" / "storage")}}}
    client.force_login(staff_user())
    storage = client.get("/health/").json()["checks"]["storage"]
    assert storage["ok"] and "created on first use" in storage["detail"], storage
    assert not (tmp_path / "not-yet").exists()


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
def test_a_stopped_redis_makes_ready_unavailable_and_detail_names_it(client, own_redis, settings):
    settings.KASA_PROBE_CACHE_SECONDS = 0
    settings.KASA_METRICS_TOKEN = TOKEN
    proc, url = own_redis
    with _redis_settings(url):
        assert client.get("/health/ready/").status_code == 200
        proc.kill()
        proc.wait()
        response = client.get("/health/ready/")
        detail = client.get("/health/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 503 and response.json() == {"status": "unavailable"}
    checks = detail.json()["checks"]
    assert [n for n, c in checks.items() if not c["ok"]] == ["broker", "channel_layer"]
    assert "Connection" in checks["broker"]["detail"] or "refused" in checks["broker"]["detail"].lower()


def test_probes_answer_and_stay_cached_while_the_redis_cache_is_down(own_redis, tmp_path):
    """With REDIS_URL the probes' cache is Redis too: Redis down, they still answer, from a cache of their own."""
    proc, url = own_redis
    proc.kill()
    proc.wait()
    code = (
        "import django, json, time; django.setup();"
        "from django.test import Client; c = Client();"
        "first = c.get('/health/ready/'); t = time.monotonic();"
        "codes = [c.get('/health/ready/').status_code for _ in range(100)];"
        "print(json.dumps({'first': first.status_code, 'codes': sorted(set(codes)),"
        " 'seconds': time.monotonic() - t}))"
    )
    env = {"DJANGO_SETTINGS_MODULE": "config.settings", "PATH": "/usr/bin:/bin", "KASA_VAR_DIR": str(tmp_path),
           "REDIS_URL": url, "ALLOWED_HOSTS": "testserver"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=str(BASE_DIR))
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["first"] == 503 and doc["codes"] == [503]
    assert doc["seconds"] < 1.0, doc  # one check per period, not 100 failed connections


def test_a_stopped_control_database_makes_ready_unavailable_and_detail_names_it(tmp_path):
    """A Kasa process whose PostgreSQL is down: ready answers 503; /health/ (token) names the database (and the
    ORM broker on it)."""
    port = free_port()  # nothing listens: the server is stopped
    code = (
        "import django, json; django.setup();"
        "from django.test import Client; c = Client();"
        "r = c.get('/health/ready/');"
        f"d = c.get('/health/', headers={{'Authorization': 'Bearer {TOKEN}'}});"
        "print(json.dumps({'status': r.status_code, 'body': r.json(), 'detail': d.json()}))"
    )
    env = {"DJANGO_SETTINGS_MODULE": "config.settings", "PATH": "/usr/bin:/bin", "KASA_VAR_DIR": str(tmp_path),
           "DATABASE_URL": f"postgres://kasa:pw@127.0.0.1:{port}/kasa", "ALLOWED_HOSTS": "testserver",
           "KASA_METRICS_TOKEN": TOKEN}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=str(BASE_DIR))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["status"] == 503 and doc["body"] == {"status": "unavailable"}
    assert not doc["detail"]["checks"]["database"]["ok"] and not doc["detail"]["checks"]["broker"]["ok"]
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
    assert 'kasa_run_duration_seconds_count{kind="check",result="succeeded"} 1.0' in text  # a histogram
    assert 'kasa_customers{status="active"} 1.0' in text


@pytest.mark.smoke
@pytest.mark.django_db
def test_metrics_expose_rollouts_their_latest_gates_and_customers_by_version_in_constant_queries(
        client, make_customer, team, staff_user, tmp_path):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from console import metrics
    from customers.models import Customer, Team
    from rollouts import planning, services
    from rollouts.models import GateResult, Rollout
    from tests.rollout_fixtures import sync_fleet_releases

    releases = sync_fleet_releases(tmp_path / "pkg")
    ours = [make_customer(f"m{i}.example.com") for i in range(3)]
    theirs = make_customer("theirs.example.com", team_=Team.objects.create(name="metrics other team"))
    Customer.objects.filter(pk__in=[c.pk for c in ours[:2]]).update(versions={"app": "1.0.0"})
    Customer.objects.filter(pk__in=[ours[2].pk, theirs.pk]).update(versions={"app": "1.1.0", "api": ""})
    rollout = services.rollout_create(planning.plan(releases["1.1"], domains=["m0.example.com", "m1.example.com"],
                                                    percents="50,100", bakes="0"))
    other = services.rollout_create(planning.plan(releases["1.2"], domains=["theirs.example.com"], percents="100",
                                                  bakes="0"))
    wave = rollout.waves.get(position=1)
    GateResult.objects.create(rollout=rollout, wave=wave, gate="health", result="failed", summary="down")
    GateResult.objects.create(rollout=rollout, wave=wave, gate="health", result="successful", summary="up")
    text = client.get("/metrics").content.decode()
    assert f'kasa_rollout_state{{release="1.1",rollout="{rollout.pk}",status="scheduled"}} 1.0' in text
    assert f'kasa_rollout_state{{release="1.2",rollout="{other.pk}",status="scheduled"}} 1.0' in text
    assert f'kasa_rollout_gate_result{{gate="health",result="successful",rollout="{rollout.pk}",wave="1"}} 1.0' in text
    assert 'result="failed"' not in text  # only the latest of each gate
    assert 'kasa_customer_version{component="app",version="1.0.0"} 2.0' in text
    assert 'kasa_customer_version{component="app",version="1.1.0"} 2.0' in text
    assert 'component="api"' not in text  # no version: not counted

    # A rollout ended long ago is gone; a staff member sees their teams' rollouts and customers only.
    Rollout.objects.filter(pk=other.pk).update(status="completed", finished_at="2020-01-01T00:00:00Z")
    assert f'rollout="{other.pk}"' not in client.get("/metrics").content.decode()
    scoped = metrics.render(user=staff_user(team)).decode()
    assert f'rollout="{rollout.pk}"' in scoped
    assert 'kasa_customer_version{component="app",version="1.1.0"} 1.0' in scoped

    # The figures come from the database: as many queries for 13 customers as for 4.
    with CaptureQueriesContext(connection) as few:
        metrics.render()
    for i in range(9):
        make_customer(f"n{i}.example.com")
    Customer.objects.filter(domain__startswith="n").update(versions={"app": "1.0.0"})
    with CaptureQueriesContext(connection) as many:
        text = metrics.render().decode()
    assert 'kasa_customer_version{component="app",version="1.0.0"} 11.0' in text
    assert len(many.captured_queries) == len(few.captured_queries)


@pytest.mark.smoke
@pytest.mark.django_db
def test_metrics_can_require_a_bearer_token(client, settings):
    settings.KASA_METRICS_TOKEN = TOKEN
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": TOKEN}).status_code == 401  # the scheme is required
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


@pytest.mark.django_db
def test_a_non_ascii_authorization_header_is_refused_not_an_error(client, settings):
    settings.KASA_METRICS_TOKEN = TOKEN
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer t\u00f6ken")
    assert response.status_code == 401


@pytest.mark.django_db
def test_deployed_metrics_answer_the_token_the_fleet_and_staff_their_teams(client, settings, make_customer,
                                                                           staff_user, team, django_user_model):
    from customers.models import Team

    settings.DEPLOYED = True
    settings.KASA_METRICS_TOKEN = TOKEN
    ours = make_customer()
    theirs = make_customer(team_=Team.objects.create(name="another team"))

    def seen(response):
        assert response.status_code == 200, response.content
        text = response.content.decode()
        return {c.domain for c in (ours, theirs) if f'customer="{c.domain}"' in text}

    assert seen(client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})) == {ours.domain,
                                                                                          theirs.domain}
    client.force_login(staff_user(team))
    assert seen(client.get("/metrics")) == {ours.domain}
    assert 'kasa_customers{status="active"} 1.0' in client.get("/metrics").content.decode()
    client.force_login(django_user_model.objects.create_superuser("root-user", password="pw-Secret-123"))
    assert seen(client.get("/metrics")) == {ours.domain, theirs.domain}
    client.force_login(django_user_model.objects.create_user("plain-user", password="pw-Secret-123"))
    response = client.get("/metrics")
    assert response.status_code == 403 and ours.domain not in response.content.decode()


@pytest.mark.django_db
def test_deployed_metrics_without_a_token_answer_staff_only(client, settings, staff_user):
    settings.DEPLOYED = True
    settings.KASA_METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 401
    client.force_login(staff_user())
    assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize(("token", "expected"), [("", "kasa.W001"), ("short-token", "kasa.W002"), ("k" * 32, None)])
def test_the_deploy_check_wants_a_long_metrics_token(settings, token, expected):
    from django.core import checks

    settings.DEPLOYED = True
    settings.KASA_METRICS_TOKEN = token
    ids = [m.id for m in checks.run_checks(include_deployment_checks=True, tags=[checks.Tags.security])
           if m.id.startswith("kasa.")]
    assert ids == ([expected] if expected else [])
    settings.DEPLOYED = False
    assert not [m for m in checks.run_checks(include_deployment_checks=True) if m.id.startswith("kasa.")]


def test_s3_default_storage_by_environment_alone(s3_server, tmp_path):
    """KASA_S3_BUCKET switches Django's default storage to S3 (django-storages); /health/ready/ probes it."""
    code = (
        "import django, json; django.setup();"
        "from django.core.files.base import ContentFile; from django.core.files.storage import default_storage;"
        "from django.test import Client;"
        "name = default_storage.save('probe/hello.txt', ContentFile(b'hi'));"
        f"r = Client().get('/health/', headers={{'Authorization': 'Bearer {TOKEN}'}});"
        "from django.core.files.storage import storages;"
        "print(json.dumps({'cls': type(storages['default']).__name__, 'name': name,"
        " 'storage': r.json()['checks']['storage']}))"
    )
    env = {"DJANGO_SETTINGS_MODULE": "config.settings", "PATH": "/usr/bin:/bin", "KASA_VAR_DIR": str(tmp_path),
           "ALLOWED_HOSTS": "testserver", "KASA_S3_BUCKET": s3_server.bucket,
           "KASA_S3_ENDPOINT_URL": s3_server.endpoint, "KASA_S3_REGION": s3_server.region,
           "KASA_S3_ACCESS_KEY_ID": s3_server.access_key,
           "KASA_S3_SECRET_ACCESS_KEY": s3_server.secret_key, "KASA_S3_PREFIX": "kasa", "KASA_METRICS_TOKEN": TOKEN}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=str(BASE_DIR))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["cls"] == "S3Storage" and doc["storage"]["ok"] and "S3Storage" in doc["storage"]["detail"], doc
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"kasa/{doc['name']}")["Body"].read()
    assert body == b"hi"


def test_s3_storage_check_fails_for_a_missing_bucket(s3_server, tmp_path):
    """A HEAD of a key in a missing bucket is a 404 like a missing key: the check lists instead."""
    code = (
        "import django, json; django.setup();"
        "from core.health import run_checks;"
        "print(json.dumps(run_checks()['storage']))"
    )
    env = {"DJANGO_SETTINGS_MODULE": "config.settings", "PATH": "/usr/bin:/bin", "KASA_VAR_DIR": str(tmp_path),
           "KASA_S3_BUCKET": s3_server.bucket + "-missing", "KASA_S3_ENDPOINT_URL": s3_server.endpoint,
           "KASA_S3_REGION": s3_server.region, "KASA_S3_ACCESS_KEY_ID": s3_server.access_key,
           "KASA_S3_SECRET_ACCESS_KEY": s3_server.secret_key}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=str(BASE_DIR))
    assert out.returncode == 0, out.stderr
    storage = json.loads(out.stdout.strip().splitlines()[-1])
    assert not storage["ok"] and "NoSuchBucket" in storage["detail"], storage
