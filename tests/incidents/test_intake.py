"""The asynchronous intake: a webhook stores what it accepts and answers; the worker's step
(`intake.deliveries_apply`) applies stored deliveries per integration, in arrival order,
keeps what it cannot apply yet, and sets aside what it never can."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from incidents.ingestion import intake
from incidents.models import (
    Alert,
    AlertDelivery,
    AlertStatus,
    Counter,
    DeliveryStatus,
    Incident,
    IncidentStatus,
)

from .factories import SeverityFactory, alertmanager_body, integration

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
ENQUEUE = "/api/v1/events/v2/enqueue"


@pytest.fixture
def severities():
    return {level: SeverityFactory(level=level) for level in (1, 2, 3, 4)}


def am_url(token: str) -> str:
    return f"/api/v1/integrations/{token}/alertmanager/"


def post(client, url: str, body, **extra):
    return client.post(url, data=json.dumps(body), content_type="application/json", **extra)


def test_an_accepted_delivery_is_stored_before_the_answer_and_applied_by_the_worker(
    client, severities
):
    source, token = integration()
    with time_machine.travel(T0, tick=False):
        response = post(client, am_url(token), alertmanager_body({"fingerprint": "fp1"}))
    assert response.status_code == 202
    delivery = AlertDelivery.objects.get()
    assert response.json() == {"status": "accepted", "delivery": delivery.pk, "alerts": 1}
    assert (delivery.status, delivery.integration, delivery.received_at) == (
        DeliveryStatus.PENDING,
        source,
        T0,
    )
    assert Alert.objects.count() == Incident.objects.count() == 0  # not applied yet

    with time_machine.travel(T0 + timedelta(seconds=1), tick=False):
        report = intake.deliveries_apply()
    assert (report.applied, report.waiting, report.failed) == (1, 0, 0)
    delivery.refresh_from_db()
    incident = Incident.objects.get()
    assert delivery.status == DeliveryStatus.DONE
    assert delivery.incidents == [incident.reference]
    assert delivery.applied_at == T0 + timedelta(seconds=1)
    # The alert is dated when it was received, not when it was applied.
    assert Alert.objects.get().first_received_at == T0
    # Nothing left: a second run applies nothing.
    assert intake.deliveries_apply().applied == 0


def test_deliveries_of_one_integration_apply_in_arrival_order(client, severities):
    _, token = integration(auto_resolve=True)
    fired = alertmanager_body({"fingerprint": "fp1"})
    resolved = alertmanager_body(
        {"fingerprint": "fp1", "endsAt": "2026-01-01T00:05:00Z"}, status="resolved"
    )
    refired = alertmanager_body({"fingerprint": "fp1", "startsAt": "2026-01-01T01:00:00Z"})
    for body in (fired, resolved, refired):
        assert post(client, am_url(token), body).status_code == 202

    assert intake.deliveries_apply().applied == 3
    # Fired, resolved (the incident with it), fired again: a new alert and a new incident.
    first, second = Incident.objects.order_by("number")
    assert first.status == IncidentStatus.RESOLVED
    assert second.status == IncidentStatus.TRIGGERED
    assert list(Alert.objects.order_by("pk").values_list("status", flat=True)) == [
        AlertStatus.RESOLVED,
        AlertStatus.FIRING,
    ]


def test_a_delivery_that_cannot_apply_yet_waits_with_its_error_and_holds_later_ones(client):
    # No severity exists yet: nothing can open an incident. The sender was answered 202
    # (the body is stored); the delivery waits, and so does the next one, in order.
    _, token = integration()
    assert post(client, am_url(token), alertmanager_body({"fingerprint": "a"})).status_code == 202
    assert post(client, am_url(token), alertmanager_body({"fingerprint": "b"})).status_code == 202

    report = intake.deliveries_apply()
    assert (report.applied, report.waiting) == (0, 1)
    first, second = AlertDelivery.objects.order_by("pk")
    assert (first.status, first.attempts) == (DeliveryStatus.PENDING, 1)
    assert "severity" in first.error.lower()
    assert (second.status, second.attempts) == (DeliveryStatus.PENDING, 0)
    assert Alert.objects.count() == 0

    SeverityFactory(level=1)
    assert intake.deliveries_apply().applied == 2
    first.refresh_from_db()
    assert (first.status, first.attempts, first.error) == (DeliveryStatus.DONE, 2, "")
    assert set(Alert.objects.values_list("fingerprint", flat=True)) == {"a", "b"}


def test_a_delivery_that_can_never_apply_is_set_aside_and_can_be_queued_again(client, severities):
    _, token = integration()
    assert post(client, am_url(token), alertmanager_body({"fingerprint": "a"})).status_code == 202
    assert post(client, am_url(token), alertmanager_body({"fingerprint": "b"})).status_code == 202
    broken = AlertDelivery.objects.order_by("pk").first()
    # A body that no longer parses (stored by an older version, say).
    AlertDelivery.objects.filter(pk=broken.pk).update(body='{"version": "4"}')

    report = intake.deliveries_apply()
    assert (report.applied, report.failed) == (1, 1)
    broken.refresh_from_db()
    assert broken.status == DeliveryStatus.FAILED
    assert "alerts" in broken.error
    assert list(Alert.objects.values_list("fingerprint", flat=True)) == ["b"]

    AlertDelivery.objects.filter(pk=broken.pk).update(
        body=json.dumps(alertmanager_body({"fingerprint": "a"}))
    )
    assert intake.deliveries_requeue(ids=[broken.pk]) == 1
    assert intake.deliveries_apply().applied == 1
    assert set(Alert.objects.values_list("fingerprint", flat=True)) == {"a", "b"}


def test_an_integration_another_process_is_applying_is_left_to_it(client, severities):
    source, token = integration()
    assert post(client, am_url(token), alertmanager_body({"fingerprint": "a"})).status_code == 202
    with time_machine.travel(T0, tick=False):
        held = intake._lease_take(source.pk, T0)
        assert held is not None
        report = intake.deliveries_apply()
    assert (report.applied, report.busy) == (0, 1)
    assert Alert.objects.count() == 0

    # The holder died without releasing: its lease lapses and the next run takes over.
    with time_machine.travel(T0 + timedelta(seconds=intake.LEASE_SECONDS + 1), tick=False):
        assert intake.deliveries_apply().applied == 1
    assert Counter.objects.get(name=f"alert-apply:{source.pk}").value == 0  # released


def test_events_v2_is_stored_without_its_routing_key_and_with_its_answered_dedup_key(client):
    SeverityFactory(level=1)
    _, token = integration(kind="events_v2")
    event = {
        "routing_key": token,
        "event_action": "trigger",
        "payload": {"summary": "Disk full", "source": "db1", "severity": "critical"},
    }
    response = post(client, ENQUEUE, event)
    assert response.status_code == 202
    key = response.json()["dedup_key"]
    stored = AlertDelivery.objects.get()
    assert token not in stored.body
    assert json.loads(stored.body)["dedup_key"] == key
    intake.deliveries_apply()
    assert Alert.objects.get().fingerprint == key


def test_an_invalid_body_is_refused_and_nothing_is_stored(client, severities):
    _, token = integration()
    response = post(client, am_url(token), {"version": "4", "alerts": [{"labels": []}]})
    assert response.status_code == 400
    assert AlertDelivery.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_workers_applying_at_once_apply_each_delivery_once_and_in_order():
    """Four threads (four database connections) apply 3 integrations' 40 deliveries each
    at once; each integration's are applied by one of them at a time, in order."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    for level in (1, 2, 3, 4):
        SeverityFactory(level=level)
    sources = [integration(auto_resolve=True)[0] for _ in range(3)]
    for source in sources:
        for n in range(20):
            fired = alertmanager_body({"fingerprint": f"fp{n}"}, group_key=f"g{n % 4}")
            resolved = alertmanager_body(
                {"fingerprint": f"fp{n}", "endsAt": "2026-01-01T00:05:00Z"},
                group_key=f"g{n % 4}",
                status="resolved",
            )
            for body in (fired, resolved):
                intake.accept(integration=source, body=json.dumps(body), alerts=1)

    def work() -> int:
        try:
            return sum(intake.deliveries_apply(batch=7).applied for _ in range(3))
        finally:
            connections.close_all()

    with ThreadPoolExecutor(4) as pool:
        applied = sum(pool.map(lambda _: work(), range(4)))

    assert applied == 120
    assert set(AlertDelivery.objects.values_list("status", flat=True)) == {DeliveryStatus.DONE}
    # Each firing was applied once (no count of 2) and resolved after it fired.
    assert Alert.objects.count() == 60
    assert set(Alert.objects.values_list("count", flat=True)) == {1}
    assert set(Alert.objects.values_list("status", flat=True)) == {AlertStatus.RESOLVED}
