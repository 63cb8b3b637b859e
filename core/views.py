import hmac

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import health
from . import metrics as kasa_metrics


@never_cache
@require_GET
def health_live(request):
    """The process answers: nothing else is checked (for restart decisions)."""
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def health_ready(request):
    """Can this instance do its work? 503 names every failing part."""
    results = health.run_checks()
    failing = [name for name, r in results.items() if not r["ok"]]
    if failing:
        return JsonResponse({"status": "unavailable", "failing": failing,
                             "detail": {n: results[n]["detail"] for n in failing}}, status=503)
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def health_detail(request):
    results = health.run_checks()
    ok = all(r["ok"] for r in results.values())
    return JsonResponse(
        {"status": "ok" if ok else "unavailable", "version": settings.KASA_VERSION, "env": settings.KASA_ENV,
         "checks": results},
        status=200 if ok else 503,
    )


@never_cache
@require_GET
def metrics(request):
    token = settings.KASA_METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given, token):
            return HttpResponse("metrics need the bearer token (KASA_METRICS_TOKEN)\n", status=401)
    return HttpResponse(kasa_metrics.render(), content_type=CONTENT_TYPE_LATEST)
