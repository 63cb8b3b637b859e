"""Backup notifications: email (Django's locmem outbox) and a Slack-compatible webhook (a real local HTTP server).

Backups run in this process (`manage.py backup` in the foreground), so the
notification is sent exactly where the worker would send it.
"""

import json
import os
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from backups.models import Backup, BackupPolicy, CustomerBackupState
from backups.notify import backup_finished, missed_backups_check
from backups.services import default_target, global_policy
from tests.conftest import free_port

DB_PASSWORD = "pw-Notify-Secret-5c1e"
EMAILS = "ops@example.com, oncall@example.com"


class _Hook:
    def __init__(self):
        self.posts: list[dict] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.posts.append({"path": self.path, "content_type": self.headers.get("Content-Type"),
                                   "json": json.loads(body)})
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def texts(self) -> list[str]:
        return [p["json"]["text"] for p in self.posts]


@pytest.fixture
def webhook():
    hook = _Hook()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


@pytest.fixture
def mail_settings(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.DEFAULT_FROM_EMAIL = "kasa@example.test"
    settings.KASA_BASE_URL = "https://kasa.example.test"
    mail.outbox = []
    return settings


def _policy(customer, webhook_url, **extra):
    global_policy()
    return BackupPolicy.objects.create(customer=customer, target=default_target(), notify_emails=EMAILS,
                                       webhook_url=webhook_url, **extra)


@pytest.fixture
def failing_customer(make_customer, customer_root):
    """Its PostgreSQL database is unreachable: every backup fails at the dump."""
    (customer_root / "backend" / "app.js").parent.mkdir(parents=True, exist_ok=True)
    (customer_root / "backend" / "app.js").write_text("console.log('hi')\n")
    return make_customer(databases=[("main", f"postgresql://shop:{DB_PASSWORD}@127.0.0.1:{free_port()}/shop")])


@pytest.fixture
def good_customer(make_customer, customer_root):
    root = customer_root.with_name(customer_root.name + "-good")  # its own root, beside: a test may use both
    (root / "backend").mkdir(parents=True)
    (root / "backend" / "data.bin").write_bytes(os.urandom(50_000))
    (root / "backend" / ".env").write_text("PORT=3000\n")
    return make_customer(root=root)


def _everything_sent(hook) -> str:
    return "\n".join([m.subject + "\n" + m.body for m in mail.outbox] + [json.dumps(p["json"]) for p in hook.posts])


@pytest.mark.django_db(transaction=True)
def test_a_failed_backup_is_emailed_and_posted_to_the_webhook_without_secrets(failing_customer, webhook,
                                                                               mail_settings):
    _policy(failing_customer, webhook.url)
    with pytest.raises(CommandError):
        call_command("backup", failing_customer.domain)
    bk = Backup.objects.get(customer=failing_customer)
    assert bk.status == "failed"

    assert len(mail.outbox) == 1
    msg = mail.outbox[0]
    assert msg.to == ["ops@example.com", "oncall@example.com"] and msg.from_email == "kasa@example.test"
    assert "FAILED" in msg.subject and failing_customer.domain in msg.subject and f"#{bk.pk}" in msg.subject
    for part in (f"Customer: {failing_customer.domain}", f"Backup: #{bk.pk}", "Status: failed",
                 "Error: ", "cannot connect to PostgreSQL", "Size: ", "Duration: ",
                 "https://kasa.example.test" + reverse("admin:backups_backup_change", args=[bk.pk])):
        assert part in msg.body, part

    assert len(webhook.posts) == 1
    post = webhook.posts[0]
    assert post["content_type"] == "application/json" and post["path"] == "/services/T000/B000/token"
    text = post["json"]["text"]
    assert failing_customer.domain in text and f"#{bk.pk}" in text and "failed" in text.lower()
    assert "cannot connect to PostgreSQL" in text and post["json"]["attachments"][0]["color"] == "danger"

    assert DB_PASSWORD not in _everything_sent(webhook)


@pytest.mark.django_db(transaction=True)
def test_a_secret_inside_an_error_message_is_masked(failing_customer, webhook, mail_settings):
    _policy(failing_customer, webhook.url)
    bk = Backup.objects.create(
        customer=failing_customer, target=default_target(), status=Backup.Status.FAILED,
        started_at=timezone.now(), finished_at=timezone.now(),
        error=f"pg_dump: postgresql://shop:{DB_PASSWORD}@db:5432/shop refused; password={DB_PASSWORD}; "
              f"s3://AKIA:other-Secret-9@bucket",
    )
    backup_finished(bk.pk)
    sent = _everything_sent(webhook)
    assert len(mail.outbox) == 1 and len(webhook.posts) == 1
    assert DB_PASSWORD not in sent and "other-Secret-9" not in sent
    assert "postgresql://shop:********@db:5432/shop" in sent


@pytest.mark.django_db(transaction=True)
def test_a_success_is_silent_unless_the_policy_asks_for_it(good_customer, webhook, mail_settings):
    policy = _policy(good_customer, webhook.url)
    call_command("backup", good_customer.domain)
    assert mail.outbox == [] and webhook.posts == []

    policy.notify_on_success = True
    policy.save()
    call_command("backup", good_customer.domain)
    bk = Backup.objects.filter(customer=good_customer).order_by("-pk").first()
    assert bk.status == "succeeded"
    assert len(mail.outbox) == 1 and "succeeded" in mail.outbox[0].subject and f"#{bk.pk}" in mail.outbox[0].body
    assert "Status: succeeded" in mail.outbox[0].body and "Error:" not in mail.outbox[0].body
    assert len(webhook.posts) == 1 and webhook.posts[0]["json"]["attachments"][0]["color"] == "good"


@pytest.mark.django_db(transaction=True)
def test_a_dead_webhook_or_mail_server_changes_nothing_about_the_backup(failing_customer, good_customer, webhook,
                                                                        mail_settings):
    mail_settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    mail_settings.EMAIL_HOST, mail_settings.EMAIL_PORT = "127.0.0.1", free_port()  # nothing listens
    _policy(failing_customer, f"http://127.0.0.1:{free_port()}/hook")  # nothing listens either
    with pytest.raises(CommandError) as info:
        call_command("backup", failing_customer.domain)
    assert "cannot connect to PostgreSQL" in str(info.value)  # the backup's own error, not a mail error
    bk = Backup.objects.get(customer=failing_customer)
    assert bk.status == "failed" and "notif" not in bk.error
    assert backup_finished(bk.pk) == {"email": False, "webhook": False}

    webhook.status = 500  # a webhook that answers with an error
    _policy(good_customer, webhook.url, notify_on_success=True)
    call_command("backup", good_customer.domain)
    assert Backup.objects.get(customer=good_customer).status == "succeeded"
    assert len(webhook.posts) == 1


@pytest.mark.django_db(transaction=True)
def test_a_missed_backup_is_alerted_once_per_lapse_and_rearmed_by_a_success(good_customer, webhook, mail_settings):
    _policy(good_customer, webhook.url, schedule=BackupPolicy.Schedule.DAILY)
    t0 = timezone.now()

    assert missed_backups_check(t0)["alerted"] == []  # just created: within its schedule
    assert missed_backups_check(t0 + timedelta(days=2))["alerted"] == [good_customer.domain]
    assert len(mail.outbox) == 1 and len(webhook.posts) == 1
    msg = mail.outbox[0]
    assert msg.subject == f"[Kasa] Missed backup: {good_customer.domain}"
    assert "Last successful backup: never" in msg.body
    assert "36 h 15 min" in msg.body and good_customer.domain in webhook.texts()[0]
    state = CustomerBackupState.objects.get(customer=good_customer)
    assert state.missed_alert_at == t0 + timedelta(days=2) and state.missed_since

    # The next checks of the same lapse stay quiet.
    assert missed_backups_check(t0 + timedelta(days=2, minutes=5))["alerted"] == []
    assert missed_backups_check(t0 + timedelta(days=3))["alerted"] == []
    assert len(mail.outbox) == 1 and len(webhook.posts) == 1

    # A success ends the lapse; the next lapse is alerted again (once).
    call_command("backup", good_customer.domain)
    done = Backup.objects.get(customer=good_customer, status="succeeded").finished_at
    state.refresh_from_db()
    assert state.missed_alert_at is None and state.missed_since is None
    assert missed_backups_check(done + timedelta(hours=30))["alerted"] == []
    report = missed_backups_check(done + timedelta(hours=37))
    assert report["alerted"] == [good_customer.domain]
    assert missed_backups_check(done + timedelta(hours=38))["alerted"] == []
    assert len(mail.outbox) == 2 and "Last successful backup: 20" in mail.outbox[1].body
    assert len(webhook.posts) == 2
    assert DB_PASSWORD not in _everything_sent(webhook)


@pytest.mark.django_db(transaction=True)
def test_unscheduled_customers_and_narrower_backups_do_not_count(good_customer, make_customer, webhook,
                                                                 mail_settings):
    _policy(good_customer, webhook.url, schedule=BackupPolicy.Schedule.HOURLY, scope="full")
    other = make_customer()
    _policy(other, webhook.url, schedule=BackupPolicy.Schedule.NONE)
    call_command("backup", good_customer.domain, "--scope", "config")  # not what the policy asks for
    report = missed_backups_check(timezone.now() + timedelta(hours=2))
    assert report["alerted"] == [good_customer.domain] and report["checked"] == 1
