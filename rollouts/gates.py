"""A wave's gates: each measurement is successful, failed, error (could not measure) or inconclusive (no data).

- failures: the wave's failed or quarantined upgrades against max_failures ("more than" fails, as Ansible's
  max_fail_percentage: reaching it does not);
- health: every customer this rollout has upgraded so far answers on each health URL (one GET each, now);
- prometheus: a PromQL expression compared with a threshold on every sample it returns; `$customers` in the
  query becomes a regular expression matching the upgraded customers' domains. No sample is *inconclusive*,
  never a pass (Kayenta's lesson: a metric with no data must not pass).

The driver (rollouts.driver) stores each measurement as a GateResult with its evidence.
"""

from __future__ import annotations

import json
import math
import operator
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from django.conf import settings

from engines import health

from .models import GateResult, Rollout, RolloutTarget, RolloutWave

R = GateResult.Result
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
       "!=": operator.ne}
FAILED_STATES = (RolloutTarget.State.FAILED, RolloutTarget.State.QUARANTINED)


@dataclass
class Measurement:
    gate: str
    result: str
    summary: str
    evidence: dict = field(default_factory=dict)


def failures(rollout: Rollout, wave: RolloutWave) -> Measurement:
    bad = list(wave.targets.filter(state__in=FAILED_STATES).select_related("customer", "upgrade"))
    evidence = {"failed": [{"customer": t.customer.domain, "state": t.state, "upgrade": t.upgrade_id,
                            "error": (t.error or "")[:300]} for t in bad], "max_failures": rollout.max_failures}
    if len(bad) > rollout.max_failures:
        names = ", ".join(t.customer.domain for t in bad[:5])
        return Measurement("failures", R.FAILED, f"{len(bad)} failed upgrade(s) in wave {wave.position}, more than "
                           f"{rollout.max_failures} allowed: {names}", evidence)
    return Measurement("failures", R.SUCCESSFUL, f"{len(bad)} failed upgrade(s), {rollout.max_failures} allowed",
                       evidence)


def upgraded(rollout: Rollout) -> list[RolloutTarget]:
    return list(rollout.targets.filter(state=RolloutTarget.State.UPGRADED).select_related("customer"))


def health_gate(rollout: Rollout) -> Measurement:
    targets = upgraded(rollout)
    checked, bad = [], []
    for t in targets:
        for svc in t.customer.services.all():
            if not svc.health_url:
                continue
            res = health.wait_healthy(svc.health_url, consecutive=1, timeout=settings.KASA_ROLLOUT_HEALTH_TIMEOUT,
                                      interval=0.5)
            entry = {"customer": t.customer.domain, "service": svc.name, "url": svc.health_url, "ok": res.ok,
                     "status": res.last_status, "error": "" if res.ok else str(res.last_error)[:200]}
            checked.append(entry)
            if not res.ok:
                bad.append(entry)
    evidence = {"checked": checked}
    if bad:
        names = ", ".join(f"{b['customer']} {b['service']} ({b['error'] or b['status']})" for b in bad[:5])
        return Measurement("health", R.FAILED, f"{len(bad)} health URL(s) of upgraded customers do not answer: "
                           f"{names}", evidence)
    if not checked:
        return Measurement("health", R.SUCCESSFUL, f"none of the {len(targets)} upgraded customers has a health URL: "
                           "nothing to check", evidence)
    return Measurement("health", R.SUCCESSFUL, f"{len(checked)} health URL(s) of {len(targets)} upgraded "
                       "customers answer", evidence)


def customers_regex(domains: list[str]) -> str:
    """A RE2 alternation matching exactly these domains, written for a PromQL string literal."""
    # No customer yet: a class that matches nothing (RE2 has no lookahead; an empty pattern would match series
    # without the label).
    alternation = "|".join(re.escape(d) for d in sorted(domains)) or r"[^\s\S]"
    return alternation.replace("\\", "\\\\")


def prometheus_gate(rollout: Rollout, spec: dict) -> Measurement:
    base = (settings.KASA_PROMETHEUS_URL or "").rstrip("/")
    domains = [t.customer.domain for t in upgraded(rollout)]
    query = str(spec["query"]).replace("$customers", customers_regex(domains))
    evidence: dict = {"query": query, "op": spec["op"], "threshold": spec["threshold"]}
    if not base:
        return Measurement("prometheus", R.ERROR, "KASA_PROMETHEUS_URL is not set: the Prometheus gate cannot be "
                           "measured", evidence)
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=settings.KASA_ROLLOUT_HEALTH_TIMEOUT) as resp:
            doc = json.loads(resp.read(4 << 20))
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = json.loads(exc.read(65536)).get("error", "")
        except (ValueError, OSError, AttributeError):
            pass
        return Measurement("prometheus", R.ERROR, f"Prometheus answered HTTP {exc.code}: {detail or exc.reason}",
                           evidence)
    except (OSError, ValueError) as exc:
        return Measurement("prometheus", R.ERROR, f"Prometheus at {base} could not be asked: {exc}", evidence)
    data = doc.get("data") or {} if isinstance(doc, dict) else {}
    kind, result = data.get("resultType"), data.get("result")
    samples: list[tuple[dict, float]] = []
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        samples = [({}, _number(result[1]))]
    elif kind == "vector" and isinstance(result, list):
        samples = [(r.get("metric") or {}, _number((r.get("value") or [None, None])[1])) for r in result
                   if isinstance(r, dict)]
    else:
        return Measurement("prometheus", R.ERROR, f"Prometheus gave a {kind or 'malformed'} result; the gate needs "
                           "an instant vector or a scalar", evidence)
    samples = [(m, v) for m, v in samples if not math.isnan(v)]
    evidence["samples"] = [{"metric": m, "value": v} for m, v in samples[:50]]
    if not samples:
        return Measurement("prometheus", R.INCONCLUSIVE, "the query returned no data: the gate cannot decide "
                           "(a person must look)", evidence)
    compare = OPS[spec["op"]]
    bad = [(m, v) for m, v in samples if not compare(v, spec["threshold"])]
    if bad:
        shown = ", ".join(f"{_label(m)}={v:g}" for m, v in bad[:5])
        return Measurement("prometheus", R.FAILED, f"{len(bad)} of {len(samples)} sample(s) break "
                           f"{spec['op']} {spec['threshold']:g}: {shown}", evidence)
    return Measurement("prometheus", R.SUCCESSFUL, f"{len(samples)} sample(s) {spec['op']} {spec['threshold']:g}",
                       evidence)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _label(metric: dict) -> str:
    inner = ",".join(f"{k}={v}" for k, v in sorted(metric.items()) if k != "__name__")
    return f"{metric.get('__name__', '')}{{{inner}}}" if inner or metric.get("__name__") else "value"


def measure(rollout: Rollout, wave: RolloutWave) -> list[Measurement]:
    """Every gate of the rollout, now."""
    out = [failures(rollout, wave)]
    if rollout.gates.get("health", True):
        out.append(health_gate(rollout))
    if rollout.gates.get("prometheus"):
        out.append(prometheus_gate(rollout, rollout.gates["prometheus"]))
    return out
