"""What an upgrade or rollback of a customer on a remote host works with (upgrades.remote): the run's Job with one
SSH session to the host (hosts.remote.RemoteHost), the customer's root and user *as the host knows them*, and a
journal that is written on the host's disk before the worker's own copy (as backups.remote_restore's Journal:
the same `.kasa-journals` folder, the same per-host key), so that an interrupted upgrade can be undone when the
host returns.

Also here: the customer's services as the host runs them (PM2 there, through engines.hostrestore.services) and a
release hook run on the host as the customer's user (engines.hostupgrade.HOOK_LAUNCHER), its output in the run's
log line by line as it comes.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import threading
from pathlib import Path

from django.conf import settings

from backups.remote_restore import host_journal_key
from engines import hostrestore, hostupgrade, procman, ssh
from engines.plainread import last_line
from engines.proc import kill_group
from hosts.remote import RemoteError, RemoteHost
from operations.context import OperationError, RunContext

from .journal import Journal
from .models import Upgrade
from .rollback import Job


class HostJournal(Journal):
    """The run's journal (upgrades.journal.Journal) with a copy on the host's disk, written first: a worker that
    dies leaves its local copy, a host that goes away its own (engines.hostrestore.journal_write)."""

    def __init__(self, ctx: RunContext, doc: dict, key: str, remote: RemoteHost, root: str):
        super().__init__(ctx, doc, key)
        self.remote, self.root = remote, root
        self.hkey = host_journal_key(remote.host.name)
        self.path = hostrestore.journal_path(remote.host.root(), ctx.run.pk)

    def save(self) -> None:
        # Both of the run's lists (the forward journal and the way back's own) in one host file.
        body = {"run": self.ctx.run.pk, "root": self.root, "kind": "upgrade",
                "steps": list(self.doc.get("journal") or []), "rollback": list(self.doc.get("rollback") or [])}
        if self.key == "journal":
            body["steps"] = list(self.steps)
        else:
            body["rollback"] = list(self.steps)
        self.remote.call("engines.hostrestore.journal_write", self.remote.host.root(), self.ctx.run.pk, body,
                         self.hkey)
        super().save()

    def remove_on_host(self) -> None:
        self.remote.call("engines.hostrestore.journal_remove", self.remote.host.root(), self.ctx.run.pk)


class RemoteJob(Job):
    """A Job whose customer lives on `remote`'s host: `root` is the host's path, `who` the customer's user there."""

    def __init__(self, ctx: RunContext, upgrade: Upgrade, remote: RemoteHost, facts: dict, who: dict,
                 doc: dict | None = None):
        super().__init__(ctx, upgrade, doc=doc)
        self.remote, self.facts, self.who = remote, facts, who
        self.host = remote.host.name
        self._root = facts["root"]
        self.journal = HostJournal(ctx, self.doc, "journal", remote, self._root)
        self.undo_journal = HostJournal(ctx, self.doc, "rollback", remote, self._root)

    @property
    def root(self) -> Path:
        return Path(self._root)

    @property
    def user(self) -> str:
        return self.customer.run_as

    def call(self, function: str, *args, **kwargs):
        return self.remote.call(function, *args, **kwargs)

    def specs(self, folders: dict[str, str] | None = None) -> list[procman.ServiceSpec]:
        """The customer's services as the host runs them (their identity is resolved there)."""
        root = self._root
        return [procman.ServiceSpec(name=s.name, folder=os.path.join(root, s.path or "."), manager=s.process_manager,
                                    app_name=s.app_name, start_command=tuple(s.start_command or ()),
                                    stop_command=tuple(s.stop_command or ()),
                                    health_url=s.health_url, root=root)
                for s in sorted(self.customer.services.all(), key=lambda s: s.name)]

    def present_specs(self) -> list[procman.ServiceSpec]:
        """The services whose folder is there on the host (a folder, or a release link leading to one)."""
        specs = self.specs()
        there = set(self.call("engines.hostupgrade.present", self._root, [s.folder for s in specs]) or [])
        return [s for s in specs if s.folder in there]

    def services(self, action: str, specs: list[procman.ServiceSpec], log) -> None:
        """Stop or start `specs` with PM2 on the host, each PM2 call as the customer's user there."""
        if not specs:
            return
        wire = [{"name": s.name, "folder": s.folder, "manager": s.manager, "app_name": s.app_name,
                 "start_command": list(s.start_command), "stop_command": list(s.stop_command), "root": s.root,
                 "ecosystem": s.ecosystem} for s in specs]
        answer = self.call("engines.hostrestore.services", action, wire, self.user,
                           settings.KASA_REMOTE_PM2 or "pm2", timeout=settings.KASA_SERVICE_TIMEOUT,
                           settle=settings.KASA_PM2_SETTLE)
        if not isinstance(answer, dict) or not isinstance(answer.get("lines"), list):
            raise OperationError(f"{self.remote.where} answered something that is not a service report: not trusted")
        for line in answer["lines"][:50]:
            log(f"{self.host}: {str(line)[:300]}")
        if not answer.get("ok"):
            raise OperationError(f"on {self.host}: {str(answer.get('error'))[:2000]}")

    def hook(self, slog, argv: list[str], folder: str, env: dict[str, str], *, timeout: float) -> None:
        """Run a release hook in `folder` on the host as the customer's user, `env` its environment's own part (sent
        on stdin, never in argv); every line it prints to the run's log as it comes. OperationError when it fails,
        RemoteError naming the host when the connection is lost."""
        rel = os.path.relpath(folder, self._root)
        launcher = ["python3", "-I", "-c", hostupgrade.HOOK_LAUNCHER, self._root, rel, self.user, f"{timeout:g}",
                    *argv]
        cmd = self.remote.session.argv(launcher)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        tail: collections.deque[str] = collections.deque(maxlen=20)
        # The launcher kills the hook on the host when `timeout` passes; this is the backstop for a host that
        # stops answering (the connection then goes, and the launcher kills the hook there too).
        timer = threading.Timer(timeout + 30, kill_group, args=(proc,))
        timer.daemon = True
        timer.start()
        try:
            try:
                proc.stdin.write(json.dumps({"env": env}).encode() + b"\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass
            for raw in iter(proc.stdout.readline, b""):
                line = self.ctx.mask(raw.decode("utf-8", "replace").rstrip("\n"))
                tail.append(line)
                slog.info(f"  {line}")
            code = proc.wait()
        except BaseException:
            kill_group(proc)
            raise
        finally:
            timer.cancel()
            proc.stdout.close()
        if code == 255:  # ssh's own failure (Kasa's launcher never exits 255): the host, not the hook
            try:
                self.remote.session.check(255, "\n".join(tail))
            except ssh.SSHError as exc:
                raise RemoteError(str(exc)) from None
        if code != 0:
            why = f"killed after {timeout:g} s" if code in (124, -9) else f"exit code {code}"
            raise OperationError(f"{argv[0]} failed on {self.host} ({why}"
                                 f"{': ' + last_line(tail) if last_line(tail) else ''})")
        slog.info(f"exit code 0 on {self.host}")
