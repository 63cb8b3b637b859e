"""A connection to a remote host for the length of one operation (issue 14): one engines.ssh Session (a
multiplexed master), Kasa's pure engines code served on it by one engines.hostcall helper, and database forwards
on the master. Used by backups (backups.remote) and checks (customers.remote_check); the host's answers are
untrusted input, checked by the callers.

Failures are RemoteError (a SourceError, so a backup's artifact error wraps it like any source's), each message
naming the host.
"""

from __future__ import annotations

import threading

from engines import health, hostcall, hostpgtools, sources, ssh
from engines.streams import Stage

from .models import Host
from .services import runtime_dir


class RemoteError(sources.SourceError):
    """The host was lost, refused, or answered something a backup cannot use: the message names the host."""


class RemoteHost:
    """One SSH session and one host-side helper for the length of an operation; calls are serialised (a backup's
    two lanes stream at once, the helper answers one call at a time)."""

    def __init__(self, host: Host):
        self.host = host
        self.target = host.target()
        self.where = self.target.where()
        self.session = ssh.Session(self.target, runtime_dir())
        self._lock = threading.Lock()
        self._helper: hostcall.HostSession | None = None
        self._forwards: dict[tuple[str, int | None], str] = {}

    def __enter__(self) -> RemoteHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, function: str, *args, **kwargs):
        with self._lock:
            try:
                if self._helper is None:
                    self._helper = hostcall.HostSession(self.session.argv(hostcall.HostSession.boot_argv()),
                                                        where=self.where, timeout=600)
                return self._helper.call(function, *args, **kwargs)
            except hostcall.HostLost as exc:
                self._helper = None
                raise RemoteError(str(exc)) from None
            except hostcall.HostCallError as exc:
                raise RemoteError(str(exc)) from None

    def stage(self, argv: list[str], *, name: str, ok_codes=(0,)) -> Stage:
        """A chain stage that runs `argv` on the host; its stdout comes through the ssh process."""
        return Stage(self.session.argv(argv), name=f"{name} on {self.host.name}", ok_codes=ok_codes)

    def lost(self, stage: Stage, code: int | None) -> None:
        """Raise RemoteError naming the host when a stage's ssh ended with 255 (the connection, not the
        command: Kasa's remote commands never exit 255)."""
        if code == 255:
            try:
                self.session.check(255, "\n".join(stage.stderr_tail))
            except ssh.SSHError as exc:
                raise RemoteError(str(exc)) from None

    def check_health(self, specs, *, consecutive: int, timeout: float, interval: float) -> dict:
        """engines.health.check_all asked *on the host* (a health URL names the service as its host sees it: a
        service bound to the host's 127.0.0.1 is reachable there only, and the worker's own 127.0.0.1 is another
        machine). {name: HealthResult}, the host's answer checked (untrusted input)."""
        urls = {s.name: s.health_url for s in specs if s.health_url}
        if not urls:
            return {}
        answer = self.call("engines.health.check_urls", urls, consecutive=consecutive, budget=timeout,
                           interval=interval, timeout=timeout + 60)
        if not isinstance(answer, dict) or set(answer) != set(urls):
            raise RemoteError(f"{self.where} answered something that is not a health report: not trusted")
        results = {}
        for name, r in answer.items():
            if not isinstance(r, dict) or not isinstance(r.get("ok"), bool):
                raise RemoteError(f"{self.where} answered something that is not a health report: not trusted")
            status = r.get("last_status")
            results[name] = health.HealthResult(
                ok=r["ok"], attempts=int(r.get("attempts") or 0) if isinstance(r.get("attempts"), int) else 0,
                last_status=status if isinstance(status, int) else None,
                last_error=str(r.get("last_error") or "")[:500],
                elapsed=float(r["elapsed"]) if isinstance(r.get("elapsed"), (int, float)) else 0.0,
                url=urls[name])
        return results

    def http_status(self, url: str, timeout: float) -> tuple[int | None, str]:
        """One GET of `url` from the host: (status, error)."""
        answer = self.call("engines.health.probe_once", url, timeout, timeout=timeout + 30)
        if not (isinstance(answer, list) and len(answer) == 2 and (answer[0] is None or isinstance(answer[0], int))):
            raise RemoteError(f"{self.where} answered something that is not an HTTP status: not trusted")
        return answer[0], str(answer[1] or "")[:500]

    def own_pg_dump(self) -> tuple[str, str]:
        """For a host set to its own database client tools (Host.db_client_tools): its pg_dump (the absolute path
        there: KASA_REMOTE_PG_BIN's, else its PATH's) and its version line (engines.hostpgtools.find_tool, run
        there). RemoteError naming the host when it has none."""
        from django.conf import settings

        folder = settings.KASA_REMOTE_PG_BIN
        found = self.call("engines.hostpgtools.find_tool", "pg_dump", folder)
        if not isinstance(found, dict):
            raise RemoteError(f"{self.where} answered something that is not a tool's place: not trusted")
        if "missing" in found:
            looked = f"in {folder}" if folder else "on its PATH"
            raise RemoteError(f"host {self.host.name} is set to back up PostgreSQL with its own client tools, but it "
                              f"has no usable pg_dump {looked} ({str(found['missing'])[:300]}): install PostgreSQL's "
                              "client tools there (KASA_REMOTE_PG_BIN names their folder), or set the host back to "
                              "Kasa's own tools")
        path, version = found.get("path"), found.get("version")
        if not (isinstance(path, str) and path.startswith("/") and isinstance(version, str)):
            raise RemoteError(f"{self.where} answered something that is not a tool's place: not trusted")
        return path, version[:200]

    def own_pg_dump_problem(self, tool: tuple[str, str], server_major: int) -> str:
        """Why the host's own pg_dump cannot dump a server of `server_major` (older: it would abort), or ""."""
        major = hostpgtools.major_of(tool[1])
        if major >= server_major:
            return ""
        return (f"host {self.host.name}'s own pg_dump {major} ({tool[0]}) cannot dump its PostgreSQL {server_major} "
                f"server: install a client of version {server_major} or newer there, or set the host back to "
                "Kasa's own tools")

    def forward(self, db_host: str, db_port: int | None, socket_name: str) -> str:
        """The local socket of a forward to db_host:db_port as the host sees it (one per server and session)."""
        key = (db_host, db_port)
        with self._lock:
            if key not in self._forwards:
                try:
                    self._forwards[key] = self.session.forward(db_host, db_port,
                                                               name=f"f{len(self._forwards)}/{socket_name}")
                except ssh.SSHError as exc:
                    raise RemoteError(str(exc)) from None
            return self._forwards[key]

    def close(self) -> None:
        with self._lock:
            if self._helper is not None:
                self._helper.close()
                self._helper = None
            for (db_host, db_port), local_path in self._forwards.items():
                self.session.cancel_forward(local_path, db_host, db_port)
            self._forwards.clear()
        self.session.close()
