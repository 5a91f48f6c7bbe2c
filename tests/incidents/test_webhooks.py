"""The alert webhooks over HTTP (Django's test client, real PostgreSQL): authentication by
token, the answers senders act on (2xx stored, 400 never valid, 404, 413, 429, 503 retry),
and what each format stores."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.test import override_settings

from incidents.ingestion import intake
from incidents.models import (
    Alert,
    AlertDelivery,
    AlertGroup,
    AlertStatus,
    DeliveryStatus,
    EventKind,
    Incident,
    IncidentStatus,
    Integration,
    TimelineEvent,
)
from tests.escalation.processes import ROOT, Child, free_port, wait_until

from .factories import SeverityFactory, alertmanager_body, integration

pytestmark = pytest.mark.django_db
S = IncidentStatus
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def severities():
    return {level: SeverityFactory(level=level) for level in (1, 2, 3, 4)}


def am_url(token: str) -> str:
    return f"/api/v1/integrations/{token}/alertmanager/"


def post_json(client, url: str, body, *, apply: bool = True, **extra):
    """POST a JSON body; once it is accepted (202), run the worker's step that applies
    accepted deliveries, as the beat task does within a second."""
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    response = client.post(url, data=data, content_type="application/json", **extra)
    if apply and response.status_code == 202:
        intake.deliveries_apply()
    return response


def stored() -> tuple[int, int, int, int]:
    return (
        Alert.objects.count(),
        Incident.objects.count(),
        TimelineEvent.objects.count(),
        AlertGroup.objects.count(),
    )


# --- Alertmanager ---------------------------------------------------------------------------

FULL_V4 = {
    "version": "4",
    "groupKey": '{}/{env="prod"}:{alertname="HighLatency"}',
    "truncatedAlerts": 3,
    "status": "firing",
    "receiver": "tracker",
    "groupLabels": {"alertname": "HighLatency"},
    "commonLabels": {"alertname": "HighLatency", "env": "prod", "severity": "critical"},
    "commonAnnotations": {"runbook_url": "https://runbooks.example/latency"},
    "externalURL": "http://alertmanager.example:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "HighLatency",
                "env": "prod",
                "severity": "critical",
                "instance": "web-1",
            },
            "annotations": {"summary": "p99 over 100 ms on web-1", "description": "long"},
            "startsAt": "2026-03-02T08:55:00.123456789Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example/graph?g0.expr=latency",
            "fingerprint": "a1b2c3d4e5f60718",
        },
        {
            "status": "firing",
            "labels": {
                "alertname": "HighLatency",
                "env": "prod",
                "severity": "critical",
                "instance": "web-2",
            },
            "annotations": {"summary": "p99 over 100 ms on web-2"},
            "startsAt": "2026-03-02T10:56:00+02:00",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example/graph?g0.expr=latency",
            "fingerprint": "0718a1b2c3d4e5f6",
        },
    ],
}


def test_alertmanager_v4_with_every_field_is_stored_with_its_payload(client, severities):
    source, token = integration(kind="alertmanager")
    with time_machine.travel(T0, tick=False):
        response = post_json(client, am_url(token), FULL_V4)

    assert response.status_code == 202, response.content
    delivery = AlertDelivery.objects.get()
    assert response.json() == {"status": "accepted", "delivery": delivery.pk, "alerts": 2}
    incident = Incident.objects.get()
    assert (delivery.status, delivery.alerts, delivery.incidents) == (
        DeliveryStatus.DONE,
        2,
        [incident.reference],
    )
    assert json.loads(delivery.body) == FULL_V4  # stored as received
    assert incident.severity == severities[1]  # "critical" in the default mapping
    assert incident.status == S.TRIGGERED
    assert incident.title == "HighLatency and 1 more"
    assert incident.detected_at == datetime(2026, 3, 2, 8, 55, 0, 123456, tzinfo=UTC)

    first, second = Alert.objects.order_by("fingerprint")
    assert (first.fingerprint, second.fingerprint) == ("0718a1b2c3d4e5f6", "a1b2c3d4e5f60718")
    web1 = second
    assert web1.incident == incident
    assert web1.integration == source
    assert web1.status == AlertStatus.FIRING
    assert web1.group_key == FULL_V4["groupKey"]
    assert web1.name == "HighLatency"
    assert web1.summary == "p99 over 100 ms on web-1"
    assert web1.severity_label == "critical"
    assert web1.labels == FULL_V4["alerts"][0]["labels"]
    assert web1.annotations == FULL_V4["alerts"][0]["annotations"]
    assert web1.payload == FULL_V4["alerts"][0]  # the raw alert, as received
    assert web1.source.startswith("http://prometheus.example/graph")
    assert web1.starts_at == datetime(2026, 3, 2, 8, 55, 0, 123456, tzinfo=UTC)
    assert web1.ends_at is None  # Go's zero time: no end yet
    assert first.starts_at == datetime(2026, 3, 2, 8, 56, tzinfo=UTC)
    assert web1.count == 1
    assert web1.first_received_at == T0

    fired = incident.timeline.filter(kind=EventKind.ALERT_FIRED).order_by("value")
    assert [e.value for e in fired] == ["0718a1b2c3d4e5f6", "a1b2c3d4e5f60718"]
    assert all("3 more alerts" in e.message for e in fired)
    assert all(e.actor_label == f"integration {source.name}" for e in fired)
    source.refresh_from_db()
    assert source.alerts_received == 2
    assert source.last_received_at == T0


def test_alertmanager_token_in_the_authorization_header(client):
    _, token = integration(kind="alertmanager")
    response = post_json(
        client,
        "/api/v1/integrations/alertmanager/",
        alertmanager_body({"fingerprint": "fp-bearer"}),
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 202, response.content
    assert Alert.objects.get().fingerprint == "fp-bearer"


def test_alertmanager_repeat_delivery_counts_and_resolution_resolves(client):
    _, token = integration(kind="alertmanager")
    body = alertmanager_body({"fingerprint": "fp1"}, {"fingerprint": "fp2"})
    assert post_json(client, am_url(token), body).status_code == 202
    assert post_json(client, am_url(token), body).status_code == 202
    assert Alert.objects.count() == 2
    assert Incident.objects.count() == 1
    assert set(Alert.objects.values_list("count", flat=True)) == {2}

    resolved = alertmanager_body(
        {"fingerprint": "fp1", "endsAt": "2026-01-01T00:05:00Z"},
        {"fingerprint": "fp2", "endsAt": "2026-01-01T00:06:00Z"},
        status="resolved",
    )
    assert post_json(client, am_url(token), resolved).status_code == 202
    assert Alert.objects.filter(status=AlertStatus.RESOLVED).count() == 2
    incident = Incident.objects.get()
    assert incident.status == S.RESOLVED
    assert Alert.objects.get(fingerprint="fp1").ends_at == datetime(2026, 1, 1, 0, 5, tzinfo=UTC)


def test_no_token_is_403_and_unknown_token_is_404_and_nothing_is_stored(client):
    integration(kind="alertmanager")
    before = stored()
    body = alertmanager_body({"fingerprint": "fp1"})
    unknown = post_json(client, am_url("x" * 32), body)
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "unknown_key"
    header = post_json(
        client, "/api/v1/integrations/alertmanager/", body, HTTP_AUTHORIZATION="Bearer nope"
    )
    assert header.status_code == 404
    missing = post_json(client, "/api/v1/integrations/alertmanager/", body)
    assert missing.status_code == 403
    basic = post_json(
        client, "/api/v1/integrations/alertmanager/", body, HTTP_AUTHORIZATION="Basic abc"
    )
    assert basic.status_code == 403
    assert stored() == before


def test_a_token_of_another_kind_is_404(client):
    _, generic_token = integration(kind="generic")
    _, am_token = integration(kind="alertmanager")
    before = stored()
    assert post_json(client, am_url(generic_token), alertmanager_body({})).status_code == 404
    generic = post_json(client, f"/api/v1/integrations/{am_token}/generic/", {"title": "x"})
    assert generic.status_code == 404
    events = post_json(
        client,
        "/api/v1/events/v2/enqueue",
        {
            "routing_key": am_token,
            "event_action": "trigger",
            "payload": {"summary": "s", "source": "h", "severity": "info"},
        },
    )
    assert events.status_code == 404
    assert stored() == before


def test_an_inactive_integration_is_404(client):
    source, token = integration(kind="alertmanager", heartbeat_interval=timedelta(minutes=5))
    Integration.objects.filter(pk=source.pk).update(is_active=False)
    assert post_json(client, am_url(token), alertmanager_body({})).status_code == 404
    assert client.post(f"/api/v1/integrations/{token}/heartbeat/").status_code == 404
    assert Alert.objects.count() == 0


def test_a_rotated_token_stops_working(client):
    from incidents.ingestion.services import integration_rotate_token

    source, old = integration(kind="alertmanager")
    new = integration_rotate_token(integration=source)
    assert post_json(client, am_url(old), alertmanager_body({})).status_code == 404
    assert post_json(client, am_url(new), alertmanager_body({})).status_code == 202


def _with(path: str, value):
    """FULL_V4 with the value at a dotted path (alerts.1.startsAt) replaced."""
    body = json.loads(json.dumps(FULL_V4))
    *parents, last = path.split(".")
    node = body
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return body


_DELETE = object()

SCHEMA_ERRORS = [
    (_with("version", "3"), "version", "4"),
    (_with("version", _DELETE), "version", "4"),
    (_with("alerts", {"a": 1}), "alerts", "list"),
    (_with("alerts", _DELETE), "alerts", "list"),
    (_with("truncatedAlerts", -1), "truncatedAlerts", "whole number"),
    (_with("truncatedAlerts", "3"), "truncatedAlerts", "whole number"),
    (_with("groupKey", 7), "groupKey", "string"),
    (_with("commonLabels", ["a"]), "commonLabels", "object"),
    (_with("alerts.1.status", "pending"), "alerts[1].status", "firing"),
    (_with("alerts.1.status", _DELETE), "alerts[1].status", "required"),
    (_with("alerts.1.startsAt", "yesterday"), "alerts[1].startsAt", "RFC 3339"),
    (_with("alerts.1.startsAt", "2026-03-02T10:56:00"), "alerts[1].startsAt", "time zone"),
    (_with("alerts.1.endsAt", 12), "alerts[1].endsAt", "string"),
    (_with("alerts.1.labels.instance", 5), "alerts[1].labels.instance", "string"),
    (_with("alerts.1.annotations", "x"), "alerts[1].annotations", "object"),
    (_with("alerts.1.fingerprint", "f" * 300), "alerts[1].fingerprint", "at most"),
    (_with("alerts.1", "not an alert"), "alerts[1]", "object"),
    ([FULL_V4], "", "object"),
]


@pytest.mark.parametrize(("body", "field", "reason"), SCHEMA_ERRORS)
def test_a_schema_error_is_400_naming_the_field_and_nothing_is_stored(client, body, field, reason):
    source, token = integration(kind="alertmanager")
    before = stored()
    response = post_json(client, am_url(token), body)
    assert response.status_code == 400, response.content
    answer = response.json()
    assert answer["code"] == "invalid"
    assert answer.get("field", "") == field
    assert reason in answer["detail"]
    if field:
        assert answer["detail"].startswith(field)
    assert stored() == before  # alerts[0] was valid, and is not stored either
    source.refresh_from_db()
    assert source.requests_rejected == 1
    assert source.alerts_received == 0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"version": "4", "alerts": [', "malformed JSON"),
        (b"", "malformed JSON"),
        (b'{"version": "4", "alerts": [], "x": "\xff"}', "UTF-8"),
        (b'{"version": "4", "alerts": [], "x": NaN}', "NaN"),
        (b'{"version": "4", "alerts": [], "x": 1e999}', "number"),
        (b'{"version": "4", "alerts": [], "x": ' + b"9" * 5000 + b"}", "number"),
        (b'{"version": "4", "alerts": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "deep"),
        # Deeper than MAX_DEPTH though well within what the JSON decoder accepts.
        (b'{"version": "4", "alerts": [], "x": ' + b"[" * 40 + b"]" * 40 + b"}", "deep"),
    ],
)
def test_malformed_json_is_400_and_nothing_is_stored(client, raw, reason):
    _, token = integration(kind="alertmanager")
    before = stored()
    response = client.post(am_url(token), data=raw, content_type="application/json")
    assert response.status_code == 400, response.content
    assert reason in response.json()["detail"]
    assert stored() == before


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        # PostgreSQL cannot store these in text or jsonb: refused as invalid, never a 500.
        ("alerts.0.labels.instance", "web\u00001", "alerts[0].labels.instance"),
        ("alerts.0.annotations.summary", "bad \ud800 surrogate", "alerts[0].annotations.summary"),
        ("commonAnnotations.note", "nul\u0000", "commonAnnotations.note"),
        ("alerts.0.extra", {"deep": ["ok", "\u0000"]}, "alerts[0].extra.deep[1]"),
    ],
)
def test_text_postgresql_cannot_store_is_400_naming_the_field(client, path, value, field):
    _, token = integration(kind="alertmanager")
    before = stored()
    raw = json.dumps(_with(path, value))  # ensure_ascii: \u0000 and \ud800 as escapes
    response = client.post(am_url(token), data=raw, content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field
    assert stored() == before


def test_a_null_generator_url_is_accepted(client):
    _, token = integration(kind="alertmanager")
    body = alertmanager_body({"fingerprint": "fp1"})
    body["alerts"][0]["generatorURL"] = None
    response = post_json(client, am_url(token), body)
    assert response.status_code == 202, response.content
    assert Alert.objects.get().source == ""


def test_a_blank_alertname_still_opens_an_incident(client):
    _, token = integration(kind="alertmanager")
    body = alertmanager_body({"fingerprint": "fp1", "labels": {"alertname": "   "}})
    response = post_json(client, am_url(token), body)
    assert response.status_code == 202, response.content
    assert Incident.objects.get().title == "Alert"


def test_a_body_over_the_limit_is_413_and_nothing_is_stored(client):
    source, token = integration(kind="alertmanager")
    body = alertmanager_body({"fingerprint": "fp1", "annotations": {"summary": "x" * 500}})
    before = stored()
    with override_settings(ALERT_MAX_BODY_BYTES=400):
        response = post_json(client, am_url(token), body)
        assert response.status_code == 413
        assert response.json()["code"] == "too_large"
        small = post_json(client, am_url(token), {"version": "4", "alerts": []})
        assert small.status_code == 202
    assert stored() == before
    source.refresh_from_db()
    assert source.requests_rejected == 1


def test_the_rate_limit_answers_429_with_retry_after_and_stores_nothing(client):
    source, token = integration(kind="alertmanager", rate_limit=3)
    with time_machine.travel(T0, tick=False):
        answers = [
            post_json(client, am_url(token), alertmanager_body({"fingerprint": f"fp{n}"}))
            for n in range(5)
        ]
    assert [a.status_code for a in answers] == [202, 202, 202, 429, 429]
    assert answers[3]["Retry-After"] == "60"
    assert answers[3].json()["code"] == "throttled"
    assert set(Alert.objects.values_list("fingerprint", flat=True)) == {"fp0", "fp1", "fp2"}
    source.refresh_from_db()
    assert source.requests_rejected == 2
    # The next minute is a new window.
    with time_machine.travel(T0 + timedelta(minutes=1), tick=False):
        later = post_json(client, am_url(token), alertmanager_body({"fingerprint": "fp9"}))
    assert later.status_code == 202


def test_a_rate_limit_of_zero_means_no_limit(client):
    _, token = integration(kind="alertmanager", rate_limit=0)
    with time_machine.travel(T0, tick=False):
        codes = {
            post_json(client, am_url(token), {"version": "4", "alerts": []}).status_code
            for _ in range(5)
        }
    assert codes == {202}


# --- Events v2 ------------------------------------------------------------------------------

ENQUEUE = "/api/v1/events/v2/enqueue"


def trigger(token: str, **changes) -> dict:
    event = {
        "routing_key": token,
        "event_action": "trigger",
        "dedup_key": "disk-full-db1",
        "payload": {
            "summary": "Disk 95% full on db1",
            "source": "db1.example",
            "severity": "error",
            "component": "postgres",
            "group": "databases",
            "class": "disk",
            "custom_details": {"free": "5%", "mount": "/var"},
            "timestamp": "2026-03-02T08:58:00Z",
        },
        "client": "Monitoring",
        "client_url": "https://monitoring.example",
        "links": [{"href": "https://monitoring.example/db1", "text": "db1"}],
        "images": [],
    }
    event.update(changes)
    return event


def test_events_v2_trigger_acknowledge_resolve(client, severities):
    source, token = integration(kind="events_v2")
    with time_machine.travel(T0, tick=False):
        response = post_json(client, ENQUEUE, trigger(token))
    assert response.status_code == 202, response.content
    assert response.json() == {
        "status": "success",
        "message": "Event processed",
        "dedup_key": "disk-full-db1",
    }
    alert = Alert.objects.get()
    assert alert.fingerprint == "disk-full-db1"
    assert alert.name == alert.summary == "Disk 95% full on db1"
    assert alert.source == "db1.example"
    assert alert.severity_label == "error"
    assert alert.labels == {
        "severity": "error",
        "source": "db1.example",
        "component": "postgres",
        "group": "databases",
        "class": "disk",
    }
    assert alert.payload["payload"]["custom_details"] == {"free": "5%", "mount": "/var"}
    assert alert.starts_at == datetime(2026, 3, 2, 8, 58, tzinfo=UTC)
    incident = Incident.objects.get()
    assert incident.severity == severities[2]  # "error"
    assert incident.detected_at == datetime(2026, 3, 2, 8, 58, tzinfo=UTC)

    # The same trigger again only counts.
    assert post_json(client, ENQUEUE, trigger(token)).status_code == 202
    assert Alert.objects.get().count == 2
    assert Incident.objects.count() == 1

    ack = {"routing_key": token, "event_action": "acknowledge", "dedup_key": "disk-full-db1"}
    with time_machine.travel(T0 + timedelta(minutes=2), tick=False):
        response = post_json(client, ENQUEUE, ack)
    assert response.status_code == 202
    assert response.json()["dedup_key"] == "disk-full-db1"
    incident.refresh_from_db()
    assert incident.status == S.ACKNOWLEDGED
    assert incident.acknowledged_at == T0 + timedelta(minutes=2)
    assert incident.timeline.filter(
        kind=EventKind.ACKNOWLEDGED, actor_label=f"integration {source.name}"
    ).exists()

    resolve = {"routing_key": token, "event_action": "resolve", "dedup_key": "disk-full-db1"}
    assert post_json(client, ENQUEUE, resolve).status_code == 202
    incident.refresh_from_db()
    assert incident.status == S.RESOLVED
    assert Alert.objects.get().status == AlertStatus.RESOLVED


def test_events_v2_trigger_without_dedup_key_gets_one_back(client):
    _, token = integration(kind="events_v2")
    event = trigger(token)
    del event["dedup_key"]
    response = post_json(client, ENQUEUE, event)
    assert response.status_code == 202
    key = response.json()["dedup_key"]
    assert len(key) >= 16
    assert Alert.objects.get().fingerprint == key


def test_events_v2_routing_key_may_come_as_bearer(client):
    _, token = integration(kind="events_v2")
    event = trigger(token)
    del event["routing_key"]
    response = post_json(client, ENQUEUE, event, HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 202


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event_action": "explode"}, "event_action"),
        ({"event_action": None}, "event_action"),
        ({"payload": None}, "payload"),
        ({"payload": {"summary": "s", "source": "h", "severity": "bad"}}, "payload.severity"),
        ({"payload": {"source": "h", "severity": "info"}}, "payload.summary"),
        ({"payload": {"summary": "s", "severity": "info"}}, "payload.source"),
        (
            {"payload": {"summary": "s" * 1025, "source": "h", "severity": "info"}},
            "payload.summary",
        ),
        ({"links": "x"}, "links"),
        ({"event_action": "resolve", "dedup_key": None}, "dedup_key"),
    ],
)
def test_events_v2_invalid_event_is_a_pagerduty_like_400(client, change, field):
    _, token = integration(kind="events_v2")
    before = stored()
    response = post_json(client, ENQUEUE, trigger(token, **change))
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["status"] == "invalid event"
    assert body["message"] == "Event object is invalid"
    assert isinstance(body["errors"], list)
    assert body["errors"]
    assert body["errors"][0].startswith(field)
    assert body["field"] == field
    assert stored() == before


def test_events_v2_without_a_routing_key_is_400_and_unknown_is_404(client):
    _, token = integration(kind="events_v2")
    event = trigger(token)
    del event["routing_key"]
    response = post_json(client, ENQUEUE, event)
    assert response.status_code == 400
    assert response.json()["errors"][0].startswith("routing_key")
    unknown = post_json(client, ENQUEUE, trigger("y" * 32))
    assert unknown.status_code == 404
    assert unknown.json()["status"] == "unknown_key"
    malformed = client.post(ENQUEUE, data=b"{", content_type="application/json")
    assert malformed.status_code == 400
    assert malformed.json()["status"] == "invalid event"
    assert Alert.objects.count() == 0


def test_events_v2_acknowledge_or_resolve_of_an_unknown_key_is_accepted_and_ignored(client):
    _, token = integration(kind="events_v2")
    for action in ("acknowledge", "resolve"):
        event = {"routing_key": token, "event_action": action, "dedup_key": "never-seen"}
        assert post_json(client, ENQUEUE, event).status_code == 202
    assert stored()[:2] == (0, 0)


# --- generic JSON ---------------------------------------------------------------------------


def generic_url(token: str) -> str:
    return f"/api/v1/integrations/{token}/generic/"


def test_generic_single_object(client, severities):
    _, token = integration(kind="generic")
    response = post_json(
        client,
        generic_url(token),
        {
            "title": "Checkout errors",
            "id": "checkout-5xx",
            "severity": "warning",
            "description": "5xx rate 12%",
            "source": "synthetics",
            "labels": {"service": "checkout"},
            "starts_at": "2026-03-02T08:59:00Z",
        },
    )
    assert response.status_code == 202, response.content
    alert = Alert.objects.get()
    assert (alert.fingerprint, alert.name, alert.summary) == (
        "checkout-5xx",
        "Checkout errors",
        "5xx rate 12%",
    )
    assert alert.labels == {"service": "checkout"}
    incident = Incident.objects.get()
    assert incident.severity == severities[3]
    assert incident.title == "Checkout errors"

    resolved = post_json(client, generic_url(token), {"id": "checkout-5xx", "status": "resolved"})
    assert resolved.status_code == 202
    assert Alert.objects.get().status == AlertStatus.RESOLVED
    incident.refresh_from_db()
    assert incident.status == S.RESOLVED


def test_generic_list_of_alerts_groups_by_group(client):
    _, token = integration(kind="generic")
    body = {
        "alerts": [
            {"title": "Disk full", "id": "d1", "group": "db"},
            {"title": "Replica lag", "id": "d2", "group": "db"},
            {"title": "Queue backlog", "id": "q1"},
        ]
    }
    response = post_json(client, generic_url(token), body)
    assert response.status_code == 202, response.content
    assert Alert.objects.count() == 3
    assert Incident.objects.count() == 2
    db = Alert.objects.get(fingerprint="d1").incident
    assert Alert.objects.get(fingerprint="d2").incident == db
    assert Alert.objects.get(fingerprint="q1").incident != db


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"alerts": []}, "alerts"),
        ({"alerts": [{"title": "ok"}, {"status": "firing"}]}, "alerts[1].title"),
        ({"title": "x", "status": "pending"}, "status"),
        ({"title": "x", "labels": {"a": 1}}, "labels.a"),
        ({"title": "x", "starts_at": "soon"}, "starts_at"),
        ({"title": ""}, "title"),
    ],
)
def test_generic_schema_errors_are_400(client, body, field):
    _, token = integration(kind="generic")
    before = stored()
    response = post_json(client, generic_url(token), body)
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field
    assert stored() == before


# --- heartbeats -----------------------------------------------------------------------------


def test_heartbeat_post_and_get_answer_200_and_push_the_due_time(client):
    source, token = integration(kind="generic", heartbeat_interval=timedelta(minutes=5))
    with time_machine.travel(T0, tick=False):
        response = client.post(f"/api/v1/integrations/{token}/heartbeat/")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "ok"
    source.refresh_from_db()
    assert source.last_heartbeat_at == T0
    assert source.heartbeat_due_at == T0 + timedelta(minutes=5)

    with time_machine.travel(T0 + timedelta(minutes=3), tick=False):
        response = client.get(f"/api/v1/integrations/{token}/heartbeat/")
    assert response.status_code == 200
    with time_machine.travel(T0 + timedelta(minutes=4), tick=False):
        response = client.post(
            "/api/v1/integrations/heartbeat/", HTTP_AUTHORIZATION=f"Bearer {token}"
        )
    assert response.status_code == 200
    source.refresh_from_db()
    assert source.heartbeat_due_at == T0 + timedelta(minutes=9)
    assert Alert.objects.count() == 0


def test_heartbeat_for_an_integration_without_one_is_400_and_unknown_404(client):
    _, token = integration(kind="alertmanager")
    response = client.post(f"/api/v1/integrations/{token}/heartbeat/")
    assert response.status_code == 400
    assert response.json()["field"] == "heartbeat"
    assert client.get("/api/v1/integrations/nope/heartbeat/").status_code == 404


def test_heartbeat_rate_limit_is_429_with_retry_after(client):
    _, token = integration(kind="generic", heartbeat_interval=timedelta(minutes=5), rate_limit=1)
    with time_machine.travel(T0, tick=False):
        codes = [client.post(f"/api/v1/integrations/{token}/heartbeat/") for _ in range(2)]
    assert [r.status_code for r in codes] == [200, 429]
    assert codes[1]["Retry-After"] == "60"


# --- an unreachable database ----------------------------------------------------------------


def test_an_unreachable_database_is_503_with_retry_after(tmp_path):
    """The real thing: the app under gunicorn with a DATABASE_URL nothing listens on. The
    token lookup is the first query; it fails, and the sender is told to retry."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        DATABASE_URL="postgres://postgres@127.0.0.1:1/x",
        DJANGO_DEBUG="true",
        DJANGO_SETTINGS_MODULE="config.settings",
        PYTHONUNBUFFERED="1",
    )
    server = Child(
        "gunicorn",
        [
            os.path.join(os.path.dirname(sys.executable), "gunicorn"),
            "config.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--chdir",
            str(ROOT),
        ],
        env,
        tmp_path / "gunicorn.log",
    )
    import urllib.error
    import urllib.request

    def post(path: str, body: dict, headers: dict | None = None):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def listening() -> bool:
        if not server.alive:
            raise AssertionError(f"gunicorn exited:\n{server.log()[-3000:]}")
        try:
            post("/api/v1/integrations/x/alertmanager/", {})
        except OSError:
            return False
        return True

    server.start()
    try:
        wait_until(listening, timeout=30, what="gunicorn to listen")
        body = alertmanager_body({"fingerprint": "fp1"})
        for path, headers in [
            ("/api/v1/integrations/any-token-at-all/alertmanager/", {}),
            ("/api/v1/integrations/alertmanager/", {"Authorization": "Bearer any-token"}),
            ("/api/v1/integrations/any-token/generic/", {}),
        ]:
            status, answer_headers, raw = post(path, body, headers)
            assert status == 503, raw
            assert answer_headers["Retry-After"] == "30"
            assert json.loads(raw)["code"] == "unavailable"
        event = trigger("any-token")
        status, answer_headers, raw = post(ENQUEUE, event)
        assert status == 503, raw
        assert answer_headers["Retry-After"] == "30"
        status, answer_headers, raw = post("/api/v1/integrations/any-token/heartbeat/", {})
        assert status == 503, raw
        assert answer_headers["Retry-After"] == "30"
    finally:
        server.stop()


