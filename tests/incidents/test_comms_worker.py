"""Customer email end to end with the real moving parts: a Celery worker and beat (their
own processes, a private Redis as broker) send through a real SMTP server that this test
starts. Subscribing mails a confirmation, the link confirms, a notice reaches every
confirmed subscriber exactly once, and the notice ends up sent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from django.test import Client

from config.celery import app
from incidents.comms import notices
from incidents.models import (
    CustomerNotice,
    DeliveryState,
    NoticeDelivery,
    NoticeStatus,
    Subscriber,
    TemplateKind,
)
from tests.escalation.processes import ProcessGroup, child_env, wait_until

from .factories import ServiceFactory, SeverityFactory, UserFactory, declare
from .notice_support import link, parts

pytestmark = pytest.mark.django_db(transaction=True)
WAIT = 60


@contextlib.contextmanager
def enqueueing_to(broker_url: str) -> Iterator[None]:
    """Tasks this process enqueues (on commit, as services do) go to `broker_url`, the
    private Redis the worker listens to. Celery keeps its connection pools: drop them."""

    def drop_pools() -> None:
        if app._pool is not None:
            app._pool.force_close_all()
            app._pool = None
        app.amqp._producer_pool = None

    saved = app.conf.broker_url
    drop_pools()
    app.conf.broker_url = broker_url
    try:
        yield
    finally:
        drop_pools()
        app.conf.broker_url = saved


def test_a_worker_mails_confirmations_and_a_notice_once_to_each_confirmed_subscriber(
    smtp_server, tmp_path
):
    checkout = ServiceFactory(name="Checkout", slug="checkout")
    search = ServiceFactory(name="Search", slug="search")
    root = UserFactory(username="root", is_superuser=True)
    addresses = [f"customer{n}@example.org" for n in range(3)]

    with ProcessGroup(tmp_path) as group:
        redis = group.redis()
        env = child_env(broker_url=redis.url, **smtp_server.env())
        group.worker("mail", env)
        group.beat("beat", env)
        with enqueueing_to(redis.url):
            for address in addresses:
                notices.subscriber_subscribe(email=address, service_ids=[checkout.pk])
            # Subscribed to another service only: must get the confirmation, not the notice.
            notices.subscriber_subscribe(email="other@example.org", service_ids=[search.pk])
            wait_until(lambda: len(smtp_server.messages) == 4, timeout=WAIT, what="4 confirmations")
            client = Client()
            for message in list(smtp_server.messages):
                assert client.post(link(message, "/status/confirm/")).status_code == 200
            assert Subscriber.objects.filter(confirmed_at__isnull=False).count() == 4

            incident = declare(
                title="Payments fail",
                services=[checkout],
                impact="partial_outage",
                severity=SeverityFactory(level=1),
                actor=root,
            )
            notice = notices.notice_compose(
                kind=TemplateKind.CUSTOMER_NOTICE, incident=incident, actor=root
            )
            assert notices.notice_send(notice=notice, actor=root) == 3

            def sent() -> bool:
                return CustomerNotice.objects.get(pk=notice.pk).status == NoticeStatus.SENT

            wait_until(sent, timeout=WAIT, what="the notice to be sent")

    received = [m for m in smtp_server.messages if m["Subject"] == notice.subject]
    assert sorted(m["To"] for m in received) == addresses  # each once, nobody else
    for message in received:
        delivery = NoticeDelivery.objects.get(email=message["To"])
        assert message["Message-ID"] == delivery.message_id
        assert "/status/unsubscribe/" in message["List-Unsubscribe"]
        assert "Payments fail" in message["Subject"]
        text, html = parts(message)
        assert "affecting Checkout" in text
        assert "affecting Checkout" in html
    assert set(NoticeDelivery.objects.values_list("status", flat=True)) == {DeliveryState.SENT}
