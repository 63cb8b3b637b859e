"""The customer page's form (issue 12, point 8): one validator per field for the admin and the CLI, commands edited
one argument per line (still an argv list in the database), versions shown once, a favicon."""

from __future__ import annotations

import json
import re
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from customers.changes import service_save
from customers.forms import ArgvField
from customers.models import Customer, DatabaseConnection, MaintenanceConnection, Service
from tests.security.test_permissions import _change_form_data

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]

PORT_MESSAGE = "port 99999 is not a TCP port (1-65535)"


def runtime_holder(staff_user, team):
    user = staff_user(team)
    user.user_permissions.add(Permission.objects.get(content_type__app_label="customers", codename="change_runtime"))
    return user


def test_a_database_port_of_99999_is_refused_by_the_admin_and_by_customer_add_with_the_same_message(
        client, make_customer, team, staff_user, customer_root):
    customer = make_customer(databases=[("main", "postgresql://shop:pw@127.0.0.1:5432/shop")])
    client.force_login(staff_user(team))
    url = f"/customers/customer/{customer.pk}/change/"
    data = _change_form_data(client, url, customer)
    data["databases-0-port"] = "99999"
    response = client.post(url, data)
    assert response.status_code == 200
    errors = response.context["inline_admin_formsets"][1].formset.errors[0]
    assert errors == {"port": [PORT_MESSAGE]}
    assert DatabaseConnection.objects.get(customer=customer).port == 5432

    with pytest.raises(CommandError) as refused:
        call_command("customer_add", "port.example.com", "--root", str(customer_root.with_name("port-root")),
                     "--database", "postgresql://shop:pw@127.0.0.1:99999/shop", stdout=StringIO())
    assert refused.value.returncode == 2 and PORT_MESSAGE in str(refused.value)
    assert not Customer.objects.filter(domain="port.example.com").exists()

    # The same validator guards the maintenance logins (superusers' admin page): one rule for every port.
    with pytest.raises(ValidationError) as bad:
        MaintenanceConnection(engine="postgresql", host="127.0.0.1", port=99999, user="postgres").full_clean()
    assert bad.value.message_dict["port"] == [PORT_MESSAGE]


def test_a_runtime_holder_edits_commands_one_argument_per_line_and_they_are_saved_as_argv_lists(
        client, make_customer, team, staff_user):
    customer = make_customer(services=("backend",))
    service_save(Service(customer=customer, name="worker", path="backend", process_manager="command",
                         start_command=["node", "server.js", "--title=My shop"]))
    client.force_login(runtime_holder(staff_user, team))
    url = f"/customers/customer/{customer.pk}/change/"
    html = client.get(url).content.decode()
    # Shown as lines, not as JSON; a space inside one argument stays in it.
    assert re.search(r'<textarea name="services-\d+-start_command"[^>]*>\nnode\nserver.js\n--title=My shop</textarea>',
                     html), html
    assert not re.search(r">\s*\[\]\s*<", html)  # no raw JSON list shown

    data = _change_form_data(client, url, customer)
    index = next(i for i in range(int(data["services-TOTAL_FORMS"])) if data[f"services-{i}-name"] == "worker")
    data[f"services-{index}-start_command"] = "/usr/bin/node\r\nserver.js\r\n\r\n  --port=4100  \r\n"
    data[f"services-{index}-stop_command"] = "pkill\n-f\nserver.js"
    assert client.post(url, data).status_code == 302
    worker = Service.objects.get(customer=customer, name="worker")
    assert worker.start_command == ["/usr/bin/node", "server.js", "--port=4100"]
    assert worker.stop_command == ["pkill", "-f", "server.js"]

    # Shown again exactly as saved: a round trip changes nothing.
    data = _change_form_data(client, url, customer)
    assert data[f"services-{index}-start_command"] == json.dumps(worker.start_command)  # the helper posts JSON
    field = ArgvField(required=False)  # as the model field (blank=True) makes it
    assert field.clean(field.prepare_value(worker.start_command)) == worker.start_command
    assert field.clean(json.dumps(["npm", "run", "start"])) == ["npm", "run", "start"]  # JSON pasted whole
    assert field.clean("") == []


