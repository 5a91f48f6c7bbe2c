"""GET /metrics: the tracker's own state in the Prometheus text format (filled in by the
metrics work of the alerts-and-API issue)."""

from django.http import HttpResponse


def metrics(request):
    return HttpResponse("", content_type="text/plain; version=0.0.4; charset=utf-8")
