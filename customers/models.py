from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.core.validators import DomainNameValidator
from django.db import models

from core.secrets import EncryptedSecretField
from engines import dburl, paths, runas
from hosts.models import Host, local_host_pk

from . import roots
from .validators import (
    normalize_tags,
    slug_validator,
    validate_argv,
    validate_tags,
    validate_tcp_port,
    validate_versions,
)


class Team(models.Model):
    """Staff see and act only on the customers of their teams."""

    name = models.CharField(max_length=100, unique=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="kasa_teams", blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class CustomerQuerySet(models.QuerySet):
    def visible_to(self, user) -> CustomerQuerySet:
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return self.none()
        if user.is_superuser:
            return self
        return self.filter(team__members=user)

    def tagged(self, tag: str) -> CustomerQuerySet:
        """Customers carrying `tag` (tags are stored normalized: lower case, comma-separated)."""
        return self.filter(tags__regex=rf"(^|,){re.escape(normalize_tags(tag))}(,|$)")


def validate_customer_root(value: str) -> None:
    """What holds on every host: an absolute path without '..' or a NUL byte. Which customers root it must lie in
    depends on the customer's host: Customer.clean() (KASA_CUSTOMERS_ROOT on local, the host's customers_root
    elsewhere)."""
    if not value or "\x00" in value:
        raise ValidationError("root folder is empty or contains a NUL byte")
    if ".." in Path(value).parts:
        raise ValidationError(f"root folder {value!r} contains '..'")
    if not Path(value).is_absolute():
        raise ValidationError("root folder must be an absolute path")


def local_root_problem(value: str) -> str | None:
    """Why `value` may not be the root of a customer on `local` (the worker's own filesystem, links followed)."""
    try:
        paths.resolve_strictly_inside(value, settings.KASA_CUSTOMERS_ROOT, what="root folder")
    except paths.PathEscapeError as exc:
        return f"{exc} (KASA_CUSTOMERS_ROOT)"
    return None


def remote_root_problem(value: str, host: Host, others) -> str | None:
    """Why `value` may not be the root of a customer on the remote `host`, as far as the worker can tell: inside
    the host's customers root and overlapping no other root of that host, compared as written (the worker cannot
    follow the host's links; a backup checks again on the host with every link followed, engines.hostside)."""
    mine, base = Path(os.path.normpath(value)), Path(os.path.normpath(host.root() or "/"))
    if not host.root() or base not in mine.parents:
        return (f"root folder {value!r} is not inside {str(base)!r} (the customers root of host {host.name})")
    for other in others:
        if how := roots.overlap(mine, Path(os.path.normpath(other))):
            return f"root folder {value} {how} another customer's root folder: each customer's folder is its own"
    return None


def is_remote(customer) -> bool:
    return customer is not None and customer.host_id is not None and not customer.host.is_local


def kasa_uids() -> set[int]:
    """Kasa's own users: this process's, and the owner of KASA_VAR_DIR (a worker running as root, to switch to
    the customers' users, and the web running as `kasa` are both Kasa)."""
    uids = {os.geteuid()}
    try:
        uids.add(settings.KASA_VAR_DIR.stat().st_uid)
    except OSError:
        pass
    return uids


def run_as_identity(name: str) -> runas.Identity:
    """The OS user `name` for a customer's code: it must exist and be neither root nor one of Kasa's users.
    Raises runas.RunAsError with a message for humans."""
    identity = runas.lookup(name)
    if identity.uid in kasa_uids():
        raise runas.RunAsError(f"run_as user {name!r} is Kasa's own user: customer code must not run within "
                               "reach of Kasa's keys")
    return identity


class Customer(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        MAINTENANCE = "maintenance", "Maintenance"
        DISABLED = "disabled", "Disabled"

    domain = models.CharField(
        max_length=253, unique=True, validators=[DomainNameValidator(accept_idna=False)],
        help_text="The customer's primary domain, e.g. shop.example.com.",
    )
    name = models.CharField(max_length=200, blank=True)
    # Names the customer in its backups' manifests: an import attaches a backup to an existing customer only
    # when this matches (a domain alone is easy to forge on a storage target).
    uuid = models.UUIDField("UUID", default=uuid.uuid4, unique=True, editable=False)
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="customers")
    host = models.ForeignKey(
        Host, on_delete=models.PROTECT, related_name="customers", default=local_host_pk,
        help_text="The machine the customer lives on (`local`: the worker's own). On another host, checks, backups, "
                  "drills, restores (in place or into a copy) and moves run over SSH; upgrades and rollbacks are "
                  "refused there for now.")
    root = models.CharField(
        "root folder", max_length=1024, validators=[validate_customer_root],
        help_text="Absolute folder holding the services; must lie inside KASA_CUSTOMERS_ROOT.",
    )
    run_as = models.CharField(
        "run as", max_length=32, blank=True,
        help_text="OS user the customer's code runs as (PM2, start/stop commands, release hooks): not root, not "
                  "Kasa's own user. Empty: development only, Kasa's user with a warning on every run.",
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ACTIVE)
    versions = models.JSONField(default=dict, blank=True, validators=[validate_versions],
                                help_text="Current version per component: one COMPONENT=VERSION per line.")
    tags = models.CharField(max_length=500, blank=True, validators=[validate_tags],
                            help_text="Words that group customers for rollouts, e.g. canary, eu-west "
                                      "(commas or spaces).")
    version_pin = models.CharField(
        "pinned to", max_length=100, blank=True,
        help_text="A release name: fleet rollouts skip this customer while it is pinned (single upgrades do not).")
    version_pin_reason = models.CharField("why pinned", max_length=300, blank=True)
    # Set by a move to another host (backups.move): where the previous copy stays, stopped, until the move is
    # confirmed (backups.move_service.move_confirm deletes it and empties this).
    old_copy = models.JSONField(
        "old copy", default=dict, blank=True, editable=False,
        help_text="After a move: the host and folder of the previous copy, stopped, kept until the move is confirmed.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = CustomerQuerySet.as_manager()

    class Meta:
        ordering = ["domain"]
        permissions = [
            ("change_runtime", "Can change what runs: root folder, run as, process manager, commands, health URLs"),
            ("check_customer", "Can check a customer's databases and services"),
        ]

    def __str__(self):
        return self.domain

    def save(self, *args, **kwargs):
        self.domain = self.domain.lower().strip()
        self.tags = normalize_tags(self.tags)
        super().save(*args, **kwargs)

    def clean(self):
        super().clean()
        self.tags = normalize_tags(self.tags)
        if self.version_pin.strip() and not self.version_pin_reason.strip():
            raise ValidationError({"version_pin_reason": "say why the customer is pinned (rollouts list it)"})
        self.run_as = (self.run_as or "").strip()
        if self.run_as and not is_remote(self):  # a remote host's user: its check looks it up there
            try:
                run_as_identity(self.run_as)
            except runas.RunAsError as exc:
                raise ValidationError({"run_as": str(exc)}) from None
        # The root lies strictly inside its host's customers root, and no other customer's root of that host (nor,
        # on local, any of Kasa's files) may be it, hold it or lie in it. On local: resolved real paths, as always;
        # on a remote host: as written here, then resolved on the host before every backup (backups.remote).
        shaped = "\x00" not in self.root and ".." not in Path(self.root).parts  # else the field's own error says so
        if self.root and Path(self.root).is_absolute() and shaped:
            others = Customer.objects.exclude(pk=self.pk).filter(host_id=self.host_id).values_list("root", flat=True)
            if is_remote(self):
                problem = remote_root_problem(self.root, self.host, others)
            else:
                problem = local_root_problem(self.root) or roots.root_conflict(self.root, others)
            if problem:
                raise ValidationError({"root": problem})

    def tag_list(self) -> list[str]:
        return [t for t in self.tags.split(",") if t]

    def root_path(self) -> Path:
        """The root, checked again now: a symlink may have been swapped since it was saved."""
        return paths.resolve_strictly_inside(self.root, settings.KASA_CUSTOMERS_ROOT, what="root folder")

    def folder_problems(self) -> list[str]:
        """Everything wrong with this customer's folders now (a folder may have become a link since it was
        validated): root confinement and overlap, service and SQLite paths."""
        try:
            self.root_path()
        except paths.PathEscapeError as exc:
            return [f"{exc} (KASA_CUSTOMERS_ROOT)"]
        others = Customer.objects.exclude(pk=self.pk).values_list("root", flat=True)
        if problem := roots.root_conflict(self.root, others):
            return [problem]
        problems = []
        for svc in self.services.all():
            try:
                svc.folder()
            except paths.PathEscapeError as exc:
                problems.append(str(exc))
        for db in self.databases.all():
            if db.engine == DatabaseConnection.Engine.SQLITE:
                try:
                    db.sqlite_file()
                except paths.PathEscapeError as exc:
                    problems.append(str(exc))
        return problems


def _customer_of(obj) -> Customer | None:
    """The customer a service or database belongs to, also while both are still unsaved (admin inlines)."""
    try:
        return obj.customer
    except ObjectDoesNotExist:
        return None


class Service(models.Model):
    class ProcessManager(models.TextChoices):
        PM2 = "pm2", "PM2"
        SYSTEMD = "systemd", "systemd"
        COMMAND = "command", "Start/stop commands"
        NONE = "none", "None"

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="services")
    name = models.CharField(max_length=63, validators=[slug_validator])
    path = models.CharField(max_length=512, help_text="Folder relative to the customer's root.")
    process_manager = models.CharField(max_length=10, choices=ProcessManager.choices, default=ProcessManager.NONE)
    app_name = models.CharField(max_length=200, blank=True, help_text="PM2 app name or systemd unit.")
    start_command = models.JSONField(default=list, blank=True, validators=[validate_argv],
                                     help_text="One argument per line, e.g. npm, then start (an argv list, no shell).")
    stop_command = models.JSONField(default=list, blank=True, validators=[validate_argv],
                                    help_text="One argument per line (an argv list, no shell).")
    health_url = models.URLField(blank=True)

    class Meta:
        ordering = ["customer", "name"]
        constraints = [models.UniqueConstraint(fields=["customer", "name"], name="unique_service_name")]

    def __str__(self):
        return f"{self.customer}/{self.name}"

    def clean(self):
        try:
            self.path = paths.relative_inside(self.path, what="service path")
        except paths.PathEscapeError as exc:
            raise ValidationError({"path": str(exc)}) from None
        customer = _customer_of(self)
        if customer is not None and customer.root and not is_remote(customer):  # remote: checked on the host
            try:  # followed through links: the folder stays inside its own root
                paths.resolve_inside(self.path or ".", customer.root, what="service path")
            except paths.PathEscapeError as exc:
                raise ValidationError({"path": str(exc)}) from None
        if self.process_manager == self.ProcessManager.COMMAND and not self.start_command:
            raise ValidationError({"start_command": "required with the 'command' process manager"})
        if self.process_manager in (self.ProcessManager.PM2, self.ProcessManager.SYSTEMD) and not self.app_name:
            raise ValidationError({"app_name": f"required with {self.get_process_manager_display()}"})

    def folder(self) -> Path:
        return paths.resolve_inside(self.path or ".", self.customer.root_path(), what=f"service {self.name} path")


class DatabaseConnection(models.Model):
    class Engine(models.TextChoices):
        POSTGRESQL = "postgresql", "PostgreSQL"
        MYSQL = "mysql", "MySQL / MariaDB"
        SQLITE = "sqlite", "SQLite"
        REDIS = "redis", "Redis"

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="databases")
    name = models.CharField(max_length=63, default="main", validators=[slug_validator])
    engine = models.CharField(max_length=12, choices=Engine.choices)
    host = models.CharField(max_length=255, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True, validators=[validate_tcp_port],
                                       help_text="Empty: the engine's default (5432, 3306, 6379).")
    database = models.CharField("database name", max_length=255, blank=True,
                                help_text="Redis: the logical database number (empty: 0).")
    user = models.CharField(max_length=255, blank=True, help_text="Redis: empty for requirepass (user default).")
    password = EncryptedSecretField()
    tls = models.BooleanField("TLS", default=False,
                              help_text="Redis only: connect with TLS (rediss://), the server's certificate checked "
                                        "against KASA_REDIS_CA_FILE, else the system's CAs.")
    sqlite_path = models.CharField(
        "SQLite path", max_length=1024, blank=True, help_text="Inside the customer's root (relative or absolute)."
    )

    class Meta:
        ordering = ["customer", "name"]
        constraints = [models.UniqueConstraint(fields=["customer", "name"], name="unique_database_name")]

    def __str__(self):
        return f"{self.customer}/{self.name}"

    def clean(self):
        if self.engine == self.Engine.SQLITE:
            if not self.sqlite_path:
                raise ValidationError({"sqlite_path": "required for SQLite"})
            customer = _customer_of(self)
            if customer is not None and customer.root and is_remote(customer):
                # The host's path: as written here (inside the root, no '..'), resolved on the host before every
                # backup (engines.hostside.backup_facts).
                mine = Path(os.path.normpath(os.path.join(customer.root, self.sqlite_path)))
                if ".." in Path(self.sqlite_path).parts or Path(os.path.normpath(customer.root)) not in mine.parents:
                    raise ValidationError({"sqlite_path": f"SQLite path {self.sqlite_path!r} is not inside the "
                                                          f"customer's root {customer.root!r}"})
            elif customer is not None and customer.root:
                try:
                    resolved = paths.resolve_strictly_inside(self.sqlite_path, customer.root, what="SQLite path")
                except paths.PathEscapeError as exc:
                    raise ValidationError({"sqlite_path": str(exc)}) from None
                if problem := roots.kasa_conflict(resolved, what="SQLite path"):
                    raise ValidationError({"sqlite_path": problem})
        elif self.engine == self.Engine.REDIS:
            if not self.host:
                raise ValidationError({"host": "required for Redis"})
            self.database = (self.database or "0").strip()
            if problem := dburl.redis_db_problem(self.database):
                raise ValidationError({"database": problem})
            self.database = str(int(self.database))
            if not self.port:
                self.port = dburl.DEFAULT_PORTS["redis"]
        else:
            missing = [f for f in ("host", "database", "user") if not getattr(self, f)]
            if missing:
                raise ValidationError({f: f"required for {self.get_engine_display()}" for f in missing})
            if not self.port:
                self.port = dburl.DEFAULT_PORTS.get(self.engine)

    def sqlite_file(self) -> Path:
        return paths.resolve_strictly_inside(self.sqlite_path, self.customer.root_path(), what="SQLite path")

    def display_url(self) -> str:
        """Connection facts for humans and logs; never the password."""
        if self.engine == self.Engine.SQLITE:
            return f"sqlite:///{self.sqlite_path}"
        if self.engine == self.Engine.REDIS:
            return dburl.redis_display(user=self.user, password=False, host=self.host, port=self.port,
                                       db=self.database, tls=self.tls)
        return f"{self.engine}://{self.user}@{self.host}:{self.port}/{self.database}"


class MaintenanceConnection(models.Model):
    """An administrative login to one database server (superusers set it), used only to create, rename and drop
    databases during restores and rollbacks when the customer's own role may not (no CREATEDB). Without one,
    Kasa restores with the customer's role alone (see engines.dbrestore)."""

    # Servers whose databases Kasa creates and renames: a Redis restore needs no administrative login (it moves keys
    # into a spare logical database and swaps it in).
    engine = models.CharField(max_length=12, choices=[c for c in DatabaseConnection.Engine.choices
                                                      if c[0] not in ("sqlite", "redis")])
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField(validators=[validate_tcp_port])
    user = models.CharField(max_length=255)
    password = EncryptedSecretField()
    database = models.CharField("maintenance database", max_length=255, blank=True,
                                help_text="Database to connect to (PostgreSQL: postgres); empty: the engine's default.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["engine", "host", "port"]
        constraints = [models.UniqueConstraint(fields=["engine", "host", "port"], name="unique_maintenance_server")]

    def __str__(self):
        return f"{self.engine}://{self.user}@{self.host}:{self.port}"

    def clean(self):
        if not self.port and self.engine:
            self.port = dburl.DEFAULT_PORTS[self.engine]
