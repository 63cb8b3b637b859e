"""Upgrades of customers to registered releases, their steps, and the releases that failed for a customer.

The Run (operations) records the execution and ends succeeded or failed; the Upgrade row says what
happened to the customer: succeeded, failed (before anything was touched: preflight or backup),
rolled_back (a later step failed and the previous state was put back) or quarantined (putting it back
failed too: an operator must look; nothing was deleted).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class UpgradeQuerySet(models.QuerySet):
    def real(self) -> UpgradeQuerySet:
        """Upgrades that changed (or tried to change) something: dry runs left out."""
        return self.filter(dry_run=False)

    def unresolved_quarantine(self) -> UpgradeQuerySet:
        return self.filter(status=Upgrade.Status.QUARANTINED, resolved_at__isnull=True)


class Upgrade(models.Model):
    class Kind(models.TextChoices):
        UPGRADE = "upgrade", "Upgrade"
        ROLLBACK = "rollback", "Rollback"
        INSTALL = "install", "Install"

    class Strategy(models.TextChoices):
        IN_PLACE = "in-place", "In place (stop, switch, start)"
        BLUE_GREEN = "blue-green", "Blue-green (the new release checked beside the live one first)"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        ROLLED_BACK = "rolled_back", "Rolled back"
        FAILED = "failed", "Failed (nothing touched)"
        QUARANTINED = "quarantined", "Quarantined (needs an operator)"

    TERMINAL = (Status.SUCCEEDED, Status.ROLLED_BACK, Status.FAILED, Status.QUARANTINED)
    TRANSITIONS = {
        Status.PENDING: {Status.RUNNING, Status.FAILED},
        Status.RUNNING: {Status.SUCCEEDED, Status.ROLLED_BACK, Status.FAILED, Status.QUARANTINED},
    }

    customer = models.ForeignKey("customers.Customer", on_delete=models.PROTECT, related_name="upgrades")
    run = models.OneToOneField("operations.Run", on_delete=models.PROTECT, related_name="upgrade")
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.UPGRADE)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING, db_index=True)
    dry_run = models.BooleanField(default=False, help_text="Preflight only: nothing was changed.")
    force = models.BooleanField(default=False, help_text="Asked for although the release is marked bad.")
    strategy = models.CharField(max_length=12, choices=Strategy.choices, default=Strategy.IN_PLACE)
    from_versions = models.JSONField(default=dict, blank=True, help_text="The customer's versions before.")
    to_versions = models.JSONField(default=dict, blank=True, help_text="The versions it moves to (changed ones).")
    to_release = models.ForeignKey("releases.Release", null=True, blank=True, on_delete=models.PROTECT,
                                   related_name="+", help_text="Empty for a rollback.")
    rolls_back = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                   help_text="For a rollback: the upgrade it undoes.")
    backup = models.ForeignKey("backups.Backup", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                               help_text="The pinned backup taken before anything changed.")
    preflight = models.JSONField(default=dict, blank=True)
    env_diff = models.JSONField(default=dict, blank=True, help_text="Per component, values masked.")
    layout = models.JSONField(default=dict, blank=True,
                              help_text="Per component: what the service path was before and where it points now.")
    # Blue-green: the previous release kept running beside the new one after the switch (upgrades.standby), until
    # standby_until; then it is stopped and `standby` keeps what it was. A rollback with switch_back uses it.
    standby = models.JSONField(default=dict, blank=True,
                               help_text="The previous release kept running after a blue-green switch.")
    standby_until = models.DateTimeField(null=True, blank=True, db_index=True,
                                         help_text="Set while the standby runs: its grace period ends then.")
    switch_back = models.BooleanField(default=False, help_text="A rollback that only switched back to the "
                                      "standby's release folders (the databases untouched).")
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True, help_text="A quarantine an operator has dealt with.")
    resolved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    resolution = models.TextField(blank=True)

    objects = UpgradeQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [
            ("upgrade_customer", "Can upgrade a customer to a release"),
            ("rollback_customer", "Can roll back a customer's last upgrade"),
            ("install_release", "Can install a release on a customer that has none"),
        ]

    def __str__(self):
        target = self.to_release.name if self.to_release_id else ", ".join(
            f"{c} {v}" for c, v in sorted(self.to_versions.items()))
        return f"{self.get_kind_display()} #{self.pk} of {self.customer} to {target or 'nothing'}"

    @property
    def is_active(self) -> bool:
        return self.status in (self.Status.PENDING, self.Status.RUNNING)

    @property
    def standby_live(self) -> bool:
        """The previous release still runs beside this upgrade's (its grace period has not ended)."""
        return self.standby_until is not None and self.standby_until > timezone.now()

    # --- transitions: conditional UPDATEs, as Run's ------------------------------------------------
    def _transition(self, to: str, *, expect: tuple[str, ...], **fields) -> bool:
        assert all(to in self.TRANSITIONS.get(s, ()) for s in expect), (expect, to)
        updated = Upgrade.objects.filter(pk=self.pk, status__in=expect).update(status=to, **fields)
        self.refresh_from_db()
        return updated == 1

    def begin(self) -> bool:
        return self._transition(self.Status.RUNNING, expect=(self.Status.PENDING,), started_at=timezone.now())

    def succeed(self) -> bool:
        return self._transition(self.Status.SUCCEEDED, expect=(self.Status.RUNNING,), finished_at=timezone.now())

    def fail(self, error: str) -> bool:
        return self._transition(self.Status.FAILED, expect=(self.Status.PENDING, self.Status.RUNNING),
                                error=error[:10000], finished_at=timezone.now())

    def rolled_back(self, error: str) -> bool:
        return self._transition(self.Status.ROLLED_BACK, expect=(self.Status.RUNNING,), error=error[:10000],
                                finished_at=timezone.now())

    def quarantine(self, error: str) -> bool:
        return self._transition(self.Status.QUARANTINED, expect=(self.Status.RUNNING,), error=error[:10000],
                                finished_at=timezone.now())


class UpgradeStep(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        SKIPPED = "skipped", "Skipped"

    upgrade = models.ForeignKey(Upgrade, on_delete=models.CASCADE, related_name="steps")
    position = models.PositiveIntegerField()
    name = models.CharField(max_length=40)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.RUNNING)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    detail = models.TextField(blank=True, help_text="The step's output (also in the run's log, as it happened).")

    class Meta:
        ordering = ["upgrade", "position"]
        constraints = [models.UniqueConstraint(fields=["upgrade", "position"], name="unique_upgrade_step_position")]

    def __str__(self):
        return f"{self.name}: {self.status}"


class BadRelease(models.Model):
    """A release that was rolled back for a customer: not offered to it again unless forced."""

    customer = models.ForeignKey("customers.Customer", on_delete=models.CASCADE, related_name="bad_releases")
    release = models.ForeignKey("releases.Release", on_delete=models.CASCADE, related_name="+")
    upgrade = models.ForeignKey(Upgrade, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    reason = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["customer", "release"], name="unique_bad_release")]

    def __str__(self):
        return f"{self.release} is bad for {self.customer}"
