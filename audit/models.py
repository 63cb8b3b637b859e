from django.conf import settings
from django.db import models
from django.utils import timezone


class AuditEntry(models.Model):
    """Who did what, when, to what, and how it ended. Append-only."""

    class Source(models.TextChoices):
        ADMIN = "admin"
        CLI = "cli"
        WORKER = "worker"
        SCHEDULE = "schedule"
        SYSTEM = "system"

    ts = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_repr = models.CharField(max_length=200, help_text="Kept when the user is deleted; OS user for the CLI.")
    source = models.CharField(max_length=10, choices=Source.choices)
    action = models.CharField(max_length=100)
    object_type = models.CharField(max_length=100, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=300, blank=True)
    customer = models.ForeignKey(
        "customers.Customer", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    changes = models.JSONField(default=dict, blank=True, help_text="Field names changed; secrets show no values.")
    result = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["-ts", "-id"]
        verbose_name_plural = "audit entries"

    def __str__(self):
        return f"{self.ts:%Y-%m-%d %H:%M:%S} {self.actor_repr} {self.action} {self.object_repr}"
