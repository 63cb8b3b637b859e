from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class RunQuerySet(models.QuerySet):
    def visible_to(self, user) -> RunQuerySet:
        # The team rule is customers' (Customer.objects.visible_to), reached through the relation: operations
        # sits below customers and does not import it.
        customers = self.model._meta.get_field("customer").related_model
        return self.filter(customer__in=customers.objects.visible_to(user))

    def active(self) -> RunQuerySet:
        return self.filter(status__in=Run.ACTIVE)


class Run(models.Model):
    """One operation on one customer, recorded from request to result.

    The row is created first; the task receives only its primary key. Every
    status change is a conditional UPDATE on the expected current status, so
    two workers, a reaper and a cancel request can never both win.
    """

    class Kind(models.TextChoices):
        CHECK = "check", "Check"
        BACKUP = "backup", "Backup"
        RESTORE = "restore", "Restore"
        VERIFY = "verify", "Verify"
        UPGRADE = "upgrade", "Upgrade"
        ROLLBACK = "rollback", "Rollback"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE = (Status.PENDING, Status.RUNNING)
    TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    TRANSITIONS = {
        Status.PENDING: {Status.RUNNING, Status.CANCELLED, Status.FAILED},
        Status.RUNNING: {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED},
    }

    kind = models.CharField(max_length=20, choices=Kind.choices)
    customer = models.ForeignKey("customers.Customer", on_delete=models.PROTECT, related_name="runs")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING, db_index=True)
    mutating = models.BooleanField(default=True, help_text="Changes the customer: one at a time per customer.")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_via = models.CharField(max_length=20, default="admin")
    params = models.JSONField(default=dict, blank=True)
    root = models.CharField(max_length=1024, blank=True,
                            help_text="The folder a mutating run changes: one such run at a time per folder.")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(
        max_length=200, blank=True,
        help_text="name:pid of the worker that claimed it (KASA_WORKER_NAME); while pending, the name of the "
                  "worker that took its task off the Redis queue, if any")
    host = models.CharField(max_length=200, blank=True,
                            help_text="The host the run works on (operations.slots.host_key), set when claimed.")
    abandon_host = models.CharField(
        max_length=200, blank=True,
        help_text="Failed while its worker was gone, its cleanup (the kind's on_abandon) still owed: only a worker "
                  "that reaches this host does it (operations.services.runs_reap).")
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    progress_done = models.BigIntegerField(default=0)
    progress_total = models.BigIntegerField(null=True, blank=True)
    progress_message = models.CharField(max_length=300, blank=True)
    # Named phases (RunContext.phases/phase): the plan [[name, weight], …], the current one, when it began, and
    # the overall percentage they give (never decreasing while the run runs; 100 once it succeeded).
    phase_plan = models.JSONField(default=list, blank=True)
    phase = models.CharField(max_length=100, blank=True)
    phase_started_at = models.DateTimeField(null=True, blank=True)
    percent = models.FloatField(default=0.0)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # The database itself enforces one mutating operation per customer;
            # the service layer's check only produces the friendly message.
            models.UniqueConstraint(
                fields=["customer"],
                condition=Q(mutating=True, status__in=["pending", "running"]),
                name="one_active_mutating_run_per_customer",
            ),
            models.UniqueConstraint(
                fields=["customer", "kind"],
                condition=Q(status__in=["pending", "running"]),
                name="one_active_run_per_customer_and_kind",
            ),
            models.UniqueConstraint(
                fields=["root"],
                condition=Q(mutating=True, status__in=["pending", "running"]) & ~Q(root=""),
                name="one_active_mutating_run_per_root",
            ),
        ]
        permissions = [("cancel_run", "Can cancel a pending or running operation")]
        indexes = [
            models.Index(fields=["status", "heartbeat_at"], name="run_status_heartbeat"),
            # The changelist's order; a customer's runs, newest first (its page, "last operation"); the newest
            # recovery per customer (RTO, backups.recovery); the fleet overview's recent failures.
            models.Index(fields=["-created_at", "-id"], name="run_created"),
            models.Index(fields=["customer", "-created_at"], name="run_customer_created"),
            models.Index(fields=["customer", "-finished_at"], name="run_customer_recovery",
                         condition=Q(status="succeeded", kind__in=["restore", "verify"])),
            models.Index(fields=["-finished_at"], name="run_failed_finished", condition=Q(status="failed")),
        ]

    def __str__(self):
        return f"{self.get_kind_display()} #{self.pk} of {self.customer_id and self.customer}"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def duration(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None

    # --- transitions: conditional UPDATEs ------------------------------------
    def _transition(self, to: str, *, expect: tuple[str, ...], **fields) -> bool:
        assert all(to in self.TRANSITIONS.get(s, ()) for s in expect), (expect, to)
        updated = Run.objects.filter(pk=self.pk, status__in=expect).update(status=to, **fields)
        self.refresh_from_db()
        return updated == 1

    def start(self, worker: str, *, host: str = "") -> bool:
        now = timezone.now()
        return self._transition(
            self.Status.RUNNING, expect=(self.Status.PENDING,), worker=worker, host=host, started_at=now,
            heartbeat_at=now,
        )

    def succeed(self, result: dict) -> bool:
        return self._transition(
            self.Status.SUCCEEDED, expect=(self.Status.RUNNING,), result=result, finished_at=timezone.now(),
            percent=100.0,
        )

    def fail(self, error: str, *, result: dict | None = None, expect=(Status.RUNNING,), abandon_host: str = "") -> bool:
        fields = {"error": error[:10000], "finished_at": timezone.now(), "abandon_host": abandon_host}
        if result is not None:
            fields["result"] = result
        return self._transition(self.Status.FAILED, expect=tuple(expect), **fields)

    def cancel(self, *, expect=(Status.PENDING,), error: str = "") -> bool:
        return self._transition(
            self.Status.CANCELLED, expect=tuple(expect), finished_at=timezone.now(), error=error
        )


class SlotLease(models.Model):
    """One of a key's N concurrency slots, held by a run (operations.slots).

    The unique (key, n) with 0 <= n < N is what keeps holders at N or fewer under any concurrency, on PostgreSQL
    and on SQLite alike: a second INSERT of the same slot fails in the database, whichever machine makes it. A
    lease goes when its holder releases it, or when its run is no longer running (its worker died): the reaper,
    or the next acquirer that finds the slots full, removes it.
    """

    key = models.CharField(max_length=250, help_text='"host:<host key>" or "worker:<worker name>"')
    n = models.PositiveIntegerField()
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="slot_leases")
    worker = models.CharField(max_length=200, help_text="name:pid of the process that holds it")
    acquired_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key", "n"], name="one_holder_per_slot")]

    def __str__(self):
        return f"{self.key} slot {self.n}: run #{self.run_id} on {self.worker}"