@pytest.mark.parametrize("typed, message", [
    ("npm start", "the program 'npm start' contains a space: put one argument per line (npm, then start)"),
    ('["npm", 3]', "must be a list of strings"),
])
def test_a_command_typed_as_a_shell_line_is_refused_on_its_field(client, make_customer, team, staff_user,
                                                                typed, message):
    customer = make_customer(services=("backend",))
    client.force_login(runtime_holder(staff_user, team))
    url = f"/customers/customer/{customer.pk}/change/"
    data = _change_form_data(client, url, customer)
    data.update({"services-0-process_manager": "command", "services-0-start_command": typed})
    response = client.post(url, data)
    assert response.status_code == 200
    assert message in response.context["inline_admin_formsets"][0].formset.errors[0]["start_command"][0]
    assert Service.objects.get(customer=customer).start_command == []
    # The same validator on the model: whatever saves through full_clean refuses it too.
    with pytest.raises(ValidationError):
        Service(customer=customer, name="x", path="backend", start_command=["npm start"]).full_clean()


def test_an_operator_reads_commands_as_a_command_line_and_never_gets_a_field_for_them(
        client, make_customer, team, staff_user):
    customer = make_customer(services=("backend",))
    service_save(Service(customer=customer, name="worker", path="backend", process_manager="command",
                         start_command=["node", "server.js", "--title=My shop"]))
    client.force_login(staff_user(team))
    html = client.get(f"/customers/customer/{customer.pk}/change/").content.decode()
    assert "<code>node server.js &#x27;--title=My shop&#x27;</code>" in html
    assert not re.search(r'name="services-\d+-(start|stop)_command"', html)
    assert not re.search(r">\s*\[\]\s*<", html)  # an empty command is a dash, not a raw JSON list


def test_versions_appear_once_and_only_a_runtime_holder_may_correct_them(client, make_customer, team, staff_user):
    customer = make_customer()
    customer.versions = {"backend": "2.4.0", "store": "2.4.1"}
    customer.save()
    url = f"/customers/customer/{customer.pk}/change/"

    client.force_login(staff_user(team))
    html = client.get(url).content.decode()
    assert 'name="versions"' not in html and '{"backend"' not in html and "field-versions" not in html
    assert html.count(">2.4.0<") == 1  # the Versions card's table

    client.force_login(runtime_holder(staff_user, team))
    html = client.get(url).content.decode()
    assert re.search(r'<details[^>]*>\s*<summary>.*Correct the recorded versions', html, re.S)
    assert re.search(r'<textarea name="versions"[^>]*>\nbackend=2.4.0\nstore=2.4.1</textarea>', html)
    data = _change_form_data(client, url, customer)
    data["versions"] = "backend=2.5.0\nstore=2.4.1"
    assert client.post(url, data).status_code == 302
    customer.refresh_from_db()
    assert customer.versions == {"backend": "2.5.0", "store": "2.4.1"}
    data["versions"] = "backend 2.6.0"
    response = client.post(url, data)
    assert response.status_code == 200 and "write COMPONENT=VERSION" in response.content.decode()


def test_every_admin_page_links_the_favicon_and_favicon_ico_leads_to_it(client, staff_user, team):
    assert 'rel="icon"' in client.get("/login/").content.decode()  # before logging in too
    client.force_login(staff_user(team))
    html = client.get("/customers/customer/").content.decode()
    icon = re.search(r'<link rel="icon" type="image/svg\+xml" href="([^"]+)">', html).group(1)
    assert icon.endswith("kasa/favicon.svg")
    client.logout()
    response = client.get("/favicon.ico")  # browsers ask without a session: it needs none and shows nothing else
    assert response.status_code == 302 and response["Location"] == icon


def test_tags_are_normalized_and_checked_alike_by_customer_add_and_the_model_and_a_pin_needs_a_reason(
        make_customer, customer_root):
    out = StringIO()
    call_command("customer_add", "tagged.example.com", "--root", str(customer_root.with_name("tagged-root")),
                 "--tag", "Canary", "--tag", "eu-west canary", "--json", stdout=out)
    assert json.loads(out.getvalue())["tags"] == ["canary", "eu-west"]
    assert list(Customer.objects.tagged("CANARY").values_list("domain", flat=True)) == ["tagged.example.com"]
    with pytest.raises(CommandError) as refused:
        call_command("customer_add", "bad-tag.example.com", "--root", str(customer_root.with_name("bt-root")),
                     "--tag", "a/b", stdout=StringIO())
    assert refused.value.returncode == 2 and "not: a/b" in str(refused.value)
    customer = make_customer()
    customer.version_pin = "2.4"
    with pytest.raises(ValidationError) as bad:
        customer.full_clean()
    assert "say why" in str(bad.value.message_dict["version_pin_reason"])
