"""The operator group: what a non-superuser staff member may do (scoped by team elsewhere).

An operator sees their teams' customers, backups, runs, upgrades and audit trail, and takes every action on them
(core.permissions): check, back up now, restore, verify, download, pin/unpin, delete backups, upgrade, install,
roll back, resolve a quarantine, cancel a run. Not in the group: what decides what runs and as whom
(customers.change_runtime: root folder, run_as, process manager, app name, commands, health URLs) and therefore
adding customers; uploading releases (they serve every customer); storage targets, maintenance connections and
teams (superusers). `ensure_operator_group` sets exactly this list, so a re-run also takes away what was removed.
"""

from django.contrib.auth.models import Group, Permission
from django.db.models import Q

from core import permissions

OPERATORS = "Kasa operators"
ACTIONS = [permissions.CHECK, permissions.BACKUP, permissions.RESTORE, permissions.VERIFY, permissions.DOWNLOAD,
           permissions.PIN, permissions.DELETE, permissions.UPGRADE, permissions.INSTALL, permissions.ROLLBACK,
           permissions.RESOLVE, permissions.CANCEL,
           # Rollouts are team-scoped like single upgrades, which operators may already run one by one.
           permissions.ROLLOUT, permissions.ROLLOUT_CONTROL]
VIEW = {
    "customers": ["view_customer", "change_customer", "view_service", "change_service", "add_service",
                  "delete_service", "view_databaseconnection", "change_databaseconnection",
                  "add_databaseconnection", "delete_databaseconnection", "view_team"],
    "operations": ["view_run"],
    "audit": ["view_auditentry"],
    "backups": ["view_backup", "view_backupartifact"],
    "releases": ["view_release", "view_componentversion"],
    "upgrades": ["view_upgrade", "view_upgradestep", "view_badrelease"],
    "rollouts": ["view_rollout"],
}
PERMS: dict[str, list[str]] = {app: list(codes) for app, codes in VIEW.items()}
for _perm in ACTIONS:
    _app, _code = _perm.split(".")
    PERMS.setdefault(_app, []).append(_code)


def ensure_operator_group() -> Group:
    """Create or update the group with exactly PERMS (idempotent). A name that matches no permission is an error
    here rather than a permission silently missing from every operator."""
    wanted = {(app, code) for app, codes in PERMS.items() for code in codes}
    query = Q()
    for app, code in wanted:
        query |= Q(content_type__app_label=app, codename=code)
    perms = list(Permission.objects.filter(query).select_related("content_type"))
    missing = wanted - {(p.content_type.app_label, p.codename) for p in perms}
    if missing:
        raise LookupError(f"permissions missing (migrations not applied?): {', '.join(sorted(map('.'.join, missing)))}")
    group, _ = Group.objects.get_or_create(name=OPERATORS)
    group.permissions.set(perms)
    return group
