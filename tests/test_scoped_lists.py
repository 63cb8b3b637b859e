"""Filters and lists are scoped (issue 11, point 10): changelist filters, autocompletes and choice lists show only
the user's teams, customers and the storage targets open to them; a customer's backups go only to targets its
team may use (StorageTarget.teams; none listed: every team)."""

from __future__ import annotations

import re
import uuid

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission

from audit.services import audit_record
from backups.models import BackupPolicy, StorageTarget
from backups.services import BackupInputError, backup_params, backup_start, default_target
from customers.models import Team
from operations.models import Run
from tests.security.test_permissions import stored_backup

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]


@pytest.fixture
def site(make_customer, staff_user):
    blue, red = (Team.objects.create(name=f"{c}-{uuid.uuid4().hex[:6]}") for c in ("Blue", "Red"))
    local = default_target()  # open to every team
    vault = {}
    for team in (blue, red):
        vault[team.pk] = StorageTarget.objects.create(name=f"vault-{team.name.lower()}", kind="local",
                                                      path=str(settings.KASA_VAR_DIR / f"vault-{team.pk}"))
        vault[team.pk].teams.set([team])
    return {"blue": make_customer(team_=blue), "red": make_customer(team_=red), "local": local,
            "blue_vault": vault[blue.pk], "red_vault": vault[red.pk], "alice": staff_user(blue),
            "blue_team": blue, "red_team": red}


def test_a_customers_backups_go_only_to_targets_its_team_may_use(site):
    blue = site["blue"]
    assert backup_params(blue, target=site["blue_vault"].name, encrypt=False)["target"] == site["blue_vault"].name
    assert backup_params(blue, target="local", encrypt=False)["target"] == "local"
    with pytest.raises(BackupInputError, match="not open to team"):
        backup_params(blue, target=site["red_vault"].name, encrypt=False)  # the CLI too: it is about the customer
    # A policy naming another team's target (or replica) is refused at the next backup, not followed.
    policy = BackupPolicy.objects.create(customer=blue, target=site["local"], encrypt=False)
    policy.replicas.set([site["red_vault"]])
    with pytest.raises(BackupInputError, match=site["red_vault"].name):
        backup_start(blue, via="cli", enqueue=False)
    assert not Run.objects.filter(customer=blue).exists()
    policy.replicas.set([site["blue_vault"]])
    assert backup_start(blue, via="cli", enqueue=False).params["replicas"] == [site["blue_vault"].name]


def test_back_up_now_offers_only_the_teams_targets(client, site):
    client.force_login(site["alice"])
    url = f"/customers/customer/{site['blue'].pk}/backup/"
    offered = re.findall(r'<option value="([^"]+)"', client.get(url).content.decode())
    assert sorted(offered) == sorted(["local", site["blue_vault"].name])
    response = client.post(url, {"scope": "full", "compression": "zstd", "target": site["red_vault"].name})
    assert response.status_code == 400 and "target" in response.context["form"].errors
    assert not Run.objects.exists()


def test_policy_form_offers_and_accepts_only_targets_open_to_the_customers_team(client, site, admin_user):
    alice = site["alice"]
    alice.user_permissions.add(*Permission.objects.filter(content_type__app_label="backups",
                                                          codename__in=["add_backuppolicy", "view_backuppolicy"]))
    client.force_login(alice)
    html = client.get("/backups/backuppolicy/add/").content.decode()
    assert site["blue_vault"].name in html and site["red_vault"].name not in html
    assert site["blue"].domain in html and site["red"].domain not in html
    # A superuser sees every target, and still may not point blue's policy at red's.
    client.force_login(admin_user)
    base = {"customer": site["blue"].pk, "schedule": "none", "scope": "full", "compression": "zstd",
            "keep_last": 5, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, "keep_verified": 0,
            "excludes": "[]", "verify_schedule": "none", "full_every_days": 7}
    response = client.post("/backups/backuppolicy/add/", {**base, "target": site["red_vault"].pk})
    assert response.status_code == 200 and "not open to team" in str(response.context["adminform"].form.errors)
    response = client.post("/backups/backuppolicy/add/", {**base, "target": site["local"].pk,
                                                          "replicas": [site["red_vault"].pk]})
    assert response.status_code == 200 and "not open to team" in str(response.context["adminform"].form.errors)
    assert not BackupPolicy.objects.filter(customer=site["blue"]).exists()
    response = client.post("/backups/backuppolicy/add/", {**base, "target": site["blue_vault"].pk,
                                                          "replicas": [site["local"].pk]})
    assert response.status_code == 302
    # The policy changelist's target filter: blue's operator sees blue's vault and the shared target only.
    client.force_login(alice)
    html = client.get("/backups/backuppolicy/").content.decode()
    assert f"target__id__exact={site['blue_vault'].pk}" in html and site["red_vault"].name not in html


def test_autocompletes_answer_only_with_the_users_teams_and_customers(client, site):
    client.force_login(site["alice"])

    def names(**query) -> list[str]:
        response = client.get("/autocomplete/", {"term": "", **query})
        assert response.status_code == 200, response.content
        return [r["text"] for r in response.json()["results"]]

    assert names(app_label="customers", model_name="customer", field_name="team") == [site["blue_team"].name]
    assert names(app_label="backups", model_name="backup", field_name="customer") == [site["blue"].domain]
    assert client.get("/autocomplete/", {"app_label": "backups", "model_name": "backup",
                                         "field_name": "target"}).status_code == 404  # targets: none at all


def test_backup_run_and_audit_filters_name_nothing_of_another_team(client, site):
    stored_backup(site["red"])
    stored_backup(site["blue"])
    audit_record(action="backup.red_only_action", source="cli", customer=site["red"], obj=site["red"])
    Run.objects.create(customer=site["red"], kind="verify", mutating=False)
    client.force_login(site["alice"])
    for url in ("/backups/backup/", "/operations/run/", "/audit/auditentry/", "/customers/customer/",
                "/upgrades/upgrade/"):
        html = client.get(url).content.decode()
        for leak in (site["red_team"].name, site["red"].domain, site["red_vault"].name, "red_only_action"):
            assert leak not in html, (url, leak)


def test_superusers_open_targets_to_teams(client, site, admin_user):
    client.force_login(admin_user)
    html = client.get("/backups/storagetarget/").content.decode()
    assert "every team" in html and site["blue_team"].name in html
    html = client.get(f"/backups/storagetarget/{site['blue_vault'].pk}/change/").content.decode()
    assert 'name="teams"' in html
