"""Staff see and act only on their teams' customers; superusers see all."""

import pytest
from django.core.exceptions import PermissionDenied

from audit.models import AuditEntry
from customers.models import Customer, Team
from customers.services import customer_check_start
from operations.models import Run

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]


@pytest.fixture
def two_teams(make_customer, staff_user, tmp_path):
    blue, red = Team.objects.create(name="Blue"), Team.objects.create(name="Red")
    from django.conf import settings

    roots = []
    for name in ("blue", "red"):
        root = settings.KASA_CUSTOMERS_ROOT / f"{name}-{tmp_path.name}"
        root.mkdir(parents=True, exist_ok=True)
        roots.append(root)
    blue_c = make_customer("blue.example.com", team_=blue, root=roots[0])
    red_c = make_customer("red.example.com", team_=red, root=roots[1])
    return {"blue": blue_c, "red": red_c, "alice": staff_user(blue), "bob": staff_user(red)}


def test_changelist_lists_only_the_users_teams_customers(client, two_teams, admin_user):
    client.force_login(two_teams["alice"])
    html = client.get("/customers/customer/").content.decode()
    assert "blue.example.com" in html and "red.example.com" not in html
    client.force_login(admin_user)
    html = client.get("/customers/customer/").content.decode()
    assert "blue.example.com" in html and "red.example.com" in html


def test_other_teams_customer_page_is_not_reachable(client, two_teams):
    client.force_login(two_teams["alice"])
    response = client.get(f"/customers/customer/{two_teams['red'].pk}/change/", follow=True)
    html = response.content.decode()
    assert response.redirect_chain and "doesn’t exist" in html
    assert 'name="domain"' not in html and two_teams["red"].root not in html


def test_check_action_on_other_teams_customer_starts_nothing(client, two_teams):
    client.force_login(two_teams["alice"])
    client.post("/customers/customer/", {"action": "check_action", "_selected_action": [two_teams["red"].pk]})
    assert not Run.objects.filter(customer=two_teams["red"]).exists()
    response = client.post("/customers/customer/",
                           {"action": "check_action", "_selected_action": [two_teams["blue"].pk]})
    run = Run.objects.get(customer=two_teams["blue"])
    assert response.status_code == 302 and response["Location"].endswith(f"/operations/run/{run.pk}/change/")
    assert run.requested_by == two_teams["alice"]


def test_service_refuses_a_user_outside_the_team(two_teams):
    with pytest.raises(PermissionDenied):
        customer_check_start(two_teams["red"], requested_by=two_teams["alice"])
    assert customer_check_start(two_teams["red"], requested_by=two_teams["bob"]).pk


def test_runs_and_their_pages_are_scoped_to_the_team(client, two_teams):
    red_run = customer_check_start(two_teams["red"], requested_by=two_teams["bob"])
    blue_run = customer_check_start(two_teams["blue"], requested_by=two_teams["alice"])
    client.force_login(two_teams["alice"])
    html = client.get("/operations/run/").content.decode()
    assert f"/operations/run/{blue_run.pk}/change/" in html
    assert f"/operations/run/{red_run.pk}/change/" not in html
    assert client.get(f"/operations/run/{blue_run.pk}/change/").status_code == 200
    assert client.get(f"/operations/run/{red_run.pk}/change/").status_code == 302  # "doesn't exist"
    client.post("/operations/run/", {"action": "cancel_action", "_selected_action": [red_run.pk]})
    red_run.refresh_from_db()
    assert red_run.status == "pending"  # untouched


def test_audit_trail_is_scoped_and_read_only(client, two_teams):
    customer_check_start(two_teams["red"], requested_by=two_teams["bob"])
    customer_check_start(two_teams["blue"], requested_by=two_teams["alice"])
    client.force_login(two_teams["alice"])
    html = client.get("/audit/auditentry/").content.decode()
    assert "blue.example.com" in html and "red.example.com" not in html
    entry = AuditEntry.objects.filter(customer=two_teams["blue"]).first()
    assert client.get("/audit/auditentry/add/").status_code == 403
    assert client.post(f"/audit/auditentry/{entry.pk}/delete/", {"post": "yes"}).status_code == 403
    assert AuditEntry.objects.filter(pk=entry.pk).exists()


def test_team_choices_offer_only_the_users_teams(client, two_teams):
    from django.contrib.auth.models import Permission

    alice = two_teams["alice"]
    client.force_login(alice)
    # A new customer sets its root folder, which decides what runs: not an operator's to add…
    assert client.get("/customers/customer/add/").status_code == 403
    # …but a holder of customers.change_runtime (and add_customer) may, for their own teams only.
    alice.user_permissions.add(*Permission.objects.filter(content_type__app_label="customers",
                                                          codename__in=["change_runtime", "add_customer"]))
    html = client.get("/customers/customer/add/").content.decode()
    assert ">Blue<" in html and ">Red<" not in html


def test_admin_changes_are_audited_with_field_names_only(client, admin_user, two_teams):
    client.force_login(admin_user)
    customer = two_teams["blue"]
    page = client.get(f"/customers/customer/{customer.pk}/change/")
    from tests.test_secrets import _inline_management

    form = page.context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if not isinstance(v, (list, dict))}
    data.update(_inline_management(page, customer), name="Renamed shop", versions="{}")
    assert client.post(f"/customers/customer/{customer.pk}/change/", data).status_code == 302
    entry = AuditEntry.objects.filter(action="admin.change", object_id=str(customer.pk)).get()
    assert entry.actor == admin_user and entry.source == "admin" and entry.customer == customer
    assert "Name" in str(entry.changes) and "Renamed shop" not in str(entry.changes)


def test_operations_are_audited_from_request_to_result(two_teams):
    from operations.services import run_execute

    run = customer_check_start(two_teams["blue"], requested_by=two_teams["alice"])
    run_execute(run.pk)
    actions = list(AuditEntry.objects.filter(object_id=str(run.pk), object_type="operations.Run")
                   .order_by("ts").values_list("action", "actor_repr", "result"))
    assert actions[0] == ("run.check.requested", two_teams["alice"].username, "pending")
    assert actions[1][0] == "run.check.finished" and actions[1][2] == "succeeded"
    assert Customer.objects.count() == 2


def test_check_now_button_starts_a_check_only_for_the_team(client, two_teams):
    client.force_login(two_teams["alice"])
    page = client.get(f"/customers/customer/{two_teams['blue'].pk}/change/").content.decode()
    assert "Check now" in page and "Recent operations" in page
    response = client.post(f"/customers/customer/{two_teams['blue'].pk}/check/")
    run = Run.objects.get(customer=two_teams["blue"])
    assert response["Location"].endswith(f"/operations/run/{run.pk}/change/")
    assert f"/operations/run/{run.pk}/change/" in client.get(
        f"/customers/customer/{two_teams['blue'].pk}/change/").content.decode()
    # a second click while it is pending is refused with the reason
    again = client.post(f"/customers/customer/{two_teams['blue'].pk}/check/", follow=True)
    assert f"check #{run.pk} is pending" in again.content.decode()
    assert client.post(f"/customers/customer/{two_teams['red'].pk}/check/").status_code == 404
    assert client.get(f"/customers/customer/{two_teams['blue'].pk}/check/").status_code == 405
    assert not Run.objects.filter(customer=two_teams["red"]).exists()
