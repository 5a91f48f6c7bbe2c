"""GET /metrics: the tracker's own state in the Prometheus text exposition format.

For the tracker's own monitoring (is it keeping up, is it paging): open incidents by
severity and status, breached targets, alerts received and requests rejected per
integration, pages by channel and outcome, and the escalation engine's tick (duration,
lag, count, age). Drills are counted under `drill="true"`, apart from real incidents.

Rendered by prometheus_client from a collector on a private registry, so nothing else in
the process (no default process or platform collectors) leaks into the output. Every
scrape runs the same few grouped aggregate queries (seven), whatever the size of the
tables: counts come from the database, nothing is loaded row by row.

The endpoint needs no login, as Prometheus scrapes it: it shows counts and integration
names, nothing else. Expose it on an internal network only (firewall it, or have the
reverse proxy refuse `/metrics` from outside), or set the environment variable (or the
setting) METRICS_TOKEN: requests must then carry `Authorization: Bearer <token>`
(Prometheus: `authorization: {credentials: <token>}` in the scrape config), and others get 401.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections import defaultdict
from collections.abc import Iterator

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count, Min, Q
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "incident_tracker"
ENGINE_STATE = "engine"
# Targets whose breach the engine records, and the Incident field that records it.
BREACH_FIELDS = {
    "acknowledge": "ack_breached_at",
    "resolve": "resolve_breached_at",
    "update": "update_breached_at",
}


def _bool(value: bool) -> str:
    return "true" if value else "false"


class TrackerCollector(Collector):
    """Reads the database on every scrape; a fixed number of queries."""

    def collect(self) -> Iterator:
        from escalation.models import EngineState, Page, PageStatus
        from escalation.services import escalations_overdue
        from incidents.models import (
            OPEN_STATUSES,
            Alert,
            AlertStatus,
            Incident,
            Integration,
            Severity,
        )

        now = timezone.now()
        yield from self._incidents(Severity, Incident, OPEN_STATUSES)
        yield from self._integrations(Integration, Alert, AlertStatus)
        yield from self._pages(Page, PageStatus)
        yield from self._engine(EngineState, escalations_overdue(now=now).count(), now)

    def _incidents(self, severity_model, incident_model, open_statuses) -> Iterator:
        open_ = GaugeMetricFamily(
            f"{PREFIX}_incidents_open",
            'Open incidents by severity and status; drills are counted under drill="true".',
            labels=["severity", "severity_name", "status", "drill"],
        )
        breached = GaugeMetricFamily(
            f"{PREFIX}_incidents_breached",
            "Open incidents whose acknowledge, resolve or update target was missed (the "
            "engine recorded the breach), by target and severity.",
            labels=["target", "severity", "severity_name", "drill"],
        )
        # One query for the severities (so each has a series, 0 when nothing is open), one
        # grouped count of the open incidents with their breach counts.
        severities = {s.pk: s for s in severity_model.objects.order_by("level")}
        open_counts: dict[tuple, int] = defaultdict(int)
        breach_counts: dict[tuple, int] = defaultdict(int)
        for severity in severities.values():
            for status in sorted(open_statuses):
                open_counts[(severity.pk, status, False)] = 0
            for target in BREACH_FIELDS:
                breach_counts[(target, severity.pk, False)] = 0
        rows = (
            incident_model.objects.filter(status__in=open_statuses)
            .values("severity_id", "status", "is_drill")
            .annotate(
                total=Count("pk"),
                **{
                    target: Count("pk", filter=Q(**{f"{name}__isnull": False}))
                    for target, name in BREACH_FIELDS.items()
                },
            )
            .order_by()
        )
        for row in rows:
            key = (row["severity_id"], row["status"], row["is_drill"])
            open_counts[key] += row["total"]
            for target in BREACH_FIELDS:
                breach_counts[(target, row["severity_id"], row["is_drill"])] += row[target]

        def labels(pk):
            severity = severities.get(pk)
            return (str(severity.level), severity.name) if severity else (str(pk), "")

        for (pk, status, drill), value in sorted(open_counts.items(), key=str):
            open_.add_metric([*labels(pk), status, _bool(drill)], value)
        for (target, pk, drill), value in sorted(breach_counts.items(), key=str):
            breached.add_metric([target, *labels(pk), _bool(drill)], value)
        yield open_
        yield breached

    def _integrations(self, integration_model, alert_model, alert_status) -> Iterator:
        received = CounterMetricFamily(
            f"{PREFIX}_alerts_received",
            "Alerts received by each integration (each alert of a delivery counts, repeats "
            "included).",
            labels=["integration", "kind"],
        )
        rejected = CounterMetricFamily(
            f"{PREFIX}_requests_rejected",
            "Webhook requests an integration refused (invalid, too large or throttled).",
            labels=["integration", "kind"],
        )
        firing = GaugeMetricFamily(
            f"{PREFIX}_alerts_firing",
            "Alerts currently firing, by integration.",
            labels=["integration", "kind"],
        )
        integrations = list(
            integration_model.objects.values_list(
                "pk", "name", "kind", "alerts_received", "requests_rejected"
            ).order_by("name")
        )
        firing_counts = dict(
            alert_model.objects.filter(status=alert_status.FIRING)
            .values("integration_id")
            .annotate(total=Count("pk"))
            .order_by()
            .values_list("integration_id", "total")
        )
        for pk, name, kind, alerts_received, requests_rejected in integrations:
            received.add_metric([name, kind], alerts_received)
            rejected.add_metric([name, kind], requests_rejected)
            firing.add_metric([name, kind], firing_counts.get(pk, 0))
        yield received
        yield rejected
        yield firing
        yield from self._deliveries()

    def _deliveries(self) -> Iterator:
        from incidents.models import AlertDelivery, DeliveryStatus

        waiting = GaugeMetricFamily(
            f"{PREFIX}_alert_deliveries_pending",
            "Accepted alert deliveries the worker has not applied yet.",
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_alert_deliveries_oldest_pending_seconds",
            "Age of the oldest delivery waiting to be applied (0 when none waits): alerts "
            "reach incidents this late.",
        )
        failed = GaugeMetricFamily(
            f"{PREFIX}_alert_deliveries_failed",
            "Accepted alert deliveries that could not be applied (see the admin).",
        )
        pending = AlertDelivery.objects.filter(status=DeliveryStatus.PENDING)
        stats = pending.aggregate(total=Count("pk"), first=Min("received_at"))
        waiting.add_metric([], stats["total"])
        age = (timezone.now() - stats["first"]).total_seconds() if stats["first"] else 0.0
        oldest.add_metric([], max(age, 0.0))
        failed.add_metric([], AlertDelivery.objects.filter(status=DeliveryStatus.FAILED).count())
        yield waiting
        yield oldest
        yield failed

    def _pages(self, page_model, page_status) -> Iterator:
        sent = CounterMetricFamily(
            f"{PREFIX}_pages_sent",
            "Pages sent (accepted by the channel), by the channel of the contact method used.",
            labels=["channel"],
        )
        failed = CounterMetricFamily(
            f"{PREFIX}_pages_failed",
            "Pages that failed for good (every method and retry spent), by the channel last "
            'tried ("none": the person had no contact method).',
            labels=["channel"],
        )
        by_status = GaugeMetricFamily(
            f"{PREFIX}_pages",
            "Page rows by status and channel: the outbox (pending and sending are in flight; "
            "unknown means a send whose outcome was lost).",
            labels=["status", "channel"],
        )
        counts = {status: defaultdict(int) for status in page_status.values}
        rows = page_model.objects.values("status", "channel").annotate(total=Count("pk")).order_by()
        for row in rows:
            counts.setdefault(row["status"], defaultdict(int))[row["channel"] or "none"] += row[
                "total"
            ]
        for status, channels in counts.items():
            for channel, value in sorted(channels.items()):
                by_status.add_metric([status, channel], value)
        for channel, value in sorted(counts[page_status.SENT].items()):
            sent.add_metric([channel], value)
        for channel, value in sorted(counts[page_status.FAILED].items()):
            failed.add_metric([channel], value)
        yield sent
        yield failed
        yield by_status

    def _engine(self, state_model, overdue: int, now) -> Iterator:
        state = state_model.objects.filter(pk=ENGINE_STATE).first()
        ticks = CounterMetricFamily(
            f"{PREFIX}_engine_ticks", "Escalation engine ticks run since the database was made."
        )
        duration = GaugeMetricFamily(
            f"{PREFIX}_engine_tick_duration_seconds", "How long the last engine tick took."
        )
        lag = GaugeMetricFamily(
            f"{PREFIX}_engine_lag_seconds",
            "How late the most overdue escalation step was when the last tick started "
            "(0: none was due).",
        )
        since = GaugeMetricFamily(
            f"{PREFIX}_engine_seconds_since_last_tick",
            "Seconds since the last engine tick started (absent until the first tick); well "
            "above ENGINE_TICK_SECONDS means beat or the worker is down.",
        )
        overdue_family = GaugeMetricFamily(
            f"{PREFIX}_escalations_overdue",
            "Escalation steps overdue by more than ESCALATION_OVERDUE_AFTER (the auditor's "
            "figure).",
        )
        ticks.add_metric([], state.ticks if state else 0)
        duration.add_metric([], state.last_duration_seconds if state else 0.0)
        lag.add_metric([], state.last_lag_seconds if state else 0.0)
        if state is not None and state.last_tick_at is not None:
            since.add_metric([], max(0.0, (now - state.last_tick_at).total_seconds()))
        overdue_family.add_metric([], overdue)
        yield from (ticks, duration, lag, since, overdue_family)


def _token() -> str:
    return getattr(settings, "METRICS_TOKEN", "") or os.environ.get("METRICS_TOKEN", "")


def _authorized(request: HttpRequest, token: str) -> bool:
    scheme, _, value = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


def render() -> bytes:
    """The exposition text; raises DatabaseError when the database cannot be read."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TrackerCollector())
    return generate_latest(registry)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    token = _token()
    if token and not _authorized(request, token):
        response = HttpResponse("Unauthorized\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    try:
        body = render()
    except DatabaseError:
        logger.warning("metrics: the database could not be read", exc_info=True)
        return HttpResponse(
            "The database could not be read.\n", status=503, content_type="text/plain"
        )
    return HttpResponse(body, content_type=CONTENT_TYPE_PLAIN_0_0_4)
