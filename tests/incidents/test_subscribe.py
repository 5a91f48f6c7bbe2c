"""Subscribing to customer notices: the public pages, double opt-in through a real SMTP
server, one-click unsubscribe (RFC 8058), and every refusal leaving nothing behind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core import signing
from django.core.cache import cache
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


@pytest.fixture(autouse=True)
def fresh_throttle():
    """The subscribe throttle counts in Redis across tests; each test starts from zero."""
    cache.clear()


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


def test_the_answer_is_the_same_for_a_subscribed_address_whose_services_do_not_change(
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
    assert [c.func for c in known_callbacks] == [notices._enqueue_change]  # a link, no more
    member.refresh_from_db()
    assert member.is_active  # still the same subscriber, still confirmed
    assert [s.slug for s in member.services.all()] == ["checkout"]  # unchanged until confirmed


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


# --- review fixes: a confirmed subscription widens only by its owner's link; the throttle ---


def test_widening_a_confirmed_subscription_needs_the_owners_confirmation(
    client, smtp_server, checkout, search, django_capture_on_commit_callbacks
):
    other = ServiceFactory(name="Payments", slug="payments")
    member = SubscriberFactory(
        email="member@example.org", services=[checkout], confirmed_at=T0 - timedelta(days=1)
    )
    with time_machine.travel(T0, tick=False):
        response, callbacks = subscribe(
            client,
            django_capture_on_commit_callbacks,
            email="member@example.org",
            services=[search.pk, checkout.pk],
        )
        assert response.status_code == 200
        assert "Check your inbox" in response.content.decode()
        member.refresh_from_db()
        assert [s.slug for s in member.services.all()] == ["checkout"]  # nothing changed
        [job] = callbacks
        assert job.func is notices._enqueue_change
        assert job.args == (member.pk, [search.pk], False)  # only what is new
        assert tasks.send_subscription_change(*job.args) is True
    [message] = smtp_server.messages
    assert message["To"] == "member@example.org"
    assert message["Subject"] == "Confirm the change to your Service status notices"
    text, _html = parts(message)
    assert "asked to add to the Service status notices this address gets: Search." in text
    change = link(message, "/status/confirm/")

    # Asking again within the quarter hour, even for something else: no second mail.
    with time_machine.travel(T0 + timedelta(minutes=5), tick=False):
        response, callbacks = subscribe(
            client,
            django_capture_on_commit_callbacks,
            email="member@example.org",
            services=[other.pk],
        )
    assert (response.status_code, callbacks) == (200, [])

    # The link shows the change; only the button applies it, and only what it carries.
    with time_machine.travel(T0 + timedelta(minutes=10), tick=False):
        shown = client.get(change).content.decode()
        assert "Confirm the change" in shown
        assert "Search" in shown
        member.refresh_from_db()
        assert [s.slug for s in member.services.all()] == ["checkout"]
        done = client.post(change)
        assert done.status_code == 200
        assert "Your subscription is updated" in done.content.decode()
        assert client.post(change).status_code == 200  # idempotent
    member.refresh_from_db()
    assert member.is_active
    assert sorted(s.slug for s in member.services.all()) == ["checkout", "search"]
    assert not member.all_services


def test_all_services_for_a_confirmed_subscriber_waits_for_the_link_and_dies_with_it(
    smtp_server, checkout, django_capture_on_commit_callbacks
):
    member = SubscriberFactory(
        email="member@example.org", services=[checkout], confirmed_at=T0 - timedelta(days=1)
    )
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        notices.subscriber_subscribe(
            email="member@example.org", service_ids=[], all_services=True, now=T0
        )
    [job] = callbacks
    assert job.args == (member.pk, [], True)
    member.refresh_from_db()
    assert not member.all_services
    tasks.send_subscription_change(*job.args)
    token = link(smtp_server.messages[0], "/status/confirm/").split("/")[-2]
    # Unsubscribed since: the old link cannot bring the subscription back, or widen it.
    notices.subscriber_unsubscribe(token=member.unsubscribe_token, now=T0 + timedelta(hours=1))
    with pytest.raises(InvalidInput, match="subscription that has ended"):
        notices.subscriber_confirm(token=token, now=T0 + timedelta(hours=2))
    member.refresh_from_db()
    assert (member.is_active, member.all_services) == (False, False)


def test_a_forged_change_is_refused(client, checkout, search):
    member = SubscriberFactory(email="member@example.org", services=[checkout])
    forged = signing.dumps(
        {"id": member.pk, "email": member.email, "sent": T0.timestamp(), "add": [search.pk]},
        salt="another-salt",
    )
    assert client.post(f"/status/confirm/{forged}/").status_code == 404
    member.refresh_from_db()
    assert [s.slug for s in member.services.all()] == ["checkout"]


def test_subscribe_posts_are_throttled_per_client_address(
    client, smtp_server, checkout, settings, django_capture_on_commit_callbacks
):
    settings.SUBSCRIBE_THROTTLE_PER_HOUR = 2
    data = {"services": [checkout.pk]}
    with time_machine.travel(T0, tick=False):
        for n in range(2):
            response, _ = subscribe(
                client, django_capture_on_commit_callbacks, email=f"a{n}@example.org", **data
            )
            assert response.status_code == 200
        response, callbacks = subscribe(
            client, django_capture_on_commit_callbacks, email="late@example.org", **data
        )
        assert response.status_code == 429
        assert "Too many requests" in response.content.decode()
        assert response["Retry-After"] == "3600"
        assert callbacks == []
        assert not Subscriber.objects.filter(email="late@example.org").exists()
        # Another client is counted on its own.
        other = Client(REMOTE_ADDR="192.0.2.7")
        response, _ = subscribe(
            other, django_capture_on_commit_callbacks, email="other@example.org", **data
        )
        assert response.status_code == 200
        assert client.get(SUBSCRIBE).status_code == 200  # the form itself is not throttled
    with time_machine.travel(T0 + timedelta(hours=1), tick=False):
        response, _ = subscribe(
            client, django_capture_on_commit_callbacks, email="late@example.org", **data
        )
        assert response.status_code == 200
    assert not smtp_server.messages  # the confirmations were never delivered here


def test_the_subscribe_throttle_lets_requests_through_when_the_cache_is_down(
    client, checkout, settings, django_capture_on_commit_callbacks
):
    from tests.escalation.processes import free_port

    settings.SUBSCRIBE_THROTTLE_PER_HOUR = 1
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
    for n in range(3):
        response, _ = subscribe(
            client,
            django_capture_on_commit_callbacks,
            email=f"a{n}@example.org",
            services=[checkout.pk],
        )
        assert response.status_code == 200
    assert Subscriber.objects.count() == 3
