"""Settings come from the environment: what production refuses, what it accepts, how it logs.

Each test runs `manage.py` in a fresh subprocess, because settings are read
once at import: the environment of that process is the thing under test.
Nothing here touches the suite's control database; each subprocess gets its
own KASA_VAR_DIR (and so its own SQLite file when it needs one).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

BASE_DIR = Path(__file__).resolve().parent.parent

# Variables of the calling environment that would change what is under test.
SCRUBBED = (
    "DATABASE_URL", "REDIS_URL", "SECRET_KEY", "KASA_SECRET_KEYS", "KASA_ENV", "DEBUG", "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS", "SENTRY_DSN", "LOG_LEVEL", "KASA_CUSTOMERS_ROOT", "KASA_STORAGE_DIR",
    "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SECURE_HSTS_PRELOAD", "KASA_METRICS_TOKEN",
    "KASA_PROBE_CACHE_SECONDS",
)


def base_env(var_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(DJANGO_SETTINGS_MODULE="config.settings", KASA_VAR_DIR=str(var_dir), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def production_env(var_dir: Path, **extra: str) -> dict[str, str]:
    values = {
        "KASA_ENV": "production",
        "SECRET_KEY": secrets.token_urlsafe(64),  # 86 random characters
        "KASA_SECRET_KEYS": f"{secrets.token_urlsafe(40)},{secrets.token_urlsafe(40)}",
        "ALLOWED_HOSTS": "kasa.example.com",
        "DATABASE_URL": f"sqlite:///{var_dir / 'prod.sqlite3'}",
        "KASA_METRICS_TOKEN": secrets.token_urlsafe(32),  # without it check --deploy warns (kasa.W001)
    }
    return base_env(var_dir, **{**values, **extra})


def manage(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, capture_output=True,
                          text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --- production refuses to start without its secrets ---------------------------------
@pytest.mark.parametrize("missing", ["SECRET_KEY", "KASA_SECRET_KEYS"])
@pytest.mark.parametrize("kasa_env", ["production", "staging"])
def test_deployed_environment_refuses_to_start_without_a_secret(tmp_path, missing, kasa_env):
    env = production_env(tmp_path, KASA_ENV=kasa_env)
    del env[missing]
    res = manage("check", env=env)
    assert res.returncode != 0, res.stdout
    message = last_line(res.stderr)
    assert "ImproperlyConfigured" in message, res.stderr[-2000:]
    assert f"{kasa_env} refuses to start without {missing}" in message
    # The other (present) variable is not blamed.
    other = "KASA_SECRET_KEYS" if missing == "SECRET_KEY" else "SECRET_KEY"
    assert not re.search(rf"\b{other}\b", message.split("without", 1)[1])
    # Nothing was generated in the var dir as a silent fallback.
    assert not (tmp_path / "django_secret_key").exists()
    assert not (tmp_path / "kasa_secret_keys").exists()


def test_production_names_both_missing_variables(tmp_path):
    env = production_env(tmp_path)
    del env["SECRET_KEY"], env["KASA_SECRET_KEYS"]
    res = manage("check", env=env)
    assert res.returncode != 0
    assert "production refuses to start without SECRET_KEY, KASA_SECRET_KEYS" in last_line(res.stderr)


def test_an_empty_secret_counts_as_missing(tmp_path):
    res = manage("check", env=production_env(tmp_path, SECRET_KEY=""))
    assert res.returncode != 0
    assert "production refuses to start without SECRET_KEY" in last_line(res.stderr)


@pytest.mark.parametrize("kasa_env", ["production", "development"])
def test_a_secret_key_shorter_than_32_characters_is_refused(tmp_path, kasa_env):
    good = secrets.token_urlsafe(40)
    short = "x" * 31
    env = production_env(tmp_path, KASA_ENV=kasa_env, KASA_SECRET_KEYS=f"{good},{short}")
    res = manage("check", env=env)
    assert res.returncode != 0, res.stdout
    message = last_line(res.stderr)
    assert "KASA_SECRET_KEYS: secret key #2 is shorter than 32 characters" in message, res.stderr[-2000:]
    assert short not in res.stderr and good not in res.stderr  # the refusal never echoes key material


def test_a_key_of_exactly_32_characters_is_accepted(tmp_path):
    res = manage("check", env=production_env(tmp_path, KASA_SECRET_KEYS="k" * 32))
    assert res.returncode == 0, res.stderr[-2000:]


def test_unknown_kasa_env_is_refused(tmp_path):
    res = manage("check", env=base_env(tmp_path, KASA_ENV="prod"))
    assert res.returncode != 0
    assert "KASA_ENV must be development, staging or production, not 'prod'" in last_line(res.stderr)


# --- a production environment passes Django's deployment checks --------------------------
# docker-compose.yml passes optional variables as empty strings: they must mean "not set". (An empty
# KASA_METRICS_TOKEN is "not set" too, and warned about: tests/security/test_endpoints.py.)
COMPOSE_EMPTY = {"CSRF_TRUSTED_ORIGINS": "", "SENTRY_DSN": ""}


@pytest.mark.parametrize("extra", [{}, COMPOSE_EMPTY], ids=["plain", "compose-empty-optionals"])
def test_check_deploy_is_clean_in_production(tmp_path, extra):
    res = manage("check", "--deploy", "--fail-level", "WARNING", env=production_env(tmp_path, **extra))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "System check identified no issues" in res.stdout
    assert "WARNINGS" not in res.stdout + res.stderr


def test_check_deploy_is_clean_in_production_on_postgresql(tmp_path, pg_server):
    url = f"postgres://postgres@{pg_server['host']}:{pg_server['port']}/postgres"
    res = manage("check", "--deploy", "--fail-level", "WARNING", "--database", "default",
                 env=production_env(tmp_path, DATABASE_URL=url))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "System check identified no issues" in res.stdout


def test_check_deploy_flags_debug_in_production(tmp_path):
    """The check is a real gate: turning DEBUG on in production makes it fail."""
    res = manage("check", "--deploy", "--fail-level", "WARNING", env=production_env(tmp_path, DEBUG="true"))
    assert res.returncode != 0
    assert "security.W018" in res.stdout + res.stderr


# --- logs: JSON lines on stdout when deployed, plain in development -----------------------
LOG_SNIPPET = (
    "import logging, django_q.conf\n"
    "logging.getLogger('operations.services').warning('run %s lost', 7, extra={'run_id': 7})\n"
    "logging.getLogger('django.request').error('boom')\n"
    "django_q.conf.logger.info('cluster says hi')\n"
)


def _log_output(env: dict[str, str]) -> list[str]:
    res = manage("shell", "-v", "0", "-c", LOG_SNIPPET, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "run 7 lost" not in res.stderr  # logs go to stdout, not stderr
    return [ln for ln in res.stdout.splitlines() if ln.strip()]


@pytest.mark.parametrize("kasa_env", ["staging", "production"])
def test_logs_are_json_lines_on_stdout_when_deployed(tmp_path, kasa_env):
    lines = _log_output(production_env(tmp_path, KASA_ENV=kasa_env))
    records = [json.loads(ln) for ln in lines]  # every stdout line is one JSON object
    assert [r["logger"] for r in records] == ["operations.services", "django.request", "django-q"]
    first = records[0]
    assert first["level"] == "warning" and first["msg"] == "run 7 lost" and first["run_id"] == 7
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", first["ts"])
    assert records[2]["msg"] == "cluster says hi"


def test_logs_are_plain_text_in_development(tmp_path):
    lines = _log_output(base_env(tmp_path))
    assert len(lines) == 3
    for ln in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(ln)
    assert re.search(r" WARNING operations\.services: run 7 lost$", lines[0])
    assert lines[2].endswith("INFO django-q: cluster says hi")


# --- default control database: SQLite in WAL mode, inside KASA_VAR_DIR -----------------
@pytest.mark.smoke
def test_default_control_database_is_sqlite_in_wal_mode(tmp_path):
    code = (
        "from django.db import connection\n"
        "with connection.cursor() as c:\n"
        "    c.execute('PRAGMA journal_mode')\n"
        "    print(connection.vendor, c.fetchone()[0], connection.settings_dict['NAME'])\n"
    )
    res = manage("shell", "-v", "0", "-c", code, env=base_env(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    vendor, mode, name = last_line(res.stdout).split(" ", 2)
    assert (vendor, mode) == ("sqlite", "wal")
    assert Path(name) == tmp_path.resolve() / "kasa.sqlite3"
    # WAL is a property of the file: a plain sqlite3 connection sees it too.
    import sqlite3

    con = sqlite3.connect(name)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()
    # Development generated its keys into the var dir, readable by the owner only.
    for generated in ("django_secret_key", "kasa_secret_keys"):
        path = tmp_path / generated
        assert path.stat().st_mode & 0o777 == 0o600
        assert len(path.read_text().strip()) >= 32
