"""Hosts: the machines customers live on. `local` is the worker's own machine (no SSH); any other host is reached
over SSH (engines.ssh) with a pinned host key and a private key encrypted at rest (or a key file on the workers).

On another host, backups, verification drills, checks, restores (in place or into a copy) and moves to it run
(hosts.remote holds the connection they use); upgrades and rollbacks still run on `local` only
(customers.operations.guard refuses them elsewhere)."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

from core.secrets import EncryptedSecretField
from engines import hostprobe, ssh
from engines.secretbox import Secret

LOCAL = "local"
TUNNEL_LABEL = ("tunnel", "yes")  # a host behind NAT reached through its reverse tunnel (README "Hosts behind NAT")

slug_validator = RegexValidator(r"^[a-z0-9][a-z0-9_-]{0,62}$", "Use lowercase letters, digits, - and _.")
# A user name or address that starts with "-" could be read as an option by ssh (argv puts "--" first anyway).
ssh_user_validator = RegexValidator(r"^[a-z_][a-z0-9_.-]{0,31}$", "A POSIX user name: lowercase letters, digits, _ . -")
address_validator = RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$", "A host name or an IP address.")
path_validator = RegexValidator(r"^/[^\x00\n\r]*$", "An absolute path on the host.")


def validate_labels(value) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValidationError("labels are a JSON object of strings (KEY: VALUE)")


def validate_host_key(value: str) -> None:
    if value:
        try:
            ssh.normalize_key_line(value)
        except ssh.SSHError as exc:
            raise ValidationError(str(exc)) from None


def local_host_pk() -> int:
    """The built-in `local` host (created by migration 0001; again here after a test flushed the tables)."""
    # Read by primary key only: this is a field default, also called by migrations that run before later columns
    # of Host exist (customers 0005), where selecting the whole row would fail.
    pk = Host.objects.filter(name=LOCAL).values_list("pk", flat=True).first()
    if pk is None:
        pk = Host.objects.create(name=LOCAL, address="", ssh_user="").pk
    return pk


class Host(models.Model):
    class DbTools(models.TextChoices):
        KASA = "kasa", "Kasa's own (on the worker, through a forward)"
        HOST = "host", "the host's own (PostgreSQL: pg_dump run on the host)"

    name = models.CharField(max_length=63, unique=True, validators=[slug_validator])
    ssh_user = models.CharField("SSH user", max_length=32, blank=True, default="root",
                                validators=[ssh_user_validator],
                                help_text="root, or a `kasa` user with a sudo rule limited to what Kasa runs.")
    sudo = models.BooleanField(
        "through sudo", default=False,
        help_text="The SSH user is not root: every command Kasa runs on the host goes through `sudo -n`, which the "
                  "host allows with the rule in deploy/sudoers/kasa.")
    address = models.CharField(max_length=253, blank=True, validators=[address_validator],
                               help_text="Host name or IP address Kasa's workers reach its sshd at.")
    port = models.PositiveIntegerField(default=22)
    host_key = models.TextField(
        "pinned host key", blank=True, validators=[validate_host_key],
        help_text="The OpenSSH public key line the host must present. Set only by an explicit trust of the "
                  "fingerprint shown on first contact; a different key is refused.")
    private_key = EncryptedSecretField(help_text="OpenSSH private key Kasa logs in with (write-only).")
    key_file = models.CharField(
        max_length=1024, blank=True, validators=[path_validator],
        help_text="Instead of a stored key: the path of a private key file on every worker (0600, Kasa's user).")
    labels = models.JSONField(default=dict, blank=True, validators=[validate_labels])
    customers_root = models.CharField(
        max_length=1024, blank=True, validators=[path_validator],
        help_text="The folder holding the customers' roots on the host (local: KASA_CUSTOMERS_ROOT).")
    enabled = models.BooleanField(default=True)
    # Host-wide, not per database: the client tools are what is installed on the machine, and the case it is for
    # ("this host's server is newer than Kasa's pg_dump") is the host's own server, which all its customers use.
    db_client_tools = models.CharField(
        "database client tools", max_length=8, choices=DbTools.choices, default=DbTools.KASA,
        help_text="Which pg_dump backs up this host's PostgreSQL databases: Kasa's own (the newest on the worker, "
                  "through a forward of the SSH session; the default) or, only when asked, the host's own, run there "
                  "(its pg_dump must be at least the server's version). Restores and drills use Kasa's pg_restore "
                  "in both cases; MySQL/MariaDB always Kasa's mariadb-dump.")
    # What the last probe found (hosts.services.host_probe).
    reachable = models.BooleanField(null=True, editable=False)
    last_seen = models.DateTimeField(null=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    os = models.CharField("OS", max_length=200, blank=True, editable=False)
    free_bytes = models.BigIntegerField("free space", null=True, editable=False,
                                        help_text="Bytes free under the customers root.")
    tools = models.JSONField(default=dict, blank=True, editable=False,
                             help_text="Versions of python3, tar, zstd, pm2, pg_dump, mariadb-dump (or missing).")
    probed_at = models.DateTimeField(null=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def is_local(self) -> bool:
        return self.name == LOCAL

    def clean(self):
        super().clean()
        if self.is_local:
            return
        missing = [f for f in ("ssh_user", "address", "customers_root") if not getattr(self, f)]
        if missing:
            raise ValidationError({f: "required for a remote host" for f in missing})
        if not 1 <= int(self.port or 0) <= 65535:
            raise ValidationError({"port": "a TCP port: 1-65535"})
        if self.host_key:
            self.host_key = ssh.normalize_key_line(self.host_key)

    def ssh_spec(self) -> str:
        return "" if self.is_local else f"{self.ssh_user}@{self.address}:{self.port}"

    @property
    def via_tunnel(self) -> bool:
        """Whether address:port is a bastion's end of the host's reverse tunnel (the label tunnel=yes): then an
        unreachable host is named as a tunnel down, not a host down."""
        key, value = TUNNEL_LABEL
        return not self.is_local and isinstance(self.labels, dict) and self.labels.get(key) == value

    @property
    def host_pg_tools(self) -> bool:
        """Whether PostgreSQL dumps of this host's customers are made with the host's own pg_dump, on the host."""
        return not self.is_local and self.db_client_tools == self.DbTools.HOST

    def root(self) -> str:
        """The customers root on this host."""
        return str(settings.KASA_CUSTOMERS_ROOT) if self.is_local else self.customers_root

    def fingerprint(self) -> str:
        return ssh.fingerprint(self.host_key) if self.host_key else ""

    def target(self) -> ssh.Target:
        """How engines.ssh reaches this host (the private key stays sealed until a session writes its file)."""
        key = self.private_key
        if isinstance(key, str):  # set on this instance and not reloaded yet: sealed from here on all the same
            key = Secret(key) if key else None
        return ssh.Target(name=self.name, user=self.ssh_user, address=self.address, port=self.port,
                          host_key=self.host_key, private_key=key or None, key_file=self.key_file,
                          connect_timeout=max(1, round(settings.KASA_SSH_CONNECT_TIMEOUT)), tunnel=self.via_tunnel,
                          sudo=self.sudo and self.ssh_user != "root")

    def tool_summary(self) -> str:
        return ", ".join(f"{t} {self.tools.get(t, '?')}" for t in hostprobe.TOOLS) if self.tools else ""
