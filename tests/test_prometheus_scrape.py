"""A real Prometheus scrapes a live Kasa and fires its alerts (issue 18, items 5 and 6).

Debian's `prometheus` runs on a free port with its own data folder, scraping Kasa's /metrics (daphne serving
config.asgi, as in production) every second with the metrics token, and evaluating deploy/prometheus/
kasa-alerts.yml every second. The rules are loaded from a copy whose `for:` durations are rewritten to 0s:
the rules' own durations (minutes to a day) are what promtool's unit tests check; here only the expressions meet
real data. A second job scrapes the same Kasa under another address with a wrong token, labelled job="kasa", so
that KasaMetricsScrapeFailing is seen firing for it and not for the right one.

One customer is put outside its RPO (a real backup, verified by a real drill, whose finish is then moved 30 hours
back: a test cannot wait a day), another's newest backup fails for real (its service folder is gone), and both
alerts must fire in /api/v1/alerts — for those customers only. Then every panel query of deploy/grafana/kasa.json
is run against the same Prometheus and must answer without error."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from backups.models import Backup
from tests.conftest import BASE_DIR, free_port, require, serving_asgi, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "scrape-Token-5b7e0c"  # noqa: S105 (a test's own metrics token)
RULES = BASE_DIR / "deploy" / "prometheus" / "kasa-alerts.yml"
DASHBOARD = BASE_DIR / "deploy" / "grafana" / "kasa.json"
# What Grafana puts in place of its variables; $customer is the dashboard's "All".
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "customer": ".*"}


def _get(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy from the env
    with opener.open(url, timeout=10) as fh:
        return json.loads(fh.read())


def _ready(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/-/ready", timeout=2) as fh:
            return fh.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_prometheus(kasa_url: str):
    binary = shutil.which("prometheus")
    require(binary is not None, "Debian's prometheus (make system-deps)")
    folder = Path(tempfile.mkdtemp(prefix="kasa-prom-scrape-"))
    rules = RULES.read_text()
    (folder / "kasa-alerts.yml").write_text(re.sub(r"^(\s+)for: \S+$", r"\1for: 0s", rules, flags=re.M))
    port = urllib.parse.urlsplit(kasa_url).port
    (folder / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["kasa-alerts.yml"],
        "scrape_configs": [
            {"job_name": "kasa", "metrics_path": "/metrics", "authorization": {"credentials": TOKEN},
             "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
            {"job_name": "kasa-wrong-token", "metrics_path": "/metrics",
             "authorization": {"credentials": "not-" + TOKEN},
             "static_configs": [{"targets": [f"localhost:{port}"]}],
             "relabel_configs": [{"target_label": "job", "replacement": "kasa"}]},
        ]}))
    listen = free_port()
    with open(folder / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={folder}/prometheus.yml",
                                 f"--storage.tsdb.path={folder}/data", f"--web.listen-address=127.0.0.1:{listen}"],
                                cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{listen}"
        wait_until(lambda: proc.poll() is not None or _ready(url), 30, interval=0.2, what="prometheus to be ready")
        assert proc.poll() is None, (folder / "prometheus.log").read_text()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def firing(prometheus: str) -> set[tuple[str, str]]:
    """(alert, customer or instance) of every alert firing now."""
    found = _get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("customer") or a["labels"].get("instance", ""))
            for a in found if a["state"] == "firing"}


def panel_queries(dashboard: dict):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = re.sub(rf"\$\{{{name}\}}|\${name}\b|\[\[{name}\]\]", value, expr)
            assert "$" not in expr, (panel["title"], expr)
            yield panel["title"], expr


def _backed_up_and_verified(customer) -> Backup:
    call_command("backup", customer.domain)
    backup = Backup.objects.filter(customer=customer).latest("id")
    call_command("verify", str(backup.pk))
    backup.refresh_from_db()
    assert backup.status == "succeeded" and backup.verify_status == "passed", (backup.status, backup.verify_status)
    return backup


def test_a_real_prometheus_scraping_kasa_fires_its_alerts_for_those_customers_and_answers_every_panel(
        subprocess_env, make_customer, tmp_path):
    late, broken, fine = (make_customer(domain=f"{name}.example.com") for name in ("late", "broken", "fine"))
    for customer in (late, broken, fine):
        (Path(customer.root) / "backend" / "index.html").write_text(f"<p>{customer.domain}</p>")
        _backed_up_and_verified(customer)
    moved = timezone.now() - timedelta(hours=30)  # the default RPO target is 24 hours
    Backup.objects.filter(customer=late).update(started_at=moved - timedelta(seconds=5), finished_at=moved,
                                                verified_at=moved)
    shutil.rmtree(Path(broken.root) / "backend")  # its next backup fails: "the folder of service … does not exist"
    with pytest.raises(CommandError):
        call_command("backup", broken.domain)
    assert Backup.objects.filter(customer=broken).latest("id").status == "failed"

    env = {**subprocess_env, "KASA_METRICS_TOKEN": TOKEN}
    with serving_asgi(env, tmp_path / "daphne.log") as kasa, running_prometheus(kasa.url) as prometheus:
        port = urllib.parse.urlsplit(kasa.url).port
        wanted = {("KasaCustomerOutsideRPO", late.domain), ("KasaLastBackupFailed", broken.domain),
                  ("KasaMetricsScrapeFailing", f"localhost:{port}")}
        wait_until(lambda: wanted <= firing(prometheus), 60, interval=0.5, what=f"{wanted} firing")
        now = firing(prometheus)
        assert {c for a, c in now if a == "KasaCustomerOutsideRPO"} == {late.domain}
        assert {c for a, c in now if a == "KasaLastBackupFailed"} == {broken.domain}
        assert {c for a, c in now if a == "KasaMetricsScrapeFailing"} == {f"localhost:{port}"}  # the token matters
        alert = next(a for a in _get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
                     if a["labels"]["alertname"] == "KasaCustomerOutsideRPO")
        assert alert["labels"]["severity"] == "critical"
        assert late.domain in alert["annotations"]["summary"] and late.domain in alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"] == "docs/OPERATIONS.md#kasacustomeroutsiderpo"

        # Every rule evaluates against real series without error (a type error shows only here, not in promtool).
        groups = _get(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 9 and all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                                            for r in rules]

        dashboard = json.loads(DASHBOARD.read_text())
        answered = []
        for title, expr in panel_queries(dashboard):
            answer = _get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            assert answer["status"] == "success", (title, expr, answer)
            answered.append((title, bool(answer["data"]["result"])))
        assert len(answered) == sum(len(p.get("targets", [])) for p in dashboard["panels"])
        # panels on series this Kasa has now show them (the rest need runs, targets or rollouts to exist)
        shown = {title for title, data in answered if data}
        assert {"RPO per customer against its target", "Outside RPO", "Customers needing attention",
                "Backup storage per customer", "Runs by kind and status", "Kasa alerts firing"} <= shown, answered
