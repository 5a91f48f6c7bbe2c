"""Customer notices: composing, sending through a real SMTP server, retries, unknown
outcomes, refusals; the admin and API lists' query counts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.urls import reverse

from incidents.comms import notices
from incidents.exceptions import InvalidInput
from incidents.models import (
    CustomerNotice,
    DeliveryState,
    EventKind,
    MessageTemplate,
    NoticeDelivery,
    NoticeStatus,
    Subscriber,
    TemplateKind,
)
from tests.incidents.factories import (
    MaintenanceWindowFactory,
    ServiceFactory,
    SubscriberFactory,
    UserFactory,
    declare,
)
from tests.incidents.notice_support import DroppingSMTPServer, parts, smtp_server_at

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
S3 = timedelta(seconds=3)


@pytest.fixture
def dropping_smtp_server(settings):
    """A real SMTP server that loses the connection after every message's data."""
    yield from smtp_server_at(DroppingSMTPServer(), settings)


@pytest.fixture
def checkout():
    return ServiceFactory(name="Checkout", slug="checkout")


@pytest.fixture
def search():
    return ServiceFactory(name="Search", slug="search")


@pytest.fixture
def admin_user():
    return UserFactory(username="root", is_superuser=True)


@pytest.fixture
def incident(checkout, admin_user):
    internal = ServiceFactory(name="Ledger", slug="ledger", is_public=False)
    # Declared by a person: customers see its title (public_title).
    return declare(
        title="Payments fail",
        services=[checkout, internal],
        impact="partial_outage",
        customer_impact="Some card payments are declined.",
        actor=admin_user,
        now=T0,
    )


def compose(incident, actor, **kwargs):
    return notices.notice_compose(
        kind=kwargs.pop("kind", TemplateKind.CUSTOMER_NOTICE),
        incident=incident,
        actor=actor,
        now=T0,
        **kwargs,
    )


def send(notice, actor, capture, **kwargs) -> tuple[int, list]:
    with capture(execute=False) as callbacks:
        count = notices.notice_send(notice=notice, actor=actor, now=T0, **kwargs)
    return count, callbacks


def run_batches(notice, mode="first", times=1):
    return [notices.notice_deliver_batch(notice_id=notice.pk, mode=mode) for _ in range(times)]


def test_notice_reaches_each_confirmed_subscriber_once_with_both_parts_and_headers(
    smtp_server, incident, checkout, search, admin_user, django_capture_on_commit_callbacks
):
    followers = [SubscriberFactory(services=[checkout]) for _ in range(3)]
    everything = SubscriberFactory(all_services=True)
    SubscriberFactory(services=[checkout], confirmed_at=None)  # never confirmed
    SubscriberFactory(services=[checkout], unsubscribed_at=T0)  # left
    SubscriberFactory(services=[search])  # another service

    notice = compose(incident, admin_user)
    assert notice.status == NoticeStatus.DRAFT
    assert [s.slug for s in notice.services.all()] == ["checkout"]  # public services only
    assert not incident.timeline.filter(kind=EventKind.CUSTOMER_NOTICE).exists()

    count, callbacks = send(notice, admin_user, django_capture_on_commit_callbacks)
    assert count == 4
    assert len(callbacks) == 1  # one batch task queued on commit
    [report] = run_batches(notice)
    assert report.sent == 4

    messages = smtp_server.messages
    recipients = sorted(m["To"] for m in messages)
    assert recipients == sorted(s.email for s in [*followers, everything])
    notice.refresh_from_db()
    assert notice.status == NoticeStatus.SENT
    assert notice.recipients == 4
    for message in messages:
        subscriber = Subscriber.objects.get(email=message["To"])
        assert message["Message-ID"] == f"<notice-{notice.pk}-{subscriber.pk}@localhost>"
        url = f"http://127.0.0.1:8000/status/unsubscribe/{subscriber.unsubscribe_token}/"
        assert message["List-Unsubscribe"].strip() == f"<{url}>"  # may be folded
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert message["Subject"] == "Service status: Payments fail"
        assert message["Auto-Submitted"] == "auto-generated"
        text, html = parts(message)
        assert "Some card payments are declined." in text
        assert f"Unsubscribe with one click: {url}" in text
        assert f'<a href="{url}">Unsubscribe with one click</a>' in html
    rows = NoticeDelivery.objects.filter(notice=notice)
    assert {(r.status, r.attempts) for r in rows} == {(DeliveryState.SENT, 1)}
    assert all(r.sent_at is not None and r.error == "" for r in rows)
    events = list(incident.timeline.filter(kind=EventKind.CUSTOMER_NOTICE).order_by("pk"))
    assert len(events) == 2
    assert "sent to 4 subscriber(s) of Checkout" in events[0].message
    assert events[0].actor == admin_user
    assert "4 sent, 0 failed, 0 with an unknown outcome" in events[1].message


def test_a_big_notice_goes_out_in_batches_each_address_once(
    smtp_server, incident, checkout, admin_user, settings, django_capture_on_commit_callbacks
):
    settings.NOTICE_BATCH_SIZE = 2
    for _ in range(5):
        SubscriberFactory(services=[checkout])
    count, callbacks = send(
        compose(incident, admin_user), admin_user, django_capture_on_commit_callbacks
    )
    assert count == 5
    assert len(callbacks) == 3
    notice = CustomerNotice.objects.get()
    reports = run_batches(notice, times=4)
    assert [r.claimed for r in reports] == [2, 2, 1, 0]
    assert len(smtp_server.messages) == 5
    assert len({m["Message-ID"] for m in smtp_server.messages}) == 5
    assert CustomerNotice.objects.get().status == NoticeStatus.SENT


