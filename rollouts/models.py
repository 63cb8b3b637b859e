"""Fleet rollouts: one release taken to many customers in waves, with bakes, gates and a safe halt.

A Rollout is planned whole when it starts (its RolloutWave and RolloutTarget rows: who goes in which wave, who
is skipped and why) and then moved by rollouts.driver, one tick at a time, by the worker's scheduler or by a
foreground `manage.py rollout start`. Every fact the driver needs is a row: a restart of the web or the worker
finds the rollout where it was. Each customer's upgrade stays the unit of work (upgrades.Upgrade, with its
backup, rollback and quarantine); a target only points at it.

    draft → scheduled → progressing (each wave: upgrading → baking → gating) → completed
    progressing ⇄ paused (by a person, an inconclusive gate, or outside the maintenance window)
    progressing/paused → halted (a gate failed: nothing more starts, upgraded customers stay)
    progressing/paused/halted → aborting (abort, or a failed gate with on_failure=revert) → aborted
    halted/aborted → progressing (retry: from the failed wave, its failed customers first)
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Rollout(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        SCHEDULED = "scheduled", "Scheduled"
        PROGRESSING = "progressing", "Progressing"
        PAUSED = "paused", "Paused"
        COMPLETED = "completed", "Completed"
        HALTED = "halted", "Halted"
        ABORTING = "aborting", "Aborting"
        ABORTED = "aborted", "Aborted"

    class OnFailure(models.TextChoices):
        HALT = "halt", "Halt (upgraded customers stay on the new release)"
        REVERT = "revert", "Revert (roll back every customer this rollout upgraded)"

    class Strategy(models.TextChoices):  # each customer's upgrade (upgrades.Upgrade.Strategy)
        IN_PLACE = "in-place", "In place (stop, switch, start)"
        BLUE_GREEN = "blue-green", "Blue-green (the new release checked beside the live one first)"

    class PausedBy(models.TextChoices):
        NONE = "", "—"
        OPERATOR = "operator", "An operator"
        INCONCLUSIVE = "inconclusive", "An inconclusive gate"
        WINDOW = "window", "The maintenance window"

    ACTIVE = (Status.DRAFT, Status.SCHEDULED, Status.PROGRESSING, Status.PAUSED, Status.ABORTING)
    ENDED = (Status.COMPLETED, Status.HALTED, Status.ABORTED)
    TRANSITIONS = {
        Status.DRAFT: {Status.SCHEDULED, Status.ABORTED},
        Status.SCHEDULED: {Status.PROGRESSING, Status.ABORTING, Status.ABORTED},
        Status.PROGRESSING: {Status.PAUSED, Status.COMPLETED, Status.HALTED, Status.ABORTING},
        Status.PAUSED: {Status.PROGRESSING, Status.HALTED, Status.ABORTING},
        Status.HALTED: {Status.PROGRESSING, Status.ABORTING},
        Status.ABORTING: {Status.ABORTED},
        Status.ABORTED: {Status.PROGRESSING},
    }

    release = models.ForeignKey("releases.Release", on_delete=models.PROTECT, related_name="rollouts")
    selection = models.JSONField(default=dict, blank=True,
                                 help_text="How customers were chosen: team, tags, domains, from_version.")
    strategy = models.CharField(max_length=12, choices=Strategy.choices, default=Strategy.IN_PLACE)
    percents = models.JSONField(default=list, help_text="Cumulative percentages of the selection, per wave.")
    concurrency = models.PositiveSmallIntegerField(default=2, help_text="Upgrades at once within a wave.")
    max_failures = models.PositiveSmallIntegerField(default=0, help_text="Failed upgrades a wave may have.")
    consecutive_errors = models.PositiveSmallIntegerField(
        default=4, help_text="Gate measurements that may fail in a row (error) before the rollout stops.")
    on_failure = models.CharField(max_length=8, choices=OnFailure.choices, default=OnFailure.HALT)
    gates = models.JSONField(default=dict, blank=True,
                             help_text='{"health": true, "prometheus": {"query": …, "op": "<", "threshold": …}}')
    window_start = models.TimeField(null=True, blank=True)
    window_end = models.TimeField(null=True, blank=True)
    window_zone = models.CharField(max_length=64, blank=True, default="UTC")
    skipped = models.JSONField(default=list, blank=True, help_text="[{domain, reason}] left out when planned.")

    status = models.CharField(max_length=12, choices=Status.choices, default=Status.DRAFT, db_index=True)
    paused_by = models.CharField(max_length=12, choices=PausedBy.choices, default="", blank=True)
    reason = models.TextField(blank=True, help_text="Why it paused, halted or was aborted.")
    promote_all = models.BooleanField(default=False, help_text="Remaining bakes and gates skipped.")
    reverting = models.BooleanField(default=False, help_text="Aborting rolls back the customers it upgraded.")
    lease_until = models.DateTimeField(null=True, blank=True, help_text="A driver is advancing it until then.")

    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    requested_via = models.CharField(max_length=10, default="admin")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [("control_rollout", "Can pause, resume, promote, abort and retry rollouts")]

    def __str__(self):
        return f"Rollout #{self.pk} to {self.release}"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    # --- transitions: conditional UPDATEs (two drivers, or a driver and a person, never both win) ---------
    def transition(self, to: str, *, expect: tuple[str, ...] | None = None, **fields) -> bool:
        expect = expect or tuple(s for s, targets in self.TRANSITIONS.items() if to in targets)
        assert all(to in self.TRANSITIONS.get(s, ()) for s in expect), (expect, to)
        if to in self.ENDED and "finished_at" not in fields:
            fields["finished_at"] = timezone.now()
        updated = Rollout.objects.filter(pk=self.pk, status__in=expect).update(
            status=to, updated_at=timezone.now(), **fields)
        self.refresh_from_db()
        return updated == 1


class RolloutWave(models.Model):
    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        UPGRADING = "upgrading", "Upgrading"
        BAKING = "baking", "Baking"
        GATING = "gating", "Gating"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="waves")
    position = models.PositiveSmallIntegerField(help_text="1 for the first wave.")
    percent = models.PositiveSmallIntegerField()
    bake_seconds = models.PositiveIntegerField(default=0)
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    started_at = models.DateTimeField(null=True, blank=True)
    upgraded_at = models.DateTimeField(null=True, blank=True, help_text="Its last upgrade ended; the bake began.")
    bake_until = models.DateTimeField(null=True, blank=True)
    last_sample_at = models.DateTimeField(null=True, blank=True)
    error_streak = models.PositiveSmallIntegerField(default=0)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["rollout", "position"]
        constraints = [models.UniqueConstraint(fields=["rollout", "position"], name="unique_rollout_wave")]

    def __str__(self):
        return f"wave {self.position} ({self.percent} %)"


class RolloutTarget(models.Model):
    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        UPGRADING = "upgrading", "Upgrading"
        UPGRADED = "upgraded", "Upgraded"
        FAILED = "failed", "Failed (rolled back or untouched)"
        QUARANTINED = "quarantined", "Quarantined"
        REVERTING = "reverting", "Rolling back"
        REVERTED = "reverted", "Rolled back by the rollout"
        REVERT_FAILED = "revert_failed", "Rollback failed"
        NOT_STARTED = "not_started", "Not started (the rollout stopped)"

    RUNNING = (State.UPGRADING, State.REVERTING)

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="targets")
    wave = models.ForeignKey(RolloutWave, on_delete=models.CASCADE, related_name="targets")
    customer = models.ForeignKey("customers.Customer", on_delete=models.PROTECT, related_name="rollout_targets")
    position = models.PositiveIntegerField(help_text="Order within the wave (canaries first, then by hash).")
    state = models.CharField(max_length=14, choices=State.choices, default=State.PENDING, db_index=True)
    upgrade = models.ForeignKey("upgrades.Upgrade", null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="+")
    revert = models.ForeignKey("upgrades.Upgrade", null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="+", help_text="The rollback this rollout started for it.")
    from_versions = models.JSONField(default=dict, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    # True while the rollout is active: a customer is in at most one active rollout (the constraint below).
    active = models.BooleanField(default=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["rollout", "wave__position", "position"]
        constraints = [
            models.UniqueConstraint(fields=["customer"], condition=Q(active=True), name="one_active_rollout"),
            models.UniqueConstraint(fields=["rollout", "customer"], name="unique_rollout_customer"),
        ]

    def __str__(self):
        return f"{self.customer} in {self.rollout}"


class GateResult(models.Model):
    class Result(models.TextChoices):
        SUCCESSFUL = "successful", "Successful"
        FAILED = "failed", "Failed"
        ERROR = "error", "Error (could not measure)"
        INCONCLUSIVE = "inconclusive", "Inconclusive (no data)"

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="gate_results")
    wave = models.ForeignKey(RolloutWave, on_delete=models.CASCADE, related_name="gate_results")
    gate = models.CharField(max_length=20, help_text="failures, health or prometheus")
    result = models.CharField(max_length=12, choices=Result.choices)
    summary = models.CharField(max_length=500)
    evidence = models.JSONField(default=dict, blank=True)
    final = models.BooleanField(default=False, help_text="Taken at the end of the bake (else a sample during it).")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.gate}: {self.result}"
