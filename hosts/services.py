"""Service functions for hosts: add, trust a host key, probe (now or queued).

Hosts serve every team: only superusers add or change them (`actor` None is the CLI's shell user). A host key is
pinned only by an explicit trust of a fingerprint someone saw (`host_trust`), and only when the host still offers
that key at the moment of the trust; nothing here learns a key silently.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string
from django_q.tasks import async_task

from audit.models import AuditEntry
from audit.services import audit_record
from core import permissions
from engines import hostprobe, pm2, ssh
from engines.secretbox import Secret

from .models import Host

PROBE_TIMEOUT = 30
log = logging.getLogger(__name__)


class HostInputError(ValueError):
    pass


def runtime_dir():
    """Where SSH sessions keep their key file, known_hosts and control socket (0700, Kasa's)."""
    return settings.KASA_VAR_DIR / "ssh"


def parse_ssh_spec(spec: str) -> tuple[str, str, int]:
    """USER@ADDRESS[:PORT] (an IPv6 address in brackets: root@[::1]:22) → (user, address, port)."""
    user, at, rest = spec.rpartition("@")
    if not at or not user or not rest:
        raise HostInputError(f"--ssh {spec!r}: use USER@ADDRESS[:PORT]")
    port = 22
    if rest.startswith("["):
        address, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                raise HostInputError(f"--ssh {spec!r}: the port must be a number")
            port = int(tail[1:])
    elif rest.count(":") == 1:
        address, _, p = rest.partition(":")
        if not p.isdigit():
            raise HostInputError(f"--ssh {spec!r}: the port must be a number")
        port = int(p)
    else:
        address = rest
    return user, address, port


def _validation_message(exc: ValidationError) -> str:
    if hasattr(exc, "message_dict"):
        return "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in exc.message_dict.items())
    return " ".join(exc.messages)


def _save(host: Host) -> None:
    try:
        host.full_clean()
    except ValidationError as exc:
        raise HostInputError(_validation_message(exc)) from None
    host.save()


@dataclass
class Added:
    host: Host
    scanned: list[ssh.ScannedKey]
    trusted: bool
    scan_error: str = ""


def host_add(*, name: str, user: str, address: str, port: int = 22, private_key: str | Secret = "",
             key_file: str = "", labels: dict | None = None, customers_root: str = "/srv/kasa/customers",
             trust_host_key: bool = False, sudo: bool = False, db_client_tools: str = Host.DbTools.KASA, actor=None,
             via: str = AuditEntry.Source.CLI) -> Added:
    """Register a remote host, scan its host keys (first contact) and pin the preferred one only when
    `trust_host_key`. Without it the host is stored disabled with no pinned key. Re-adding a host that has no
    trusted key yet updates it (so the trust can follow a look at the fingerprint); a trusted one is refused."""
    permissions.require_superuser(actor, "add a host")
    existing = Host.objects.filter(name=name).first()
    if existing is not None and (existing.is_local or existing.host_key):
        raise HostInputError(f"host {name!r} exists already" + (" and its key is trusted" if existing.host_key else ""))
    host = existing or Host(name=name)
    host.ssh_user, host.address, host.port = user, address, port
    host.labels, host.customers_root, host.sudo = labels or {}, customers_root, sudo
    host.db_client_tools = db_client_tools
    if private_key:
        host.private_key = private_key
    host.key_file = key_file
    if not (host.private_key or host.key_file):
        raise HostInputError(f"host {name!r}: give a private key (stdin) or a key file on the workers")
    host.enabled, host.host_key = False, ""
    try:
        host.full_clean()
    except ValidationError as exc:
        raise HostInputError(_validation_message(exc)) from None
    try:
        scanned = ssh.keyscan(address, port)
        scan_error = ""
    except ssh.SSHError as exc:
        scanned, scan_error = [], str(exc)
    with transaction.atomic():
        if trust_host_key and scanned:
            host.host_key, host.enabled = scanned[0].line, True
        _save(host)
        audit_record(action="host.add", source=via, actor=actor, obj=host, result="ok",
                     changes={"ssh": host.ssh_spec(), "sudo": host.sudo, "key_file": host.key_file or None,
                              "db_client_tools": host.db_client_tools,
                              "private_key": "set" if host.private_key else None, "labels": host.labels,
                              "scanned": [k.fingerprint for k in scanned],
                              "trusted": host.fingerprint() or None})
    return Added(host, scanned, bool(host.host_key), scan_error)


def host_trust(host: Host, fingerprint: str, *, actor=None, via: str = AuditEntry.Source.CLI) -> ssh.ScannedKey:
    """Pin the key with `fingerprint` that the host offers now (scanned again here, so what is pinned is what the
    person saw), and enable the host. HostInputError when the host offers no such key."""
    permissions.require_superuser(actor, "trust a host key")
    if host.is_local:
        raise HostInputError("the local host is reached without SSH: it has no host key")
    wanted = fingerprint.strip().rstrip("=")
    try:
        scanned = ssh.keyscan(host.address, host.port)
    except ssh.SSHError as exc:
        raise HostInputError(f"host {host.name}: {exc}") from None
    match = next((k for k in scanned if k.fingerprint == wanted), None)
    if match is None:
        offered = ", ".join(k.fingerprint for k in scanned)
        raise HostInputError(f"host {host.name} does not offer the key {wanted} (it offers {offered}): nothing "
                             "was trusted")
    before = host.fingerprint() or None
    with transaction.atomic():
        host.host_key, host.enabled = match.line, True
        _save(host)
        audit_record(action="host.trust", source=via, actor=actor, obj=host, result="ok",
                     changes={"host_key": {"before": before, "after": match.fingerprint}})
    return match


def _probe_output(host: Host) -> tuple[str, str]:
    """The probe script's stdout, run locally for `local` and over SSH for any other host; and a problem with the
    host's sudo rule when it logs in through sudo (Kasa's helper refused: nothing but the probe would work)."""
    if host.is_local:
        done = subprocess.run(hostprobe.argv(host.root(), pm2.pm2_binary()), capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
        return done.stdout, ""
    problem = ""
    with ssh.Session(host.target(), runtime_dir()) as session:
        result = session.run(hostprobe.argv(host.root()), timeout=PROBE_TIMEOUT, privileged=False)
        if host.sudo:  # what every operation starts with: Kasa's helper, through the host's sudo rule
            helper = session.run(["python3", "-I", "-c", "pass"], timeout=PROBE_TIMEOUT)
            if helper.rc != 0:
                problem = (f"host {host.name}: sudo refused Kasa's helper for {host.ssh_user} (install the rule of "
                           f"deploy/sudoers/kasa there): {helper.stderr.strip()[-300:]}")
    if result.rc != 0 and not result.stdout:
        raise ssh.SSHError(f"host {host.name}: the probe exited with status {result.rc}: {result.stderr[-300:]}")
    return result.text, problem


def host_probe(host: Host) -> Host:
    """Ask the host what it has now and record it. An unreachable host (or one whose key changed) is recorded as
    such with the reason naming it; nothing is raised. Runs no customer code."""
    now = timezone.now()
    fields = {"probed_at": now}
    try:
        text, sudo_problem = _probe_output(host)
        answer = hostprobe.parse(text)
    except (ssh.SSHError, OSError, subprocess.SubprocessError) as exc:
        message = str(exc) if isinstance(exc, ssh.SSHError) else f"host {host.name}: probe failed: {exc}"
        fields.update(reachable=False, last_error=message[:2000])
    else:
        problem = "" if answer.root_exists else f"host {host.name}: the customers root {host.root()} does not exist"
        problem = "; ".join(p for p in (problem, sudo_problem) if p)
        fields.update(reachable=True, last_seen=now, last_error=problem, os=answer.os, free_bytes=answer.free_bytes,
                      tools=answer.tools)
        host.journals_left = answer.journals  # not stored: the probe task has them replayed (host_journals_left)
    Host.objects.filter(pk=host.pk).update(**fields)
    for key, value in fields.items():
        setattr(host, key, value)
    return host


# Called with a remote host that answers and still holds restore journals a lost connection left there (dotted
# paths to fn(host), registered by the apps above that wrote them: backups.host_journals replays them).
_journal_hooks: list[str] = []


def add_journal_hook(path: str) -> None:
    if path not in _journal_hooks:
        _journal_hooks.append(path)


def host_journals_left(host: Host) -> list[str]:
    """The host's probe found journals there: each hook deals with them (it reports on the runs); what they did,
    a line each. Never raises."""
    lines: list[str] = []
    for path in _journal_hooks:
        try:
            lines += import_string(path)(host) or []
        except Exception as exc:  # noqa: BLE001  (the probe has recorded the host; a hook's trouble is logged)
            log.exception("journal hook %s for host %s failed", path, host.name)
            lines.append(f"{path} failed: {exc}")
    return lines


def host_probe_start(host: Host, *, actor=None, via: str = AuditEntry.Source.ADMIN) -> None:
    """Queue a probe of `host` (the task gets its primary key only)."""
    if actor is not None and not (actor.is_active and actor.is_staff):
        raise PermissionDenied("only staff may check a host")
    pk = host.pk
    transaction.on_commit(lambda: async_task("hosts.tasks.probe_host", pk))


def host_probe_all() -> int:
    """Queue a probe of every enabled host (the schedule's tick): one task each, so a slow or unreachable host
    delays no other."""
    pks = list(Host.objects.filter(enabled=True).values_list("pk", flat=True))
    for pk in pks:
        async_task("hosts.tasks.probe_host", pk)
    return len(pks)


def host_describe(host: Host) -> dict:
    """A host as the CLI shows it: never its private key."""
    return {
        "name": host.name, "ssh": host.ssh_spec() or None, "local": host.is_local, "tunnel": host.via_tunnel,
        "sudo": host.sudo, "enabled": host.enabled, "db_client_tools": host.db_client_tools,
        "host_key": host.fingerprint() or None, "key": "stored" if host.private_key else (host.key_file or None),
        "labels": host.labels, "customers_root": host.root(), "reachable": host.reachable,
        "last_seen": host.last_seen, "last_error": host.last_error or None, "os": host.os or None,
        "free_bytes": host.free_bytes, "tools": host.tools, "probed_at": host.probed_at,
    }
