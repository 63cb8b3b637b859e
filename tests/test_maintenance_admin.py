"""The maintenance connections' admin: superusers only, the password encrypted at rest and write-only."""

from __future__ import annotations

import pytest
from django.db import connection

from customers.models import MaintenanceConnection

pytestmark = pytest.mark.django_db


def _raw_password(pk: int) -> str:
    with connection.cursor() as cur:
        cur.execute("SELECT password FROM customers_maintenanceconnection WHERE id = %s", [pk])
        return cur.fetchone()[0]


def test_a_superuser_adds_a_maintenance_connection_whose_password_is_never_shown(client, admin_user, make_customer):
    make_customer(databases=[("main", "postgresql://shop:x@db.internal/shop"),
                             ("other", "postgresql://shop:x@db.internal:5433/shop")])
    client.force_login(admin_user)
    response = client.post("/customers/maintenanceconnection/add/", {
        "engine": "postgresql", "host": "db.internal", "port": "5432", "user": "postgres",
        "password": "Adm1n-Secret", "database": "postgres"})
    assert response.status_code == 302, response.content.decode()[:2000]
    mc = MaintenanceConnection.objects.get()
    raw = _raw_password(mc.pk)
    assert "Adm1n-Secret" not in raw and raw.startswith("gAAAA") and mc.password.reveal() == "Adm1n-Secret"
    listing = client.get("/customers/maintenanceconnection/").content.decode()
    assert "postgresql://postgres@db.internal:5432" in listing and "Adm1n-Secret" not in listing
    assert '<td class="field-databases_served">1</td>' in listing  # the database on 5432 (no port: the default)
    url = f"/customers/maintenanceconnection/{mc.pk}/change/"
    html = client.get(url).content.decode()
    assert "Adm1n-Secret" not in html and raw not in html and 'type="password"' in html
    # Saved with the password left empty: the stored one stays.
    response = client.post(url, {"engine": "postgresql", "host": "db.internal", "port": "5432", "user": "postgres",
                                 "password": "", "database": "postgres"})
    assert response.status_code == 302 and _raw_password(mc.pk) == raw


def test_staff_who_are_not_superusers_cannot_see_or_add_maintenance_connections(client, staff_user, team):
    mc = MaintenanceConnection.objects.create(engine="mysql", host="127.0.0.1", port=3306, user="root",
                                              password="r00t-Secret")
    client.force_login(staff_user(team))
    assert client.get("/customers/maintenanceconnection/").status_code == 403
    assert client.get(f"/customers/maintenanceconnection/{mc.pk}/change/").status_code in (403, 302)
    response = client.post("/customers/maintenanceconnection/add/", {
        "engine": "mysql", "host": "10.0.0.1", "port": "3306", "user": "root", "password": "x"})
    assert response.status_code == 403
    assert MaintenanceConnection.objects.count() == 1
    assert "maintenanceconnection" not in client.get("/").content.decode()
