"""Writes to a customer that a run had to keep in its local journal (its undo went on while the control database
did not answer), made at reconciliation (operations.reconcile, registered in CustomersConfig.ready)."""

from __future__ import annotations

from .models import Customer


def replay_versions(run, payload: dict) -> None:
    """The versions the run recorded (an upgrade's way back, a restore's), on the run's own customer only."""
    versions = payload["versions"]
    if not (isinstance(versions, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items())):
        raise ValueError("recorded versions are not a mapping of component to version")
    Customer.objects.filter(pk=run.customer_id).update(versions=versions)
