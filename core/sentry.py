"""Sentry, when SENTRY_DSN is set: init (called by config.settings), the run's scope, and the scrubber.

What an event may carry is decided here, not at each call: `scrub` (before_send) replaces every secret Kasa knows
of, wherever it appears in the event (message, exception values, breadcrumbs, tags, extra): the values of secret
environment variables (and so of the .env file, which settings load into the environment), passwords inside URL
variables (DATABASE_URL, REDIS_URL…), Django's secret settings, and the secrets of the run being executed (the
passwords and keys a run masks in its own log, RunContext.add_secret). Frames' local variables are never sent and
sentry-sdk's own key-based scrubber stays on (send_default_pii=False).

Only sentry_sdk and the standard library are imported at module level: config.settings imports this.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from urllib.parse import unquote, urlsplit

FILTERED = "[Filtered]"
SECRET_NAME = re.compile(r"SECRET|PASSW|TOKEN|KEY|CREDENTIAL|PRIVATE|_PASS$|_PWD$", re.I)
# Named like a secret, but not one: their values (class paths, file paths) are shown as they are.
NOT_SECRET = {"SENTRY_DSN", "PASSWORD_HASHERS", "AUTH_PASSWORD_VALIDATORS", "EMAIL_SSL_KEYFILE",
              "CACHE_MIDDLEWARE_KEY_PREFIX", "PASSWORD_RESET_TIMEOUT"}
MIN_SECRET = 6  # shorter values ("1", "true", a port) would blank out ordinary words

_run_secrets: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("kasa_run_secrets", default=None)


def init(dsn: str, *, environment: str, release: str, traces_sample_rate: float = 0.0) -> None:
    import sentry_sdk

    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        release=release,
        send_default_pii=False,
        # Local variables may hold a revealed secret just before it is written
        # to a 0600 file; never ship frames' locals.
        include_local_variables=False,
        traces_sample_rate=traces_sample_rate,
        before_send=scrub,
        before_breadcrumb=_scrub_breadcrumb,
    )


def active() -> bool:
    try:
        import sentry_sdk
    except ImportError:  # pragma: no cover - a dependency, but never required to run a backup
        return False
    return sentry_sdk.get_client().is_active()


def environment_secrets(environ=None) -> set[str]:
    """Secret values of the environment: variables named like a secret, and the password of any URL variable."""
    found = set()
    for name, value in (os.environ if environ is None else environ).items():
        if not value:
            continue
        if SECRET_NAME.search(name) and name not in NOT_SECRET:
            found.add(value)
            found.update(_pieces(value))  # a list of keys ("id:key,id:key"): each one alone too
        if "://" in value:
            for part in re.split(r"[,\s]+", value):
                try:
                    password = urlsplit(part).password
                except ValueError:
                    continue
                if password:
                    found.update({password, unquote(password)})
    return found


def _pieces(value: str) -> list[str]:
    return [v for v in re.split(r"[,\s:=]+", value) if v]


def settings_secrets() -> set[str]:
    found = set()
    try:
        from django.conf import settings

        for name in dir(settings):
            if not name.isupper() or not SECRET_NAME.search(name) or name in NOT_SECRET:
                continue
            value = getattr(settings, name, None)
            for v in (value if isinstance(value, list | tuple) else [value]):
                if isinstance(v, str) and v:
                    found.add(v)
                    found.update(_pieces(v))
        for db in settings.DATABASES.values():
            if db.get("PASSWORD"):
                found.add(str(db["PASSWORD"]))
    except Exception:  # noqa: BLE001  (settings not configured: the environment's secrets still apply)
        pass
    return found


def _secrets() -> list[str]:
    found = environment_secrets() | settings_secrets() | set(_run_secrets.get() or [])
    # Longest first: a secret that contains another is replaced whole.
    return sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True)


def _clean(value, secrets: list[str]):
    if isinstance(value, str):
        for s in secrets:
            if s in value:
                value = value.replace(s, FILTERED)
        return value
    if isinstance(value, dict):
        return {_clean(k, secrets): _clean(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, secrets) for v in value]
    return value


def scrub(event, hint=None):
    """before_send: every known secret replaced, wherever it is in the event."""
    return _clean(event, _secrets())


def _scrub_breadcrumb(crumb, hint=None):
    return _clean(crumb, _secrets())


@contextlib.contextmanager
def run_scope(run, secrets: list[str]):
    """While a run executes: its events carry the run and customer (tags and a "run" context), and its own
    secrets (the list RunContext masks with, growing as the run learns them) are scrubbed from them."""
    token = _run_secrets.set(secrets)
    try:
        if not active():
            yield
            return
        import sentry_sdk

        with sentry_sdk.isolation_scope() as scope:
            customer = run.customer
            scope.set_tag("run_id", str(run.pk))
            scope.set_tag("run_kind", run.kind)
            scope.set_tag("customer", customer.domain)
            scope.set_context("run", {"id": run.pk, "kind": run.kind, "customer": customer.domain,
                                      "customer_id": customer.pk, "worker": run.worker})
            yield
    finally:
        _run_secrets.reset(token)


def report_failed_run(run, error: str) -> None:
    """A failed run is an event (its error already masked by the run); grouped per kind and customer."""
    if not active():
        return
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["kasa-run-failed", run.kind, str(run.customer_id)]
        sentry_sdk.capture_message(f"{run.kind} run #{run.pk} of {run.customer.domain} failed: {error}",
                                   level="error")
