"""What the rollout's admin page shows, as one document: rendered into the page when it opens and again, by the
page's WebSocket consumer (rollouts.consumers), on every change, with the same template fragment
(admin/rollouts/rollout/live.html) — so the two never disagree. Built on rollouts.selectors.rollout_document."""

from __future__ import annotations

import json
import re

from django.template.loader import render_to_string
from django.urls import reverse

from engines.humanize import human_duration, human_time

from .models import GateResult, Rollout, RolloutTarget, RolloutWave
from .selectors import rollout_document

_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@", re.I)
MASK = "********"

# Which controls a status offers (the services refuse the rest anyway; this only hides buttons that would fail).
CONTROLS = {
    "pause": (Rollout.Status.PROGRESSING,),
    "resume": (Rollout.Status.PAUSED,),
    "promote": (Rollout.Status.PROGRESSING, Rollout.Status.PAUSED),
    "promote_all": (Rollout.Status.SCHEDULED, Rollout.Status.PROGRESSING, Rollout.Status.PAUSED),
    "abort": (Rollout.Status.SCHEDULED, Rollout.Status.PROGRESSING, Rollout.Status.PAUSED, Rollout.Status.HALTED),
    "retry": (Rollout.Status.HALTED, Rollout.Status.ABORTED),
}


def masked(value):
    """Evidence as shown: a password in any URL replaced by ********."""
    if isinstance(value, str):
        return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", value)
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def _versions(versions: dict | None) -> str:
    return ", ".join(f"{c} {v or 'nothing'}" for c, v in sorted((versions or {}).items())) or "—"


def page_document(rollout: Rollout) -> dict:
    doc = rollout_document(rollout)
    wave_states, target_states = dict(RolloutWave.State.choices), dict(RolloutTarget.State.choices)
    results = dict(GateResult.Result.choices)
    ids = [g["id"] for w in doc["waves"] for g in w["gates"]]
    evidence = dict(GateResult.objects.filter(pk__in=ids).values_list("pk", "evidence"))
    total = sum(len(w["customers"]) for w in doc["waves"])
    upgraded = doc["counts"].get(RolloutTarget.State.UPGRADED, 0)
    for w in doc["waves"]:
        w["state_label"] = wave_states.get(w["state"], w["state"])
        w["bake_text"] = human_duration(w["bake_seconds"]) if w["bake_seconds"] else "no bake"
        w["bake_until_iso"] = w["bake_until"].isoformat() if w["bake_until"] and w["state"] == "baking" else ""
        w["bake_left_text"] = human_duration(w["bake_left_seconds"]) if w["bake_left_seconds"] is not None else ""
        w["finished_text"] = human_time(w["finished_at"]) if w["finished_at"] else ""
        for g in w["gates"]:
            g["result_label"] = results.get(g["result"], g["result"])
            g["at_text"] = human_time(g["at"])
            g["evidence_json"] = json.dumps(masked(evidence.get(g["id"]) or {}), indent=1, sort_keys=True,
                                            default=str)
        for t in w["customers"]:
            t["state_label"] = target_states.get(t["state"], t["state"])
            t["versions_text"] = _versions(t["versions"])
            t["from_text"] = _versions(t["from_versions"])
            t["customer_url"] = reverse("admin:customers_customer_change", args=[t["customer_id"]])
            t["run_url"] = reverse("admin:operations_run_change", args=[t["run"]]) if t["run"] else ""
            t["error_line"] = (t["error"] or "").strip().splitlines()[0][:200] if (t["error"] or "").strip() else ""
    doc.update(
        status_label=Rollout.Status(doc["status"]).label, paused_by_label=dict(Rollout.PausedBy.choices).get(
            doc["paused_by"], ""), total=total, upgraded=upgraded,
        progress_text=f"{upgraded} of {total} upgraded",
        ended=doc["status"] in Rollout.ENDED,
        controls=[name for name, statuses in CONTROLS.items() if doc["status"] in statuses],
        created_text=human_time(doc["created_at"]),
        started_text=human_time(doc["started_at"]) if doc["started_at"] else "—",
        finished_text=human_time(doc["finished_at"]) if doc["finished_at"] else "—",
    )
    return doc


def render_live(doc: dict) -> str:
    """The part of the page that follows the rollout (status, waves, customers, gates, skipped)."""
    return render_to_string("admin/rollouts/rollout/live.html", {"d": doc})
