"""The audit trail of admin changes: every add, change and delete made in the admin is recorded."""

from __future__ import annotations

from .models import AuditEntry
from .services import audit_record


def _changed_fields(message) -> dict:
    # Django's change message lists field names only, never values: safe for secrets.
    return {"message": message} if isinstance(message, list) else {"message": str(message)}


class AuditedAdminMixin:
    """Every add, change and delete made in the admin lands in the audit trail."""

    def log_addition(self, request, obj, message):
        audit_record(action="admin.add", source=AuditEntry.Source.ADMIN, actor=request.user, obj=obj,
                     changes=_changed_fields(message), result="ok")
        return super().log_addition(request, obj, message)

    def log_change(self, request, obj, message):
        audit_record(action="admin.change", source=AuditEntry.Source.ADMIN, actor=request.user, obj=obj,
                     changes=_changed_fields(message), result="ok")
        return super().log_change(request, obj, message)

    def log_deletions(self, request, queryset):
        for obj in queryset:
            audit_record(action="admin.delete", source=AuditEntry.Source.ADMIN, actor=request.user, obj=obj,
                         result="ok")
        return super().log_deletions(request, queryset)