def test_events_v2_routing_key_is_never_stored(client):
    _, token = integration(kind="events_v2")
    assert post_json(client, ENQUEUE, trigger(token)).status_code == 202
    ack = {"routing_key": token, "event_action": "acknowledge", "dedup_key": "disk-full-db1"}
    assert post_json(client, ENQUEUE, ack).status_code == 202
    alert = Alert.objects.get()
    assert "routing_key" not in alert.payload
    assert token not in json.dumps(alert.payload)
    assert alert.payload["client"] == "Monitoring"


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("events_v2", {"dedup_key": "tracker:heartbeat"}, "dedup_key"),
        ("generic", {"id": "tracker:heartbeat", "title": "x"}, "id"),
    ],
)
def test_reserved_fingerprints_are_refused(client, kind, body, field):
    _, token = integration(kind=kind)
    if kind == "events_v2":
        response = post_json(client, ENQUEUE, trigger(token, **body))
    else:
        response = post_json(client, generic_url(token), body)
    assert response.status_code == 400
    assert response.json()["field"] == field
    assert Alert.objects.count() == 0


def test_a_nul_character_in_a_query_parameter_is_400_not_500(admin_client):
    response = admin_client.get("/api/v1/oncall/", {"team": "plat\x00form"})
    assert response.status_code == 400


