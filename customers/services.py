"""Service functions for customers: create, describe, start a check."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

from audit.models import AuditEntry
from audit.services import audit_record
from core import permissions
from engines import dburl
from operations.models import Run
from operations.services import run_start

from .models import Customer, DatabaseConnection, Service, Team


class CustomerInputError(ValueError):
    pass


def parse_service_spec(spec: str) -> tuple[str, str]:
    """NAME or NAME=RELPATH (default path: the name)."""
    name, _, rel = spec.partition("=")
    return name.strip(), (rel.strip() or name.strip())


def parse_database_spec(spec: str, index: int) -> tuple[str, dburl.DatabaseURL]:
    """[NAME=]URL; the first unnamed database is "main", later ones "db2", "db3"…"""
    name = ""
    head, sep, tail = spec.partition("=")
    if sep and "://" not in head:
        name, spec = head.strip(), tail
    parsed = dburl.parse(spec.strip())
    return (name or ("main" if index == 0 else f"db{index + 1}")), parsed


def _validation_message(exc: ValidationError) -> str:
    if hasattr(exc, "message_dict"):
        return "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in exc.message_dict.items())
    return " ".join(exc.messages)


@transaction.atomic
def customer_create(
    *, domain: str, root: str, team: Team, name: str = "", services: list[tuple[str, str]] = (),
    databases: list[tuple[str, dburl.DatabaseURL]] = (), versions: dict[str, str] | None = None,
    uuid=None, actor=None, via: str = AuditEntry.Source.CLI, tags: str = "", host=None,
) -> Customer:
    """Create a customer with its services and databases, all validated, or nothing.

    Services get a name and a folder only: what runs (process manager, commands, health URL, run as) is set
    apart, by whoever may change runtime fields. `uuid` re-creates a customer its backups name (backup_import).
    The root folder is a runtime field: an actor needs customers.change_runtime (None: the CLI's shell user).
    `host` None: the built-in `local` host (the worker's own machine).
    """
    permissions.require(actor, permissions.RUNTIME)
    customer = Customer(domain=domain.lower().strip(), root=root, name=name or domain, team=team,
                        versions=versions or {}, tags=tags)
    if host is not None:
        customer.host = host
    if uuid is not None:
        customer.uuid = uuid
    try:
        customer.full_clean()
        customer.save()
        for svc_name, rel in services:
            svc = Service(customer=customer, name=svc_name, path=rel)
            svc.full_clean()
            svc.save()
        for db_name, url in databases:
            db = DatabaseConnection(customer=customer, name=db_name, engine=url.engine)
            if url.engine == "sqlite":
                db.sqlite_path = url.path
            else:
                db.host, db.port, db.database, db.user = url.host, url.port, url.name, url.user
                db.password = url.password
                db.tls = url.tls
            db.full_clean()
            db.save()
    except ValidationError as exc:
        raise CustomerInputError(_validation_message(exc)) from None
    audit_record(action="customer.add", source=via, actor=actor, obj=customer, result="ok",
                 changes={"host": customer.host.name,
                          "services": [s for s, _ in services], "databases": [d for d, _ in databases],
                          "runtime": {"root": {"before": None, "after": customer.root},
                                      "run_as": {"before": None, "after": customer.run_as}}})
    return customer


def customer_check_start(customer: Customer, *, requested_by=None, via: str = "admin", enqueue: bool = True) -> Run:
    """A check run; enqueue=False for a command that executes it in the foreground (operations.cli)."""
    return run_start(customer, kind=Run.Kind.CHECK, requested_by=requested_by, via=via, enqueue=enqueue)


def customer_describe(customer: Customer) -> dict:
    """A customer as the CLI shows it: never a password."""
    return {
        "domain": customer.domain,
        "name": customer.name,
        "team": customer.team.name,
        "host": customer.host.name,
        "status": customer.status,
        "root": customer.root,
        "versions": customer.versions,
        "tags": customer.tag_list(),
        "pinned_to": {"release": customer.version_pin, "reason": customer.version_pin_reason} if customer.version_pin
        else None,
        "services": [
            {"name": s.name, "path": s.path, "process_manager": s.process_manager, "health_url": s.health_url}
            for s in customer.services.all()
        ],
        "databases": [
            {"name": d.name, "engine": d.engine, "url": d.display_url(), "has_password": bool(d.password)}
            for d in customer.databases.all()
        ],
    }
