"""Probes, and who may read what: what an anonymous caller may learn, and what needs the metrics token or staff
(/metrics itself is console.views.metrics, which uses has_token / is_staff / refuse from here).

/health/live/ and /health/ready/ answer anyone, with one word: load balancers and orchestrators need no more,
and an attacker learns nothing about which part is down. /health/ (which part, how long, versions) needs the
token or a staff session. /metrics names every customer: when deployed it needs the token or a staff session
(staff see their teams' customers; the token and superusers see the fleet).
"""

import hmac

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from . import health


def has_token(request) -> bool:
    token = settings.KASA_METRICS_TOKEN
    if not token:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Bytes: compare_digest refuses non-ASCII str, and a header is whatever the caller sends.
    return hmac.compare_digest(given.strip().encode(), token.encode())


def is_staff(request) -> bool:
    user = request.user
    return user.is_authenticated and user.is_active and user.is_staff


def refuse(request, what: str) -> HttpResponse:
    """401 for a caller without credentials (or a wrong token), 403 for a logged-in user who is not staff."""
    if request.user.is_authenticated:
        return HttpResponse(f"{what} needs a staff account or the metrics token\n", status=403,
                            content_type="text/plain")
    response = HttpResponse(f"{what} needs the bearer token (KASA_METRICS_TOKEN) or a staff session\n",
                            status=401, content_type="text/plain")
    response["WWW-Authenticate"] = 'Bearer realm="kasa"'
    return response


def _status(ok: bool) -> JsonResponse:
    return JsonResponse({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)


@never_cache
@require_GET
def health_live(request):
    """The process answers: nothing else is checked (for restart decisions)."""
    return _status(True)


@never_cache
@require_GET
def health_ready(request):
    """Can this instance do its work? Only yes or no: /health/ says which part fails, to staff."""
    return _status(health.all_ok(health.cached_checks()))


@never_cache
@require_GET
def health_detail(request):
    if not (has_token(request) or is_staff(request)):
        return refuse(request, "/health/")
    answer = health.cached_checks()
    ok = health.all_ok(answer)
    return JsonResponse(
        {"status": "ok" if ok else "unavailable", "version": settings.KASA_VERSION, "env": settings.KASA_ENV,
         "checked_at": answer["checked_at"], "checks": answer["checks"]},
        status=200 if ok else 503,
    )
