"""Notifications about backups: email and a Slack-compatible webhook.

- `backup_finished(backup_id)`: called after every backup ends. A failure is
  always reported; a success only when the policy says notify_on_success.
- `missed_backups_check()`: every five minutes (backups.tasks.check_missed_backups);
  one alert per lapse when a customer's last successful backup is older than
  its schedule allows (see backups.schedules.allowed_age).

Recipients come from the customer's effective policy (notify_emails,
webhook_url). Sending never raises into the caller: a dead SMTP server or
webhook is logged as a warning and the backup's outcome is unchanged. Every
text goes through `_redact`: the customer's database passwords, the storage
credentials and any `user:password@` in a URL are masked.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.core.mail import send_mail
from django.db.models import Max
from django.urls import reverse
from django.utils import timezone

from core.secrets import reveal
from engines.humanize import human_duration, human_size, human_time

from .models import Backup, BackupPolicy, CustomerBackupState, StorageTarget
from .schedules import ScheduleError, allowed_age, effective_policies, scheduled_customers
from .services import policy_for

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 10
MASK = "********"
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*):[^\s@/]+@")


# --- what to say ----------------------------------------------------------------
def _secrets_of(customer) -> list[str]:
    values = [reveal(db.password) for db in customer.databases.all()]
    for t in StorageTarget.objects.all():
        values += [reveal(t.access_key), reveal(t.secret_key), reveal(t.private_key)]
    values.append(settings.DATABASES["default"].get("PASSWORD") or "")
    return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


def _redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, MASK)
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)


def _link(path: str) -> str | None:
    base = (getattr(settings, "KASA_BASE_URL", "") or "").rstrip("/")
    return f"{base}{path}" if base else None


def _customer_line(customer) -> str:
    named = customer.name and customer.name != customer.domain
    return f"Customer: {customer.domain}" + (f" ({customer.name})" if named else "")


def recipients(policy: BackupPolicy) -> list[str]:
    return [a.strip() for a in re.split(r"[,;\s]+", policy.notify_emails or "") if a.strip()]


def backup_message(bk: Backup) -> tuple[str, str]:
    """(subject, body) describing a finished backup; secrets masked."""
    customer = bk.customer
    failed = bk.status != Backup.Status.SUCCEEDED
    failed_copies = list(bk.copies.filter(status="failed").select_related("target"))
    state = "FAILED" if failed else ("succeeded, REPLICA FAILED" if failed_copies else "succeeded")
    subject = f"[Kasa] Backup {state}: {customer.domain} (backup #{bk.pk})"
    who = f" by {bk.requested_by.get_username()}" if bk.requested_by_id else ""
    lines = [
        _customer_line(customer),
        f"Backup: #{bk.pk} ({bk.scope}, {bk.get_trigger_display().lower()}{who}, target {bk.target.name})",
        f"Status: {bk.status}",
    ]
    if failed:
        lines.append(f"Error: {bk.error or 'unknown error'}")
    for copy in failed_copies:
        lines.append(f"Replica {copy.target.name} failed (the primary copy is kept): {copy.error}")
    lines += [f"Size: {human_size(bk.size)}", f"Duration: {human_duration(bk.duration)}"]
    if bk.started_at:
        lines.append(f"Started: {human_time(bk.started_at)}")
    link = _link(reverse("admin:backups_backup_change", args=[bk.pk]))
    if link:
        lines.append(f"Details: {link}")
    secrets = _secrets_of(customer)
    return _redact(subject, secrets), _redact("\n".join(lines), secrets)


# --- how to say it ------------------------------------------------------------------
def send_email(to: list[str], subject: str, body: str) -> bool:
    if not to:
        return False
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, to, fail_silently=False)
    except Exception as exc:
        log.warning("backup notification email to %s failed: %s: %s", ", ".join(to), type(exc).__name__, exc)
        return False
    return True


def post_webhook(url: str, subject: str, body: str, *, ok: bool) -> bool:
    """POST Slack-compatible JSON ({"text": …} plus one coloured attachment); False when it did not work."""
    if not url:
        return False
    payload = {
        "text": f"{subject}\n{body}",
        "attachments": [{"color": "good" if ok else "danger", "fallback": subject, "text": body}],
    }
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST",
        headers={"Content-Type": "application/json", "User-Agent": f"Kasa/{settings.KASA_VERSION}"},
    )
    where = urlsplit(url).netloc  # never log the path: a Slack webhook's path is its secret token
    try:
        with urllib.request.urlopen(req, timeout=WEBHOOK_TIMEOUT) as resp:  # noqa: S310 (operator-set URL)
            resp.read(1024)
    except Exception as exc:
        log.warning("backup notification webhook to %s failed: %s: %s", where, type(exc).__name__, exc)
        return False
    return True


def _deliver(policy: BackupPolicy, subject: str, body: str, *, ok: bool, dead: set | None = None) -> dict:
    """Email and webhook. `dead` (one missed-backup check): channels that already failed are not retried,
    so 500 alerts to a dead webhook cost one timeout, not 500."""
    dead = set() if dead is None else dead
    sent = {"email": False, "webhook": False}
    to = recipients(policy)
    if to and "smtp" not in dead:
        sent["email"] = send_email(to, subject, body)
        if not sent["email"]:
            dead.add("smtp")
    url = policy.webhook_url
    if url and url not in dead:
        sent["webhook"] = post_webhook(url, subject, body, ok=ok)
        if not sent["webhook"]:
            dead.add(url)
    return sent


# --- entry points ---------------------------------------------------------------------
def backup_finished(backup_id: int) -> dict | None:
    """Called after every backup ends (succeeded or failed); sends what the policy asks for. Never raises."""

    try:
        bk = (Backup.objects.select_related("customer", "target", "requested_by").filter(pk=backup_id).first())
        if bk is None or bk.status not in (Backup.Status.SUCCEEDED, Backup.Status.FAILED):
            return None
        if bk.status == Backup.Status.SUCCEEDED:
            # A success ends any missed-backup lapse: the next lapse alerts again.
            CustomerBackupState.objects.filter(customer=bk.customer).update(missed_alert_at=None, missed_since=None)
        policy = policy_for(bk.customer)
        degraded = bk.copies.filter(status="failed").exists()  # a lost replica is alerted like a failure
        if bk.status == Backup.Status.SUCCEEDED and not degraded and not policy.notify_on_success:
            return None
        subject, body = backup_message(bk)
        return _deliver(policy, subject, body, ok=bk.status == Backup.Status.SUCCEEDED and not degraded)
    except Exception:
        log.warning("notification about backup %s failed", backup_id, exc_info=True)
        return None


def verification_failed(backup_id: int) -> dict | None:
    """A drill found that a backup does not restore: always alerted (a bad restore point is a silent failure)."""

    try:
        bk = Backup.objects.select_related("customer", "target").filter(pk=backup_id).first()
        if bk is None:
            return None
        customer = bk.customer
        subject = f"[Kasa] Backup VERIFICATION FAILED: {customer.domain} (backup #{bk.pk})"
        lines = [_customer_line(customer),
                 f"Backup: #{bk.pk} ({bk.scope}, finished {human_time(bk.finished_at)}, "
                 f"target {bk.target.name})",
                 f"Error: {bk.verify_error or 'unknown error'}",
                 "This backup is flagged: it did not restore in the drill. Take a new backup and check the storage."]
        link = _link(reverse("admin:backups_backup_change", args=[bk.pk]))
        if link:
            lines.append(f"Details: {link}")
        secrets = _secrets_of(customer)
        return _deliver(policy_for(customer), _redact(subject, secrets), _redact("\n".join(lines), secrets), ok=False)
    except Exception:
        log.warning("notification about the verification of backup %s failed", backup_id, exc_info=True)
        return None


def missed_backups_check(now=None) -> dict:
    """Alert once per lapse for every scheduled customer whose last success is older than allowed.

    A lapse starts when the deadline (last success, or the customer's creation,
    + allowed age) passes; it is alerted once (CustomerBackupState.missed_alert_at,
    claimed with a conditional UPDATE so two overlapping checks cannot both
    send) and re-armed as soon as the customer is back within its schedule.
    """

    now = now or timezone.now()
    customers = list(scheduled_customers())
    policies = effective_policies(customers)
    last: dict[int, dict[str, object]] = {}
    for row in (Backup.objects.filter(customer__in=customers, status=Backup.Status.SUCCEEDED)
                .values("customer_id", "scope").annotate(at=Max("finished_at"))):
        last.setdefault(row["customer_id"], {})[row["scope"]] = row["at"]
    states = {s.customer_id: s for s in CustomerBackupState.objects.filter(customer__in=customers)}
    summary = {"checked": 0, "alerted": [], "rearmed": [], "errors": {}}
    dead: set[str] = set()
    for customer in customers:
        policy = policies[customer.pk]
        try:
            allowed = allowed_age(policy, now)
        except ScheduleError as exc:
            summary["errors"][customer.domain] = str(exc)
            continue
        if allowed is None:
            continue
        summary["checked"] += 1
        scopes = last.get(customer.pk, {})
        # A full backup covers every narrower scope.
        successes = [t for s, t in scopes.items() if t and s in (policy.scope, BackupPolicy.Scope.FULL)]
        last_success = max(successes) if successes else None
        reference = last_success or customer.created_at
        deadline = reference + allowed
        state = states.get(customer.pk)
        if now <= deadline:
            if state and (state.missed_alert_at or state.missed_since):
                CustomerBackupState.objects.filter(pk=state.pk).update(missed_alert_at=None, missed_since=None)
                summary["rearmed"].append(customer.domain)
            continue
        if state is None:
            state, _ = CustomerBackupState.objects.get_or_create(customer=customer)
        if state.missed_alert_at and state.missed_alert_at >= reference:
            continue  # this lapse was already reported
        claimed = CustomerBackupState.objects.filter(pk=state.pk, missed_alert_at=state.missed_alert_at).update(
            missed_alert_at=now, missed_since=deadline)
        if not claimed:
            continue  # another check got there first
        subject, body = _missed_message(customer, policy, last_success, allowed, deadline)
        delivered = _deliver(policy, subject, body, ok=False, dead=dead)
        if not any(delivered.values()):
            log.warning("missed backup of %s: no notification delivered (policy has no working recipient)",
                        customer.domain)
        log.warning("missed backup: %s", subject)
        summary["alerted"].append(customer.domain)
    return summary


def _missed_message(customer, policy: BackupPolicy, last_success, allowed: timedelta, deadline) -> tuple[str, str]:
    schedule = policy.cron if policy.schedule == BackupPolicy.Schedule.CRON else policy.get_schedule_display()
    subject = f"[Kasa] Missed backup: {customer.domain}"
    lines = [
        _customer_line(customer),
        "Last successful backup: " + (human_time(last_success) if last_success else "never"),
        f"Schedule: {schedule} ({policy.scope}); a backup may be at most {human_duration(allowed.total_seconds())} old",
        f"Overdue since: {human_time(deadline)}",
    ]
    link = _link(reverse("admin:backups_backup_changelist") + f"?customer__id__exact={customer.pk}")
    if link:
        lines.append(f"Backups: {link}")
    secrets = _secrets_of(customer)
    return _redact(subject, secrets), _redact("\n".join(lines), secrets)
