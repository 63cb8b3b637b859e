"""Kasa's own deployment checks (`manage.py check --deploy`)."""

from django.conf import settings
from django.core.checks import Tags, Warning, register

# Same floor as KASA_SECRET_KEYS: the token is compared in constant time, but a short one can be guessed.
MIN_METRICS_TOKEN_LENGTH = 32


@register(Tags.security, deploy=True)
def check_metrics_token(app_configs, **kwargs):
    if not settings.DEPLOYED:
        return []  # development: /metrics may stay open (README)
    token = settings.KASA_METRICS_TOKEN
    if not token:
        return [Warning(
            "KASA_METRICS_TOKEN is not set: /metrics and /health/ answer staff sessions only, so Prometheus "
            "cannot scrape them.",
            hint="Set KASA_METRICS_TOKEN to a random value of at least 32 characters and give it to Prometheus "
            "as its bearer token.",
            id="kasa.W001",
        )]
    if len(token) < MIN_METRICS_TOKEN_LENGTH:
        return [Warning(
            f"KASA_METRICS_TOKEN is shorter than {MIN_METRICS_TOKEN_LENGTH} characters.",
            hint="Use a random value, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'.",
            id="kasa.W002",
        )]
    return []
