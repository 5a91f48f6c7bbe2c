"""GET /metrics: real incidents, alerts, pages and engine ticks, read back by parsing the
output with prometheus_client's own parser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client.parser import text_string_to_metric_families

from escalation import services as engine
from escalation.models import ContactKind, EngineState, Page, PageStatus, TargetKind
from incidents import services as incident_services
from incidents.ingestion import intake
from tests.escalation.factories import ContactMethodFactory, PersonFactory, PolicyFactory, step
from tests.incidents.factories import SeverityFactory, alertmanager_body, declare, integration

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
MAX_QUERIES = 9


def scrape(client, **headers) -> dict:
    """{(name, frozenset(labels)): value} for every sample of a 200 answer."""
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        assert family.documentation, f"{family.name} has no HELP text"
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def post_alerts(client, token: str, body) -> int:
    return client.post(
        f"/api/v1/integrations/{token}/alertmanager/", body, content_type="application/json"
    ).status_code


def test_empty_database_still_names_every_metric(client):
    samples = scrape(client)
    names = {name for name, _ in samples}
    assert {
        "incident_tracker_engine_ticks_total",
        "incident_tracker_engine_tick_duration_seconds",
        "incident_tracker_engine_lag_seconds",
        "incident_tracker_escalations_overdue",
    } <= names
    assert value(samples, "incident_tracker_engine_ticks_total") == 0
    # No tick yet: no age to report, rather than a made-up one.
    assert "incident_tracker_engine_seconds_since_last_tick" not in names


def test_metrics_report_incidents_breaches_alerts_pages_and_the_engine(client):
    ann = PersonFactory(name="Ann")
    ContactMethodFactory(person=ann, kind=ContactKind.EMAIL, address="ann@example.com")
    bob = PersonFactory(name="Bob")  # no contact method: his page fails
    policy = PolicyFactory()
    step(policy, 0, MIN, (TargetKind.PERSON, ann), (TargetKind.PERSON, bob))
    sev1 = SeverityFactory(level=1, escalation_policy=policy)  # acknowledge within 15 min
    sev3 = SeverityFactory(level=3)

    paged = declare(severity=sev1, title="Checkout down", now=T0)
    declare(severity=sev1, title="Tabletop", is_drill=True, now=T0)
    working = declare(severity=sev3, title="Slow search", now=T0)
    incident_services.incident_acknowledge(incident=working, actor=None, now=T0 + MIN)
    closed = declare(severity=sev3, title="Fixed", now=T0)
    incident_services.incident_resolve(incident=closed, actor=None, now=T0 + MIN)

    source, token = integration(name="prometheus", rate_limit=0)
    started = {"startsAt": "2026-11-02T09:00:00Z"}
    body = alertmanager_body(
        {"fingerprint": "a1", "labels": {"severity": "warning"}, **started},
        {"fingerprint": "a2", "labels": {"severity": "warning"}, **started},
        group_key="g1",
    )
    with time_machine.travel(T0, tick=False):
        assert post_alerts(client, token, body) == 202
        assert post_alerts(client, token, body) == 202  # a repeat: counted, not new
        assert post_alerts(client, token, {"version": "4", "alerts": "nope"}) == 400
        assert (
            post_alerts(client, token, alertmanager_body({"fingerprint": "a3", **started})) == 202
        )
        assert intake.deliveries_apply().applied == 3
        # One more, accepted and not applied yet: it waits in the queue.
        assert post_alerts(client, token, alertmanager_body({"fingerprint": "a4"})) == 202

    # The tick at T0 + 90 s finds step 1 of the Sev1 incidents due since T0 + 60 s (30 s
    # late); the one at T0 + 20 min records their missed acknowledge target.
    engine.engine_tick(now=T0 + 90 * timedelta(seconds=1))
    outcomes = sorted(
        engine.page_deliver(page_id=pk, now=T0 + 2 * MIN)
        for pk in Page.objects.filter(incident=paged).values_list("pk", flat=True)
    )
    assert outcomes == ["failed", "sent"]
    engine.engine_tick(now=T0 + 20 * MIN)
    with time_machine.travel(T0 + 20 * MIN + 5 * timedelta(seconds=1), tick=False):
        samples = scrape(client)

    def open_(level, status, drill="false"):
        return value(
            samples,
            "incident_tracker_incidents_open",
            severity=str(level),
            severity_name=f"Sev{level}",
            status=status,
            drill=drill,
        )

    assert open_(1, "triggered") == 1
    assert open_(1, "triggered", drill="true") == 1
    assert open_(1, "acknowledged") == 0
    assert open_(3, "acknowledged") == 1
    # The alert-opened incidents (warning -> level 3; no severity label -> least severe, 3).
    assert open_(3, "triggered") == 2
    assert sum(v for (n, _), v in samples.items() if n == "incident_tracker_incidents_open") == 5

    def breached(target, level, drill="false"):
        return value(
            samples,
            "incident_tracker_incidents_breached",
            target=target,
            severity=str(level),
            severity_name=f"Sev{level}",
            drill=drill,
        )

    assert breached("acknowledge", 1) == 1
    assert breached("acknowledge", 1, drill="true") == 1
    assert breached("resolve", 1) == 0
    assert breached("acknowledge", 3) == 0

    labels = {"integration": "prometheus", "kind": "alertmanager"}
    assert value(samples, "incident_tracker_alerts_received_total", **labels) == 5
    assert value(samples, "incident_tracker_requests_rejected_total", **labels) == 1
    assert value(samples, "incident_tracker_alerts_firing", **labels) == 3
    assert source.alerts.count() == 3
    assert value(samples, "incident_tracker_alert_deliveries_pending") == 1
    assert value(samples, "incident_tracker_alert_deliveries_failed") == 0
    assert value(samples, "incident_tracker_alert_deliveries_oldest_pending_seconds") > 0

    # Two pages: Ann's sent by email, Bob's failed with no channel to try (the drill pages
    # nobody: nobody opted in to drills).
    assert value(samples, "incident_tracker_pages_sent_total", channel="email") == 1
    assert value(samples, "incident_tracker_pages_failed_total", channel="none") == 1
    assert value(samples, "incident_tracker_pages", status="sent", channel="email") == 1
    assert sum(v for (n, _), v in samples.items() if n == "incident_tracker_pages") == 2

    state = EngineState.objects.get()
    assert value(samples, "incident_tracker_engine_ticks_total") == state.ticks == 2
    assert value(samples, "incident_tracker_engine_tick_duration_seconds") == (
        state.last_duration_seconds
    )
    assert state.last_duration_seconds > 0
    assert value(samples, "incident_tracker_engine_lag_seconds") == 0  # nothing due then
    assert value(samples, "incident_tracker_engine_seconds_since_last_tick") == 5
    assert value(samples, "incident_tracker_escalations_overdue") == 0


def test_engine_tick_records_the_lag_of_the_most_overdue_escalation():
    ann = PersonFactory(name="Ann")
    policy = PolicyFactory()
    step(policy, 0, MIN, (TargetKind.PERSON, ann))
    severity = SeverityFactory(level=1, escalation_policy=policy)
    declare(severity=severity, now=T0)  # step 1 due at T0 + 1 min
    declare(severity=severity, now=T0 + MIN)  # due at T0 + 2 min

    engine.engine_tick(now=T0 + 30 * timedelta(seconds=1))  # nothing due yet
    state = EngineState.objects.get(pk="engine")
    assert (state.ticks, state.last_lag_seconds, state.last_tick_at) == (
        1,
        0,
        T0 + 30 * timedelta(seconds=1),
    )

    engine.engine_tick(now=T0 + 3 * MIN)  # the first has been due for two minutes
    state.refresh_from_db()
    assert (state.ticks, state.last_lag_seconds) == (2, 120)
    assert Page.objects.filter(status=PageStatus.PENDING).count() == 2


def _grow(n: int, start: int) -> None:
    severity = SeverityFactory(level=2)
    person = PersonFactory()
    for i in range(start, start + n):
        incident = declare(severity=severity, title=f"Incident {i}", now=T0, is_drill=i % 5 == 0)
        Page.objects.create(
            incident=incident,
            step_index=0,
            person=person,
            due_at=T0,
            status=[PageStatus.SENT, PageStatus.FAILED, PageStatus.PENDING][i % 3],
            channel=["email", "webhook", ""][i % 3],
        )
        integration(name=f"source {i}")
        SeverityFactory(level=10 + i)


def test_query_count_does_not_grow_with_the_data(client):
    _grow(2, 0)
    engine.engine_tick(now=T0)
    with CaptureQueriesContext(connection) as small:
        scrape(client)
    _grow(20, 2)
    with CaptureQueriesContext(connection) as large:
        scrape(client)
    assert len(small.captured_queries) == len(large.captured_queries) <= MAX_QUERIES


def test_query_count_is_bounded_at_two_sizes(client, django_assert_max_num_queries):
    _grow(3, 100)
    with django_assert_max_num_queries(MAX_QUERIES):
        scrape(client)
    _grow(30, 200)
    with django_assert_max_num_queries(MAX_QUERIES):
        scrape(client)


def test_a_token_when_set_is_required(client, settings):
    settings.METRICS_TOKEN = "s3cret-metrics"
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-metrics")


def test_only_get(client):
    assert client.post("/metrics").status_code == 405
