"""Subscribing to customer notices: the public pages, double opt-in through a real SMTP
server, one-click unsubscribe (RFC 8058), and every refusal leaving nothing behind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core import signing
from django.test import Client

from incidents import tasks
from incidents.comms import notices
from incidents.exceptions import InvalidInput
from incidents.models import NoticeDelivery, Subscriber, TemplateKind
from tests.incidents.factories import ServiceFactory, SubscriberFactory, UserFactory, declare
from tests.incidents.notice_support import link, parts

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
SUBSCRIBE = "/status/subscribe/"


@pytest.fixture
def checkout():
    return ServiceFactory(name="Checkout", slug="checkout")


@pytest.fixture
def search():
    return ServiceFactory(name="Search", slug="search")


def deliver_confirmations(callbacks) -> int:
    """Run what the subscribe request queued, as the worker would: the confirmation task."""
    sent = 0
    for callback in callbacks:
        assert callback.func is notices._enqueue_confirmation
        sent += tasks.send_subscriber_confirmation(*callback.args)
    return sent


def subscribe(client, capture, **data):
    with capture(execute=False) as callbacks:
        response = client.post(SUBSCRIBE, data)
    return response, callbacks


def test_double_opt_in_end_to_end_through_the_public_pages(
    client, smtp_server, checkout, search, django_capture_on_commit_callbacks
):
    ServiceFactory(name="Ledger", slug="ledger", is_public=False)
    page = client.get(SUBSCRIBE)
    assert page.status_code == 200
    body = page.content.decode()
    assert "Checkout" in body
    assert "Search" in body
    assert "Ledger" not in body

    response, callbacks = subscribe(
        client,
        django_capture_on_commit_callbacks,
        email="  Ann@Example.ORG ",
        services=[checkout.pk],
    )
    assert response.status_code == 200
    assert "Check your inbox" in response.content.decode()
    subscriber = Subscriber.objects.get()
    assert subscriber.email == "ann@example.org"
    assert not subscriber.is_active
    assert deliver_confirmations(callbacks) == 1

    [message] = smtp_server.messages
    assert message["To"] == "ann@example.org"
    assert message["Subject"] == "Confirm your subscription to Service status"
    text, html = parts(message)
    assert "Checkout" in text
    assert "Confirm the subscription" in html
    confirm = link(message, "/status/confirm/")

    # Following the link shows what is confirmed; only the button confirms it.
    shown = client.get(confirm)
    assert shown.status_code == 200
    assert "Confirm your subscription" in shown.content.decode()
    subscriber.refresh_from_db()
    assert subscriber.confirmed_at is None
    done = client.post(confirm)
    assert done.status_code == 200
    assert "You are subscribed" in done.content.decode()
    subscriber.refresh_from_db()
    assert subscriber.is_active
    assert client.post(confirm).status_code == 200  # idempotent

    # And now a notice about a Checkout incident reaches the address, once.
    smtp_server.clear()
    root = UserFactory(username="root", is_superuser=True)
    incident = declare(title="Payments fail", services=[checkout])
    notice = notices.notice_compose(
        kind=TemplateKind.CUSTOMER_NOTICE, incident=incident, actor=root
    )
    with django_capture_on_commit_callbacks(execute=False):
        assert notices.notice_send(notice=notice, actor=root) == 1
    tasks.deliver_notice_batch(notice.pk)
    [notice_mail] = smtp_server.messages
    assert notice_mail["To"] == "ann@example.org"

    # Its one-click link unsubscribes: a GET only asks, the POST does it.
    unsubscribe = link(notice_mail, "/status/unsubscribe/")
    asked = client.get(unsubscribe)
    assert asked.status_code == 200
    assert "Stop every notice" in asked.content.decode()
    subscriber.refresh_from_db()
    assert subscriber.unsubscribed_at is None
    assert client.post(unsubscribe).status_code == 200
    subscriber.refresh_from_db()
    assert subscriber.unsubscribed_at is not None
    assert notices.notice_recipients([checkout.pk]).count() == 0


def test_the_answer_is_the_same_for_a_subscribed_address_and_no_mail_goes_to_it(
    client, smtp_server, checkout, search, django_capture_on_commit_callbacks
):
    fresh, fresh_callbacks = subscribe(
        client, django_capture_on_commit_callbacks, email="new@example.org", services=[search.pk]
    )
    member = SubscriberFactory(email="member@example.org", services=[checkout])
    known, known_callbacks = subscribe(
        client,
        django_capture_on_commit_callbacks,
        email="member@example.org",
        services=[search.pk],
    )
    assert fresh.status_code == known.status_code == 200

    def answer(response) -> str:
        return (
            response.content.decode()
            .replace("new@example.org", "X")
            .replace("member@example.org", "X")
        )

    assert answer(fresh) == answer(known)
    assert len(fresh_callbacks) == 1
    assert known_callbacks == []
    member.refresh_from_db()
    assert member.is_active  # still the same subscriber, still confirmed
    assert sorted(s.slug for s in member.services.all()) == ["checkout", "search"]


def test_a_confirmation_is_sent_again_at_most_every_quarter_hour(
    client, smtp_server, checkout, django_capture_on_commit_callbacks
):
    data = {"email": "ann@example.org", "services": [checkout.pk]}
    sent = []
    for minutes in (0, 5, 14, 16):
        with time_machine.travel(T0 + timedelta(minutes=minutes), tick=False):
            response, callbacks = subscribe(client, django_capture_on_commit_callbacks, **data)
            assert response.status_code == 200
            sent.append(deliver_confirmations(callbacks))
    assert sent == [1, 0, 0, 1]
    assert len(smtp_server.messages) == 2


@pytest.mark.parametrize(
    ("email", "error"),
    [
        ("not-an-address", "Email is not a valid email address."),
        ("ann@example.org\r\nBcc: all@example.org", "Email must be one line (no CR or LF)."),
        ("ann@example.org\n", "Email must be one line (no CR or LF)."),
        ("", "This field is required."),
    ],
)
def test_a_bad_address_is_refused_and_nothing_is_stored_or_sent(
    client, smtp_server, checkout, django_capture_on_commit_callbacks, email, error
):
    response, callbacks = subscribe(
        client, django_capture_on_commit_callbacks, email=email, services=[checkout.pk]
    )
    assert response.status_code == 400
    assert error in response.content.decode()
    assert callbacks == []
    assert not Subscriber.objects.exists()
    assert not smtp_server.messages


def test_a_private_or_missing_service_and_no_choice_are_refused(
    client, checkout, django_capture_on_commit_callbacks
):
    private = ServiceFactory(name="Ledger", slug="ledger", is_public=False)
    response, _ = subscribe(
        client, django_capture_on_commit_callbacks, email="a@example.org", services=[private.pk]
    )
    assert response.status_code == 400
    assert "Ledger" not in response.content.decode()
    response, _ = subscribe(client, django_capture_on_commit_callbacks, email="a@example.org")
    assert response.status_code == 400
    assert "choose at least one service, or all services" in response.content.decode()
    with pytest.raises(InvalidInput, match="no public service with id"):
        notices.subscriber_subscribe(email="a@example.org", service_ids=[private.pk])
    assert not Subscriber.objects.exists()


def test_all_services_needs_no_service_ticked(
    client, smtp_server, django_capture_on_commit_callbacks
):
    response, callbacks = subscribe(
        client, django_capture_on_commit_callbacks, email="all@example.org", all_services="on"
    )
    assert response.status_code == 200
    assert len(callbacks) == 1
    assert Subscriber.objects.get().all_services


def test_the_form_needs_its_csrf_token_but_one_click_unsubscribe_does_not(checkout):
    strict = Client(enforce_csrf_checks=True)
    refused = strict.post(SUBSCRIBE, {"email": "a@example.org", "services": [checkout.pk]})
    assert refused.status_code == 403
    assert not Subscriber.objects.exists()

    subscriber = SubscriberFactory(services=[checkout])
    # RFC 8058: the mail provider POSTs this body to the List-Unsubscribe URL, no token.
    response = strict.post(
        f"/status/unsubscribe/{subscriber.unsubscribe_token}/",
        "List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 200
    subscriber.refresh_from_db()
    first = subscriber.unsubscribed_at
    assert first is not None
    assert strict.post(f"/status/unsubscribe/{subscriber.unsubscribe_token}/").status_code == 200
    subscriber.refresh_from_db()
    assert subscriber.unsubscribed_at == first  # idempotent: the first time is kept


def test_bad_and_expired_links_are_refused(client, checkout, settings):
    subscriber = notices.subscriber_subscribe(
        email="ann@example.org", service_ids=[checkout.pk], now=T0
    )
    token = notices.confirmation_token(subscriber)
    assert client.get("/status/confirm/garbage/").status_code == 404
    assert client.post(f"/status/confirm/{token}x/").status_code == 404
    assert client.post("/status/unsubscribe/no-such-token/").status_code == 404
    settings.SUBSCRIBE_CONFIRM_MAX_AGE = 60
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=2), tick=False):
        response = client.post(f"/status/confirm/{token}/")
    assert response.status_code == 404
    assert "expired" in response.content.decode()
    forged = signing.dumps(
        {"id": subscriber.pk, "email": subscriber.email, "sent": 0}, salt="another-salt"
    )
    assert client.post(f"/status/confirm/{forged}/").status_code == 404
    subscriber.refresh_from_db()
    assert subscriber.confirmed_at is None


def test_an_old_confirmation_link_cannot_undo_an_unsubscribe(checkout):
    subscriber = notices.subscriber_subscribe(
        email="ann@example.org", service_ids=[checkout.pk], now=T0
    )
    token = notices.confirmation_token(subscriber)
    notices.subscriber_confirm(token=token, now=T0 + timedelta(minutes=1))
    notices.subscriber_unsubscribe(
        token=subscriber.unsubscribe_token, now=T0 + timedelta(minutes=2)
    )
    with pytest.raises(InvalidInput, match="sent before the address unsubscribed"):
        notices.subscriber_confirm(token=token, now=T0 + timedelta(minutes=3))
    subscriber.refresh_from_db()
    assert not subscriber.is_active


def test_subscribing_again_after_leaving_needs_a_new_confirmation(
    smtp_server, checkout, search, django_capture_on_commit_callbacks
):
    subscriber = SubscriberFactory(email="ann@example.org", services=[checkout])
    notices.subscriber_unsubscribe(token=subscriber.unsubscribe_token, now=T0)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        notices.subscriber_subscribe(
            email="ann@example.org", service_ids=[search.pk], now=T0 + timedelta(days=1)
        )
    deliver_confirmations(callbacks)
    subscriber.refresh_from_db()
    assert not subscriber.is_active  # nothing is sent until it is confirmed again
    assert [s.slug for s in subscriber.services.all()] == ["search"]  # what was asked now
    [message] = smtp_server.messages
    token = link(message, "/status/confirm/").split("/")[-2]
    notices.subscriber_confirm(token=token)
    subscriber.refresh_from_db()
    assert subscriber.is_active


def test_untrusted_text_on_the_public_pages_is_escaped(client, django_capture_on_commit_callbacks):
    ServiceFactory(name="<script>alert(1)</script>", slug="evil")
    page = client.get(SUBSCRIBE).content.decode()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    response, _ = subscribe(
        client, django_capture_on_commit_callbacks, email="o'hara@example.org", all_services="on"
    )
    assert response.status_code == 200
    assert "o&#x27;hara@example.org" in response.content.decode()


def test_an_unconfirmed_address_gets_no_notice(
    smtp_server, checkout, django_capture_on_commit_callbacks
):
    notices.subscriber_subscribe(email="pending@example.org", service_ids=[checkout.pk])
    root = UserFactory(username="root", is_superuser=True)
    incident = declare(title="Down", services=[checkout])
    notice = notices.notice_compose(
        kind=TemplateKind.CUSTOMER_NOTICE, incident=incident, actor=root
    )
    with django_capture_on_commit_callbacks(execute=False):
        assert notices.notice_send(notice=notice, actor=root) == 0
    assert not NoticeDelivery.objects.exists()
    assert not smtp_server.messages