def test_an_unusual_accept_header_does_not_refuse_the_alert(client):
    _, token = integration()
    response = post_json(
        client, am_url(token), alertmanager_body({}), HTTP_ACCEPT="application/xml"
    )
    assert response.status_code == 202
    assert Alert.objects.count() == 1


def _five(start: int) -> dict:
    return alertmanager_body(*({"fingerprint": f"q{start + n}"} for n in range(5)))


@pytest.mark.parametrize("existing", [5, 200])
def test_a_delivery_to_an_open_incident_costs_the_same_queries_at_any_size(
    client, django_assert_num_queries, django_assert_max_num_queries, existing
):
    _, token = integration()
    for start in range(0, existing, 5):
        assert post_json(client, am_url(token), _five(1000 + start)).status_code == 202
    # The request: the integration is cached per process, so one INSERT of the body.
    with django_assert_num_queries(1):
        assert post_json(client, am_url(token), _five(0), apply=False).status_code == 202
    # Applying it. The worker's own: pending integrations, lease, integration, batch,
    # mark done, next (empty) batch, lease renewal and release (8). The alerts: firing rows,
    # group, incident lock, group re-check, alerts, timeline, counter, begin and commit (9).
    with django_assert_max_num_queries(17):
        assert intake.deliveries_apply().applied == 1
    # Repeats: firing rows, one count update, counter, begin, commit.
    assert post_json(client, am_url(token), _five(0), apply=False).status_code == 202
    with django_assert_max_num_queries(13):
        assert intake.deliveries_apply().applied == 1
    assert Alert.objects.get(fingerprint="q0").count == 2


def test_a_webhook_answers_405_to_other_methods_and_stores_nothing(client):
    _, token = integration()
    response = client.get(am_url(token))
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert "not allowed" in response.json()["detail"]
    assert AlertDelivery.objects.count() == 0
