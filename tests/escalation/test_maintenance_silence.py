"""Maintenance windows silence paging: alerts are stored and incidents open, and nobody is
paged for an incident that alerts opened during a running window on its services only; the
timeline says why once, and when the window ends the escalation goes on from where it stood.
Incidents a person declared, incidents detected before the window began, and incidents that
also touch a service outside the window are paged as usual."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext

from escalation import services as engine
from escalation.models import Page, PageStatus, StepCondition, TargetKind
from incidents import services
from incidents.ingestion import payloads
from incidents.ingestion.services import alerts_ingest
from incidents.models import EventKind, Incident
from tests.incidents.factories import (
    MaintenanceWindowFactory,
    ServiceFactory,
    SeverityFactory,
    UserFactory,
    alertmanager_body,
    declare,
    integration,
)

from .factories import ContactMethodFactory, PersonFactory, PolicyFactory, step

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


@pytest.fixture
def people():
    people = {name: PersonFactory(name=name) for name in ("Ann", "Ben", "Cal")}
    for name, person in people.items():
        ContactMethodFactory(person=person, address=f"{name.lower()}@example.com")
    return people


@pytest.fixture
def sev1(people):
    """Ann at once; Ben at 15 min if unacknowledged; Cal at 30 min if unresolved."""
    policy = PolicyFactory(name="Sev1 chain")
    step(policy, 0, timedelta(0), (TargetKind.PERSON, people["Ann"]))
    step(policy, 1, 15 * MIN, (TargetKind.PERSON, people["Ben"]))
    step(
        policy, 2, 30 * MIN, (TargetKind.PERSON, people["Cal"]), condition=StepCondition.UNRESOLVED
    )
    return SeverityFactory(level=1, escalation_policy=policy)


@pytest.fixture
def checkout():
    return ServiceFactory(name="Checkout", slug="checkout")


@pytest.fixture
def search():
    return ServiceFactory(name="Search", slug="search")


def window(*services, start=T0 - 10 * MIN, end=T0 + 60 * MIN, **kwargs):
    return MaintenanceWindowFactory(
        title=kwargs.pop("title", "Database upgrade"),
        starts_at=start,
        ends_at=end,
        services=list(services),
        **kwargs,
    )


def alerted(severity, *on, at=T0, name="DiskFull"):
    """An incident opened by an Alertmanager alert firing since `at` on the first service
    (the integration's default), with the others added as a responder would."""
    source, _token = integration(default_service=on[0], default_severity=severity)
    body = alertmanager_body(
        {"labels": {"alertname": name}, "startsAt": at.isoformat()},
        group_key=f'{{}}:{{alertname="{name}"}}',
    )
    result = alerts_ingest(integration=source, delivery=payloads.parse_alertmanager(body), now=at)
    incident = Incident.objects.get(reference__in=result.opened)
    assert (incident.declared_by, incident.detected_at) == (None, at)
    if len(on) > 1:
        services.incident_update(
            incident=incident, changes={"services": list(on)}, actor=None, now=at
        )
    return incident


def paged(incident) -> list[str]:
    return list(
        Page.objects.filter(incident=incident)
        .order_by("created_at", "pk")
        .values_list("person__name", flat=True)
    )


def tick(now) -> None:
    engine.escalate_due(now=now)


def silenced(incident) -> list:
    return list(incident.timeline.filter(kind=EventKind.PAGING_SILENCED))


def test_an_alert_incident_during_maintenance_pages_nobody_and_says_why_once(
    sev1, checkout, search
):
    window(checkout, search)
    incident = alerted(sev1, checkout, search)
    for minute in (0, 1, 2, 20, 45):
        tick(T0 + minute * MIN)
    assert paged(incident) == []
    [event] = silenced(incident)
    assert event.value == "Database upgrade"
    assert "covers Checkout, Search until 2026-11-02 10:00 UTC" in event.message
    incident.refresh_from_db()
    assert incident.next_escalation_at <= T0 + 60 * MIN
    assert incident.status == "triggered"  # the incident stays open
    assert incident.alerts.count() == 1  # and its alert is stored


def test_when_the_window_ends_escalation_resumes_where_it_stood(sev1, checkout):
    window(checkout, end=T0 + 40 * MIN)
    incident = alerted(sev1, checkout)
    for minute in range(40):  # the tick runs every few seconds; every minute will do here
        tick(T0 + minute * MIN)
    assert paged(incident) == []
    tick(T0 + 40 * MIN)
    assert paged(incident) == ["Ann"]  # the step that was due fires at the end
    tick(T0 + 54 * MIN)
    assert paged(incident) == ["Ann"]
    tick(T0 + 55 * MIN)
    assert paged(incident) == ["Ann", "Ben"]  # and the next keeps its 15 minutes
    assert len(silenced(incident)) == 1


def test_a_window_starting_mid_escalation_pages_as_usual(sev1, checkout):
    """Detected before the window began: not the planned work, so it keeps escalating."""
    incident = alerted(sev1, checkout)
    tick(T0)
    assert paged(incident) == ["Ann"]
    window(checkout, start=T0 + 5 * MIN, end=T0 + 65 * MIN)
    for minute in range(5, 31):
        tick(T0 + minute * MIN)
    assert paged(incident) == ["Ann", "Ben", "Cal"]  # at 15 and 30 minutes, as planned
    assert silenced(incident) == []


def test_an_alert_that_fired_before_the_window_is_paged(sev1, checkout):
    window(checkout, start=T0, end=T0 + 60 * MIN)
    incident = alerted(sev1, checkout, at=T0 - MIN)  # opened a minute before it started
    tick(T0 + MIN)
    assert paged(incident) == ["Ann"]
    assert silenced(incident) == []


def test_an_incident_a_person_declares_during_maintenance_is_paged(sev1, checkout):
    window(checkout)
    person = UserFactory(username="dana")
    declared = declare(severity=sev1, services=[checkout], actor=person, now=T0)
    tick(T0)
    assert paged(declared) == ["Ann"]
    tick(T0 + 15 * MIN)
    assert paged(declared) == ["Ann", "Ben"]
    assert silenced(declared) == []


def test_an_incident_without_alerts_is_paged(sev1, checkout):
    """Nobody declared it (an API client without a user) and no alert opened it either: only
    alert noise is what a window is for."""
    window(checkout)
    quiet = declare(severity=sev1, services=[checkout], now=T0)
    tick(T0)
    assert paged(quiet) == ["Ann"]


def test_an_incident_also_on_a_service_outside_the_window_is_paged(sev1, checkout, search):
    window(checkout)
    window(search, title="Search reindex")  # each covers one service, neither covers both
    both = alerted(sev1, checkout, search)
    tick(T0)
    assert paged(both) == ["Ann"]
    assert silenced(both) == []


def test_a_window_on_other_services_or_not_yet_running_silences_nothing(sev1, checkout, search):
    window(search)
    window(checkout, start=T0 + 30 * MIN, end=T0 + 90 * MIN, title="Later")
    window(checkout, start=T0 - 90 * MIN, end=T0 - 30 * MIN, title="Over")
    window(checkout, title="Called off", cancelled_at=T0 - 20 * MIN)
    incident = alerted(sev1, checkout)
    tick(T0)
    assert paged(incident) == ["Ann"]
    assert silenced(incident) == []


def test_a_cancelled_window_releases_paging_within_a_minute(sev1, checkout):
    running = window(checkout, end=T0 + 120 * MIN)
    incident = alerted(sev1, checkout)
    tick(T0)
    assert paged(incident) == []
    running.cancelled_at = T0 + 10 * MIN
    running.save()
    tick(T0 + 10 * MIN)
    assert paged(incident) == ["Ann"]


def test_a_page_waiting_to_be_delivered_is_held_until_the_window_ends(sev1, checkout, smtp_server):
    incident = alerted(sev1, checkout)
    tick(T0)
    page = Page.objects.get()
    # Scheduled just after the page was made, its start typed a minute back ("from now").
    window(checkout, start=T0 - MIN, end=T0 + 20 * MIN)
    assert engine.page_deliver(page_id=page.pk, now=T0 + MIN) == "held"
    page.refresh_from_db()
    assert page.status == PageStatus.PENDING
    assert page.next_attempt_at == T0 + 2 * MIN  # looked at again in a minute
    assert smtp_server.messages == []
    assert len(silenced(incident)) == 1
    assert engine.page_deliver(page_id=page.pk, now=T0 + 20 * MIN) == "sent"
    assert [m["To"] for m in smtp_server.messages] == ["ann@example.com"]


def test_an_alert_during_maintenance_is_stored_and_opens_an_incident_that_pages_nobody(
    client, sev1, checkout
):
    from incidents.ingestion import intake
    from tests.incidents.factories import AlertRouteFactory

    window(checkout, start=T0 - 10 * MIN, end=T0 + 600 * MIN)
    _source, token = integration(name="prom", default_severity=sev1)
    AlertRouteFactory(alert_name="DiskFull", severity=sev1, service=checkout)
    with time_machine.travel(T0, tick=False):
        response = client.post(
            f"/api/v1/integrations/{token}/alertmanager/",
            alertmanager_body(
                {"labels": {"alertname": "DiskFull"}, "startsAt": "2026-11-02T09:00:00Z"}
            ),
            content_type="application/json",
        )
        assert response.status_code in (200, 202), response.content
        if response.status_code == 202:
            intake.deliveries_apply()
        incident = Incident.objects.get()
        assert incident.alerts.count() == 1
        engine.engine_tick()
    assert paged(incident) == []
    assert len(silenced(incident)) == 1


def test_silencing_costs_the_same_few_queries_per_due_incident(sev1, checkout):
    window(checkout, end=T0 + 600 * MIN)

    def due_tick_queries(count: int, at: datetime) -> int:
        Incident.objects.update(next_escalation_at=None)
        for n in range(count):
            alerted(sev1, checkout, at=at, name=f"DiskFull{n}")
        tick(at)  # announced once per incident
        Incident.objects.filter(next_escalation_at__isnull=False).update(next_escalation_at=at)
        with CaptureQueriesContext(connection) as queries:
            tick(at + MIN)
        assert not Page.objects.exists()
        return len(queries)

    small = due_tick_queries(5, T0)
    large = due_tick_queries(25, T0 + 2 * MIN)
    # A fixed cost (the due rows, the running windows, the incidents' services) plus the
    # same small number per held incident (its savepoint and one compare-and-set update).
    per_incident = (large - small) / 20
    assert per_incident <= 3
    assert small - 5 * per_incident <= 8


def test_resolving_during_maintenance_stops_the_held_escalation(sev1, checkout):
    window(checkout)
    incident = alerted(sev1, checkout)
    tick(T0)
    services.incident_resolve(incident=incident, actor=None, now=T0 + 5 * MIN)
    incident.refresh_from_db()
    assert incident.next_escalation_at is None
    tick(T0 + 61 * MIN)
    assert paged(incident) == []
