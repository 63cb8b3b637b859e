"""docker-compose.yml stays true to Kasa: every variable it gives Kasa's containers is one Kasa reads, every
setting production needs is set there or demanded from .env (`${VAR:?…}`), and its health checks call endpoints
that exist. The file is read as Compose reads it (YAML anchors and merge keys); nothing is started here
(tests/test_image.py runs the image itself)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from django.urls import Resolver404, resolve

BASE_DIR = Path(__file__).resolve().parent.parent
COMPOSE = BASE_DIR / "docker-compose.yml"
KASA_PACKAGES = ("config", "core", "customers", "hosts", "backups", "releases", "upgrades", "rollouts", "operations",
                 "audit", "engines", "console")
# Read by what the image runs besides Kasa's code: Django, Python.
READ_BY_THE_RUNTIME = {"DJANGO_SETTINGS_MODULE", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PATH"}
# What production cannot do without, and why. SECRET_KEY and KASA_SECRET_KEYS are added from settings.py's own
# refusal below, so a name added there is checked here too.
PRODUCTION_NEEDS = {
    "KASA_ENV": "production's checks (secure cookies, HTTPS redirect, refusing to start without keys)",
    "DATABASE_URL": "one control database for migrate, web and worker (the default is a SQLite file per container)",
    "REDIS_URL": "the task queue and the live-log channel layer shared by web and worker containers",
    "KASA_BACKUP_KEYS": "a deployed Kasa refuses to write backups unencrypted and has no key without it",
    "ALLOWED_HOSTS": "a deployed Kasa's default is none: every request would be refused",
    "KASA_VAR_DIR": "the volume Kasa's own files live on",
    "KASA_CUSTOMERS_ROOT": "the volume the customers' folders live on",
}
ENV_READ = re.compile(r"""(?:env\.[a-z_]+\(|os\.environ\.get\(|os\.getenv\(|os\.environ\[)\s*"""
                      r"""["']([A-Z][A-Z0-9_]*)["']""")
HEALTH_URL = re.compile(r"https?://(?:127\.0\.0\.1|localhost)(?::\d+)?(/[^'\"\s)]*)")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def kasa_services() -> dict[str, dict]:
    """The services that run Kasa's image (not PostgreSQL's or Redis's)."""
    services = compose()["services"]
    kasa = {name: s for name, s in services.items() if "build" in s or str(s.get("image", "")).startswith("kasa")}
    assert {"migrate", "web", "worker"} <= set(kasa), sorted(services)
    return kasa


def variables_kasa_reads() -> set[str]:
    names = set()
    for package in KASA_PACKAGES:
        for path in (BASE_DIR / package).rglob("*.py"):
            names.update(ENV_READ.findall(path.read_text()))
    return names | READ_BY_THE_RUNTIME


def refused_without() -> set[str]:
    """The names settings.py refuses to start a deployed Kasa without (its `missing = [...]` check)."""
    text = (BASE_DIR / "config" / "settings.py").read_text()
    found = re.search(r"missing = \[n for n in \(([^)]*)\)", text)
    assert found, "settings.py's refusal to start without its keys moved: update this test"
    return set(re.findall(r'"([A-Z_]+)"', found.group(1)))


def test_every_variable_compose_gives_kasa_is_one_kasa_reads():
    reads = variables_kasa_reads()
    assert {"SECRET_KEY", "DATABASE_URL", "KASA_ADMIN_PASSWORD"} <= reads  # the scan itself finds reads
    for name, service in kasa_services().items():
        unknown = sorted(set(service.get("environment", {})) - reads)
        assert not unknown, f"service {name} sets variables Kasa never reads: {unknown}"


def test_every_setting_production_needs_is_set_or_demanded_in_compose():
    needs = set(PRODUCTION_NEEDS) | refused_without()
    for name, service in kasa_services().items():
        env = service.get("environment", {})
        for var in sorted(needs):
            value = str(env.get(var, ""))
            why = PRODUCTION_NEEDS.get(var, "starting at all")
            assert value, f"service {name}: {var} is not set (needed for {why})"
            if "${" + var in value:  # from .env: demanded (`:?`), or with a usable default (`:-something`)
                usable = re.search(r"\$\{" + var + r"(:\?|:-)[^}]+\}", value)
                assert usable, f"service {name}: {var}={value!r} may be empty"
    assert compose()["services"]["web"]["environment"]["KASA_ENV"] == "production"


def test_compose_health_checks_call_endpoints_kasa_serves():
    checked = 0
    for name, service in kasa_services().items():
        test = service.get("healthcheck", {}).get("test")
        if not test:
            continue
        command = " ".join(test) if isinstance(test, list) else test
        urls = HEALTH_URL.findall(command)
        assert urls, f"service {name}'s health check calls no URL of Kasa: {command}"
        for path in urls:
            try:
                match = resolve(path)
            except Resolver404:
                pytest.fail(f"service {name}'s health check calls {path}, which Kasa does not serve")
            assert match.url_name.startswith("health"), (name, path, match.url_name)
            checked += 1
        # The check's Host header is 127.0.0.1: a deployed Kasa answers it only when it is an allowed host.
        assert "127.0.0.1" in str(service["environment"]["ALLOWED_HOSTS"]).split(","), name
    assert checked, "no Kasa service in docker-compose.yml has a health check"


def test_the_web_service_runs_the_images_default_command():
    """The web service repeats the Dockerfile's CMD (compose has no way to say "the image's"): they must agree."""
    dockerfile = (BASE_DIR / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd, "the Dockerfile has no CMD in exec form"
    assert yaml.safe_load(cmd.group(1)) == compose()["services"]["web"]["command"]


def test_a_variable_kasa_does_not_read_would_be_caught(monkeypatch):
    services = {"web": {"build": ".", "environment": {"KASA_ENV": "production", "KASA_BACKUP_KEY": "typo"}},
                "migrate": {"build": "."}, "worker": {"build": "."}}
    monkeypatch.setattr(yaml, "safe_load", lambda _text: {"services": services})
    with pytest.raises(AssertionError, match="KASA_BACKUP_KEY"):
        test_every_variable_compose_gives_kasa_is_one_kasa_reads()
