"""Attacks on fleet rollouts from the admin (issue 13, point 9): the team rule (a rollout is someone's only when
every customer in it is of their teams) and the control permission. Each test names what it proves."""

from __future__ import annotations

import pytest

from customers.models import Customer, Team
from tests.security.test_permissions import user_with

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]

CONTROLS = ("pause", "resume", "promote", "promote_all", "abort", "retry")
START = "/rollouts/rollout/start/"


@pytest.fixture
def fleet_ab(make_customer, team, tmp_path):
    """Two customers of `team` (A) and one of team B, at 1.0; the fleet's releases."""
    from tests.rollout_fixtures import sync_fleet_releases

    releases = sync_fleet_releases(tmp_path / "pkg")
    team_b = Team.objects.create(name="team-b-rollouts")
    a1, a2 = make_customer("a1.example.com"), make_customer("a2.example.com")
    b1 = make_customer("b1.example.com", team_=team_b)
    Customer.objects.filter(pk__in=[a1.pk, a2.pk, b1.pk]).update(versions={"app": "1.0.0"})
    return {"release": releases["1.1"], "a": [a1, a2], "b": b1, "team_b": team_b}


def _rollout(release, domains):
    from rollouts import planning, services

    return services.rollout_create(planning.plan(release, domains=domains, percents="100", bakes="0"))


def _operator(team, django_user_model, *extra):
    return user_with(team, "rollouts.view_rollout", "rollouts.add_rollout", "upgrades.upgrade_customer",
                     "customers.view_customer", *extra, django_user_model=django_user_model)


def test_a_team_member_gets_404_for_a_rollout_that_includes_another_teams_customer(
        client, fleet_ab, team, django_user_model):
    mixed = _rollout(fleet_ab["release"], ["a1.example.com", "b1.example.com"])
    user = _operator(team, django_user_model, "rollouts.control_rollout")
    client.force_login(user)
    page = f"/rollouts/rollout/{mixed.pk}/change/"
    assert client.get(page).status_code == 404
    for action in CONTROLS:  # not even a 403 that would confirm it exists
        assert client.post(f"/rollouts/rollout/{mixed.pk}/control/{action}/").status_code == 404
    listing = client.get("/rollouts/rollout/").content.decode()
    assert f"/rollouts/rollout/{mixed.pk}/change/" not in listing
    mixed.refresh_from_db()
    assert mixed.status == "scheduled"
    # Their own rollout opens (after the mixed one has ended, its customer is free again).
    from rollouts.models import Rollout

    Rollout.objects.filter(pk=mixed.pk).update(status="aborted")
    mixed.targets.update(active=False)
    own = _rollout(fleet_ab["release"], ["a1.example.com", "a2.example.com"])
    assert client.get(f"/rollouts/rollout/{own.pk}/change/").status_code == 200


def test_a_team_member_cannot_plan_or_start_a_rollout_naming_another_teams_domains(
        client, fleet_ab, team, django_user_model):
    from rollouts.models import Rollout

    user = _operator(team, django_user_model)
    client.force_login(user)
    form = {"release": "1.1", "domains": "a1.example.com\nb1.example.com", "waves": "100", "bakes": "0",
            "concurrency": "2", "max_failures": "0", "on_failure": "halt", "health_gate": "on",
            "prom_op": "<", "window_zone": "UTC"}
    preview = client.post(START, {**form, "_preview": "1"})
    assert preview.status_code == 400
    text = preview.content.decode()
    assert "no such customer (or not yours): b1.example.com" in text
    assert 'id="rollout-plan"' not in text
    # A forged confirmation (any digest, the release typed) starts nothing either.
    forged = client.post(START, {**form, "_confirm": "1", "confirm": "1.1", "digest": "0" * 32})
    assert forged.status_code == 400 and not Rollout.objects.exists()
    # Nor does naming the other team, which is not offered.
    by_team = client.post(START, {**form, "domains": "", "team": fleet_ab["team_b"].name, "_confirm": "1",
                                  "confirm": "1.1"})
    assert by_team.status_code == 400 and not Rollout.objects.exists()
    assert "team-b-rollouts" not in client.get(START).content.decode()


def test_without_control_rollout_every_control_post_is_403_and_changes_nothing(
        client, fleet_ab, team, django_user_model):
    rollout = _rollout(fleet_ab["release"], ["a1.example.com", "a2.example.com"])
    user = _operator(team, django_user_model)  # sees it, may start rollouts, may not control them
    client.force_login(user)
    page = client.get(f"/rollouts/rollout/{rollout.pk}/change/")
    assert page.status_code == 200 and 'id="rollout-controls"' not in page.content.decode()
    for action in CONTROLS:
        response = client.post(f"/rollouts/rollout/{rollout.pk}/control/{action}/",
                                {"confirm": "promote all", "revert": "1"})
        assert response.status_code == 403, action
        assert client.get(f"/rollouts/rollout/{rollout.pk}/control/{action}/").status_code == 405
    rollout.refresh_from_db()
    assert rollout.status == "scheduled" and not rollout.promote_all


def test_without_add_rollout_the_start_page_and_the_customers_action_are_refused(
        client, fleet_ab, team, django_user_model):
    user = user_with(team, "rollouts.view_rollout", "customers.view_customer", "upgrades.upgrade_customer",
                     django_user_model=django_user_model)
    client.force_login(user)
    assert client.get(START + "?release=1.1").status_code == 403
    changelist = client.get("/customers/customer/").content.decode()
    assert "rollout_action" not in changelist
    response = client.post("/customers/customer/", {"action": "rollout_action",
                                                    "_selected_action": [fleet_ab["a"][0].pk]})
    assert response.status_code in (200, 302) and 'id="rollout-form"' not in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_a_team_member_cannot_follow_another_teams_rollout_over_its_websocket(
        fleet_ab, team, django_user_model):
    from asgiref.sync import async_to_sync
    from channels.testing import WebsocketCommunicator

    from config.asgi import application
    from tests.test_live_logs import SLOW, refusal, session_cookie

    mixed = _rollout(fleet_ab["release"], ["a1.example.com", "b1.example.com"])
    member = session_cookie(_operator(team, django_user_model, "rollouts.control_rollout"))
    root = session_cookie(django_user_model.objects.create_superuser("root-rollouts", password="pw-Secret-123"))

    def socket(cookie, pk=mixed.pk):
        return WebsocketCommunicator(application, f"/ws/rollouts/{pk}/",
                                     headers=[(b"origin", b"http://localhost"), (b"cookie", cookie.encode())])

    async def scenario():
        assert await refusal(socket(member)) == 4403  # sees none of it: not even that it exists
        assert await refusal(socket(member, mixed.pk + 1000)) == 4403  # as an unknown rollout
        comm = socket(root)  # a superuser sees every team
        assert (await comm.connect(timeout=SLOW))[0]
        first = await comm.receive_json_from(timeout=SLOW)
        assert first["type"] == "rollout" and first["status"] == "scheduled" and "b1.example.com" in first["html"]
        await comm.disconnect()

    async_to_sync(scenario)()