def test_a_task_run_again_never_mails_twice(
    smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    SubscriberFactory(services=[checkout])
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    run_batches(notice)
    # The same task redelivered, a retry task, the sweep's task: nothing left to claim.
    for mode in ("first", "retry", "any"):
        assert notices.notice_deliver_batch(notice_id=notice.pk, mode=mode).claimed == 0
    assert len(smtp_server.messages) == 2


def test_a_second_send_does_nothing(
    smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    assert send(notice, admin_user, django_capture_on_commit_callbacks)[0] == 1
    count, callbacks = send(notice, admin_user, django_capture_on_commit_callbacks)
    assert (count, callbacks) == (0, [])
    assert NoticeDelivery.objects.count() == 1
    assert incident.timeline.filter(kind=EventKind.CUSTOMER_NOTICE).count() == 1


def test_a_temporary_refusal_is_retried_with_backoff_and_delivered_once(
    smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    ann = SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    smtp_server.reject_with("451 4.3.0 Try again later")
    with (
        time_machine.travel(T0, tick=False),
        django_capture_on_commit_callbacks(execute=False) as retries,
    ):
        [report] = run_batches(notice)
    assert report.retry == 1
    assert not smtp_server.messages
    row = NoticeDelivery.objects.get()
    assert (row.status, row.attempts) == (DeliveryState.PENDING, 1)
    assert row.sent_at == T0 + timedelta(seconds=30)  # pending: when the next attempt is due
    assert "451 4.3.0 Try again later" in row.error
    [retry] = retries
    assert retry.args == (notice.pk, "retry", 30)  # the first backoff step
    assert CustomerNotice.objects.get().status == NoticeStatus.SENDING

    smtp_server.reject_with(None)
    with time_machine.travel(T0 + timedelta(seconds=29), tick=False):
        # A first-pass task (another batch of the notice) leaves the row to its retry, and
        # no task takes it before its backoff is over.
        for mode in ("first", "retry", "any"):
            assert notices.notice_deliver_batch(notice_id=notice.pk, mode=mode).claimed == 0
    with time_machine.travel(T0 + timedelta(seconds=30), tick=False):
        [report] = run_batches(notice, mode="retry")
    assert report.sent == 1
    [message] = smtp_server.messages
    assert message["Message-ID"] == f"<notice-{notice.pk}-{ann.pk}@localhost>"
    row.refresh_from_db()
    assert (row.status, row.attempts, row.error) == (DeliveryState.SENT, 2, "")
    assert run_batches(notice, mode="any")[0].claimed == 0
    assert len(smtp_server.messages) == 1


def test_temporary_failures_give_up_after_the_last_backoff_step(
    smtp_server, incident, checkout, admin_user, settings, django_capture_on_commit_callbacks
):
    settings.NOTICE_RETRY_BACKOFF = (1, 2)
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    smtp_server.reject_with("452 4.2.2 Mailbox full")
    waits = []
    for mode, at in (("first", T0), ("retry", T0 + timedelta(seconds=1)), ("retry", T0 + S3)):
        with (
            time_machine.travel(at, tick=False),
            django_capture_on_commit_callbacks(execute=False) as queued,
        ):
            assert notices.notice_deliver_batch(notice_id=notice.pk, mode=mode).claimed == 1
        waits += [callback.args[2] for callback in queued]
    assert waits == [1, 2]
    row = NoticeDelivery.objects.get()
    assert (row.status, row.attempts) == (DeliveryState.FAILED, 3)
    assert CustomerNotice.objects.get().status == NoticeStatus.SENT


def test_a_permanent_refusal_fails_at_once(
    smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    smtp_server.reject_with("550 5.1.1 No such user")
    with django_capture_on_commit_callbacks(execute=False) as retries:
        [report] = run_batches(notice)
    assert (report.failed, retries) == (1, [])
    row = NoticeDelivery.objects.get()
    assert row.status == DeliveryState.FAILED
    assert "550 5.1.1 No such user" in row.error
    assert CustomerNotice.objects.get().status == NoticeStatus.SENT
    summary = incident.timeline.filter(kind=EventKind.CUSTOMER_NOTICE).last()
    assert "0 sent, 1 failed" in summary.message


def test_a_connection_lost_after_the_data_is_unknown_and_never_sent_again(
    dropping_smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    SubscriberFactory(services=[checkout])
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False) as retries:
        [report] = run_batches(notice)
    # Each message arrived, but the sender never heard so: both unknown, none retried.
    assert (report.unknown, report.sent, retries) == (2, 0, [])
    assert len(dropping_smtp_server.messages) == 2
    rows = NoticeDelivery.objects.all()
    assert {r.status for r in rows} == {DeliveryState.UNKNOWN}
    assert all(r.error.startswith("outcome unknown:") for r in rows)
    for mode in ("first", "retry", "any"):
        assert notices.notice_deliver_batch(notice_id=notice.pk, mode=mode).claimed == 0
    assert notices.notices_sweep(now=T0 + timedelta(hours=1))["queued"] == 0
    assert len(dropping_smtp_server.messages) == 2
    assert CustomerNotice.objects.get().status == NoticeStatus.SENT


def test_an_unreachable_mail_server_leaves_the_batch_for_a_retry(
    incident, checkout, admin_user, settings, django_capture_on_commit_callbacks
):
    from tests.escalation.processes import free_port

    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", free_port(), 2
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False) as retries:
        [report] = run_batches(notice)
    assert report.retry == 1
    assert len(retries) == 1
    row = NoticeDelivery.objects.get()
    assert row.status == DeliveryState.PENDING
    assert row.error.startswith("could not reach the mail server")


def test_a_send_left_by_a_dead_worker_becomes_unknown(
    smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    # A worker claimed the row at T0 and died before recording anything.
    NoticeDelivery.objects.update(status=DeliveryState.SENDING, attempts=1, sent_at=T0)
    assert notices.notices_sweep(now=T0 + timedelta(minutes=5))["unknown"] == 0
    result = notices.notices_sweep(now=T0 + timedelta(minutes=11))
    assert (result["unknown"], result["closed"]) == (1, 1)
    row = NoticeDelivery.objects.get()
    assert row.status == DeliveryState.UNKNOWN
    assert "worker stopped" in row.error
    assert not smtp_server.messages


def test_the_sweep_queues_a_notice_whose_batches_were_lost(
    smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)  # callbacks dropped: lost
    with django_capture_on_commit_callbacks(execute=False) as queued:
        assert notices.notices_sweep(now=T0 + timedelta(minutes=1))["queued"] == 0
    assert queued == []
    with django_capture_on_commit_callbacks(execute=False) as queued:
        assert notices.notices_sweep(now=T0 + timedelta(minutes=6))["queued"] == 1
    assert queued[0].args == (notice.pk, "any")
    run_batches(notice, mode="any")
    assert len(smtp_server.messages) == 1


def test_someone_who_unsubscribes_while_a_notice_is_sending_gets_nothing(
    smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    leaver = SubscriberFactory(services=[checkout])
    stayer = SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    notices.subscriber_unsubscribe(token=leaver.unsubscribe_token)
    run_batches(notice)
    assert [m["To"] for m in smtp_server.messages] == [stayer.email]
    row = NoticeDelivery.objects.get(email=leaver.email)
    assert row.status == DeliveryState.FAILED
    assert "unsubscribed" in row.error


def test_no_recipient_means_sent_at_once(
    smtp_server, incident, admin_user, django_capture_on_commit_callbacks
):
    notice = compose(incident, admin_user)
    count, callbacks = send(notice, admin_user, django_capture_on_commit_callbacks)
    assert (count, callbacks) == (0, [])
    notice.refresh_from_db()
    assert notice.status == NoticeStatus.SENT
    assert notice.sent_at == T0
    assert not smtp_server.messages


def test_incident_text_is_escaped_in_the_html_part(
    smtp_server, checkout, admin_user, django_capture_on_commit_callbacks
):
    incident = declare(
        title='<script>alert("x")</script> & co',
        services=[checkout],
        customer_impact="<img src=x onerror=alert(1)> payments fail",
        actor=admin_user,
        now=T0,
    )
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    run_batches(notice)
    [message] = smtp_server.messages
    text, html = parts(message)
    assert "<script>" not in html
    assert "<img" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in html  # the title
    assert "&lt;img src=x onerror=alert(1)&gt; payments fail" in html
    assert "<img src=x onerror=alert(1)> payments fail" in text  # plain text stays as typed
    assert message["Subject"] == 'Service status: <script>alert("x")</script> & co'


def test_a_maintenance_notice_goes_to_the_windows_services(
    smtp_server, checkout, search, admin_user, django_capture_on_commit_callbacks
):
    window = MaintenanceWindowFactory(
        title="Database upgrade",
        services=[search],
        starts_at=T0 + timedelta(days=1),
        ends_at=T0 + timedelta(days=1, hours=2),
    )
    SubscriberFactory(services=[checkout])
    follower = SubscriberFactory(services=[search])
    notice = notices.notice_compose(
        kind=TemplateKind.MAINTENANCE, maintenance=window, actor=admin_user, now=T0
    )
    assert notice.subject == "Service status maintenance: Database upgrade"
    send(notice, admin_user, django_capture_on_commit_callbacks)
    run_batches(notice)
    [message] = smtp_server.messages
    assert message["To"] == follower.email
    assert "2026-03-03 10:00 UTC" in parts(message)[0]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "teaser"}, "kind"),
        ({"service_ids": []}, "services"),
        ({"service_ids": [987654]}, "services"),
        ({"service_ids": ["x"]}, "services"),
    ],
)
def test_compose_refuses_bad_input_naming_the_field(incident, admin_user, kwargs, field):
    with pytest.raises(InvalidInput) as refused:
        compose(incident, admin_user, **kwargs)
    assert refused.value.field == field
    assert not CustomerNotice.objects.exists()


def test_compose_refuses_a_private_service_a_drill_and_neither_subject(admin_user, checkout):
    private = ServiceFactory(name="Ledger", slug="ledger", is_public=False)
    incident = declare(title="Down", services=[private], now=T0)
    with pytest.raises(InvalidInput, match="no public service is affected"):
        compose(incident, admin_user)
    with pytest.raises(InvalidInput, match="no public service with id"):
        compose(incident, admin_user, service_ids=[private.pk])
    drill = declare(title="Drill", services=[checkout], is_drill=True, now=T0)
    with pytest.raises(InvalidInput, match="is a drill"):
        compose(drill, admin_user)
    with pytest.raises(InvalidInput) as refused:
        notices.notice_compose(kind=TemplateKind.CUSTOMER_NOTICE, actor=admin_user)
    assert refused.value.field == "incident"
    assert not CustomerNotice.objects.exists()


def test_a_template_error_is_refused_and_nothing_is_sent(
    smtp_server, incident, checkout, admin_user
):
    SubscriberFactory(services=[checkout])
    # Saved around the admin's validation, as a row restored from an old backup might be.
    broken = MessageTemplate.objects.create(
        kind=TemplateKind.CUSTOMER_NOTICE, name="Broken", subject="Hi", body="{% if %}"
    )
    with pytest.raises(InvalidInput) as refused:
        compose(incident, admin_user, template=broken)
    assert refused.value.field == "body"
    assert "template error" in str(refused.value)
    wrong_kind = MessageTemplate.objects.create(
        kind=TemplateKind.MAINTENANCE, name="Maint", subject="Hi", body="Body"
    )
    with pytest.raises(InvalidInput) as refused:
        compose(incident, admin_user, template=wrong_kind)
    assert refused.value.field == "template"
    assert not CustomerNotice.objects.exists()
    assert not smtp_server.messages


def test_a_subject_that_renders_to_two_lines_is_refused(incident, admin_user):
    template = MessageTemplate.objects.create(
        kind=TemplateKind.CUSTOMER_NOTICE,
        name="Two lines",
        subject="{{ incident.title }}{{ incident.customer_impact }}",
        body="Body",
    )
    incident.customer_impact = "\r\nBcc: everyone@example.org"
    incident.save(update_fields=["customer_impact"])
    with pytest.raises(InvalidInput) as refused:
        compose(incident, admin_user, template=template)
    assert refused.value.field == "subject"
    assert not CustomerNotice.objects.exists()


def test_send_refuses_a_stored_subject_with_a_line_break(
    smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    CustomerNotice.objects.filter(pk=notice.pk).update(subject="Hi\r\nBcc: x@example.org")
    notice.refresh_from_db()
    with pytest.raises(InvalidInput) as refused:
        send(notice, admin_user, django_capture_on_commit_callbacks)
    assert refused.value.field == "subject"
    notice.refresh_from_db()
    assert notice.status == NoticeStatus.DRAFT
    assert not NoticeDelivery.objects.exists()
    assert not smtp_server.messages


def test_recipients_are_read_in_batches_not_all_at_once(
    incident, checkout, admin_user, settings, django_capture_on_commit_callbacks
):
    """Sending to more subscribers adds inserts (one per batch), not a query per row."""
    settings.NOTICE_BATCH_SIZE = 10
    Subscriber.objects.bulk_create(
        Subscriber(email=f"s{n}@example.org", unsubscribe_token=f"t{n}", confirmed_at=T0)
        for n in range(35)
    )
    Subscriber.services.through.objects.bulk_create(
        Subscriber.services.through(subscriber_id=pk, service_id=checkout.pk)
        for pk in Subscriber.objects.values_list("pk", flat=True)
    )
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    notice = compose(incident, admin_user)
    with CaptureQueriesContext(connection) as queries:
        assert send(notice, admin_user, django_capture_on_commit_callbacks)[0] == 35
    inserts = [q for q in queries if q["sql"].startswith('INSERT INTO "incidents_noticedelivery"')]
    assert len(inserts) == 4
    assert NoticeDelivery.objects.count() == 35


# --- admin and API: query counts at two sizes -----------------------------------------------


def _notices_with_deliveries(count: int, per_notice: int, service) -> None:
    subscribers = [SubscriberFactory(services=[service]) for _ in range(per_notice)]
    for n in range(count):
        notice = CustomerNotice.objects.create(
            kind=TemplateKind.CUSTOMER_NOTICE,
            subject=f"Notice {n}",
            body_text="b",
            body_html="<p>b</p>",
            status=NoticeStatus.SENT,
        )
        notice.services.add(service)
        NoticeDelivery.objects.bulk_create(
            NoticeDelivery(
                notice=notice,
                subscriber=s,
                email=s.email,
                message_id=notices.notice_message_id(notice.pk, s.pk),
                status=DeliveryState.SENT,
            )
            for s in subscribers
        )


ADMIN_LISTS = [
    "admin:incidents_subscriber_changelist",
    "admin:incidents_customernotice_changelist",
    "admin:incidents_noticedelivery_changelist",
]


def _queries(client, url: str) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, url
    return len(captured)


def test_admin_changelists_take_the_same_queries_at_two_sizes(
    client, admin_user, checkout, django_assert_max_num_queries
):
    client.force_login(admin_user)
    _notices_with_deliveries(2, 2, checkout)
    small = {name: _queries(client, reverse(name)) for name in ADMIN_LISTS}
    _notices_with_deliveries(10, 10, checkout)
    for name in ADMIN_LISTS:
        with django_assert_max_num_queries(small[name]):
            response = client.get(reverse(name))
        assert response.status_code == 200
    assert max(small.values()) <= 8, small
    notice = CustomerNotice.objects.first()
    change = reverse("admin:incidents_customernotice_change", args=[notice.pk])
    filtered = reverse("admin:incidents_noticedelivery_changelist") + f"?notice={notice.pk}"
    for url in (change, filtered):
        assert client.get(url).status_code == 200


def test_api_lists_take_the_same_queries_at_two_sizes(
    client, admin_user, checkout, django_assert_max_num_queries
):
    client.force_login(admin_user)
    _notices_with_deliveries(2, 2, checkout)
    first = CustomerNotice.objects.order_by("pk").first()
    urls = ["/api/v1/notices/", f"/api/v1/notices/{first.pk}/deliveries/"]
    small = [_queries(client, url) for url in urls]
    _notices_with_deliveries(10, 10, checkout)
    NoticeDelivery.objects.bulk_create(
        NoticeDelivery(notice=first, email=f"extra{n}@example.org", message_id=f"<x{n}@h>")
        for n in range(8)
    )
    for url, limit, rows in zip(urls, small, [12, 10], strict=True):
        with django_assert_max_num_queries(limit):
            response = client.get(url)
        assert response.status_code == 200
        assert len(response.json()["results"]) == rows
    assert max(small) <= 5, small  # session, user, the rows, services or notice, counts


def test_draft_notice_can_be_sent_later_after_time_passes(
    smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    with time_machine.travel(T0 + timedelta(hours=1), tick=False):
        with django_capture_on_commit_callbacks(execute=False):
            notices.notice_send(notice=notice, actor=admin_user)
        run_batches(notice)
    notice.refresh_from_db()
    assert notice.send_requested_at == T0 + timedelta(hours=1)
    assert notice.sent_at == T0 + timedelta(hours=1)
    assert NoticeDelivery.objects.get().sent_at == T0 + timedelta(hours=1)


# --- the admin: compose -> preview -> send --------------------------------------------------


def test_admin_compose_preview_and_send(
    client, smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    SubscriberFactory(services=[checkout])
    client.force_login(admin_user)
    add = reverse("admin:incidents_customernotice_add")
    # The incident changelist's action leads here with the incident chosen.
    response = client.post(
        reverse("admin:incidents_incident_changelist"),
        {"action": "notify_customers", "_selected_action": [incident.pk]},
    )
    assert response.status_code == 302
    assert response["Location"] == f"{add}?incident={incident.pk}"
    assert client.get(response["Location"]).status_code == 200

    response = client.post(
        add, {"kind": TemplateKind.CUSTOMER_NOTICE, "incident": incident.pk}, follow=True
    )
    notice = CustomerNotice.objects.get()
    assert response.redirect_chain[-1][0] == reverse(
        "admin:incidents_customernotice_preview", args=[notice.pk]
    )
    page = response.content.decode()
    assert "Service status: Payments fail" in page
    assert "Send to 1 subscriber" in page
    at = page.index("srcdoc=")
    assert page[at : at + 29] == 'srcdoc="&lt;!DOCTYPE html&gt;', page[at : at + 80]  # inert
    assert "charset=&quot;utf-8&quot;" in page  # quotes cannot end the attribute
    assert "List-Unsubscribe-Post" in page

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(
            reverse("admin:incidents_customernotice_send", args=[notice.pk]), follow=True
        )
    assert "is being sent to 1 subscriber(s)" in response.content.decode()
    assert len(callbacks) == 1
    run_batches(notice)
    assert len(smtp_server.messages) == 1
    # Sending again from the admin changes nothing and says so.
    response = client.post(
        reverse("admin:incidents_customernotice_send", args=[notice.pk]), follow=True
    )
    assert "was already sent: unchanged" in response.content.decode()
    page = client.get(reverse("admin:incidents_customernotice_change", args=[notice.pk]))
    assert "1 sent" in page.content.decode()


def test_admin_compose_shows_refusals_on_the_form(client, incident, admin_user):
    private = ServiceFactory(name="Ledger2", slug="ledger2", is_public=False)
    client.force_login(admin_user)
    add = reverse("admin:incidents_customernotice_add")
    response = client.post(add, {"kind": TemplateKind.CUSTOMER_NOTICE})
    assert response.status_code == 200
    assert "choose an incident or a maintenance window" in response.content.decode()
    broken = MessageTemplate.objects.create(
        kind=TemplateKind.CUSTOMER_NOTICE, name="Broken", subject="{{ x|nofilter }}", body="b"
    )
    response = client.post(
        add,
        {"kind": TemplateKind.CUSTOMER_NOTICE, "incident": incident.pk, "template": broken.pk},
    )
    assert "template error" in response.content.decode()
    incident.services.set([private])
    response = client.post(add, {"kind": TemplateKind.CUSTOMER_NOTICE, "incident": incident.pk})
    assert "no public service is affected" in response.content.decode()
    assert not CustomerNotice.objects.exists()


def test_admin_send_error_is_a_message_and_nothing_is_sent(
    client, smtp_server, incident, checkout, admin_user
):
    SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    CustomerNotice.objects.filter(pk=notice.pk).update(subject="A\nB")
    client.force_login(admin_user)
    response = client.post(
        reverse("admin:incidents_customernotice_changelist"),
        {"action": "send_selected", "_selected_action": [notice.pk]},
        follow=True,
    )
    assert "not sent: subject: must be one line" in response.content.decode()
    notice.refresh_from_db()
    assert notice.status == NoticeStatus.DRAFT
    assert not NoticeDelivery.objects.exists()


def test_admin_subscribers_can_be_unsubscribed_not_added(client, admin_user, checkout):
    subscriber = SubscriberFactory(services=[checkout])
    client.force_login(admin_user)
    changelist = reverse("admin:incidents_subscriber_changelist")
    assert client.get(reverse("admin:incidents_subscriber_add")).status_code == 403
    assert client.get(changelist + "?confirmed=yes&unsubscribed=no").status_code == 200
    client.post(changelist, {"action": "unsubscribe", "_selected_action": [subscriber.pk]})
    subscriber.refresh_from_db()
    assert subscriber.unsubscribed_at is not None
    delivery_add = reverse("admin:incidents_noticedelivery_add")
    assert client.get(delivery_add).status_code == 403
    # The change page saves nothing: a stale copy never overwrites the unsubscribe.
    change = reverse("admin:incidents_subscriber_change", args=[subscriber.pk])
    assert 'name="_save"' not in client.get(change).content.decode()
    client.post(change, {"email": subscriber.email, "all_services": "on"})
    subscriber.refresh_from_db()
    assert subscriber.unsubscribed_at is not None
    assert not subscriber.all_services


# --- the API: read-only, deliveries need their permission -----------------------------------


def test_api_lists_notices_by_incident_with_counts_and_guards_the_addresses(
    client, smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    from django.contrib.auth.models import Permission

    ann = SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    run_batches(notice)
    other = declare(title="Other", services=[checkout], now=T0)
    compose(other, admin_user)

    viewer = UserFactory(username="viewer", is_staff=False)
    client.force_login(viewer)
    listed = client.get(f"/api/v1/notices/?incident={incident.reference}").json()["results"]
    assert [n["id"] for n in listed] == [notice.pk]
    assert listed[0]["incident"] == incident.reference
    assert listed[0]["services"] == ["checkout"]
    assert listed[0]["deliveries"] == {
        "pending": 0,
        "sending": 0,
        "sent": 1,
        "failed": 0,
        "unknown": 0,
    }
    assert client.get("/api/v1/notices/?incident=INC-999").status_code == 400
    deliveries = f"/api/v1/notices/{notice.pk}/deliveries/"
    refused = client.get(deliveries)
    assert refused.status_code == 403
    assert "view_noticedelivery" in refused.json()["detail"]

    viewer.user_permissions.add(Permission.objects.get(codename="view_noticedelivery"))
    client.force_login(viewer)
    [row] = client.get(deliveries).json()["results"]
    assert row["email"] == ann.email
    assert row["status"] == "sent"
    assert row["attempts"] == 1
    assert row["message_id"] == f"<notice-{notice.pk}-{ann.pk}@localhost>"
    assert row["sent_at"] is not None
    assert row["error"] == ""
    assert client.post("/api/v1/notices/", {}).status_code == 405
    client.logout()
    assert client.get("/api/v1/notices/").status_code in {401, 403}


# --- claims on real PostgreSQL, two connections ---------------------------------------------


def _sending_notice(service, count: int) -> CustomerNotice:
    """A notice already in `sending` with `count` pending rows (written directly: with real
    commits, notice_send would queue its tasks on a real broker)."""
    notice = CustomerNotice.objects.create(
        kind=TemplateKind.CUSTOMER_NOTICE,
        subject="Checkout is slow",
        body_text="We are on it.",
        body_html="<p>We are on it.</p>",
        status=NoticeStatus.SENDING,
        send_requested_at=T0,
    )
    notice.services.add(service)
    for _ in range(count):
        s = SubscriberFactory(services=[service])
        NoticeDelivery.objects.create(
            notice=notice,
            subscriber=s,
            email=s.email,
            message_id=notices.notice_message_id(notice.pk, s.pk),
        )
    return notice


@pytest.mark.django_db(transaction=True)
def test_a_claim_skips_rows_another_connection_holds(checkout):
    import threading

    from django.db import connection, transaction

    notice = _sending_notice(checkout, 5)
    ids = list(NoticeDelivery.objects.order_by("pk").values_list("pk", flat=True))
    locked, release = threading.Event(), threading.Event()

    def hold_two() -> None:
        try:
            with transaction.atomic():
                list(NoticeDelivery.objects.select_for_update().filter(pk__in=ids[:2]))
                locked.set()
                release.wait(timeout=30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_two)
    holder.start()
    assert locked.wait(timeout=30)
    try:
        first = notices._claim(notice.pk, "first", 10, T0)
    finally:
        release.set()
        holder.join(timeout=30)
    assert first == ids[2:]  # the held rows are skipped, not waited for
    assert notices._claim(notice.pk, "first", 10, T0) == ids[:2]
    assert notices._claim(notice.pk, "first", 10, T0) == []
    assert set(NoticeDelivery.objects.values_list("status", flat=True)) == {"sending"}


@pytest.mark.django_db(transaction=True)
def test_two_workers_at_once_mail_each_address_once(smtp_server, checkout, settings):
    import threading

    from django.db import connection

    settings.NOTICE_BATCH_SIZE = 3
    notice = _sending_notice(checkout, 12)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(3):
                notices.notice_deliver_batch(notice_id=notice.pk, mode="first")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    recipients = [m["To"] for m in smtp_server.messages]
    assert len(recipients) == 12
    assert len(set(recipients)) == 12
    assert set(NoticeDelivery.objects.values_list("status", "attempts")) == {("sent", 1)}
    assert CustomerNotice.objects.get().status == NoticeStatus.SENT


# --- review fixes: nothing internal, addresses, backoff, unsubscribing mid-batch ------------

# Dumps every value of the context it is given: whatever a customer's context holds shows.
DUMP_SUBJECT = "{{ incident.title }} {{ incident.status }} {{ maintenance.title }}"
DUMP_BODY = (
    "{% for k, v in incident.items %}{{ k }}={{ v }}\n{% endfor %}"
    "{% for k, v in update.items %}{{ k }}={{ v }}\n{% endfor %}"
    "{% for k, v in maintenance.items %}{{ k }}={{ v }}\n{% endfor %}"
    "{{ incident.services_list }} / {{ maintenance.services_list }}"
)


def _everything_said(message) -> str:
    text, html = parts(message)
    headers = " ".join(f"{name}: {value}" for name, value in message.items())
    return "\n".join([headers, text, html])


def test_nothing_internal_reaches_customers_in_a_notice_of_any_kind(
    smtp_server, checkout, admin_user, django_capture_on_commit_callbacks
):
    """Every internal string contains SECRET (or is the internal status): none may appear in
    any part or header of any customer's message, whatever the notice's kind."""
    from incidents import services as incident_services
    from incidents.comms.updates import status_update_post
    from incidents.models import Severity
    from tests.incidents.factories import SeverityFactory

    SeverityFactory(level=1)
    Severity.objects.filter(level=1).update(name="SECRET-SEV")
    private = ServiceFactory(name="SECRET Ledger", slug="secret-ledger", is_public=False)
    incident = declare(
        title="Payments fail",
        services=[checkout, private],
        impact="partial_outage",
        summary="SECRET summary",
        customer_impact="Some card payments are declined.",
        actor=admin_user,
        now=T0,
    )
    incident_services.incident_add_note(
        incident=incident, body="SECRET note", actor=admin_user, now=T0
    )
    status_update_post(incident=incident, body="SECRET internal update", actor=admin_user, now=T0)
    status_update_post(
        incident=incident,
        body="We found the cause.",
        public=True,
        stage="identified",
        actor=admin_user,
        now=T0,
    )
    incident_services.incident_transition(
        incident=incident, to="mitigating", actor=admin_user, message="SECRET step", now=T0
    )
    incident.refresh_from_db()
    window = MaintenanceWindowFactory(
        title="Database upgrade",
        services=[checkout, private],
        starts_at=T0 + timedelta(days=1),
        ends_at=T0 + timedelta(days=1, hours=1),
    )
    SubscriberFactory(services=[checkout])
    SubscriberFactory(all_services=True)

    composed = []
    for kind in TemplateKind.values:
        about = {"maintenance": window} if kind == TemplateKind.MAINTENANCE else {}
        about = about or {"incident": incident}
        if kind in (TemplateKind.CUSTOMER_NOTICE, TemplateKind.MAINTENANCE):
            # The kind's default template, as the admin uses it.
            composed.append(notices.notice_compose(kind=kind, actor=admin_user, now=T0, **about))
        else:
            # The defaults of these kinds are written for responders: refused, not blanked.
            with pytest.raises(InvalidInput) as refused:
                notices.notice_compose(kind=kind, actor=admin_user, now=T0, **about)
            assert refused.value.field == "template"
            assert "customers are not told" in str(refused.value)
        # A template that prints everything its context holds.
        dump = MessageTemplate.objects.create(
            kind=kind, name=f"Dump {kind}", subject=DUMP_SUBJECT, body=DUMP_BODY
        )
        composed.append(
            notices.notice_compose(kind=kind, template=dump, actor=admin_user, now=T0, **about)
        )
    for notice in composed:
        send(notice, admin_user, django_capture_on_commit_callbacks)
        run_batches(notice)
    messages = smtp_server.messages
    assert len(messages) == 2 * len(composed) == 14
    internal = [
        "SECRET",
        "SEV",
        incident.reference,
        "INC-",
        "Mitigating",  # the internal status
        "Triggered",
    ]
    for message in messages:
        said = _everything_said(message)
        for word in internal:
            assert word not in said, (word, message["Subject"], said)
    dumped = [_everything_said(m) for m in messages if "status=" in _everything_said(m)]
    assert dumped, "the dump templates rendered the incident's context"
    for said in dumped:
        assert "title=Payments fail" in said
        assert "status=Identified" in said  # the latest public update's stage
        assert "body=We found the cause." in said
        assert "services=['Checkout']" in said


def test_a_customer_notice_template_naming_responder_fields_is_refused(incident, admin_user):
    leaky = MessageTemplate.objects.create(
        kind=TemplateKind.CUSTOMER_NOTICE,
        name="Leaky",
        subject="{{ incident.title }}",
        body="{% if incident.severity_level == 1 %}Severe{% endif %} {{ incident.reference }}",
    )
    with pytest.raises(InvalidInput) as refused:
        compose(incident, admin_user, template=leaky)
    assert refused.value.field == "template"
    assert "incident.reference, incident.severity_level" in str(refused.value)
    assert not CustomerNotice.objects.exists()


def test_viewers_do_not_see_the_addresses_of_failed_deliveries(
    client, smtp_server, incident, checkout, admin_user, django_capture_on_commit_callbacks
):
    from django.contrib.auth.models import Permission

    SubscriberFactory(email="refused-customer@example.org", services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    smtp_server.reject_with("550 5.1.1 No such user")
    run_batches(notice)
    change = reverse("admin:incidents_customernotice_change", args=[notice.pk])
    deliveries = f"/api/v1/notices/{notice.pk}/deliveries/"

    viewer = UserFactory(username="vic", groups=["Viewers"])  # staff, as admin users are
    client.force_login(viewer)
    page = client.get(change)
    assert page.status_code == 200
    assert "1 failed" in page.content.decode()  # the counts stay
    assert "refused-customer@example.org" not in page.content.decode()
    assert "failed or unknown" not in page.content.decode()
    assert client.get(deliveries).status_code == 403  # being staff is not enough

    manager = UserFactory(username="meg", groups=["Incident managers"])
    client.force_login(manager)
    assert "refused-customer@example.org" in client.get(change).content.decode()
    assert client.get(deliveries).status_code == 200
    viewer.user_permissions.add(Permission.objects.get(codename="view_noticedelivery"))
    client.force_login(viewer)
    assert "refused-customer@example.org" in client.get(change).content.decode()
    client.force_login(admin_user)  # a superuser
    assert "refused-customer@example.org" in client.get(change).content.decode()


def test_the_sweep_leaves_a_row_in_backoff_until_it_is_due(
    smtp_server, incident, checkout, admin_user, settings, django_capture_on_commit_callbacks
):
    settings.NOTICE_RETRY_BACKOFF = (900,)  # longer than NOTICE_REQUEUE_AFTER (300 s)
    waiting = SubscriberFactory(services=[checkout])
    notice = compose(incident, admin_user)
    send(notice, admin_user, django_capture_on_commit_callbacks)
    smtp_server.reject_with("451 4.3.0 Try again later")
    with time_machine.travel(T0, tick=False):
        run_batches(notice)  # its retry task is queued for T0 + 15 min (dropped here)
    smtp_server.reject_with(None)
    row = NoticeDelivery.objects.get(email=waiting.email)
    assert (row.status, row.sent_at) == (DeliveryState.PENDING, T0 + timedelta(minutes=15))

    # Another delivery of the notice whose task was lost: the sweep queues a batch for it.
    late = SubscriberFactory(services=[checkout])
    NoticeDelivery.objects.create(
        notice=notice,
        subscriber=late,
        email=late.email,
        message_id=notices.notice_message_id(notice.pk, late.pk),
    )
    at = T0 + timedelta(minutes=10)
    with (
        time_machine.travel(at, tick=False),
        django_capture_on_commit_callbacks(execute=False) as queued,
    ):
        assert notices.notices_sweep()["queued"] == 1
    [batch] = queued
    assert batch.args == (notice.pk, "any")
    with time_machine.travel(at, tick=False):
        assert notices.notice_deliver_batch(notice_id=notice.pk, mode="any").claimed == 1
    assert [m["To"] for m in smtp_server.messages] == [late.email]
    row.refresh_from_db()
    assert (row.status, row.attempts) == (DeliveryState.PENDING, 1)  # not touched early
    with (
        time_machine.travel(T0 + timedelta(minutes=14), tick=False),
        django_capture_on_commit_callbacks(execute=False) as queued,
    ):
        assert notices.notices_sweep()["queued"] == 0  # only a row in backoff: nothing
    assert queued == []

    # Its retry task was lost too: once it is due (and waited), the sweep queues it.
    with (
        time_machine.travel(T0 + timedelta(minutes=21), tick=False),
        django_capture_on_commit_callbacks(execute=False) as queued,
    ):
        assert notices.notices_sweep()["queued"] == 1
    assert len(queued) == 1
    with time_machine.travel(T0 + timedelta(minutes=21), tick=False):
        assert notices.notice_deliver_batch(notice_id=notice.pk, mode="any").sent == 1
    assert [m["To"] for m in smtp_server.messages] == [late.email, waiting.email]
    row.refresh_from_db()
    assert (row.status, row.attempts) == (DeliveryState.SENT, 2)
    assert row.sent_at == T0 + timedelta(minutes=21)


@pytest.mark.django_db(transaction=True)
def test_someone_who_unsubscribes_during_a_batch_is_not_mailed(checkout, settings):
    """The batch re-reads its subscribers' state every RECHECK_EVERY messages: the one who
    unsubscribes while the first message is on its way is dropped from a later group."""
    from tests.incidents.notice_support import HookedSMTPServer

    count = notices.RECHECK_EVERY + 3
    notice = _sending_notice(checkout, count)
    rows = list(NoticeDelivery.objects.order_by("pk").select_related("subscriber"))
    leaver = rows[-1].subscriber

    def unsubscribe_the_last_one(received: int) -> None:
        if received == 1:
            notices.subscriber_unsubscribe(token=leaver.unsubscribe_token)

    server = HookedSMTPServer(unsubscribe_the_last_one)
    for _ in smtp_server_at(server, settings):
        report = notices.notice_deliver_batch(notice_id=notice.pk)
    assert (report.claimed, report.sent, report.failed) == (count, count - 1, 1)
    recipients = [m["To"] for m in server.messages]
    assert leaver.email not in recipients
    assert len(recipients) == count - 1
    row = NoticeDelivery.objects.get(subscriber=leaver)
    assert (row.status, row.error) == (DeliveryState.FAILED, "unsubscribed before it was sent")


def test_subscribers_are_rechecked_with_one_query_per_group(
    smtp_server, checkout, settings, django_assert_max_num_queries
):
    """Re-reading subscribers costs a query per RECHECK_EVERY messages, not per message."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    notice = _sending_notice(checkout, 2 * notices.RECHECK_EVERY + 1)
    with CaptureQueriesContext(connection) as captured:
        report = notices.notice_deliver_batch(notice_id=notice.pk)
    assert report.sent == 2 * notices.RECHECK_EVERY + 1
    reads = [q for q in captured if 'FROM "incidents_subscriber"' in q["sql"]]
    assert len(reads) == 3
