"""/metrics: Prometheus figures of the fleet (console.metrics), for the metrics token, staff (their teams'
customers) and, in development without a token, anyone — as documented in core.views."""

from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.views import has_token, is_staff, refuse

from . import metrics as kasa_metrics


@never_cache
@require_GET
def metrics(request):
    if has_token(request):
        body = kasa_metrics.render()
    elif is_staff(request):
        body = kasa_metrics.render(user=request.user)
    elif not settings.DEPLOYED and not settings.KASA_METRICS_TOKEN:
        body = kasa_metrics.render()  # development without a token: open, as documented
    else:
        return refuse(request, "/metrics")
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
