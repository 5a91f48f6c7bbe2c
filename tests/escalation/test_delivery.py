"""Pages end to end, in process: the tick creates them, delivery sends them through real
SMTP and HTTP servers, failures retry or move to backup methods, the link acknowledges."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from escalation import services as engine
from escalation.models import ContactKind, Page, PageAttempt, PageStatus, TargetKind
from incidents.models import EventKind, IncidentStatus
from tests.incidents.factories import SeverityFactory, declare

from .factories import ContactMethodFactory, PersonFactory, PolicyFactory, step

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


@pytest.fixture
def ann():
    person = PersonFactory(name="Ann", backup_after=10 * MIN)
    ContactMethodFactory(person=person, kind=ContactKind.EMAIL, address="ann@example.com")
    return person


def severity_paging(person):
    policy = PolicyFactory()
    step(policy, 0, timedelta(0), (TargetKind.PERSON, person))
    return SeverityFactory(level=1, escalation_policy=policy)


def deliver_all(now: datetime) -> list[str]:
    """What the worker does with the queued ids: deliver every pending page that is due."""
    due = Page.objects.filter(status=PageStatus.PENDING, next_attempt_at__lte=now)
    return [engine.page_deliver(page_id=pk, now=now) for pk in due.values_list("pk", flat=True)]


def test_escalation_queues_one_delivery_per_page_after_commit(
    ann, django_capture_on_commit_callbacks
):
    declare(severity=severity_paging(ann), now=T0)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        engine.escalate_due(now=T0)
    page = Page.objects.get()
    assert [(c.func.__name__, c.args) for c in callbacks] == [("_enqueue", (page.pk,))]
    # Queued once: the next tick does not queue it again while the first is fresh.
    assert engine.schedule_deliveries(now=T0 + engine.REQUEUE_AFTER / 2) == []
    assert engine.schedule_deliveries(now=T0 + engine.REQUEUE_AFTER) == [page.pk]


def test_tick_pages_by_email_with_a_working_ack_link(client, smtp_server, ann, settings):
    settings.SITE_URL = "http://testserver"
    incident = declare(severity=severity_paging(ann), title="Checkout <b>down</b>", now=T0)
    engine.escalate_due(now=T0)
    assert deliver_all(T0) == ["sent"]

    (message,) = smtp_server.messages
    assert message["To"] == "ann@example.com"
    assert incident.reference in message["Subject"]
    html = message.get_body(("html",)).get_content()
    assert "Checkout &lt;b&gt;down&lt;/b&gt;" in html
    link = re.search(
        r"http://testserver(/ack/[^\s\"<]+/)", message.get_body(("plain",)).get_content()
    ).group(1)
    page = Page.objects.get()
    assert (page.status, page.attempts, page.channel) == (PageStatus.SENT, 1, "email")
    assert PageAttempt.objects.get().outcome == "sent"
    assert incident.timeline.filter(kind=EventKind.PAGE_SENT).count() == 1

    assert client.post(link).status_code == 200
    incident.refresh_from_db()
    assert incident.status == IncidentStatus.ACKNOWLEDGED
    assert incident.timeline.get(kind=EventKind.ACKNOWLEDGED).actor_label == "Ann (page link)"


def test_delivering_again_never_sends_twice(smtp_server, ann):
    declare(severity=severity_paging(ann), now=T0)
    engine.escalate_due(now=T0)
    page_id = Page.objects.get().pk
    assert engine.page_deliver(page_id=page_id, now=T0) == "sent"
    assert engine.page_deliver(page_id=page_id, now=T0) == "skipped"
    assert engine.schedule_deliveries(now=T0 + 2 * engine.REQUEUE_AFTER) == []
    assert len(smtp_server.messages) == 1


def test_temporary_failure_retries_with_backoff_then_succeeds(http_server, allow_private_webhooks):
    bob = PersonFactory(name="Bob")
    ContactMethodFactory(person=bob, kind=ContactKind.WEBHOOK, address=http_server.url("/hook"))
    incident = declare(severity=severity_paging(bob), now=T0)
    http_server.respond_once(503)
    engine.escalate_due(now=T0)
    assert deliver_all(T0) == ["retry"]
    page = Page.objects.get()
    assert page.status == PageStatus.PENDING
    assert page.next_attempt_at == T0 + engine.RETRY_BACKOFF[0]
    assert deliver_all(T0 + 10 * 1000 * timedelta(microseconds=1)) == []  # not yet due
    assert deliver_all(T0 + engine.RETRY_BACKOFF[0]) == ["sent"]
    assert [r.json["event"] for r in http_server.requests] == ["page", "page"]
    assert list(PageAttempt.objects.values_list("outcome", flat=True)) == ["failed", "sent"]
    assert incident.timeline.filter(kind=EventKind.PAGE_SENT).count() == 1


def test_permanent_failure_moves_to_the_backup_method_at_once(
    http_server, allow_private_webhooks, smtp_server
):
    cal = PersonFactory(name="Cal")
    ContactMethodFactory(
        person=cal, position=0, kind=ContactKind.SLACK_WEBHOOK, address=http_server.url("/slack")
    )
    ContactMethodFactory(person=cal, position=1, address="cal@example.com")
    incident = declare(severity=severity_paging(cal), now=T0)
    http_server.respond_with(404)
    engine.escalate_due(now=T0)
    assert deliver_all(T0) == ["backup"]
    assert deliver_all(T0) == ["sent"]
    assert len(http_server.requests) == 1
    assert [m["To"] for m in smtp_server.messages] == ["cal@example.com"]
    assert incident.timeline.filter(kind=EventKind.PAGE_BACKUP).count() == 1


def test_no_acknowledgement_within_backup_after_tries_the_next_method(smtp_server, ann):
    ContactMethodFactory(person=ann, position=1, address="ann-phone@example.com")
    incident = declare(severity=severity_paging(ann), now=T0)
    engine.escalate_due(now=T0)
    deliver_all(T0)
    assert engine.pages_try_backup(now=T0 + 9 * MIN) == 0
    assert engine.pages_try_backup(now=T0 + 10 * MIN) == 1
    deliver_all(T0 + 10 * MIN)
    assert [m["To"] for m in smtp_server.messages] == ["ann@example.com", "ann-phone@example.com"]
    assert engine.pages_try_backup(now=T0 + 30 * MIN) == 0  # no third method
    assert incident.timeline.filter(kind=EventKind.PAGE_BACKUP).count() == 1


def test_acknowledged_before_delivery_means_the_page_is_never_sent(smtp_server, ann):
    from incidents import services

    incident = declare(severity=severity_paging(ann), now=T0)
    engine.escalate_due(now=T0)
    page_id = Page.objects.get().pk
    services.incident_acknowledge(incident=incident, actor=None, now=T0)
    assert engine.page_deliver(page_id=page_id, now=T0) == "skipped"  # cancelled already
    assert Page.objects.get().status == PageStatus.CANCELLED
    assert smtp_server.messages == []


def test_a_person_without_contact_methods_is_a_recorded_failure():
    nobody = PersonFactory(name="Nobody")
    incident = declare(severity=severity_paging(nobody), now=T0)
    engine.escalate_due(now=T0)
    assert deliver_all(T0) == ["failed"]
    assert Page.objects.get().status == PageStatus.FAILED
    assert "has no contact method" in incident.timeline.get(kind=EventKind.PAGE_FAILED).message


def test_a_stuck_send_is_marked_unknown_and_not_resent_the_same_way(smtp_server, ann, settings):
    ContactMethodFactory(person=ann, position=1, address="ann-backup@example.com")
    settings.PAGE_SENDING_STUCK_AFTER = 60
    incident = declare(severity=severity_paging(ann), now=T0)
    engine.escalate_due(now=T0)
    # A worker claimed the page and died before recording the outcome.
    Page.objects.update(status=PageStatus.SENDING, claimed_at=T0, attempts=1)
    assert engine.pages_recover_stuck(now=T0 + 59 * timedelta(seconds=1)) == 0
    assert engine.pages_recover_stuck(now=T0 + MIN) == 1
    page = Page.objects.get()
    assert (page.status, page.method_index) == (PageStatus.PENDING, 1)
    assert PageAttempt.objects.get().outcome == "unknown"
    deliver_all(T0 + MIN)
    assert [m["To"] for m in smtp_server.messages] == ["ann-backup@example.com"]
    assert (
        "may or may not have gone out" in incident.timeline.get(kind=EventKind.PAGE_UNKNOWN).message
    )


def test_tick_query_count_does_not_grow_with_open_incidents(ann):
    severity = severity_paging(ann)

    def tick_queries(now):
        with CaptureQueriesContext(connection) as queries:
            engine.engine_tick(now=now)
        return len(queries)

    declare(severity=severity, now=T0)
    engine.engine_tick(now=T0)  # the first page and its queueing out of the way
    engine.engine_tick(now=T0 + MIN)
    idle_small = tick_queries(T0 + MIN)
    for _ in range(30):
        declare(severity=SeverityFactory(level=4), now=T0)  # open, nothing due
    assert tick_queries(T0 + MIN) == idle_small
