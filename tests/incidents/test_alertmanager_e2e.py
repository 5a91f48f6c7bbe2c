"""End to end: a real Alertmanager fires and then resolves alerts into the webhook of the
live server, which stores them; a real Celery worker, driven by a real beat, applies them,
and the tracker opens, groups and auto-resolves incidents from them.

Needs Debian's prometheus-alertmanager; skipped without it, except with CI=true (fails).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.utils import timezone

from incidents.models import (
    Alert,
    AlertDelivery,
    AlertStatus,
    DeliveryStatus,
    EventKind,
    Incident,
    IncidentStatus,
)
from tests.escalation.processes import HOST, ProcessGroup, child_env, wait_until

from .alertmanager import AlertmanagerProcess, require_binary
from .factories import SeverityFactory, integration

S = IncidentStatus
WAIT = 60  # seconds; Alertmanager flushes a group a second after it changes


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@pytest.mark.django_db(transaction=True)
def test_alertmanager_fires_and_resolves_alerts_into_incidents(live_server, tmp_path: Path):
    binary = require_binary()
    for level in (1, 2, 3, 4):
        SeverityFactory(level=level)
    source, token = integration(kind="alertmanager", auto_resolve=True)
    port = urlsplit(live_server.url).port
    webhook = f"http://{HOST}:{port}/api/v1/integrations/{token}/alertmanager/"

    started = timezone.now().replace(microsecond=0) - timedelta(minutes=2)
    alerts = [
        {
            "labels": {"alertname": "HighLatency", "instance": instance, "severity": "critical"},
            "annotations": {"summary": f"p99 over 100 ms on {instance}"},
            "startsAt": iso(started),
            "generatorURL": "http://prometheus.example/graph",
        }
        for instance in ("web-1", "web-2")
    ] + [
        {
            "labels": {"alertname": "DiskFull", "instance": "db-1", "severity": "warning"},
            "annotations": {"summary": "disk 95% full on db-1"},
            "startsAt": iso(started),
        }
    ]

    with (
        ProcessGroup(tmp_path) as group,
        AlertmanagerProcess(tmp_path, webhook_url=webhook, binary=binary) as am,
    ):
        redis = group.redis()
        env = child_env(broker_url=redis.url, ALERT_APPLY_SECONDS="1")
        group.worker("intake", env)
        group.beat("beat", env)
        am.post_alerts(alerts)

        def opened():
            latency = Alert.objects.filter(name="HighLatency", status=AlertStatus.FIRING)
            disk = Alert.objects.filter(name="DiskFull", status=AlertStatus.FIRING)
            return latency.count() == 2 and disk.count() == 1

        try:
            wait_until(opened, timeout=WAIT, what="the alerts to arrive as incidents")
        except AssertionError as error:
            raise AssertionError(f"{error}\nAlertmanager log:\n{am.log()[-4000:]}") from None

        # One incident per Alertmanager group (group_by alertname), each with its alerts.
        assert Incident.objects.count() == 2
        latency = Alert.objects.filter(name="HighLatency").first().incident
        disk = Alert.objects.get(name="DiskFull").incident
        assert latency != disk
        assert set(latency.alerts.values_list("labels__instance", flat=True)) == {"web-1", "web-2"}
        assert latency.severity.level == 1  # "critical"
        assert disk.severity.level == 3  # "warning"
        assert latency.status == disk.status == S.TRIGGERED
        assert latency.detected_at == started
        # The tracker's fingerprints and group keys are Alertmanager's own.
        held = {a["fingerprint"]: a for a in am.alerts()}
        stored = {a.fingerprint: a for a in Alert.objects.all()}
        assert set(stored) == set(held)
        for alert in stored.values():
            assert 'alertname="' in alert.group_key
            assert alert.payload["labels"] == held[alert.fingerprint]["labels"]
            assert alert.starts_at == started
            assert alert.count >= 1

        # Resolve: the same alerts with an end in the past.
        ended = timezone.now().replace(microsecond=0) - timedelta(seconds=5)
        am.post_alerts([{**alert, "endsAt": iso(ended)} for alert in alerts])

        def resolved():
            return (
                Incident.objects.filter(status=S.RESOLVED).count() == 2
                and not Alert.objects.filter(status=AlertStatus.FIRING).exists()
            )

        try:
            wait_until(resolved, timeout=WAIT, what="auto-resolve of both incidents")
        except AssertionError as error:
            raise AssertionError(f"{error}\nAlertmanager log:\n{am.log()[-4000:]}") from None

    for incident in (latency, disk):
        incident.refresh_from_db()
        assert incident.status == S.RESOLVED
        kinds = list(incident.timeline.values_list("kind", flat=True))
        assert kinds.count(EventKind.ALERT_RESOLVED) == incident.alerts.count()
        assert kinds[-1] == EventKind.RESOLVED
    assert set(Alert.objects.values_list("ends_at", flat=True)) == {ended}
    # Every accepted delivery was applied by the worker; none waits or failed.
    statuses = set(AlertDelivery.objects.values_list("status", flat=True))
    assert statuses == {DeliveryStatus.DONE}
    source.refresh_from_db()
    assert source.requests_rejected == 0
    assert source.alerts_received >= 6
