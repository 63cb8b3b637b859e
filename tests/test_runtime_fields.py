"""Who may decide what runs (issue 11, point 2): the root folder, run_as and each service's process manager, app
name, commands and health URL, only with customers.change_runtime; every change audited with before and after."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied

from audit.models import AuditEntry
from customers.changes import customer_save, service_save
from customers.models import Service
from tests.security.test_permissions import _change_form_data

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]


def runtime_holder(staff_user, team):
    user = staff_user(team)
    user.user_permissions.add(Permission.objects.get(content_type__app_label="customers", codename="change_runtime"))
    return user


def test_a_runtime_holder_sets_what_runs_and_the_audit_keeps_before_and_after(client, make_customer, team, staff_user,
                                                                             customer_users):
    customer = make_customer(services=("backend",))
    client.force_login(runtime_holder(staff_user, team))
    url = f"/customers/customer/{customer.pk}/change/"
    data = _change_form_data(client, url, customer)
    data.update({"run_as": customer_users[0], "services-0-process_manager": "command",
                 "services-0-start_command": json.dumps(["node", "server.js"]),
                 "services-0-health_url": "http://probe:Pr0be-Secret@127.0.0.1:4101/health"})
    response = client.post(url, data)
    assert response.status_code == 302, response.content.decode()[-3000:]
    customer.refresh_from_db()
    svc = customer.services.get()
    assert customer.run_as == customer_users[0] and svc.start_command == ["node", "server.js"]
    entries = {e.object_type: e for e in AuditEntry.objects.filter(action="customer.runtime")}
    assert entries["customers.Customer"].changes["fields"] == {"run_as": {"before": "", "after": customer_users[0]}}
    fields = entries["customers.Service"].changes["fields"]
    assert fields["start_command"] == {"before": [], "after": ["node", "server.js"]}  # commands are shown
    assert fields["process_manager"] == {"before": "none", "after": "command"}
    assert fields["health_url"] == {"before": "", "after": "http://probe:********@127.0.0.1:4101/health"}
    assert "Pr0be-Secret" not in json.dumps([e.changes for e in AuditEntry.objects.all()])
    assert all(e.customer == customer and e.source == "admin" for e in entries.values())


def test_an_operator_sees_what_runs_read_only_and_still_edits_the_rest(client, make_customer, team, staff_user):
    customer = make_customer(services=("backend",))
    service_save(Service(customer=customer, name="worker", path="backend", process_manager="command",
                         start_command=["node", "worker.js"]))  # set from the shell
    client.force_login(staff_user(team))
    url = f"/customers/customer/{customer.pk}/change/"
    html = client.get(url).content.decode()
    assert 'name="root"' not in html and 'name="run_as"' not in html and customer.root in html
    assert not re.search(r'name="services-\d+-(start_command|stop_command|process_manager|app_name|health_url)"', html)
    assert "worker.js" in html  # shown, not editable
    data = _change_form_data(client, url, customer)
    total = int(data["services-TOTAL_FORMS"])
    data.update({"name": "Renamed", "services-TOTAL_FORMS": str(total + 1), f"services-{total}-name": "assets",
                 f"services-{total}-path": "assets", f"services-{total}-customer": customer.pk})
    assert client.post(url, data).status_code == 302
    customer.refresh_from_db()
    assert customer.name == "Renamed" and customer.services.filter(name="assets", process_manager="none").exists()
    assert not AuditEntry.objects.filter(action="customer.runtime", actor__isnull=False).exists()

    # Deleting the service that runs something would change what Kasa starts: refused; the plain one goes.
    data = _change_form_data(client, url, customer)
    names = {data[f"services-{i}-name"]: i for i in range(int(data["services-TOTAL_FORMS"]))}
    data[f"services-{names['worker']}-DELETE"] = "on"
    response = client.post(url, data)
    assert response.status_code == 200 and "deleting it needs the permission" in response.content.decode()
    assert customer.services.filter(name="worker").exists()
    del data[f"services-{names['worker']}-DELETE"]
    data[f"services-{names['assets']}-DELETE"] = "on"
    assert client.post(url, data).status_code == 302
    assert set(customer.services.values_list("name", flat=True)) == {"backend", "worker"}


def test_the_services_refuse_a_runtime_change_without_the_permission_and_trust_the_shell(make_customer, team,
                                                                                        staff_user):
    from customers.services import customer_create

    customer = make_customer(services=("backend",))
    operator = staff_user(team)
    svc = customer.services.get()
    svc.start_command, svc.process_manager = ["sh", "-c", "id"], "command"
    with pytest.raises(PermissionDenied, match="change_runtime"):
        service_save(svc, actor=operator)
    with pytest.raises(PermissionDenied, match="change_runtime"):
        service_save(Service(customer=customer, name="new", path="backend", health_url="http://x.example/"),
                     actor=operator)
    other = Path(settings.KASA_CUSTOMERS_ROOT) / f"other-{uuid.uuid4().hex[:6]}"
    customer.root = str(other)
    with pytest.raises(PermissionDenied, match="change_runtime"):
        customer_save(customer, actor=operator)
    with pytest.raises(PermissionDenied, match="change_runtime"):
        customer_create(domain="new.example.com", root=str(other), team=team, actor=operator)
    customer.refresh_from_db()
    assert customer.root != str(other) and list(customer.services.values_list("start_command", flat=True)) == [[]]
    assert not customer.services.filter(name="new").exists()
    # The shell user (actor None: customer_add, a superuser's script) may; the change is audited all the same.
    service_save(svc)
    entry = AuditEntry.objects.get(action="customer.runtime")
    assert entry.changes["fields"]["start_command"]["after"] == ["sh", "-c", "id"] and entry.actor is None
