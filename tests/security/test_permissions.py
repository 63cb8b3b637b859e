"""Attacks on who may act (issue 11, points 2, 6 and 10): a view-only user acting, an operator deciding what runs,
changelist filters naming what the user may not see. Each test failed on the code before the fix."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission

from backups.models import Backup, BackupArtifact, StorageTarget
from backups.services import default_target
from customers.models import Team
from operations.models import Run

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]


def user_with(team, *perms: str, django_user_model):
    """A staff member of `team` holding exactly `perms` ("app.codename"), in no group."""
    user = django_user_model.objects.create_user(f"u-{uuid.uuid4().hex[:6]}", password="pw-Secret-123",
                                                 is_staff=True)
    for perm in perms:
        app, codename = perm.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app, codename=codename))
    team.members.add(user)
    return user


def stored_backup(customer) -> tuple[Backup, Path]:
    """A succeeded backup whose objects really lie on the default local target."""
    target = default_target()
    prefix = f"{customer.domain}/attack-{uuid.uuid4().hex[:6]}"
    folder = Path(target.path) / prefix
    folder.mkdir(parents=True)
    (folder / "backend.tar").write_bytes(b"x" * 1024)
    (folder / "backup.json").write_text("{}")
    bk = Backup.objects.create(customer=customer, target=target, status=Backup.Status.SUCCEEDED, prefix=prefix,
                               scope="files", encrypted=False, compression="none", size=1024)
    BackupArtifact.objects.create(backup=bk, name="backend.tar", kind="service", source="backend", size=1024,
                                  sha256="0" * 64, compression="none")
    return bk, folder


def test_view_only_user_cannot_delete_backups_through_the_changelist_action(client, make_customer, team,
                                                                             django_user_model):
    bk, folder = stored_backup(make_customer())
    viewer = user_with(team, "backups.view_backup", django_user_model=django_user_model)
    client.force_login(viewer)
    client.post("/backups/backup/", {"action": "delete_backups", "_selected_action": [bk.pk], "confirm": "yes"})
    bk.refresh_from_db()
    assert bk.status == Backup.Status.SUCCEEDED and (folder / "backend.tar").is_file()
    html = client.get("/backups/backup/").content.decode()
    assert f"/backups/backup/{bk.pk}/change/" in html  # sees it…
    assert 'value="delete_backups"' not in html  # …and is offered no way to delete it


def test_view_only_user_cannot_open_or_post_the_restore_page(client, make_customer, team, django_user_model):
    customer = make_customer()
    bk, _ = stored_backup(customer)
    viewer = user_with(team, "backups.view_backup", django_user_model=django_user_model)
    client.force_login(viewer)
    response = client.post(f"/backups/backup/{bk.pk}/restore/", {"artifacts": ["backend.tar"],
                                                                  "safety_backup": "on", "confirm": customer.domain})
    assert not Run.objects.filter(customer=customer).exists()
    assert response.status_code == 403
    assert client.get(f"/backups/backup/{bk.pk}/restore/").status_code == 403
    assert 'id="restore-link"' not in client.get(f"/backups/backup/{bk.pk}/change/").content.decode()


def _change_form_data(client, url: str, customer) -> dict:
    """What the customer page posts back unchanged: the main form's fields and every inline row."""
    from tests.test_secrets import _inline_management

    page = client.get(url)
    assert page.status_code == 200
    form = page.context["adminform"].form
    data = {k: ("" if v is None else v) for k, v in form.initial.items() if not isinstance(v, (list, dict))}
    data["versions"] = json.dumps(customer.versions)
    data.update(_inline_management(page, customer))
    return data


def test_operator_cannot_set_what_runs_through_the_customer_form_or_its_service_inline(client, make_customer, team,
                                                                                      staff_user):
    customer = make_customer(services=("backend",))
    elsewhere = Path(settings.KASA_CUSTOMERS_ROOT) / f"elsewhere-{uuid.uuid4().hex[:6]}"
    elsewhere.mkdir()
    operator = staff_user(team)  # the "Kasa operators" group, a member of the customer's team
    client.force_login(operator)
    url = f"/customers/customer/{customer.pk}/change/"
    data = _change_form_data(client, url, customer)
    data.update({
        "name": "Renamed by the operator", "root": str(elsewhere), "run_as": "kasa-t-beta",
        "versions": json.dumps({"backend": "9.9.9"}),  # decides install or upgrade, and its permission
        "services-0-process_manager": "command", "services-0-app_name": "evil",
        "services-0-start_command": json.dumps(["sh", "-c", "cat /proc/1/environ > /tmp/keys"]),
        "services-0-stop_command": json.dumps(["sh", "-c", "rm -rf /"]),
        "services-0-health_url": "http://attacker.example/",
    })
    # A new service row carrying a start command of its own.
    total = int(data["services-TOTAL_FORMS"])
    data.update({"services-TOTAL_FORMS": str(total + 1), f"services-{total}-name": "worker",
                 f"services-{total}-path": "backend", f"services-{total}-process_manager": "command",
                 f"services-{total}-start_command": json.dumps(["sh", "-c", "id > /tmp/pwned"]),
                 f"services-{total}-customer": customer.pk})
    client.post(url, data)

    customer.refresh_from_db()
    assert customer.root != str(elsewhere) and customer.run_as == "" and customer.versions == {}
    for svc in customer.services.all():
        assert (svc.process_manager, svc.app_name, svc.start_command, svc.stop_command, svc.health_url) == (
            "none", "", [], [], ""), svc.name


def test_customer_changelist_filter_never_names_another_team(client, make_customer, staff_user, tmp_path):
    mine, also_mine = Team.objects.create(name=f"Mine-{tmp_path.name}"), Team.objects.create(name="Also mine")
    theirs = Team.objects.create(name=f"Theirs-{tmp_path.name}")
    make_customer(team_=mine)
    make_customer(team_=theirs)
    client.force_login(staff_user(mine, also_mine))  # two teams: Django shows a filter of more than one choice
    html = client.get("/customers/customer/").content.decode()
    assert f"?team__id__exact={mine.pk}" in html and f"?team__id__exact={also_mine.pk}" in html  # the filter…
    assert theirs.name not in html and f"team__id__exact={theirs.pk}" not in html  # …without the other team


def test_backup_changelist_filter_names_only_targets_the_team_may_use(client, make_customer, team, staff_user):
    other_team = Team.objects.create(name=f"other-{uuid.uuid4().hex[:6]}")
    customer = make_customer()
    ours = StorageTarget.objects.create(name="ours-vault", kind="local", path=str(settings.KASA_VAR_DIR / "ours"))
    ours.teams.set([team])
    theirs = StorageTarget.objects.create(name="theirs-vault", kind="local",
                                          path=str(settings.KASA_VAR_DIR / "theirs"))
    theirs.teams.set([other_team])
    stored_backup(customer)
    client.force_login(staff_user(team))
    html = client.get("/backups/backup/").content.decode()
    assert f"target__id__exact={ours.pk}" in html and f"target__id__exact={default_target().pk}" in html
    assert "theirs-vault" not in html and f"target__id__exact={theirs.pk}" not in html
