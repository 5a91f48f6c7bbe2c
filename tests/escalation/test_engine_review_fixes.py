"""Behaviour fixed after review: forced levels, skipped steps on record, no replay of past
rounds, one bad configuration cannot stop the engine, acknowledged pages stop retrying,
an unknown outcome is never retried the same way."""

from datetime import UTC, datetime, timedelta

import pytest

from escalation import services as engine
from escalation.models import (
    BusinessCalendar,
    ContactKind,
    Page,
    PageAttempt,
    PageStatus,
    StepCondition,
    TargetKind,
)
from incidents import services
from incidents.models import EventKind
from tests.incidents.factories import SeverityFactory, declare

from .factories import ContactMethodFactory, PersonFactory, PolicyFactory, step
from .test_delivery import deliver_all
from .test_engine import paged, tick_until

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


@pytest.fixture
def chain():
    people = {n: PersonFactory(name=n) for n in ("Ann", "Ben", "Cal")}
    for person in people.values():
        ContactMethodFactory(person=person)
    policy = PolicyFactory(repeat=3, repeat_after=timedelta(minutes=30))
    step(policy, 0, timedelta(0), (TargetKind.PERSON, people["Ann"]))
    step(policy, 1, 15 * MIN, (TargetKind.PERSON, people["Ben"]))
    step(
        policy, 2, 30 * MIN, (TargetKind.PERSON, people["Cal"]), condition=StepCondition.UNRESOLVED
    )
    return policy


def test_manual_escalation_of_an_acknowledged_incident_pages_the_next_level(chain):
    incident = declare(severity=SeverityFactory(level=1, escalation_policy=chain), now=T0)
    tick_until(T0)
    services.incident_acknowledge(incident=incident, actor=None, now=T0 + MIN)
    engine.incident_escalate(incident=incident, actor=None, now=T0 + 2 * MIN)
    tick_until(T0 + 2 * MIN)
    assert ("Ben", 1, 0) in paged(incident)  # an "unacknowledged" step, paged on request


def test_a_skipped_step_is_on_the_timeline(chain):
    incident = declare(severity=SeverityFactory(level=1, escalation_policy=chain), now=T0)
    tick_until(T0)
    services.incident_acknowledge(incident=incident, actor=None, now=T0 + MIN)
    tick_until(T0 + 16 * MIN)
    assert "step 2 skipped" in incident.timeline.filter(kind=EventKind.ESCALATED).last().message


def test_rounds_already_over_are_not_replayed_after_an_outage(chain):
    incident = declare(severity=SeverityFactory(level=1, escalation_policy=chain), now=T0)
    tick_until(T0)
    # The engine was down for two hours: rounds 1 and 2 (60 min each) are over.
    tick_until(T0 + 150 * MIN)
    rounds = sorted({r for _, _, r in paged(incident)})
    assert rounds == [0, 2]
    assert [name for name, _, r in paged(incident) if r == 2] == ["Ann", "Ben", "Cal"]


def test_one_broken_configuration_does_not_stop_the_others(chain, caplog):
    broken_policy = PolicyFactory()
    calendar = BusinessCalendar.objects.create(name="Broken")
    step(broken_policy, 0, timedelta(0), (TargetKind.PERSON, PersonFactory(name="Zed")))
    step(broken_policy, 1, MIN, (TargetKind.PERSON, PersonFactory(name="Zoe")), calendar=calendar)
    broken = declare(severity=SeverityFactory(level=3, escalation_policy=broken_policy), now=T0)
    BusinessCalendar.objects.filter(pk=calendar.pk).update(working_days="")  # bypasses clean
    fine = declare(severity=SeverityFactory(level=1, escalation_policy=chain), now=T0)
    engine.engine_tick(now=T0)
    assert paged(fine) == [("Ann", 0, 0)]
    assert paged(broken) == []  # stays due, and the auditor will report it
    assert "escalation of" in caplog.text


def test_acknowledging_by_link_stops_that_pages_retries(http_server, allow_private_webhooks):
    person = PersonFactory(name="Dee")
    ContactMethodFactory(person=person, kind=ContactKind.WEBHOOK, address=http_server.url("/d"))
    policy = PolicyFactory()
    step(policy, 0, timedelta(0), (TargetKind.PERSON, person), condition=StepCondition.UNRESOLVED)
    declare(severity=SeverityFactory(level=2, escalation_policy=policy), now=T0)
    http_server.respond_with(503)
    tick_until(T0)
    assert deliver_all(T0) == ["retry"]
    page = Page.objects.get()
    engine.page_acknowledge(page=page, now=T0 + MIN)
    page.refresh_from_db()
    assert page.status == PageStatus.CANCELLED
    assert deliver_all(T0 + 10 * MIN) == []
    assert len(http_server.requests) == 1


def test_a_read_timeout_is_an_unknown_outcome_and_moves_to_the_backup(
    http_server, allow_private_webhooks, smtp_server, settings
):
    settings.WEBHOOK_TIMEOUT = 0.3
    person = PersonFactory(name="Eve")
    ContactMethodFactory(
        person=person, position=0, kind=ContactKind.WEBHOOK, address=http_server.url("/eve")
    )
    ContactMethodFactory(person=person, position=1, address="eve@example.com")
    policy = PolicyFactory()
    step(policy, 0, timedelta(0), (TargetKind.PERSON, person))
    incident = declare(severity=SeverityFactory(level=2, escalation_policy=policy), now=T0)
    http_server.respond_with(200, delay=2)
    tick_until(T0)
    assert deliver_all(T0) == ["backup"]
    assert deliver_all(T0) == ["sent"]
    assert len(http_server.requests) == 1  # never re-sent over the webhook
    assert [m["To"] for m in smtp_server.messages] == ["eve@example.com"]
    assert list(PageAttempt.objects.order_by("pk").values_list("outcome", flat=True)) == [
        "unknown",
        "sent",
    ]
    assert incident.timeline.filter(kind=EventKind.PAGE_UNKNOWN).count() == 1
