"""The Prometheus alert rules and the Grafana dashboard that ship in deploy/ (issue 18, items 4 and 6): promtool
checks the rules and runs their unit tests (deploy/prometheus/kasa-alerts.test.yml: each alert firing and not
firing), every alert carries what the person paged needs, and the dashboard is well formed. A real Prometheus
scraping a live Kasa fires the alerts and answers every panel's query in tests/test_prometheus_scrape.py.

The files are read as text (the rules are YAML, and Kasa has no YAML library among its dependencies): the shapes
checked here are the ones kasa-alerts.yml is written in."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from tests.conftest import BASE_DIR, require

RULES = BASE_DIR / "deploy" / "prometheus" / "kasa-alerts.yml"
RULE_TESTS = BASE_DIR / "deploy" / "prometheus" / "kasa-alerts.test.yml"
DASHBOARD = BASE_DIR / "deploy" / "grafana" / "kasa.json"
RUNBOOK = BASE_DIR / "docs" / "OPERATIONS.md"
EXPECTED = {"KasaCustomerOutsideRPO", "KasaLastBackupFailed", "KasaNoVerifiedBackup", "KasaImmutableCopyMissing",
            "KasaUpgradeQuarantined", "KasaRolloutHalted", "KasaRunsQueuedTooLong", "KasaStorageTargetDown",
            "KasaMetricsScrapeFailing"}


def promtool() -> str:
    binary = shutil.which("promtool")
    require(binary is not None, "promtool (Debian's prometheus package: make system-deps)")
    return binary


def alerts() -> dict[str, str]:
    """Each alert's name -> its rule's text (from `- alert:` to the next one)."""
    parts = re.split(r"^\s+- alert: ", RULES.read_text(), flags=re.M)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def runbook_anchors() -> set[str]:
    """GitHub's anchors of the headings of OPERATIONS.md's "Alerts runbook" section."""
    section = RUNBOOK.read_text().split("\n## Alerts runbook\n", 1)[1].split("\n## ", 1)[0]
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^###+ (.+)$", section, re.M)}


def test_the_alert_rules_pass_promtool_check_rules():
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in done.stdout


def test_each_alert_fires_and_stays_quiet_in_promtools_unit_tests():
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    tests = RULE_TESTS.read_text()
    for name in EXPECTED:
        checks = re.findall(rf"alertname: {name}\n\s+exp_alerts:( \[\])?", tests)
        assert "" in checks, f"{name} is never shown firing"
        assert " []" in checks, f"{name} is never shown not firing"


def test_every_alert_names_what_fires_and_links_its_runbook_section():
    rules = alerts()
    assert set(rules) == EXPECTED
    anchors = runbook_anchors()
    for name, text in rules.items():
        assert re.search(r"^\s+severity: (critical|warning)$", text, re.M), name
        summary = re.search(r'^\s+summary: "(.+)"$', text, re.M)
        description = re.search(r"^\s+description: >-\n((?:\s{12}.+\n)+)", text, re.M)
        assert summary and description, name
        # the customer (or the rollout, target, instance the metric is about) is named in both
        assert "{{ $labels." in summary.group(1) and "{{ $labels." in description.group(1), name
        url = re.search(r'^\s+runbook_url: "docs/OPERATIONS\.md#([a-z0-9-]+)"$', text, re.M)
        assert url and url.group(1) == name.lower() and url.group(1) in anchors, name


def test_the_dashboard_is_grafana_json_on_a_datasource_variable_with_a_query_in_every_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] == "kasa-fleet"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("outside rpo", "rpo per customer", "rto per customer", "backup duration", "backup storage",
                  "runs by kind and status", "queue depth", "oldest queued", "per target", "rollouts in progress"):
        assert topic in titles, topic
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"] and all(t["expr"] and t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] + g["w"] <= 24, p["title"]


def test_every_metric_the_rules_and_dashboard_use_is_one_kasa_exports():
    """A misspelt metric name gives an empty answer, never an error: a dashboard that stays empty and an alert that
    never fires. So each kasa_* name in the rules and the dashboard must be written in Kasa's code (a counter's
    _total, a histogram's _bucket/_sum/_count are added by prometheus_client)."""
    used = set(re.findall(r"\bkasa_[a-z_]+", RULES.read_text() + DASHBOARD.read_text()))
    source = "\n".join(p.read_text() for p in BASE_DIR.glob("*/**/*.py")
                       if p.parts[len(BASE_DIR.parts)] not in {"tests", ".venv", "node_modules", "var"})
    missing = sorted(name for name in used if re.sub(r"_(total|bucket|sum|count)$", "", name) not in source)
    assert not missing, missing
