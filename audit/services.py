from __future__ import annotations

import getpass

from .models import AuditEntry


def audit_record(
    *, action: str, source: str, actor=None, obj=None, customer=None, changes: dict | None = None,
    result: str = "", actor_repr: str = "",
) -> AuditEntry:
    if not actor_repr:
        if actor is not None:
            actor_repr = actor.get_username()
        elif source == AuditEntry.Source.CLI:
            actor_repr = f"cli:{getpass.getuser()}"
        else:
            actor_repr = source
    if customer is None and obj is not None:
        customer = getattr(obj, "customer", None) if not _is_customer(obj) else obj
    return AuditEntry.objects.create(
        actor=actor if actor is not None and actor.pk else None,
        actor_repr=actor_repr[:200],
        source=source,
        action=action[:100],
        object_type=obj._meta.label if obj is not None else "",
        object_id=str(obj.pk) if obj is not None and obj.pk is not None else "",
        object_repr=str(obj)[:300] if obj is not None else "",
        customer=customer,
        changes=changes or {},
        result=result[:300],
    )


def _is_customer(obj) -> bool:
    return obj._meta.label == "customers.Customer"
