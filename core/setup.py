"""The operator group: what a non-superuser staff member may do (scoped by team elsewhere)."""

from django.contrib.auth.models import Group, Permission

OPERATORS = "Kasa operators"
PERMS = {
    "customers": ["view_customer", "change_customer", "add_customer", "view_service", "change_service",
                  "add_service", "delete_service", "view_databaseconnection", "change_databaseconnection",
                  "add_databaseconnection", "delete_databaseconnection", "view_team"],
    "operations": ["view_run"],
    "audit": ["view_auditentry"],
    "backups": ["view_backup", "view_backupartifact"],
    "releases": ["view_release", "view_componentversion"],
    "upgrades": ["view_upgrade", "view_upgradestep", "view_badrelease"],
}


def ensure_operator_group() -> Group:
    group, _ = Group.objects.get_or_create(name=OPERATORS)
    perms = Permission.objects.filter(
        content_type__app_label__in=PERMS.keys(),
        codename__in=[c for codes in PERMS.values() for c in codes],
    )
    group.permissions.set(perms)
    return group
