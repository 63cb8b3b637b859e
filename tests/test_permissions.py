"""Permissions on every action (issue 11, point 6): each changelist action and each custom admin URL, tried by a
view-only member of the team (nothing happens, 403, no button), an operator of another team (nothing happens, 404)
and an operator of the team (works); and the services themselves, which every caller goes through."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied
from django.utils import timezone

from audit.models import AuditEntry
from backups.models import Backup
from core import permissions
from customers.models import Customer, Team
from operations.models import Run
from tests.security.test_permissions import stored_backup, user_with
from upgrades.models import Upgrade

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]

VIEW_ONLY = ("customers.view_customer", "customers.view_service", "customers.view_databaseconnection",
             "customers.view_team", "backups.view_backup", "backups.view_backupartifact", "operations.view_run",
             "upgrades.view_upgrade", "upgrades.view_upgradestep", "upgrades.view_badrelease",
             "audit.view_auditentry", "releases.view_release", "releases.view_componentversion")


def finished_upgrade(customer, status) -> Upgrade:
    now = timezone.now()
    run = Run.objects.create(customer=customer, kind="upgrade", mutating=True, status="succeeded" if status ==
                             Upgrade.Status.SUCCEEDED else "failed", started_at=now - timedelta(seconds=5),
                             finished_at=now)
    return Upgrade.objects.create(customer=customer, run=run, status=status, from_versions={"backend": "1.0.0"},
                                  to_versions={"backend": "1.1.0"}, started_at=now - timedelta(seconds=5),
                                  finished_at=now)


@pytest.fixture
def site(make_customer, staff_user, django_user_model):
    blue, red = (Team.objects.create(name=f"{c}-{uuid.uuid4().hex[:6]}") for c in ("blue", "red"))
    customer = make_customer(team_=blue, services=("backend",))
    Customer.objects.filter(pk=customer.pk).update(versions={"backend": "1.1.0"})
    customer.refresh_from_db()
    backup, folder = stored_backup(customer)
    succeeded = finished_upgrade(customer, Upgrade.Status.SUCCEEDED)  # what "Roll back" would undo
    quarantined = finished_upgrade(customer, Upgrade.Status.QUARANTINED)
    run = Run.objects.create(customer=customer, kind="check", mutating=False)  # pending: cancellable
    theirs = make_customer(team_=red)  # the outsider's own rows (an empty changelist shows no actions at all)
    stored_backup(theirs)
    Run.objects.create(customer=theirs, kind="check", mutating=False)
    return {"customer": customer, "backup": backup, "folder": folder, "upgrade": quarantined,
            "succeeded": succeeded, "run": run, "blue": blue, "red": red,
            "viewer": user_with(blue, *VIEW_ONLY, django_user_model=django_user_model),
            "outsider": staff_user(red), "operator": staff_user(blue)}


def custom_urls(s) -> list[tuple[str, str, dict]]:
    """Every custom admin URL that acts (or shows what an action would do), with a POST that would act."""
    c, b, u, r, domain = s["customer"].pk, s["backup"].pk, s["upgrade"].pk, s["run"].pk, s["customer"].domain
    return [
        ("post", f"/customers/customer/{c}/check/", {}),
        ("get", f"/customers/customer/{c}/backup/", {}),
        ("post", f"/customers/customer/{c}/backup/", {"scope": "full", "compression": "zstd", "target": "local"}),
        ("get", f"/customers/customer/{c}/upgrade/", {}),
        ("post", f"/customers/customer/{c}/upgrade/", {"release": "2.5", "confirm": domain}),
        ("get", f"/customers/customer/{c}/rollback/", {}),
        ("post", f"/customers/customer/{c}/rollback/", {"confirm": domain}),
        ("get", f"/backups/backup/{b}/restore/", {}),
        ("post", f"/backups/backup/{b}/restore/", {"artifacts": ["backend.tar"], "confirm": domain}),
        ("post", f"/backups/backup/{b}/verify/", {}),
        ("get", f"/backups/{b}/download/backend.tar", {}),
        ("get", f"/upgrades/upgrade/{u}/resolve/", {}),
        ("post", f"/upgrades/upgrade/{u}/resolve/", {"note": "looked at it"}),
        ("post", f"/operations/run/{r}/cancel/", {}),
    ]


def changelist_actions(s) -> list[tuple[str, str, list[int]]]:
    c, b, r = s["customer"].pk, s["backup"].pk, s["run"].pk
    return [("/customers/customer/", "check_action", [c]), ("/customers/customer/", "backup_action", [c]),
            ("/backups/backup/", "pin", [b]), ("/backups/backup/", "unpin", [b]),
            ("/backups/backup/", "verify_backups", [b]), ("/backups/backup/", "restore_backup", [b]),
            ("/backups/backup/", "delete_backups", [b]), ("/operations/run/", "cancel_action", [r])]


def assert_untouched(s) -> None:
    backup, upgrade, run = (Backup.objects.get(pk=s["backup"].pk), Upgrade.objects.get(pk=s["upgrade"].pk),
                            Run.objects.get(pk=s["run"].pk))
    assert backup.status == "succeeded" and not backup.pinned and (s["folder"] / "backend.tar").is_file()
    assert upgrade.resolved_at is None and run.status == "pending" and run.cancel_requested_at is None
    assert Run.objects.filter(customer=s["customer"]).count() == 3  # the two upgrades' runs and the check
    assert not AuditEntry.objects.filter(action__in=["backup.download", "backup.pin", "backup.delete"],
                                         customer=s["customer"]).exists()


BUTTONS = {  # page -> ids or links of what acts
    "customer": ['id="check-now"', 'id="backup-now"', 'id="upgrade-to"', 'id="versions-upgrade"', 'id="rollback-link"',
                 'class="kasa-resolve-link"', "/upgrade/?release="],
    "backup": ['id="restore-link"', 'id="verify-now"', "/download/"],
    "upgrade": ['id="resolve-link"'],
    "run": ['id="cancel-run"'],
}


def pages(s) -> dict[str, str]:
    return {"customer": f"/customers/customer/{s['customer'].pk}/change/",
            "backup": f"/backups/backup/{s['backup'].pk}/change/",
            "upgrade": f"/upgrades/upgrade/{s['upgrade'].pk}/change/",
            "run": f"/operations/run/{s['run'].pk}/change/"}


def test_view_only_member_sees_every_page_without_a_button_that_acts(client, site):
    client.force_login(site["viewer"])
    for name, url in pages(site).items():
        response = client.get(url)
        assert response.status_code == 200, url
        html = response.content.decode()
        for button in BUTTONS[name]:
            assert button not in html, (name, button)
    assert "backend.tar" in client.get(pages(site)["backup"]).content.decode()  # the artifact, listed, no link


def test_view_only_member_gets_403_from_every_custom_url_and_nothing_happens(client, site):
    client.force_login(site["viewer"])
    for method, url, data in custom_urls(site):
        response = getattr(client, method)(url, data)
        assert response.status_code == 403, (method, url, response.status_code)
    assert_untouched(site)


def test_view_only_member_is_offered_no_action_and_posting_one_does_nothing(client, site):
    client.force_login(site["viewer"])
    for url, action, ids in changelist_actions(site):
        assert f'<option value="{action}"' not in client.get(url).content.decode(), action
        client.post(url, {"action": action, "_selected_action": ids, "confirm": "yes"})
    assert_untouched(site)


def test_another_teams_operator_gets_404_and_its_actions_reach_nothing(client, site):
    client.force_login(site["outsider"])
    for method, url, data in custom_urls(site):
        response = getattr(client, method)(url, data)
        assert response.status_code == 404, (method, url, response.status_code)
    for url in pages(site).values():
        assert client.get(url).status_code == 302, url  # the admin's "doesn't exist"
    for url, action, ids in changelist_actions(site):
        assert f'<option value="{action}"' in client.get(url).content.decode(), action  # an operator: offered…
        client.post(url, {"action": action, "_selected_action": ids, "confirm": "yes"})  # …on their own rows only
    assert_untouched(site)


def test_the_teams_operator_sees_every_button_and_each_action_works(client, site):
    customer, backup, run = site["customer"], site["backup"], site["run"]
    client.force_login(site["operator"])
    for name, url in pages(site).items():
        html = client.get(url).content.decode()
        for button in BUTTONS[name]:
            if button != "/upgrade/?release=":  # no release is registered here
                assert button in html, (name, button)

    def started(kind) -> Run:
        return Run.objects.filter(customer=customer, kind=kind, status="pending").latest("pk")

    def cancel(new: Run) -> None:  # the Cancel button, so that the next mutating run may start
        assert client.post(f"/operations/run/{new.pk}/cancel/").status_code == 302
        assert Run.objects.get(pk=new.pk).status == "cancelled"

    client.post("/operations/run/", {"action": "cancel_action", "_selected_action": [run.pk]})
    assert Run.objects.get(pk=run.pk).status == "cancelled"
    assert client.post(f"/customers/customer/{customer.pk}/check/").status_code == 302
    assert started("check").requested_by == site["operator"]
    cancel(started("check"))
    assert client.get(f"/customers/customer/{customer.pk}/backup/").status_code == 200
    client.post(f"/customers/customer/{customer.pk}/backup/", {"scope": "full", "compression": "zstd",
                                                               "target": "local"})
    cancel(started("backup"))
    assert client.get(f"/backups/backup/{backup.pk}/restore/").status_code == 200
    client.post(f"/backups/backup/{backup.pk}/restore/", {"artifacts": ["backend.tar"], "confirm": customer.domain})
    cancel(started("restore"))
    client.post(f"/backups/backup/{backup.pk}/verify/")
    cancel(started("verify"))
    assert client.get(f"/customers/customer/{customer.pk}/rollback/").status_code == 200
    client.post(f"/customers/customer/{customer.pk}/rollback/", {"confirm": customer.domain})
    cancel(started("rollback"))
    assert client.get(f"/customers/customer/{customer.pk}/upgrade/").status_code == 200
    response = client.get(f"/backups/{backup.pk}/download/backend.tar")
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"x" * 1024
    client.post("/backups/backup/", {"action": "pin", "_selected_action": [backup.pk]})
    assert Backup.objects.get(pk=backup.pk).pinned
    client.post("/backups/backup/", {"action": "unpin", "_selected_action": [backup.pk]})
    client.post("/backups/backup/", {"action": "delete_backups", "_selected_action": [backup.pk], "confirm": "yes"})
    assert Backup.objects.get(pk=backup.pk).status == "deleted" and not site["folder"].exists()
    client.post(f"/upgrades/upgrade/{site['upgrade'].pk}/resolve/", {"note": "checked by hand"})
    assert Upgrade.objects.get(pk=site["upgrade"].pk).resolved_by == site["operator"]


def test_install_needs_its_own_permission(client, make_customer, team, django_user_model, staff_user):
    from backups.services import backup_start  # noqa: F401  (the services below share core.permissions)
    from releases.models import Release
    from upgrades.services import upgrade_start

    new = make_customer(team_=team)  # no version yet: its first upgrade is an install
    release = Release.objects.create(name="1.0")
    upgrader = user_with(team, "customers.view_customer", permissions.UPGRADE, django_user_model=django_user_model)
    client.force_login(upgrader)
    assert client.get(f"/customers/customer/{new.pk}/upgrade/").status_code == 403
    assert 'id="upgrade-to"' not in client.get(f"/customers/customer/{new.pk}/change/").content.decode()
    with pytest.raises(PermissionDenied, match="install_release"):
        upgrade_start(new, release, requested_by=upgrader)
    operator = staff_user(team)
    client.force_login(operator)
    assert client.get(f"/customers/customer/{new.pk}/upgrade/").status_code == 200
    run = upgrade_start(new, release, requested_by=operator, enqueue=False)
    assert run.upgrade.kind == "install"


def test_services_refuse_who_lacks_the_permission_or_the_team_and_trust_the_shell(site):
    from backups.services import backup_delete, backup_download, backup_pin, backup_start, restore_start, verify_start
    from customers.services import customer_check_start
    from operations.services import run_cancel
    from upgrades.services import quarantine_resolve, rollback_start

    customer, backup = site["customer"], site["backup"]
    calls = {
        "check": lambda u: customer_check_start(customer, requested_by=u),
        "backup": lambda u: backup_start(customer, requested_by=u, encrypt=False),
        "restore": lambda u: restore_start(backup, confirmed=True, requested_by=u),
        "verify": lambda u: verify_start(backup, requested_by=u),
        "download": lambda u: backup_download(backup, "backend.tar", requested_by=u),
        "pin": lambda u: backup_pin(backup, pinned=True, actor=u),
        "delete": lambda u: backup_delete(backup, actor=u),
        "rollback": lambda u: rollback_start(customer, requested_by=u),
        "resolve": lambda u: quarantine_resolve(site["upgrade"], actor=u, note="x"),
        "cancel": lambda u: run_cancel(site["run"], requested_by=u),
    }
    for call in calls.values():
        with pytest.raises(PermissionDenied, match="you may not"):
            call(site["viewer"])
        with pytest.raises(PermissionDenied, match="not in the team"):
            call(site["outsider"])
    assert_untouched(site)
    # None: the shell user (CLI, schedules) who already holds Kasa's keys.
    calls["cancel"](None)
    calls["pin"](None)
    assert Run.objects.get(pk=site["run"].pk).status == "cancelled" and Backup.objects.get(pk=backup.pk).pinned


def test_an_unknown_run_kind_is_for_superusers_only(site, admin_user):
    from operations import registry
    from operations.services import run_start

    registry.register("t-perm", "tests.kinds.counting", mutating=False)
    try:
        with pytest.raises(PermissionDenied, match="only a superuser"):
            run_start(site["customer"], kind="t-perm", requested_by=site["operator"], enqueue=False)
        assert run_start(site["customer"], kind="t-perm", requested_by=admin_user, enqueue=False).pk
    finally:
        registry.unregister("t-perm")


def test_operators_group_holds_every_action_but_runtime_and_is_idempotent(db):
    from console.setup import OPERATORS, ensure_operator_group

    group = ensure_operator_group()
    extra = Permission.objects.get(content_type__app_label="customers", codename="change_runtime")
    group.permissions.add(extra)  # given by hand: a re-run takes it away again
    group = ensure_operator_group()
    held = {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.select_related("content_type")}
    assert {permissions.CHECK, permissions.BACKUP, permissions.RESTORE, permissions.VERIFY, permissions.DOWNLOAD,
            permissions.PIN, permissions.DELETE, permissions.UPGRADE, permissions.INSTALL, permissions.ROLLBACK,
            permissions.RESOLVE, permissions.CANCEL} <= held
    assert not held & {permissions.RUNTIME, permissions.UPLOAD_RELEASES, "customers.add_customer",
                       "backups.add_storagetarget", "customers.change_team"}
    assert Permission.objects.filter(group__name=OPERATORS).count() == len(held)
