"""The backup catalogue: where backups go, how often, how long they stay, what they hold.

A Backup row is the catalogue entry of one restore point; its Run records how
it was made. The manifest stored beside the artifacts repeats everything here,
so the catalogue can be rebuilt from storage alone.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

from core.secrets import EncryptedSecretField, reveal
from customers.models import slug_validator
from engines.sources import config_path_problem
from engines.stores import StoreError, store_from_config

from .cron import ScheduleError, validate_cron


class StorageTargetQuerySet(models.QuerySet):
    def usable_by(self, team) -> StorageTargetQuerySet:
        """Targets a team's backups may go to: those open to every team (no team listed) and those listing it."""
        team_id = getattr(team, "pk", team)
        return self.filter(Q(teams=None) | Q(teams=team_id)).distinct()

    def visible_to(self, user) -> StorageTargetQuerySet:
        """Targets a user may see named in lists and filters: superusers all; others those open to their teams."""
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return self.none()
        if user.is_superuser:
            return self
        return self.filter(Q(teams=None) | Q(teams__members=user)).distinct()


class LockMode(models.TextChoices):
    NONE = "", "No lock"
    GOVERNANCE = "governance", "Governance (a superuser can bypass it)"
    COMPLIANCE = "compliance", "Compliance (nobody can shorten or delete it)"


