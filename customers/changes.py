"""Saving a customer and its services from the admin: the runtime fields are guarded and audited.

Runtime fields decide what runs, where and as whom: the customer's root folder, run_as and recorded versions, and
each service's process manager, app name (a PM2 name or systemd unit), start/stop commands and health URL. Only
superusers and holders of customers.change_runtime (core.permissions.RUNTIME, not in the operators group) may set
or change them; the admin shows them read-only to everyone else, and these functions refuse a change that reaches
them anyway. actor None is the shell user (the CLI's customer_add), who already holds Kasa's keys.

Every change of a runtime field is audited ("customer.runtime") with its values before and after: commands are
shown, because whoever reads the trail must see what will run; a URL's password never is.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from django.core.exceptions import PermissionDenied
from django.db import transaction

from audit.models import AuditEntry
from audit.services import audit_record
from core import permissions

from .models import Customer, Service

# versions too: they decide what an upgrade runs (an install of every component, or the changed ones only) and
# which permission it needs (upgrades.install_release or upgrades.upgrade_customer).
CUSTOMER_RUNTIME = ("root", "run_as", "versions")
SERVICE_RUNTIME = ("process_manager", "app_name", "start_command", "stop_command", "health_url")


def _defaults(model, fields) -> dict:
    return {f: model._meta.get_field(f).get_default() for f in fields}


def _stored(model, pk, fields) -> dict:
    """The runtime values as saved now (a new object: the model's defaults, i.e. nothing runs)."""
    row = model.objects.filter(pk=pk).values(*fields).first() if pk else None
    return row if row is not None else _defaults(model, fields)


def shown(field: str, value):
    """A runtime value as the audit trail keeps it: as it is, except a password inside a URL."""
    if field == "health_url" and value:
        parts = urlsplit(value)
        if parts.password:
            netloc = f"{parts.username}:********@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    return value


def runtime_changes(before: dict, obj, fields) -> dict:
    """{field: {"before": …, "after": …}} for every runtime field whose value differs."""
    return {f: {"before": shown(f, before.get(f)), "after": shown(f, getattr(obj, f))}
            for f in fields if before.get(f) != getattr(obj, f)}


def runs_something(service: Service) -> bool:
    """Whether a service has any runtime field set (deleting it changes what Kasa starts and stops)."""
    return bool(runtime_changes(_defaults(Service, SERVICE_RUNTIME), service, SERVICE_RUNTIME))


def _guard(actor, obj, changes: dict) -> None:
    if changes and actor is not None and not permissions.has(actor, permissions.RUNTIME):
        raise PermissionDenied(f"you may not change what runs for {obj} ({', '.join(changes)}): it needs the "
                               f"permission {permissions.RUNTIME}")


def _audit(obj, customer, changes: dict, *, actor, via: str, what: str) -> None:
    if changes:
        audit_record(action="customer.runtime", source=_source(via), actor=actor, obj=obj, customer=customer,
                     changes={"object": what, "fields": changes}, result="ok")


def _source(via: str) -> str:
    return via if via in AuditEntry.Source.values else AuditEntry.Source.SYSTEM


@transaction.atomic
def customer_save(customer: Customer, *, actor=None, via: str = "admin") -> Customer:
    """Save a customer (new or changed); a change of its root or run_as needs the runtime permission."""
    changes = runtime_changes(_stored(Customer, customer.pk, CUSTOMER_RUNTIME), customer, CUSTOMER_RUNTIME)
    _guard(actor, customer, changes)
    customer.save()
    _audit(customer, customer, changes, actor=actor, via=via, what="customer")
    return customer


@transaction.atomic
def service_save(service: Service, *, actor=None, via: str = "admin") -> Service:
    """Save a service (new or changed); setting or changing any runtime field needs the runtime permission."""
    changes = runtime_changes(_stored(Service, service.pk, SERVICE_RUNTIME), service, SERVICE_RUNTIME)
    _guard(actor, service, changes)
    service.save()
    _audit(service, service.customer, changes, actor=actor, via=via, what=f"service {service.name}")
    return service


@transaction.atomic
def service_delete(service: Service, *, actor=None, via: str = "admin") -> None:
    """Delete a service; one that runs something (a runtime field set) needs the runtime permission."""
    changes = runtime_changes(_stored(Service, service.pk, SERVICE_RUNTIME), Service(), SERVICE_RUNTIME)
    _guard(actor, service, changes)
    customer, name = service.customer, service.name
    _audit(service, customer, changes, actor=actor, via=via, what=f"service {name} (deleted)")
    service.delete()
