"""Who may do what: the one place that names the permission of each action.

An action on a customer is allowed when both hold:

- the user may see the customer (a member of its team, or a superuser). Otherwise the object is treated as
  missing: a 404 in the admin, never a 403 that would confirm it exists;
- the user holds the action's permission (superusers hold every one).

The service functions check both (`require`), so the admin, the views and any later caller share one rule; the
admin also hides what the user may not do (`may`) and answers 403 on its pages.

`user=None` is the shell user: management commands, schedules, and the work a run does on its own (a restore's
safety backup, an upgrade's backup). Whoever runs manage.py already holds Kasa's keys and its database, so no
permission is asked of them. Nothing reachable over HTTP passes None.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied

CHECK = "customers.check_customer"
BACKUP = "backups.add_backup"  # "Back up now"
RESTORE = "backups.restore_backup"
VERIFY = "backups.verify_backup"
DOWNLOAD = "backups.download_backup"
PIN = "backups.pin_backup"  # pin and unpin
DELETE = "backups.delete_backup"  # delete from storage
UPGRADE = "upgrades.upgrade_customer"
INSTALL = "upgrades.install_release"  # an upgrade of a customer that has no version yet
ROLLBACK = "upgrades.rollback_customer"
RESOLVE = "upgrades.change_upgrade"  # mark a quarantined upgrade resolved: the row changes, nothing else
CANCEL = "operations.cancel_run"
# What runs and as whom: root folder, run_as, process manager, app name, start/stop commands, health URLs.
# Superusers and holders of this permission only; not in the operators group.
RUNTIME = "customers.change_runtime"
ROLLOUT = "rollouts.add_rollout"  # start a fleet rollout (each customer's upgrade also needs UPGRADE)
ROLLOUT_CONTROL = "rollouts.control_rollout"  # pause, resume, promote, abort, retry
UPLOAD_RELEASES = "releases.add_release"  # releases serve every customer: not in the operators group

DOING = {
    CHECK: "check a customer", BACKUP: "start a backup", RESTORE: "restore a backup",
    VERIFY: "verify a backup", DOWNLOAD: "download a backup", PIN: "pin or unpin a backup",
    DELETE: "delete a backup", UPGRADE: "upgrade a customer", INSTALL: "install a release on a new customer",
    ROLLBACK: "roll back an upgrade", RESOLVE: "resolve a quarantine", CANCEL: "cancel a run",
    RUNTIME: "change what runs (root folder, run as, process manager, commands, health URLs)",
    UPLOAD_RELEASES: "upload releases", ROLLOUT: "start a fleet rollout",
    ROLLOUT_CONTROL: "pause, resume, promote, abort or retry a rollout",
}

# The permission of each kind of run (operations.services.run_start checks it). An upgrade of a customer
# without versions is an install: upgrades.services passes INSTALL itself.
RUN_KINDS = {"check": CHECK, "backup": BACKUP, "restore": RESTORE, "verify": VERIFY, "upgrade": UPGRADE,
             "rollback": ROLLBACK}


def has(user, perm: str) -> bool:
    """Whether an active staff user holds `perm` (superusers hold all)."""
    return bool(user is not None and user.is_active and user.is_staff and user.has_perm(perm))


def may_see(user, customer) -> bool:
    """The team rule: a member of the customer's team, or a superuser."""
    return type(customer).objects.visible_to(user).filter(pk=customer.pk).exists()


def require(user, perm: str, customer=None) -> None:
    """PermissionDenied unless `user` may see `customer` (when given) and holds `perm`. None: the shell user."""
    if user is None:
        return
    if customer is not None and not may_see(user, customer):
        raise PermissionDenied(f"you are not in the team of {customer}")
    if not has(user, perm):
        raise PermissionDenied(f"you may not {DOING.get(perm, perm)} (it needs the permission {perm})")


def require_superuser(user, doing: str) -> None:
    """For what serves the whole fleet (storage targets, maintenance connections). None: the shell user."""
    if user is not None and not (user.is_active and user.is_superuser):
        raise PermissionDenied(f"only a superuser may {doing}")


def upgrade_permission(customer) -> str:
    """INSTALL for a customer with no version recorded (its first upgrade is an install), else UPGRADE."""
    return UPGRADE if any(v for v in (customer.versions or {}).values()) else INSTALL


def may(user, customer=None) -> dict[str, bool]:
    """What the pages show buttons for (the team is the page's own check). "upgrade" means INSTALL for a
    customer with no version yet."""
    out = {"check": CHECK, "backup": BACKUP, "restore": RESTORE, "verify": VERIFY, "download": DOWNLOAD,
           "pin": PIN, "delete": DELETE, "rollback": ROLLBACK, "resolve": RESOLVE, "cancel": CANCEL,
           "runtime": RUNTIME, "upload_releases": UPLOAD_RELEASES}
    out = {name: has(user, perm) for name, perm in out.items()}
    out["upgrade"] = has(user, upgrade_permission(customer) if customer is not None else UPGRADE)
    return out