class StorageTarget(models.Model):
    class Kind(models.TextChoices):
        LOCAL = "local", "Local folder"
        S3 = "s3", "S3-compatible"
        SFTP = "sftp", "SFTP"

    name = models.CharField(max_length=63, unique=True, validators=[slug_validator])
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.LOCAL)
    path = models.CharField(max_length=1024, blank=True, help_text="Local folder, or the folder on the SFTP server.")
    bucket = models.CharField(max_length=255, blank=True)
    prefix = models.CharField(max_length=255, blank=True, help_text="Key prefix inside the bucket.")
    endpoint_url = models.URLField(blank=True, help_text="S3-compatible endpoint; empty for AWS.")
    region = models.CharField(max_length=64, blank=True)
    host = models.CharField(max_length=255, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    username = models.CharField(max_length=255, blank=True)
    access_key = EncryptedSecretField(help_text="S3 access key id.")
    secret_key = EncryptedSecretField(help_text="S3 secret key, or the SFTP password.")
    private_key = EncryptedSecretField(help_text="SFTP private key (PEM/OpenSSH).")
    host_key = models.CharField(max_length=1000, blank=True,
                                help_text="SFTP server key to pin: an OpenSSH key line or SHA256:… fingerprint.")
    lock_mode = models.CharField(
        "object lock", max_length=10, choices=LockMode.choices, blank=True,
        help_text="S3 only: write every object with an Object Lock retention (write once, read many). The bucket "
                  "must have been created with Object Lock; docs/STORAGE.md.")
    lock_days = models.PositiveIntegerField(
        "lock days", default=0, help_text="With an object lock: how many days each backup stays locked at least.")
    enabled = models.BooleanField(default=True)
    teams = models.ManyToManyField(
        "customers.Team", blank=True, related_name="storage_targets",
        help_text="Teams whose customers may back up here (and see it named). None chosen: every team.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = StorageTargetQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def usable_by(self, team) -> bool:
        team_id = getattr(team, "pk", team)
        return not self.teams.exists() or self.teams.filter(pk=team_id).exists()

    def clean(self):
        required = {self.Kind.LOCAL: ["path"], self.Kind.S3: ["bucket"], self.Kind.SFTP: ["host", "username", "path"]}
        missing = [f for f in required[self.kind] if not getattr(self, f)]
        if missing:
            raise ValidationError({f: f"required for {self.get_kind_display()}" for f in missing})
        if self.lock_mode and self.kind != self.Kind.S3:
            raise ValidationError({"lock_mode": "object locks exist on S3 targets only"})
        if self.lock_mode and not self.lock_days:
            raise ValidationError({"lock_days": "a locked target needs at least 1 lock day"})
        if self.lock_days and not self.lock_mode:
            raise ValidationError({"lock_mode": "choose governance or compliance for the lock days to apply"})

    def lock_problem(self) -> str:
        """Why the bucket cannot keep this target's lock promise (missing, no Object Lock or versioning), or "".
        Asked over the network: the admin's form calls it on save, not the model's clean()."""
        if not (self.lock_mode and self.kind == self.Kind.S3 and self.bucket):
            return ""
        try:
            self.store().check_bucket()
        except StoreError as exc:
            return str(exc)
        return ""

    @property
    def immutable(self) -> bool:
        return bool(self.lock_mode and self.lock_days)

    def store(self):

        config = {
            "path": self.path, "bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url or None,
            "region": self.region or None, "host": self.host, "port": self.port, "username": self.username,
            "host_key": self.host_key or None, "owner": settings.KASA_FILES_OWNER,
            "lock_mode": self.lock_mode or None, "lock_days": self.lock_days,
        }
        secrets = {"access_key": reveal(self.access_key), "secret_key": reveal(self.secret_key),
                   "private_key": reveal(self.private_key)}
        return store_from_config(self.kind, config, secrets)


class BackupPolicy(models.Model):
    """How a customer is backed up. The policy without a customer is the global default."""

    class Schedule(models.TextChoices):
        NONE = "none", "Not scheduled"
        HOURLY = "hourly", "Hourly"
        DAILY = "daily", "Daily"
        WEEKLY = "weekly", "Weekly"
        MONTHLY = "monthly", "Monthly"
        CRON = "cron", "Cron expression"

    class Scope(models.TextChoices):
        FULL = "full", "Full (services, config, databases)"
        FILES = "files", "Service folders"
        DATABASE = "database", "Databases"
        CONFIG = "config", "Config files"

    class Compression(models.TextChoices):
        ZSTD = "zstd", "zstd"
        GZIP = "gzip", "gzip"
        NONE = "none", "none"

    customer = models.OneToOneField(
        "customers.Customer", null=True, blank=True, on_delete=models.CASCADE, related_name="backup_policy",
        help_text="Empty: the global default policy.",
    )
    schedule = models.CharField(max_length=8, choices=Schedule.choices, default=Schedule.DAILY)
    cron = models.CharField(max_length=100, blank=True, help_text="With 'Cron expression', e.g. '30 2 * * *'.")
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.FULL)
    compression = models.CharField(max_length=4, choices=Compression.choices, default=Compression.ZSTD)
    encrypt = models.BooleanField(default=True)
    target = models.ForeignKey(StorageTarget, on_delete=models.PROTECT, related_name="+")
    replicas = models.ManyToManyField(StorageTarget, blank=True, related_name="+",
                                      help_text="Extra copies (3-2-1); each is checksummed after writing.")
    keep_last = models.PositiveIntegerField(default=5)
    keep_daily = models.PositiveIntegerField(default=0)
    keep_weekly = models.PositiveIntegerField(default=0)
    keep_monthly = models.PositiveIntegerField(default=0)
    keep_verified = models.PositiveIntegerField(default=0, help_text="Always keep the newest N verified backups.")
    max_age_days = models.PositiveIntegerField(null=True, blank=True)
    full_every_days = models.PositiveIntegerField(
        "full backup every (days)", default=7,
        help_text="A backup is differential (only the files changed since the last full backup) unless the newest "
                  "full is this many days old or older; 0 or 1: every backup is full. Databases are always dumped "
                  "whole.")
    include_logs = models.BooleanField(default=False)
    excludes = models.JSONField(default=list, blank=True,
                                help_text='Extra tar exclude patterns, e.g. ["tmp", "*.cache"].')
    config_paths = models.JSONField(
        "extra config paths", default=list, blank=True,
        help_text='More of the instance\'s configuration, in the config artifact with the .env files: globs relative '
                  'to the customer\'s root, e.g. ["station_info.json", "nginx/*.conf"]. Regular files only (a '
                  "symlink, or a file behind a symlinked folder, is never taken); restored like the .env files.")
    bandwidth_limit_mbps = models.FloatField(null=True, blank=True,
                                             help_text="MB/s written to storage; empty: no limit.")
    notify_emails = models.CharField(max_length=500, blank=True, help_text="Comma-separated.")
    webhook_url = models.URLField(blank=True, help_text="Slack-compatible incoming webhook.")
    notify_on_success = models.BooleanField(default=False)
    verify_schedule = models.CharField(
        "verification drills", max_length=8, choices=Schedule.choices[:5], default=Schedule.NONE,
        help_text="How often the newest backup is test-restored (checksums, decryption, scratch restore).",
    )
    deep_drill = models.BooleanField(
        "deep drills", default=False,
        help_text="Drills also start the restored copy's services on free ports, as the customer's user, against "
                  "the scratch databases, and require their health URLs to answer (README, 'Verification drills').",
    )
    require_immutable = models.BooleanField(
        "require an immutable copy", default=False,
        help_text="Flag the customer (recovery alerts, metrics) when its newest verified backup has no copy under an "
                  "object lock that is still in force.")
    rpo_hours = models.FloatField("RPO target (hours)", null=True, blank=True,
                                  help_text="Most data we accept to lose; empty: KASA_RPO_HOURS.")
    rto_minutes = models.FloatField("RTO target (minutes)", null=True, blank=True,
                                    help_text="Longest restore we accept; empty: KASA_RTO_MINUTES.")

    class Meta:
        verbose_name_plural = "backup policies"
        constraints = [
            models.UniqueConstraint(fields=["customer"], condition=Q(customer__isnull=True), name="one_global_policy",
                                    nulls_distinct=False),
        ]

    def __str__(self):
        return f"policy of {self.customer}" if self.customer_id else "global backup policy"

    def clean(self):
        if self.customer_id and self.target_id and not self.target.usable_by(self.customer.team_id):
            raise ValidationError({"target": f"storage target {self.target} is not open to team {self.customer.team}"})
        if not isinstance(self.config_paths, list):
            raise ValidationError({"config_paths": 'a list of globs, e.g. ["station_info.json", "nginx/*.conf"]'})
        problems = [f"{p!r}: {why}" for p in self.config_paths if (why := config_path_problem(p))]
        if problems:
            raise ValidationError({"config_paths": "; ".join(problems)})
        if self.schedule == self.Schedule.CRON:
            try:
                self.cron = validate_cron(self.cron)
            except ScheduleError as exc:
                raise ValidationError({"cron": str(exc)}) from None


class Backup(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        # Retention dropped it but its objects are under an object lock: they are deleted by the first prune
        # after `locked_until` (then the status becomes deleted). Never offered for restore.
        EXPIRED = "expired", "Expired (locked)"
        DELETED = "deleted", "Deleted"

    class VerifyStatus(models.TextChoices):
        NEVER = "never", "Never verified"
        PASSED = "passed", "Verified"
        FAILED = "failed", "Verification failed"

    class Kind(models.TextChoices):
        FULL = "full", "Full"
        DIFFERENTIAL = "differential", "Differential"

    class Trigger(models.TextChoices):
        MANUAL = "manual", "Manual"
        SCHEDULE = "schedule", "Schedule"
        UPGRADE = "upgrade", "Before an upgrade"
        RESTORE = "restore", "Before a restore"
        IMPORT = "import", "Imported from storage"

    customer = models.ForeignKey("customers.Customer", on_delete=models.PROTECT, related_name="backups")
    run = models.OneToOneField("operations.Run", null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="backup")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.RUNNING, db_index=True)
    scope = models.CharField(max_length=8, choices=BackupPolicy.Scope.choices, default=BackupPolicy.Scope.FULL)
    kind = models.CharField(max_length=12, choices=Kind.choices, default=Kind.FULL,
                            help_text="Differential: its service archives hold what changed since `base`.")
    # The full backup a differential's service archives apply on. Retention and deletion keep a full while a
    # differential needs it (backups.chains); its row is only ever marked deleted, never removed, by Kasa. (Not
    # PROTECT: removing catalogue rows wholesale, as a test or a purge does, must not need an order.)
    base = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="differentials")
    services = models.JSONField(default=list, blank=True, help_text="Chosen services; empty: all.")
    compression = models.CharField(max_length=4, choices=BackupPolicy.Compression.choices, default="zstd")
    encrypted = models.BooleanField(default=True)
    target = models.ForeignKey(StorageTarget, on_delete=models.PROTECT, related_name="backups")
    prefix = models.CharField(max_length=500, blank=True, help_text="Folder on the target: DOMAIN/UTC-TIME-ID.")
    size = models.BigIntegerField(default=0)
    trigger = models.CharField(max_length=10, choices=Trigger.choices, default=Trigger.MANUAL)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True, db_index=True)
    pinned = models.BooleanField(default=False)
    pin_reason = models.CharField(max_length=200, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True, help_text="Last verification drill that passed.")
    verify_status = models.CharField(max_length=8, choices=VerifyStatus.choices, default=VerifyStatus.NEVER)
    verify_error = models.TextField(blank=True)
    verify_checked_at = models.DateTimeField(null=True, blank=True)
    verify_seconds = models.FloatField(null=True, blank=True, help_text="Duration of the last passed drill.")
    manifest = models.JSONField(default=dict, blank=True)
    unsigned = models.BooleanField(
        default=False, help_text="Imported with --trust-unsigned: its manifest carries no valid authentication tag.")
    error = models.TextField(blank=True)
    # On a target with an object lock (StorageTarget.lock_mode): the S3 version id of every object written (full
    # key -> version id; reads ask for exactly that version, so a version written over it later is never read)
    # and the retain-until promised for all of them. A full's date is extended to its newest differential's.
    versions = models.JSONField(default=dict, blank=True)
    lock_mode = models.CharField(max_length=10, blank=True)
    locked_until = models.DateTimeField(null=True, blank=True)
    # Objects left on the target that could not be deleted yet (under a lock): the first prune after this
    # moment deletes them.
    purge_after = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # The changelist's order; the fleet's figures per customer (backups.recovery.with_recovery): the
            # newest finished and the newest verified backup.
            models.Index(fields=["-created_at", "-id"], name="backup_created"),
            models.Index(fields=["customer", "-finished_at"], name="backup_customer_finished",
                         condition=Q(status__in=["succeeded", "failed"])),
            models.Index(fields=["customer", "-finished_at"], name="backup_customer_verified",
                         condition=Q(status="succeeded", verify_status="passed")),
        ]
        permissions = [
            ("restore_backup", "Can restore a backup"),
            ("verify_backup", "Can run a verification drill"),
            ("download_backup", "Can download a backup's artifacts"),
            ("pin_backup", "Can pin and unpin a backup"),
        ]

    def __str__(self):
        return f"backup #{self.pk} of {self.customer}"

    @property
    def duration(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None

    @property
    def restorable(self) -> bool:
        # An expired backup whose lock still holds is whole on its target: when retention was turned against the
        # fleet (a compromised Kasa pruning with keep_last=1 after backing up a wrecked instance), it is the way
        # back, so it stays restorable until its objects may go.
        if self.status == self.Status.EXPIRED:
            return bool(self.locked_until and self.locked_until > timezone.now())
        return self.status == self.Status.SUCCEEDED


class BackupArtifact(models.Model):
    class Kind(models.TextChoices):
        SERVICE = "service", "Service folder"
        CONFIG = "config", "Config files"
        DATABASE = "database", "Database dump"

    backup = models.ForeignKey(Backup, on_delete=models.CASCADE, related_name="artifacts")
    name = models.CharField(max_length=255)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    source = models.CharField(max_length=100, help_text="Service or database name.")
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    compression = models.CharField(max_length=4)
    key_id = models.CharField(max_length=32, blank=True)
    details = models.JSONField(default=dict, blank=True, help_text="Engine, versions, row counts…")

    class Meta:
        ordering = ["backup", "id"]
        constraints = [models.UniqueConstraint(fields=["backup", "name"], name="unique_artifact_name")]

    def __str__(self):
        return self.name


class BackupCopy(models.Model):
    """A copy of a backup on a replica target (the primary is Backup.target)."""

    backup = models.ForeignKey(Backup, on_delete=models.CASCADE, related_name="copies")
    target = models.ForeignKey(StorageTarget, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=10, default="succeeded")
    verified_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    versions = models.JSONField(default=dict, blank=True)  # as Backup.versions, on this copy's target
    lock_mode = models.CharField(max_length=10, blank=True)
    locked_until = models.DateTimeField(null=True, blank=True)
    purge_after = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["backup", "target"], name="unique_backup_copy")]

    def __str__(self):
        return f"copy of backup #{self.backup_id} on {self.target}"


