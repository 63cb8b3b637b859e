"""Numbers a person reads: one set of helpers (engines.humanize) in the admin, the CLI, run logs and
notifications; JSON keeps raw numbers."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re

import pytest
from django.core import mail
from django.core.management import call_command
from django.template import Context, Template
from django.urls import reverse

from backups.models import Backup, BackupPolicy
from backups.services import default_target, global_policy
from engines.humanize import human_size
from operations.models import RunLogLine

MICROSECONDS = re.compile(r"\d\d:\d\d:\d\d\.\d")
HUMAN_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")


@pytest.fixture
def small_customer(make_customer, customer_root, staff_user, settings):
    """A customer whose backup is a few kB, its policy mailing every result."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.DEFAULT_FROM_EMAIL = "kasa@example.test"
    mail.outbox = []
    (customer_root / "backend").mkdir(parents=True, exist_ok=True)
    (customer_root / "backend" / "data.bin").write_bytes(os.urandom(3000))  # incompressible: a few kB stored
    customer = make_customer()
    global_policy()
    BackupPolicy.objects.create(customer=customer, target=default_target(), notify_emails="ops@example.test",
                                notify_on_success=True)
    return customer


def _cli(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_a_small_backup_reads_in_kb_in_the_cli_the_run_log_the_notification_and_the_admin_list(
        small_customer, client, staff_user):
    said = _cli("backup", small_customer.domain)
    bk = Backup.objects.get(customer=small_customer)
    assert bk.status == "succeeded" and 1000 <= bk.size < 1_000_000
    size = human_size(bk.size)
    assert size.endswith(" kB") and size != "0.0 MB"
    # CLI: the size in kB, the duration and a timestamp to the second
    assert f": {size} in " in said and "0.0 MB" not in said
    assert HUMAN_TIME.search(said) and not MICROSECONDS.search(said), said
    listed = _cli("backup_list", small_customer.domain)
    assert size in listed and HUMAN_TIME.search(listed) and not MICROSECONDS.search(listed), listed
    # JSON keeps the raw numbers
    doc = json.loads(_cli("backup_list", small_customer.domain, "--json"))[0]
    assert doc["size"] == bk.size and isinstance(doc["size"], int)
    # the run log
    lines = list(RunLogLine.objects.filter(run=bk.run).values_list("text", flat=True))
    assert any(line.endswith(f"complete: {bk.artifacts.count()} artifacts, {size}") for line in lines), lines
    assert not any("0.0 MB" in line for line in lines)
    # the notification
    assert len(mail.outbox) == 1
    body = mail.outbox[0].body
    assert f"Size: {size}" in body and HUMAN_TIME.search(body) and not MICROSECONDS.search(body), body
    # the admin's backup list, for a member of the customer's team
    user = staff_user(small_customer.team)
    client.force_login(user)
    page = client.get(reverse("admin:backups_backup_changelist")).content.decode()
    assert f'<td class="field-size_display">{size}</td>' in page


@pytest.mark.django_db(transaction=True)
def test_cli_durations_and_schedule_times_have_no_microseconds(small_customer):
    _cli("backup", small_customer.domain)
    bk = Backup.objects.get(customer=small_customer)
    said = _cli("verify", str(bk.pk))
    assert re.fullmatch(rf"backup #{bk.pk} verified in \d+\.\d s\n", said), said
    BackupPolicy.objects.filter(customer=small_customer).update(schedule="daily")
    schedules = _cli("backup_schedules")
    assert not MICROSECONDS.search(schedules) and "+00:00" not in schedules, schedules


@pytest.mark.smoke
def test_template_filters_use_the_same_helpers():
    text = Template("{% load kasa_humanize %}{{ small|human_size }} | {{ none|human_size }} | "
                    "{{ secs|human_duration }} | {{ delta|human_duration }} | {{ when|human_time }} | "
                    "{{ none|human_time }}").render(Context({
                        "small": 812, "none": None, "secs": 185.4, "delta": dt.timedelta(hours=2, minutes=5),
                        "when": dt.datetime(2026, 12, 5, 0, 31, 7, 123456, tzinfo=dt.UTC)}))
    assert text == "812 B | — | 3 min 05 s | 2 h 05 min | 2026-12-05 00:31:07 UTC | —"
