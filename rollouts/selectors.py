"""What a rollout looks like to a reader (the CLI's JSON, the admin page, notifications): who is on which version,
who failed, who is quarantined, each wave with its gates."""

from __future__ import annotations

from collections import Counter

from django.utils import timezone

from customers.models import Customer

from .models import GateResult, Rollout, RolloutTarget


def rollout_document(rollout: Rollout) -> dict:
    targets = list(rollout.targets.select_related("customer", "wave", "upgrade", "revert").order_by(
        "wave__position", "position"))
    results = list(GateResult.objects.filter(rollout=rollout).order_by("-created_at", "-id")[:200])
    latest: dict[tuple[int, str], GateResult] = {}
    for g in results:
        latest.setdefault((g.wave_id, g.gate), g)
    now = timezone.now()
    waves = []
    for w in rollout.waves.order_by("position"):
        members = [t for t in targets if t.wave_id == w.pk]
        waves.append({
            "position": w.position, "percent": w.percent, "bake_seconds": w.bake_seconds, "state": w.state,
            "started_at": w.started_at, "bake_until": w.bake_until, "finished_at": w.finished_at,
            "bake_left_seconds": max(0, int((w.bake_until - now).total_seconds()))
            if w.bake_until and w.state == "baking" else None,
            "gates": [{"id": g.pk, "gate": g.gate, "result": g.result, "summary": g.summary, "final": g.final,
                       "at": g.created_at}
                      for (wid, _), g in sorted(latest.items(), key=lambda kv: kv[0][1]) if wid == w.pk],
            "customers": [_target(t) for t in members],
        })
    return {
        "id": rollout.pk, "release": rollout.release.name, "status": rollout.status, "paused_by": rollout.paused_by,
        "reason": rollout.reason, "strategy": rollout.strategy, "on_failure": rollout.on_failure,
        "concurrency": rollout.concurrency, "max_failures": rollout.max_failures, "percents": rollout.percents,
        "gates": rollout.gates, "window": _window(rollout), "selection": rollout.selection,
        "promote_all": rollout.promote_all, "reverting": rollout.reverting,
        "requested_by": rollout.requested_by.get_username() if rollout.requested_by_id else rollout.requested_via,
        "created_at": rollout.created_at, "started_at": rollout.started_at, "finished_at": rollout.finished_at,
        "counts": dict(Counter(t.state for t in targets)), "waves": waves, "skipped": rollout.skipped,
    }


def _target(t: RolloutTarget) -> dict:
    return {"customer": t.customer.domain, "customer_id": t.customer_id, "state": t.state,
            "versions": t.customer.versions, "from_versions": t.from_versions, "upgrade": t.upgrade_id,
            "run": t.upgrade.run_id if t.upgrade_id else None,
            "upgrade_status": t.upgrade.status if t.upgrade_id else None, "revert": t.revert_id,
            "attempts": t.attempts, "error": t.error}


def _window(rollout: Rollout) -> str:
    if rollout.window_start is None:
        return ""
    return f"{rollout.window_start:%H:%M}-{rollout.window_end:%H:%M} {rollout.window_zone}"


def active_rollouts():
    return Rollout.objects.filter(status__in=Rollout.ACTIVE).select_related("release").order_by("-created_at")


def visible_rollouts(user, qs=None):
    """The team rule for rollouts: a non-superuser sees a rollout only when every customer in it is one they may
    see (Customer.objects.visible_to); None is the shell user (everything)."""
    qs = Rollout.objects.all() if qs is None else qs
    if user is None or (user.is_superuser and user.is_active and user.is_staff):
        return qs
    hidden = RolloutTarget.objects.exclude(customer__in=Customer.objects.visible_to(user))
    return qs.exclude(pk__in=hidden.values("rollout_id"))
