"""Health checks of customer services after a restore or an upgrade started them again.

A service counts as healthy after `consecutive` answers with the expected status in a row: one lucky 200 from a
process that is still crash-looping under its manager proves little, so any other answer resets the streak. Plain
stdlib urllib (so the same code runs on a customer's remote host through engines.hostcall: a health URL names the
service as *its* host sees it, http://127.0.0.1:3000/ included), with a short timeout per request so a hung service
cannot eat the whole budget, no proxy (a health URL names a service on this host or its network, never something to
reach through the operator's HTTP proxy), and redirects followed only on the same host (a health URL must not send
Kasa elsewhere).
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

USER_AGENT = "kasa-health/1"
READ_LIMIT = 64 * 1024  # a health answer is small; never read a whole page into memory


@dataclass
class HealthResult:
    ok: bool
    attempts: int
    last_status: int | None  # HTTP status of the last answer, None when the last attempt got no answer
    last_error: str  # "" when ok; otherwise why the last attempt did not count
    elapsed: float
    url: str = ""

    def summary(self) -> str:
        if self.ok:
            return f"{self.url} healthy after {self.attempts} requests in {self.elapsed:.1f} s"
        return f"{self.url} not healthy after {self.attempts} requests in {self.elapsed:.1f} s: {self.last_error}"


class _RedirectRefused(urllib.error.HTTPError):
    pass


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, host: str):
        self.host = host

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urlsplit(urljoin(req.full_url, newurl))
        if target.scheme not in ("http", "https") or (target.hostname or "").lower() != self.host:
            raise _RedirectRefused(req.full_url, code, f"redirect to {target.scheme}://{target.hostname} "
                                   "(another host) was not followed", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(host: str) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _SameHostRedirects(host))


def _probe(opener: urllib.request.OpenerDirector, url: str, timeout: float) -> tuple[int | None, str]:
    """One GET: (status, error). error is "" when an HTTP answer came back."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT}, method="GET")
    try:
        with opener.open(req, timeout=timeout) as resp:
            resp.read(READ_LIMIT)
            return resp.status, ""
    except _RedirectRefused as exc:
        exc.close()
        return exc.code, str(exc.reason)
    except urllib.error.HTTPError as exc:  # 4xx/5xx still are answers: their status is what matters
        exc.close()
        return exc.code, ""
    except urllib.error.URLError as exc:
        return None, _describe(exc.reason, timeout)
    except (OSError, http.client.HTTPException) as exc:
        return None, _describe(exc, timeout)


def _describe(reason: object, timeout: float) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:.1f} s"
    if isinstance(reason, socket.gaierror):
        return f"host name does not resolve ({reason.strerror or reason})"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def wait_healthy(url: str, *, consecutive: int = 3, timeout: float = 30.0, interval: float = 0.5,
                 expect: int = 200, request_timeout: float = 2.0) -> HealthResult:
    """Poll `url` until `consecutive` answers in a row have status `expect`, or `timeout` seconds pass.

    Never raises for an unhealthy service: the result says what the last attempt saw.
    """
    started = time.monotonic()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return HealthResult(False, 0, None, f"{url!r} is not an http(s) URL with a host", 0.0, url)
    opener = _opener(parts.hostname.lower())
    deadline = started + timeout
    attempts = streak = 0
    status: int | None = None
    error = ""
    while True:
        attempts += 1
        per_request = max(0.05, min(request_timeout, deadline - time.monotonic()))
        status, error = _probe(opener, url, per_request)
        if status == expect and not error:
            streak += 1
            if streak >= consecutive:
                return HealthResult(True, attempts, status, "", time.monotonic() - started, url)
        else:
            streak = 0
            if not error:
                error = f"answered HTTP {status}, expected {expect}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
        if deadline - time.monotonic() <= 0:
            break
    if not error:  # the last answers were good but the streak was cut short by the timeout
        error = f"only {streak} of {consecutive} answers in a row were HTTP {expect} within {timeout:g} s"
    else:
        error = f"{error} (gave up after {timeout:g} s)"
    return HealthResult(False, attempts, status, error, time.monotonic() - started, url)


def check_all(specs: Iterable, *, consecutive: int = 3, timeout: float = 30.0, interval: float = 0.5,
              expect: int = 200, request_timeout: float = 2.0) -> dict[str, HealthResult]:
    """wait_healthy for every spec (anything with .name and .health_url) that has a health URL.

    The services are checked at the same time, so the whole check takes about one
    `timeout` at worst, not one per service. Returns {service name: result}.
    """
    checked = [s for s in specs if getattr(s, "health_url", "")]
    if not checked:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(checked)), thread_name_prefix="kasa-health") as pool:
        futures = {
            s.name: pool.submit(wait_healthy, s.health_url, consecutive=consecutive, timeout=timeout,
                                interval=interval, expect=expect, request_timeout=request_timeout)
            for s in checked
        }
        return {name: f.result() for name, f in futures.items()}


def probe_once(url: str, request_timeout: float = 5.0) -> list:
    """One GET of `url`: [status or None, error] (JSON-able: what a host's helper answers; no parameter is named
    `timeout`, which engines.hostcall keeps for the call itself)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [None, f"{url!r} is not an http(s) URL with a host"]
    status, error = _probe(_opener(parts.hostname.lower()), url, request_timeout)
    return [status, error]


def check_urls(urls: dict[str, str], *, consecutive: int = 3, budget: float = 30.0, interval: float = 0.5,
               expect: int = 200, request_timeout: float = 2.0) -> dict[str, dict]:
    """check_all for {service name: URL} within `budget` seconds, each result as a plain dict (what a host's helper
    answers)."""

    @dataclass
    class _Spec:
        name: str
        health_url: str

    results = check_all([_Spec(n, u) for n, u in urls.items()], consecutive=consecutive, timeout=budget,
                        interval=interval, expect=expect, request_timeout=request_timeout)
    return {name: {"ok": r.ok, "attempts": r.attempts, "last_status": r.last_status, "last_error": r.last_error,
                   "elapsed": r.elapsed, "url": r.url} for name, r in results.items()}