class CustomerBackupState(models.Model):
    """Per-customer alerting memory, so a missed-backup alert is sent once per lapse, not every minute."""

    customer = models.OneToOneField("customers.Customer", on_delete=models.CASCADE, related_name="backup_state")
    missed_alert_at = models.DateTimeField(null=True, blank=True)
    missed_since = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"backup state of {self.customer}"


class StorageTally(models.Model):
    """Bytes and number of each customer's succeeded backups (primary copies), for /metrics and the recovery
    figures without summing every backup at each scrape. On PostgreSQL a trigger on backups_backup keeps it exact
    (migration 0008); elsewhere backups.recovery sums the backups themselves."""

    customer = models.OneToOneField("customers.Customer", on_delete=models.CASCADE, related_name="+")
    backups = models.BigIntegerField(default=0)
    bytes = models.BigIntegerField(default=0)

    def __str__(self):
        return f"{self.bytes} bytes in {self.backups} backups of customer {self.customer_id}"



class TargetCounter(models.Model):
    """Counters of one storage target for /metrics (backups.counters): bytes written and read, storage errors, and
    the last target check. Only ever incremented (an F() UPDATE), never derived from the backups: deleting
    backups lowers no counter, as Prometheus counters require."""

    target = models.OneToOneField(StorageTarget, on_delete=models.CASCADE, related_name="+")
    written_bytes = models.BigIntegerField(default=0)
    read_bytes = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0, help_text="Backups, restores, drills and checks a StoreError ended.")
    check_ok = models.BooleanField(null=True, help_text="The last target check's result (None: never checked).")
    checked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"counters of target {self.target_id}"
