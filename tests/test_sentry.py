"""Sentry, for real: Kasa's settings initialise the real sentry-sdk from SENTRY_DSN (core.sentry.init), in a
separate `manage.py` process with the environment a deployment gives it; the envelopes go to a small HTTP
receiver in the test (a Sentry stand-in on 127.0.0.1). Distinctive secrets are planted in the environment (as a
.env file would put them), in the customer's database password and in the settings; none may appear anywhere
in the raw envelope bytes."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.conf import settings

from operations.models import Run

from .conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent


class Receiver:
    """Records every envelope POSTed to /api/<project>/envelope/ (decompressed), answers 200."""

    def __init__(self):
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802  (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                elif self.headers.get("Content-Encoding"):
                    body = b"UNDECODED " + self.headers["Content-Encoding"].encode() + b" " + body
                outer.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.dsn = f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        """The event items of the envelopes (a header line, then item header / payload line pairs)."""
        out = []
        for body in self.bodies:
            lines = body.split(b"\n")
            for head, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(head).get("type") == "event":
                    out.append(json.loads(payload))
        return out

    def raw(self) -> bytes:
        return b"\n".join(self.bodies)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def planted() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {"SECRET_KEY": f"planted-django-secret-{tag}", "KASA_METRICS_TOKEN": f"planted-metrics-token-{tag}",
            "EMAIL_HOST_PASSWORD": f"planted-mail-password-{tag}", "KASA_ALERT_WEBHOOK_TOKEN": f"planted-hook-{tag}"}


def secrets_of(env: dict[str, str]) -> list[str]:
    """Every secret the process had: the planted values and the real keys the test environment gives it."""
    found = [v for k, v in env.items() if k in planted() and v]
    for name in ("KASA_SECRET_KEYS", "KASA_BACKUP_KEYS"):
        value = env.get(name) or getattr(settings, name, "")
        found += [value, *[p for p in value.replace(",", " ").replace(":", " ").split() if len(p) >= 12]]
    return [s for s in found if s]


def manage(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.django_db(transaction=True)
def test_a_failed_backup_reports_an_event_naming_the_run_and_customer_and_no_secret(
        receiver, subprocess_env, make_customer, pg_database):
    secrets = planted()
    # The test server trusts local connections (any password is taken), so the dump fails on a database that is
    # not there; the planted password is still the customer's, handed to pg_dump and masked by the run.
    db_password = f"planted-db-password-{uuid.uuid4().hex[:12]}"
    url = pg_database["url"].replace(pg_database["password"], db_password) + "_missing"  # the database name
    customer = make_customer(databases=[("main", url)])
    env = {**subprocess_env, **secrets, "SENTRY_DSN": receiver.dsn}

    done = manage(env, "backup", customer.domain)
    assert done.returncode != 0, done.stdout + done.stderr
    run = Run.objects.get(customer=customer, kind="backup")
    assert run.status == "failed"
    wait_until(lambda: receiver.events(), timeout=10, what="an event at the receiver")

    event = next(e for e in receiver.events() if (e.get("tags") or {}).get("run_id") == str(run.pk))
    assert event["tags"]["customer"] == customer.domain and event["tags"]["run_kind"] == "backup"
    assert event["contexts"]["run"]["id"] == run.pk and event["contexts"]["run"]["customer"] == customer.domain
    text = json.dumps(event)
    assert f"#{run.pk}" in text and "failed" in text
    raw = receiver.raw()
    for secret in [*secrets_of(env), db_password]:
        assert secret.encode() not in raw, f"a secret reached Sentry: {secret[:18]}…"


@pytest.mark.django_db(transaction=True)
def test_kasa_scrubs_secrets_an_error_carries_before_it_leaves(receiver, subprocess_env):
    """The scrubber itself, on the real SDK's path: an error whose message and exception carry every planted
    secret (and a URL's password) reaches the receiver with each one replaced."""
    secrets = planted()
    env = {**subprocess_env, **secrets, "SENTRY_DSN": receiver.dsn,
           "KASA_DEMO_POSTGRES_URL": "postgres://kasa:planted-url-password-xyz@127.0.0.1:5432/kasa"}
    code = ("import logging, os\n"
            "from django.conf import settings\n"
            "names = ['SECRET_KEY', 'KASA_METRICS_TOKEN', 'EMAIL_HOST_PASSWORD', 'KASA_ALERT_WEBHOOK_TOKEN',\n"
            "         'KASA_BACKUP_KEYS', 'KASA_SECRET_KEYS']\n"
            "leak = ' '.join(os.environ.get(n, '') for n in names) + ' planted-url-password-xyz'\n"
            "try:\n"
            "    raise RuntimeError('boom ' + leak)\n"
            "except RuntimeError:\n"
            "    logging.getLogger('kasa.test').exception('failed with %s', leak)\n")
    done = manage(env, "shell", "-c", code)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: receiver.events(), timeout=10, what="an event at the receiver")
    raw = receiver.raw()
    assert b"[Filtered]" in raw and b"boom" in raw
    for secret in [*secrets_of(env), "planted-url-password-xyz"]:
        assert secret.encode() not in raw, f"a secret reached Sentry: {secret[:18]}…"
