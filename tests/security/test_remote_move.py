"""Who may move a customer to another host (issue 14, point 7): the "Move to host…" page and the CLI.

A move changes where a customer runs and which folder is its root: another team's user never reaches the page (a
404, GET or POST, and no run), a user of the team needs both the restore permission and customers.change_runtime
(a 403 without), and a refused request starts nothing."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from customers.models import Team
from hosts.models import Host
from operations.models import Run
from tests.security.test_permissions import stored_backup, user_with

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]


def _target() -> Host:
    return Host.objects.create(name="far-away", ssh_user="root", address="10.9.9.9", customers_root="/srv/customers",
                               host_key="")


def test_another_teams_user_cannot_reach_the_move_page_nor_move_the_customer(client, make_customer, team,
                                                                            django_user_model):
    customer = make_customer()
    bk, _ = stored_backup(customer)
    _target()
    other = Team.objects.create(name="other-team")
    intruder = user_with(other, "backups.restore_backup", "customers.change_runtime", "customers.view_customer",
                         django_user_model=django_user_model)
    client.force_login(intruder)
    url = f"/customers/customer/{customer.pk}/move/"
    assert client.get(url).status_code == 404
    response = client.post(url, {"host": "far-away", "backup": str(bk.pk), "confirm": customer.domain})
    assert response.status_code == 404
    assert client.post(f"/customers/customer/{customer.pk}/move_confirm/").status_code == 404
    assert not Run.objects.filter(customer=customer).exists()
    customer.refresh_from_db()
    assert customer.host.name == "local"


def test_a_team_user_needs_the_runtime_permission_to_move_and_is_offered_no_link_without_it(
        client, make_customer, team, django_user_model):
    customer = make_customer()
    bk, _ = stored_backup(customer)
    _target()
    restorer = user_with(team, "backups.restore_backup", "customers.view_customer",
                         django_user_model=django_user_model)
    client.force_login(restorer)
    url = f"/customers/customer/{customer.pk}/move/"
    assert client.get(url).status_code == 403
    assert client.post(url, {"host": "far-away", "backup": str(bk.pk), "confirm": customer.domain}).status_code == 403
    assert 'id="move-to-host"' not in client.get(f"/customers/customer/{customer.pk}/change/").content.decode()
    assert not Run.objects.filter(customer=customer).exists()


def test_the_move_page_refuses_an_untrusted_host_and_the_cli_a_move_without_a_verified_backup(
        client, make_customer, team, django_user_model):
    customer = make_customer()
    bk, _ = stored_backup(customer)
    _target()
    mover = user_with(team, "backups.restore_backup", "customers.change_runtime", "customers.view_customer",
                      django_user_model=django_user_model)
    client.force_login(mover)
    assert 'id="move-to-host"' in client.get(f"/customers/customer/{customer.pk}/change/").content.decode()
    page = client.get(f"/customers/customer/{customer.pk}/move/")
    assert page.status_code == 200 and "far-away" in page.content.decode()
    bk.verify_status = "passed"
    bk.save(update_fields=["verify_status"])
    response = client.post(f"/customers/customer/{customer.pk}/move/",
                           {"host": "far-away", "backup": str(bk.pk), "confirm": customer.domain}, follow=True)
    text = response.content.decode()
    assert "has no trusted host key" in text and "has no run_as user" in text
    assert not Run.objects.filter(customer=customer).exists()
    bk.verify_status = "never"
    bk.save(update_fields=["verify_status"])
    with pytest.raises(CommandError, match="has no verified backup") as refused:
        call_command("customer_move", customer.domain, "--to", "far-away", stdout=io.StringIO())
    assert refused.value.returncode == 2
    with pytest.raises(CommandError, match="no host named 'nowhere'") as refused:
        call_command("restore", str(bk.pk), "--to-host", "nowhere", stdout=io.StringIO())
    assert refused.value.returncode == 2
    assert not Run.objects.filter(customer=customer).exists()