class WorkerBeat(models.Model):
    """A worker machine's qcluster is alive: refreshed every KASA_HEARTBEAT_SECONDS by Kasa's qcluster. A run whose
    task a worker took off the Redis queue, and that never started, is lost once that worker's beat is stale."""

    name = models.CharField(max_length=200, unique=True)
    pid = models.IntegerField(default=0)
    started_at = models.DateTimeField(default=timezone.now)
    seen_at = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return f"worker {self.name} (seen {self.seen_at:%Y-%m-%d %H:%M:%S})"


class RunTally(models.Model):
    """How many runs each customer has per kind and status, and their summed duration: /metrics reads these
    rows instead of counting every run at each scrape (docs/PERFORMANCE.md).

    On PostgreSQL a trigger on operations_run keeps them exact whatever writes a run (services, the reaper,
    bulk updates, deletes): see migration 0004. Other databases (the SQLite development setup) have no trigger;
    there console.metrics counts the runs themselves.
    """

    customer = models.ForeignKey("customers.Customer", on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=20)
    status = models.CharField(max_length=12)
    runs = models.BigIntegerField(default=0)
    timed = models.BigIntegerField(default=0, help_text="Runs with both a start and a finish time.")
    seconds = models.FloatField(default=0.0, help_text="Their summed duration.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["customer", "kind", "status"], name="one_tally_per_state")]

    def __str__(self):
        return f"{self.runs} {self.kind} {self.status} of customer {self.customer_id}"


# The upper bounds (seconds) of kasa_run_duration_seconds's histogram buckets; the last is +Inf. Migration 0007's
# trigger puts each finished run in the first bucket whose bound it does not exceed (changing these needs a
# migration that rebuilds RunDurationTally).
RUN_DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, float("inf"))


class RunDurationTally(models.Model):
    """How many runs of each customer, kind and status took how long: one row per histogram bucket (`le`, the
    bucket's upper bound; not cumulative, console.metrics adds them up). Kept by a trigger on PostgreSQL like
    RunTally (migration 0007), so a scrape reads a few rows per customer instead of every finished run."""

    customer = models.ForeignKey("customers.Customer", on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=20)
    status = models.CharField(max_length=12)
    le = models.FloatField(help_text="The bucket's upper bound in seconds (inf: the last).")
    runs = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["customer", "kind", "status", "le"],
                                               name="one_duration_tally_per_bucket")]

    def __str__(self):
        return f"{self.runs} {self.kind} {self.status} of customer {self.customer_id} within {self.le} s"


class RunCommand(models.Model):
    """An external command a run executed: argv (secrets masked), exit code, duration."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="commands")
    argv = models.JSONField()
    cwd = models.CharField(max_length=1024, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    duration = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["run", "id"]

    def __str__(self):
        return " ".join(self.argv)


class RunLogLine(models.Model):
    """One log line, stored as it is written (never buffered to the end)."""

    class Level(models.TextChoices):
        DEBUG = "debug"
        INFO = "info"
        WARNING = "warning"
        ERROR = "error"

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="log_lines")
    seq = models.PositiveIntegerField()
    ts = models.DateTimeField(default=timezone.now)
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    stream = models.CharField(max_length=8, default="kasa", help_text="kasa, stdout or stderr")
    command = models.ForeignKey(RunCommand, null=True, blank=True, on_delete=models.CASCADE, related_name="lines")
    text = models.TextField()

    class Meta:
        ordering = ["run", "seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="unique_run_log_seq")]

    def __str__(self):
        return f"#{self.seq} {self.text[:80]}"

    def as_message(self) -> dict:
        return {
            "type": "line", "seq": self.seq, "ts": self.ts.isoformat(), "level": self.level,
            "stream": self.stream, "text": self.text,
        }
