"""Notifications of a rollout: when it completes, halts, is aborted or pauses on an inconclusive gate. They go
to KASA_ROLLOUT_EMAILS and KASA_ROLLOUT_WEBHOOK (Slack-compatible), through the same senders as backups'.
A notification never fails a rollout: a sender that does not work is logged."""

from __future__ import annotations

from collections import Counter

from django.conf import settings
from django.urls import reverse

from backups.notify import post_webhook, send_email

from .models import Rollout


def _body(rollout: Rollout) -> str:
    states = Counter(rollout.targets.values_list("state", flat=True))
    lines = [f"Rollout #{rollout.pk} of {rollout.release} is {rollout.get_status_display().lower()}."]
    if rollout.reason:
        lines.append(f"Why: {rollout.reason}")
    lines.append("Customers: " + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(states.items())))
    if rollout.skipped:
        lines.append(f"Skipped when planned: {len(rollout.skipped)}")
    base = (getattr(settings, "KASA_BASE_URL", "") or "").rstrip("/")
    if base:
        lines.append(f"Details: {base}{reverse('admin:rollouts_rollout_change', args=[rollout.pk])}")
    return "\n".join(lines)


def _send(rollout: Rollout, subject: str, *, ok: bool) -> dict:
    body = _body(rollout)
    return {"email": send_email(list(settings.KASA_ROLLOUT_EMAILS), subject, body),
            "webhook": post_webhook(settings.KASA_ROLLOUT_WEBHOOK, subject, body, ok=ok)}


def rollout_ended(rollout: Rollout) -> dict:
    rollout.refresh_from_db()
    ok = rollout.status == Rollout.Status.COMPLETED
    return _send(rollout, f"[Kasa] rollout #{rollout.pk} to {rollout.release}: {rollout.status}", ok=ok)


def rollout_paused(rollout: Rollout) -> dict:
    rollout.refresh_from_db()
    return _send(rollout, f"[Kasa] rollout #{rollout.pk} to {rollout.release} paused: a person must decide", ok=False)
