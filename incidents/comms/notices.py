"""Customer notices by email: subscribers (double opt-in), composing and sending notices, and
their per-recipient deliveries (docs/notices.md).

Subscribing is public and anonymous, so it says nothing about who is subscribed: a new, a
pending and an already confirmed address get the same answer. Nothing but the confirmation
email goes to an address before its owner follows the signed, expiring link in it, and a
confirmed subscription widens only through such a link too (the change is signed into it).

Deliveries are an outbox. `notice_send` turns a draft into one `NoticeDelivery` row per
recipient, each with a Message-ID fixed from (notice, subscriber), and queues batch tasks on
commit. `notice_deliver_batch` claims pending rows (pending -> sending, skip-locked), sends
them over one SMTP connection, and records each outcome: sent; pending again with backoff
for a temporary refusal; failed for a permanent one; unknown when the connection dropped
after the message data went out. An unknown row is never sent again by the tracker: the
subscriber may have it already. `notices_sweep` (beat) marks rows left in `sending` by a
dead worker as unknown, queues again what a lost task left pending, and closes finished
notices.

`sent_at` of a delivery depends on its state: while `sending`, when the attempt started
(the stuck-send sweep reads it); once `sent`, when the mail server accepted the message;
while `pending` after a failed attempt (`attempts > 0`), when the next attempt is due (no
batch claims the row before then, and the sweep queues a batch only for rows that are
due); otherwise empty. The API and the admin show it for sent rows only.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import smtplib
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.core import signing
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.mail import EmailMultiAlternatives, get_connection
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.core.validators import EmailValidator
from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, F, OuterRef, Q, QuerySet
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from escalation.channels import _mail_domain, one_line
from incidents.exceptions import InvalidInput, RetryLater
from incidents.models import (
    CustomerNotice,
    DeliveryState,
    EventKind,
    Incident,
    MaintenanceWindow,
    MessageTemplate,
    NoticeDelivery,
    NoticeStatus,
    Service,
    Subscriber,
    TemplateKind,
)
from incidents.services import timeline_record

from .templates import CUSTOMERS, render_message, responder_names, template_source

logger = logging.getLogger(__name__)

CONFIRM_SALT = "incidents.subscriber-confirm"
# Every knob can be set in settings; these are the defaults.
DEFAULTS: dict[str, Any] = {
    # How long a confirmation link stays valid.
    "SUBSCRIBE_CONFIRM_MAX_AGE": 3 * 24 * 3600,
    # A confirmation is sent again to the same address at most this often (seconds).
    "SUBSCRIBE_RESEND_AFTER": 15 * 60,
    # Deliveries claimed and sent over one SMTP connection by one task.
    "NOTICE_BATCH_SIZE": 200,
    # A batch stops claiming work after this many seconds and queues the rest, well inside
    # the task's time limit.
    "NOTICE_BATCH_SECONDS": 60.0,
    # Waits before the 2nd, 3rd and 4th attempt after a temporary refusal; then failed.
    "NOTICE_RETRY_BACKOFF": (30, 120, 600),
    # A delivery still `sending` after this long was being sent by a worker that died: its
    # outcome is unknown. Longer than a task's hard time limit.
    "NOTICE_SENDING_STUCK_AFTER": 600.0,
    # A sending notice whose pending rows have waited this long is queued again (a lost
    # task, a broker outage at commit time).
    "NOTICE_REQUEUE_AFTER": 300.0,
    # Also offer `mailto:` in List-Unsubscribe when set (an address that handles it).
    "NOTICE_UNSUBSCRIBE_MAILTO": "",
    # Subscribe requests (POSTs of the public form) one client address may make per hour;
    # 0 turns the throttle off. The address is REMOTE_ADDR: behind a proxy, set it from the
    # proxy's header (docs/notices.md).
    "SUBSCRIBE_THROTTLE_PER_HOUR": 20,
}
# Sent rows are recorded in groups of this many (and at the end of a batch): a worker that
# dies leaves at most this many sent messages recorded as unknown.
SENT_FLUSH = 20
# A batch re-reads its subscribers' state before each group of this many messages, so one
# who unsubscribes during a batch is dropped within a group (one query per group).
RECHECK_EVERY = 20
SWEEP_LIMIT = 1000
MODES = ("first", "retry", "any")
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def setting(name: str) -> Any:
    return getattr(settings, name, DEFAULTS[name])


# --- subscribers ----------------------------------------------------------------------------


def clean_email(value: Any) -> str:
    """A valid address, stripped and lower-cased (one subscriber per mailbox), or
    InvalidInput("email"). CR, LF and other control characters are refused, not removed."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput("email", "is required.")
    if "\r" in value or "\n" in value:
        raise InvalidInput("email", "must be one line (no CR or LF).")
    address = value.strip()
    if _HEADER_UNSAFE.search(address):
        raise InvalidInput("email", "contains control characters.")
    if len(address) > 254:
        raise InvalidInput("email", "is longer than 254 characters.")
    try:
        EmailValidator()(address)
    except ValidationError as error:
        raise InvalidInput("email", "is not a valid email address.") from error
    return address.lower()


def public_services(field: str, service_ids: Iterable[Any]) -> list[Service]:
    """The public services with these ids, or InvalidInput(field). A private service is
    reported exactly like a missing one: the public form must not reveal it exists."""
    ids: set[int] = set()
    for value in service_ids:
        if isinstance(value, Service):
            value = value.pk
        try:
            if isinstance(value, bool):
                raise TypeError
            ids.add(int(value))
        except (TypeError, ValueError):
            raise InvalidInput(field, f"{str(value)[:50]!r} is not a service id.") from None
    found = list(Service.objects.filter(pk__in=ids, is_public=True).order_by("name"))
    missing = ids - {service.pk for service in found}
    if missing:
        raise InvalidInput(field, f"there is no public service with id {min(missing)}.")
    return found


def _new_unsubscribe_token() -> str:
    return secrets.token_urlsafe(32)


def _lock_or_create(address: str, now: datetime) -> tuple[Subscriber, bool]:
    subscriber = Subscriber.objects.select_for_update().filter(email=address).first()
    if subscriber is not None:
        return subscriber, False
    try:
        with transaction.atomic():
            return Subscriber.objects.create(
                email=address, created_at=now, unsubscribe_token=_new_unsubscribe_token()
            ), True
    except IntegrityError:  # subscribed concurrently
        return Subscriber.objects.select_for_update().get(email=address), False


def subscriber_subscribe(
    *,
    email: str,
    service_ids: Iterable[Any] = (),
    all_services: bool = False,
    now: datetime | None = None,
) -> Subscriber:
    """Ask for notices about some public services (or all of them) at `email`.

    A new, a not yet confirmed or an unsubscribed address gets a confirmation email (queued
    on commit; at most once per SUBSCRIBE_RESEND_AFTER) and receives nothing else until it
    is confirmed. A confirmed address is left as it is: what it would gain is signed into
    a confirmation link mailed to it (same queue, same rate limit), and applied only when
    that link is confirmed. The caller answers the same whatever happened here. One
    transaction."""
    now = now or timezone.now()
    address = clean_email(email)
    services = public_services("services", service_ids)
    if not services and not all_services:
        raise InvalidInput("services", "choose at least one service, or all services.")
    with transaction.atomic():
        subscriber, _created = _lock_or_create(address, now)
        if subscriber.is_active:
            _request_change(subscriber, services, bool(all_services), now)
            return subscriber
        if subscriber.unsubscribed_at is not None:
            # Subscribing again after leaving: what is asked now replaces what was asked
            # before, and it takes effect only once confirmed again.
            subscriber.services.set(services)
            subscriber.all_services = bool(all_services)
        else:
            subscriber.services.add(*services)
            subscriber.all_services = subscriber.all_services or bool(all_services)
        fields = ["all_services"]
        if _may_send_confirmation(subscriber, now):
            subscriber.confirmation_sent_at = now
            fields.append("confirmation_sent_at")
            transaction.on_commit(partial(_enqueue_confirmation, subscriber.pk))
        subscriber.save(update_fields=fields)
    return subscriber


def _request_change(
    subscriber: Subscriber, services: list[Service], all_services: bool, now: datetime
) -> None:
    """An active subscriber asked for more: mail the change to the address for confirmation
    (nothing changes now). Nothing new asked, or a confirmation sent too recently: nothing
    is sent."""
    if subscriber.all_services:
        return
    followed = set(subscriber.services.values_list("pk", flat=True))
    add = sorted(service.pk for service in services if service.pk not in followed)
    if not add and not all_services:
        return
    if not _may_send_confirmation(subscriber, now):
        return
    subscriber.confirmation_sent_at = now
    subscriber.save(update_fields=["confirmation_sent_at"])
    transaction.on_commit(partial(_enqueue_change, subscriber.pk, add, all_services))


def _enqueue_change(subscriber_id: int, service_ids: list[int], all_services: bool) -> None:
    from incidents.tasks import send_subscription_change

    try:
        send_subscription_change.delay(subscriber_id, service_ids, all_services)
    except Exception:  # noqa: BLE001 - the broker is down; subscribing again re-sends it
        logger.warning("could not queue the change confirmation of subscriber %s", subscriber_id)


def subscribe_throttle_allows(*, client_ip: str, now: datetime | None = None) -> bool:
    """Count one subscribe request from `client_ip` in this hour's window; False once
    SUBSCRIBE_THROTTLE_PER_HOUR is passed. Keyed by a hash of the address (the cache holds
    no addresses). A cache that cannot be reached lets the request through, like the alert
    webhook's throttle: the confirmation's own rate limit still holds."""
    limit = setting("SUBSCRIBE_THROTTLE_PER_HOUR")
    if not limit:
        return True
    now = now or timezone.now()
    digest = hashlib.sha256(f"{settings.SECRET_KEY}:{client_ip}".encode()).hexdigest()[:32]
    key = f"subscribe-throttle:{digest}:{int(now.timestamp() // 3600)}"
    try:
        cache.add(key, 0, timeout=2 * 3600)
        count = cache.incr(key)
    except Exception:  # noqa: BLE001 - fail open, see above
        logger.warning("subscribe throttle cache unavailable; not counting", exc_info=True)
        return True
    return count <= limit


def _may_send_confirmation(subscriber: Subscriber, now: datetime) -> bool:
    last = subscriber.confirmation_sent_at
    if last is None or last > now:
        return True
    return now - last >= timedelta(seconds=setting("SUBSCRIBE_RESEND_AFTER"))


def _enqueue_confirmation(subscriber_id: int) -> None:
    from incidents.tasks import send_subscriber_confirmation

    try:
        send_subscriber_confirmation.delay(subscriber_id)
    except Exception:  # noqa: BLE001 - the broker is down; subscribing again re-sends it
        logger.warning("could not queue the confirmation of subscriber %s", subscriber_id)


def confirmation_token(
    subscriber: Subscriber, *, add: Sequence[int] = (), all_services: bool = False
) -> str:
    """A signed, expiring token for `subscriber`'s confirmation link. It carries when the
    confirmation was sent, so a link older than an unsubscribe cannot undo it. For an
    active subscriber it also carries the change asked for (`add`, `all_services`): the
    link applies that change and nothing else."""
    sent = subscriber.confirmation_sent_at or subscriber.created_at
    payload: dict[str, Any] = {"id": subscriber.pk, "email": subscriber.email}
    payload["sent"] = sent.timestamp()
    if add or all_services:
        payload["add"] = [int(pk) for pk in add]
        payload["all"] = bool(all_services)
    return signing.dumps(payload, salt=CONFIRM_SALT, compress=True)


def confirm_url(
    subscriber: Subscriber, *, add: Sequence[int] = (), all_services: bool = False
) -> str:
    token = confirmation_token(subscriber, add=add, all_services=all_services)
    return settings.SITE_URL + reverse("subscribe:confirm", args=[token])


def unsubscribe_url(token: str) -> str:
    return settings.SITE_URL + reverse("subscribe:unsubscribe", args=[token])


def _confirmation_payload(token: str) -> dict[str, Any]:
    try:
        payload = signing.loads(
            token, salt=CONFIRM_SALT, max_age=setting("SUBSCRIBE_CONFIRM_MAX_AGE")
        )
    except signing.SignatureExpired as error:
        raise InvalidInput(
            "token", "this confirmation link has expired; subscribe again for a new one."
        ) from error
    except signing.BadSignature as error:
        raise InvalidInput("token", "this confirmation link is not valid.") from error
    if not isinstance(payload, dict) or not {"id", "email", "sent"} <= set(payload):
        raise InvalidInput("token", "this confirmation link is not valid.")
    if "add" in payload and not (
        isinstance(payload["add"], list) and all(isinstance(pk, int) for pk in payload["add"])
    ):
        raise InvalidInput("token", "this confirmation link is not valid.")
    return payload


@dataclass(frozen=True)
class Confirmation:
    """What a confirmation link asks (read only): to confirm a new subscription, or
    (`change`) to add `services` to an active one."""

    subscriber: Subscriber
    change: bool
    services: list[str]


def _change_names(payload: dict[str, Any]) -> list[str]:
    if payload.get("all"):
        return ["All services, now and later"]
    ids = payload.get("add", [])
    return list(
        Service.objects.filter(pk__in=ids, is_public=True)
        .order_by("name")
        .values_list("name", flat=True)
    )


def confirmation_for(token: str) -> Confirmation:
    """What a confirmation link names (read only), or InvalidInput("token")."""
    payload = _confirmation_payload(token)
    subscriber = Subscriber.objects.filter(pk=payload["id"], email=payload["email"]).first()
    if subscriber is None:
        raise InvalidInput("token", "this confirmation link is not valid.")
    if "add" in payload:
        return Confirmation(subscriber, True, _change_names(payload))
    return Confirmation(subscriber, False, subscriber_service_names(subscriber))


def subscriber_for_confirmation(token: str) -> Subscriber:
    """The subscriber a confirmation link names (read only), or InvalidInput("token")."""
    return confirmation_for(token).subscriber


def subscriber_service_names(subscriber: Subscriber) -> list[str]:
    if subscriber.all_services:
        return ["All services"]
    return list(subscriber.services.order_by("name").values_list("name", flat=True))


def subscriber_confirm(*, token: str, now: datetime | None = None) -> Subscriber:
    """Confirm what a signed link names: a new subscription (idempotent: an active
    subscriber is left as is), or a change an active subscriber asked for (its services
    added, idempotent). A bad, expired or superseded link is InvalidInput("token"). One
    transaction."""
    now = now or timezone.now()
    payload = _confirmation_payload(token)
    with transaction.atomic():
        subscriber = (
            Subscriber.objects.select_for_update()
            .filter(pk=payload["id"], email=payload["email"])
            .first()
        )
        if subscriber is None:
            raise InvalidInput("token", "this confirmation link is not valid.")
        if "add" in payload:
            return _apply_change(subscriber, payload)
        if subscriber.is_active:
            return subscriber
        left = subscriber.unsubscribed_at
        if left is not None and left.timestamp() >= float(payload["sent"]):
            raise InvalidInput(
                "token",
                "this link was sent before the address unsubscribed; subscribe again for a "
                "new one.",
            )
        subscriber.confirmed_at = now
        subscriber.unsubscribed_at = None
        subscriber.save(update_fields=["confirmed_at", "unsubscribed_at"])
    return subscriber


def _apply_change(subscriber: Subscriber, payload: dict[str, Any]) -> Subscriber:
    """Add what a change link carries to an active subscription (locked by the caller).
    Refused when the subscription it was sent for is gone: unsubscribed since, or confirmed
    again after it (a new subscription)."""
    sent = float(payload["sent"])
    confirmed = subscriber.confirmed_at
    if not subscriber.is_active or (confirmed is not None and confirmed.timestamp() > sent):
        raise InvalidInput(
            "token",
            "this link was sent for a subscription that has ended; subscribe again for a new one.",
        )
    services = Service.objects.filter(pk__in=payload["add"], is_public=True)
    subscriber.services.add(*services)
    if payload.get("all") and not subscriber.all_services:
        subscriber.all_services = True
        subscriber.save(update_fields=["all_services"])
    return subscriber


def subscriber_for_unsubscribe(token: str) -> Subscriber:
    """The subscriber an unsubscribe link names (read only), or InvalidInput("token")."""
    subscriber = (
        Subscriber.objects.filter(unsubscribe_token=token).first()
        if isinstance(token, str) and 0 < len(token) <= 64
        else None
    )
    if subscriber is None:
        raise InvalidInput("token", "this unsubscribe link is not valid.")
    return subscriber


def subscriber_unsubscribe(*, token: str, now: datetime | None = None) -> Subscriber:
    """Stop every notice to the subscriber the one-click link names; idempotent (the first
    time is kept). Deliveries not yet sent to it are dropped when their batch runs."""
    now = now or timezone.now()
    with transaction.atomic():
        pk = subscriber_for_unsubscribe(token).pk
        subscriber = Subscriber.objects.select_for_update().get(pk=pk)
        if subscriber.unsubscribed_at is None:
            subscriber.unsubscribed_at = now
            subscriber.save(update_fields=["unsubscribed_at"])
    return subscriber


def subscriber_send_confirmation(*, subscriber_id: int) -> bool:
    """Send the confirmation email; False when there is nothing to confirm (gone, already
    active) or the server refused the address for good. Raises RetryLater on a temporary
    failure. Sending it twice is harmless: either link confirms."""
    subscriber = Subscriber.objects.filter(pk=subscriber_id).first()
    if subscriber is None or subscriber.is_active:
        return False
    return _send_confirmation(confirmation_message(subscriber), f"subscriber {subscriber_id}")


def subscriber_send_change(
    *, subscriber_id: int, service_ids: Sequence[int], all_services: bool
) -> bool:
    """Mail an active subscriber the link that confirms the change it asked for (services
    to add, or all services). False when there is nothing to confirm (gone, no longer
    active, nothing public left to add) or the server refused the address for good; raises
    RetryLater on a temporary failure. Sending it twice is harmless: the change is
    idempotent."""
    subscriber = Subscriber.objects.filter(pk=subscriber_id).first()
    if subscriber is None or not subscriber.is_active:
        return False
    add = list(
        Service.objects.filter(pk__in=list(service_ids), is_public=True)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if not add and not all_services:
        return False
    message = confirmation_message(subscriber, add=add, all_services=all_services)
    return _send_confirmation(message, f"subscriber {subscriber_id} (change)")


def _send_confirmation(message: EmailMultiAlternatives, whom: str) -> bool:
    """Send one confirmation email: True when sent, False when the server refused the
    address for good; RetryLater on a temporary failure."""
    try:
        message.send(fail_silently=False)
    except (smtplib.SMTPException, OSError) as error:
        failure = classify(error, data_started=False)
        if failure.permanent:
            logger.warning("confirmation to %s refused: %s", whom, failure)
            return False
        raise RetryLater(failure.reason) from error
    return True


def confirmation_message(
    subscriber: Subscriber, *, add: Sequence[int] = (), all_services: bool = False
) -> EmailMultiAlternatives:
    """The confirmation email: of a new subscription, or (`add`, `all_services`) of what an
    active subscriber asked to add."""
    site = one_line(settings.SITE_NAME, 100)
    change = bool(add) or all_services
    url = confirm_url(subscriber, add=add, all_services=all_services)
    days = max(1, round(setting("SUBSCRIBE_CONFIRM_MAX_AGE") / 86400))
    if change:
        names = _change_names({"add": list(add), "all": all_services})
        asked = f"asked to add to the {site} notices this address gets"
        action = "Confirm the change"
    else:
        names = subscriber_service_names(subscriber)
        asked = f"asked for {site} notices at this address about"
        action = "Confirm the subscription"
    text = (
        f"Someone, probably you, {asked}: {', '.join(names)}.\n\n"
        f"{action} (the link works for {days} days):\n{url}\n\n"
        "If it was not you, ignore this message: nothing changes.\n"
    )
    html = format_html(
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{site}</title></head>\n'
        "<body>\n<p>Someone, probably you, {asked}: {names}.</p>\n"
        '<p><a href="{url}">{action}</a> (the link works for {days} days).</p>\n'
        "<p>If it was not you, ignore this message: nothing changes.</p>\n</body></html>\n",
        site=site,
        asked=asked,
        names=", ".join(names),
        url=url,
        action=action,
        days=days,
    )
    subject = (
        f"Confirm the change to your {site} notices"
        if change
        else (f"Confirm your subscription to {site}")
    )
    message = EmailMultiAlternatives(
        subject=subject,
        body=text,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[subscriber.email],
        headers={"Auto-Submitted": "auto-generated", "X-Auto-Response-Suppress": "All"},
    )
    message.attach_alternative(str(html), "text/html")
    return message


def may_see_addresses(user) -> bool:
    """Deliveries carry customers' email addresses: superusers and users with
    `incidents.view_noticedelivery` only (the admin's and the API's rule). Being staff is
    not enough: every admin user, Viewers included, is staff."""
    return bool(
        user
        and user.is_authenticated
        and user.is_active
        and user.has_perm("incidents.view_noticedelivery")
    )


# --- composing and sending ------------------------------------------------------------------


def header_problem(subject: str) -> str:
    if "\r" in subject or "\n" in subject:
        return "must be one line (no CR or LF)."
    if _HEADER_UNSAFE.search(subject):
        return "contains control characters."
    return ""


def _default_services(incident: Incident | None, window: MaintenanceWindow | None):
    source = incident if incident is not None else window
    return list(source.services.filter(is_public=True).order_by("name"))


def notice_compose(
    *,
    kind: str,
    incident: Incident | None = None,
    maintenance: MaintenanceWindow | None = None,
    template: MessageTemplate | None = None,
    service_ids: Sequence[Any] | None = None,
    actor,
    now: datetime | None = None,
) -> CustomerNotice:
    """A draft notice about an incident or a maintenance window: the template (else the
    kind's default, else the built-in one) rendered now, for customers whatever the kind,
    and kept as it will be sent. The services default to the public services of the
    incident or window. Refuses, naming the field: no or an unknown kind, neither or both
    subjects, a drill, no public service, a template error, a template that names what only
    responders see (`template`), a subject that is not one line. No timeline event yet (at
    send)."""
    now = now or timezone.now()
    if kind not in TemplateKind.values:
        raise InvalidInput("kind", f"{str(kind)[:50]!r} is not a kind of message.")
    if (incident is None) == (maintenance is None):
        raise InvalidInput("incident", "choose an incident or a maintenance window (one).")
    if incident is not None and incident.is_drill:
        raise InvalidInput("incident", f"{incident.reference} is a drill: customers are not told.")
    if template is not None and template.kind != kind:
        raise InvalidInput(
            "template", f"{template.name} is a {template.get_kind_display()} template."
        )
    if service_ids is None:
        services = _default_services(incident, maintenance)
    else:
        services = public_services("services", service_ids)
    if not services:
        raise InvalidInput("services", "no public service is affected: choose at least one.")
    # Customers get the customer context whatever the kind: public services only, no
    # reference, severity or internal status. A template naming those is refused rather
    # than sent with blanks.
    name, subject, body = template_source(kind, template)
    for part, source in (("subject", subject), ("body", body)):
        used = responder_names(part, source)
        if used:
            raise InvalidInput(
                "template",
                f"“{name}” uses {', '.join(used)}, which customers are not told: choose or "
                "write a template for customers.",
            )
    rendered = render_message(
        kind=kind,
        template=template,
        incident=incident,
        maintenance=maintenance,
        audience=CUSTOMERS,
    )
    problem = header_problem(rendered.subject)
    if problem:
        raise InvalidInput("subject", problem)
    if not rendered.subject:
        raise InvalidInput("subject", "renders empty.")
    limit = CustomerNotice._meta.get_field("subject").max_length
    if len(rendered.subject) > limit:
        raise InvalidInput(
            "subject", f"renders to {len(rendered.subject)} characters; at most {limit}."
        )
    user = actor if actor is not None and actor.is_authenticated else None
    with transaction.atomic():
        notice = CustomerNotice.objects.create(
            kind=kind,
            incident=incident,
            maintenance=maintenance,
            template=template,
            subject=rendered.subject,
            body_text=rendered.text,
            body_html=rendered.html,
            status=NoticeStatus.DRAFT,
            created_by=user,
            created_at=now,
        )
        notice.services.set(services)
    return notice


def notice_recipients(service_ids: Iterable[int]) -> QuerySet[Subscriber]:
    """Confirmed, subscribed addresses that follow any of these services (or all)."""
    follows = Subscriber.services.through.objects.filter(
        subscriber_id=OuterRef("pk"), service_id__in=list(service_ids)
    )
    return Subscriber.objects.filter(
        confirmed_at__isnull=False, unsubscribed_at__isnull=True
    ).filter(Q(all_services=True) | Exists(follows))


def notice_message_id(notice_id: int, subscriber_id: int) -> str:
    """The Message-ID of a notice to a subscriber: the same on every attempt."""
    return f"<notice-{notice_id}-{subscriber_id}@{_mail_domain()}>"


def notice_send(*, notice: CustomerNotice, actor, now: datetime | None = None) -> int:
    """Send a draft: draft -> sending (compare-and-set: a notice already sending or sent is
    left alone and 0 returned), one delivery row per recipient (written in batches, never
    all in memory), a timeline event on the incident, and the batch tasks queued on commit.
    Returns the number of recipients; with none the notice is sent at once."""
    now = now or timezone.now()
    problem = header_problem(notice.subject)
    if problem:
        raise InvalidInput("subject", problem)
    size = setting("NOTICE_BATCH_SIZE")
    with transaction.atomic():
        if not CustomerNotice.objects.filter(pk=notice.pk, status=NoticeStatus.DRAFT).update(
            status=NoticeStatus.SENDING, send_requested_at=now
        ):
            return 0
        services = list(notice.services.order_by("name"))
        if not services:
            raise InvalidInput("services", "the notice names no service.")
        count = 0
        rows: list[NoticeDelivery] = []
        recipients = (
            notice_recipients([s.pk for s in services])
            .order_by("pk")
            .values_list("pk", "email")
            .iterator(chunk_size=size)
        )
        for subscriber_id, email in recipients:
            rows.append(
                NoticeDelivery(
                    notice_id=notice.pk,
                    subscriber_id=subscriber_id,
                    email=email,
                    message_id=notice_message_id(notice.pk, subscriber_id),
                    created_at=now,
                )
            )
            if len(rows) >= size:
                NoticeDelivery.objects.bulk_create(rows)
                count += len(rows)
                rows = []
        if rows:
            NoticeDelivery.objects.bulk_create(rows)
            count += len(rows)
        fields: dict[str, Any] = {"recipients": count}
        if not count:
            fields.update(status=NoticeStatus.SENT, sent_at=now)
        CustomerNotice.objects.filter(pk=notice.pk).update(**fields)
        if notice.incident_id:
            names = ", ".join(s.name for s in services)
            timeline_record(
                incident=notice.incident_id,
                kind=EventKind.CUSTOMER_NOTICE,
                actor=actor,
                now=now,
                value=notice.subject,
                message=f"Customer notice sent to {count} subscriber(s) of {names}: "
                f"{notice.subject}",
            )
        for _ in range(math.ceil(count / size)):
            transaction.on_commit(partial(_enqueue_batch, notice.pk, "first"))
    notice.status = fields.get("status", NoticeStatus.SENDING)
    notice.send_requested_at = now
    notice.sent_at = fields.get("sent_at")
    notice.recipients = count
    return count


def _enqueue_batch(notice_id: int, mode: str, countdown: float | None = None) -> None:
    from incidents.tasks import deliver_notice_batch

    try:
        deliver_notice_batch.apply_async((notice_id,), {"mode": mode}, countdown=countdown)
    except Exception:  # noqa: BLE001 - the broker is down: the sweep queues it again
        logger.warning("could not queue a batch of notice %s; the sweep will", notice_id)


# --- delivery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendFailure:
    reason: str
    permanent: bool
    unknown: bool = False


def _decode(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return one_line(text, 200)


def classify(error: BaseException, *, data_started: bool) -> SendFailure:
    """What a failed send means. 5xx: permanent. 4xx, a refused or failed connection:
    temporary. The connection lost once the message data was on its way: unknown (it may
    have been delivered), never retried."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        replies = list(error.recipients.values())
        detail = "; ".join(f"{code} {_decode(text)}" for code, text in replies)
        permanent = bool(replies) and all(500 <= code < 600 for code, _ in replies)
        return SendFailure(f"the mail server refused the address: {detail}", permanent)
    if isinstance(error, smtplib.SMTPResponseException):
        code = error.smtp_code
        return SendFailure(
            f"the mail server answered {code} {_decode(error.smtp_error)}", 500 <= code < 600
        )
    if isinstance(error, smtplib.SMTPServerDisconnected | TimeoutError | ssl.SSLError):
        reason = f"the mail server stopped answering: {one_line(error, 200)}"
        return SendFailure(reason, permanent=False, unknown=data_started)
    if isinstance(error, ConnectionError) and data_started:
        reason = f"the connection dropped: {one_line(error, 200)}"
        return SendFailure(reason, permanent=False, unknown=True)
    return SendFailure(f"could not send: {one_line(error, 200)}", permanent=False)


class _DataTracking:
    """Remembers whether the current message's DATA was started: a connection lost before
    that did not deliver it; one lost after may have."""

    data_started = False

    def mail(self, *args, **kwargs):
        self.data_started = False
        return super().mail(*args, **kwargs)

    def data(self, msg):
        self.data_started = True
        return super().data(msg)


class _TrackingSMTP(_DataTracking, smtplib.SMTP):
    pass


class _TrackingSMTPSSL(_DataTracking, smtplib.SMTP_SSL):
    pass


class NoticeSMTPBackend(SMTPBackend):
    """Django's SMTP backend whose connection says how far a failed message got."""

    @property
    def connection_class(self):
        return _TrackingSMTPSSL if self.use_ssl else _TrackingSMTP


def _connection():
    if settings.EMAIL_BACKEND == "django.core.mail.backends.smtp.EmailBackend":
        return get_connection(f"{__name__}.NoticeSMTPBackend", fail_silently=False)
    return get_connection(fail_silently=False)


def _data_started(connection) -> bool:
    # Backends other than SMTP cannot tell: assume the worst (the message may have gone).
    return bool(getattr(getattr(connection, "connection", None), "data_started", True))


def _reset_tracking(connection) -> None:
    smtp = getattr(connection, "connection", None)
    if smtp is not None and hasattr(smtp, "data_started"):
        smtp.data_started = False


def _closed(connection) -> bool:
    smtp = getattr(connection, "connection", None)
    return smtp is not None and getattr(smtp, "sock", True) is None


def _close_quietly(connection) -> None:
    try:
        connection.close()
    except Exception:  # noqa: BLE001 - closing a broken connection
        if getattr(connection, "connection", None) is not None:
            connection.connection = None


@dataclass(frozen=True)
class Parts:
    """What every message of a notice shares."""

    subject: str
    text: str
    html: str
    site: str
    from_email: str
    mailto: str


def _parts(notice: CustomerNotice) -> Parts:
    return Parts(
        subject=notice.subject,
        text=notice.body_text,
        html=notice.body_html,
        site=one_line(settings.SITE_NAME, 100),
        from_email=settings.DEFAULT_FROM_EMAIL,
        mailto=one_line(setting("NOTICE_UNSUBSCRIBE_MAILTO"), 200),
    )


def notice_email(
    parts: Parts, *, email: str, message_id: str, token: str, connection=None
) -> EmailMultiAlternatives:
    """One subscriber's message: the plain-text and HTML parts with a one-click unsubscribe
    footer, the fixed Message-ID, List-Unsubscribe and List-Unsubscribe-Post (RFC 8058)."""
    url = unsubscribe_url(token)
    unsubscribe = f"<{url}>"
    if parts.mailto:
        unsubscribe += f", <mailto:{parts.mailto}?subject=unsubscribe>"
    text = (
        f"{parts.text}\n\n-- \nYou receive this because {email} subscribed to {parts.site} "
        f"notices.\nUnsubscribe with one click: {url}\n"
    )
    # Rendered by the autoescaping template engine when the notice was composed.
    body = mark_safe(parts.html)  # noqa: S308
    html = format_html(
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{subject}</title></head>\n'
        "<body>\n{body}\n<hr>\n<p><small>You receive this because {email} subscribed to "
        '{site} notices. <a href="{url}">Unsubscribe with one click</a>.</small></p>\n'
        "</body></html>\n",
        subject=parts.subject,
        body=body,
        email=email,
        site=parts.site,
        url=url,
    )
    message = EmailMultiAlternatives(
        subject=parts.subject,
        body=text,
        from_email=parts.from_email,
        to=[email],
        connection=connection,
        headers={
            "Message-ID": message_id,
            "List-Unsubscribe": unsubscribe,
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            # RFC 3834: an automatic message; out-of-office replies should not answer it.
            "Auto-Submitted": "auto-generated",
            "X-Auto-Response-Suppress": "All",
        },
    )
    message.attach_alternative(str(html), "text/html")
    return message


@dataclass
class BatchReport:
    claimed: int = 0
    sent: int = 0
    retry: int = 0
    failed: int = 0
    unknown: int = 0
    released: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {
            "claimed": self.claimed,
            "sent": self.sent,
            "retry": self.retry,
            "failed": self.failed,
            "unknown": self.unknown,
            "released": self.released,
        }


def due(now: datetime) -> Q:
    """Pending rows that may be tried at `now`: never tried, or past their backoff (a
    pending row's `sent_at` is its next attempt; empty means at once)."""
    return Q(attempts=0) | Q(sent_at__isnull=True) | Q(sent_at__lte=now)


def _claim(notice_id: int, mode: str, size: int, now: datetime) -> list[int]:
    with transaction.atomic():
        pending = NoticeDelivery.objects.select_for_update(skip_locked=True).filter(
            due(now), notice_id=notice_id, status=DeliveryState.PENDING
        )
        if mode == "first":
            pending = pending.filter(attempts=0)
        elif mode == "retry":
            pending = pending.filter(attempts__gt=0)
        ids = list(pending.order_by("pk").values_list("pk", flat=True)[:size])
        if ids:
            NoticeDelivery.objects.filter(pk__in=ids, status=DeliveryState.PENDING).update(
                status=DeliveryState.SENDING, attempts=F("attempts") + 1, sent_at=now
            )
    return ids


def notice_deliver_batch(
    *, notice_id: int, mode: str = "first", now: datetime | None = None
) -> BatchReport:
    """Claim up to NOTICE_BATCH_SIZE pending deliveries of a sending notice that are due
    (`first`: never tried; `retry`: past their backoff; `any`) and send them over one SMTP
    connection; rows still waiting out their backoff are left alone. Idempotent: only
    pending rows are claimed, so a task run twice, or redelivered after a crash, sends
    nothing twice. Queues the retry of temporary failures (with backoff) and the rest of an
    unfinished batch on commit; closes the notice when no delivery is left to do."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    clock_injected = now is not None
    now = now or timezone.now()
    report = BatchReport()
    notice = CustomerNotice.objects.filter(pk=notice_id, status=NoticeStatus.SENDING).first()
    if notice is None:
        return report
    ids = _claim(notice_id, mode, setting("NOTICE_BATCH_SIZE"), now)
    report.claimed = len(ids)
    if ids:
        _send_claimed(notice, ids, mode, report, now if clock_injected else None)
    notice_finish_if_done(notice_id=notice_id, now=now if clock_injected else None)
    return report


def _send_claimed(
    notice: CustomerNotice, ids: list[int], mode: str, report: BatchReport, at: datetime | None
) -> None:
    def stamp() -> datetime:
        return at or timezone.now()

    parts = _parts(notice)
    backoff = tuple(setting("NOTICE_RETRY_BACKOFF"))
    budget = float(setting("NOTICE_BATCH_SECONDS"))
    rows = list(
        NoticeDelivery.objects.filter(pk__in=ids, status=DeliveryState.SENDING)
        .select_related("subscriber")
        .only("pk", "email", "message_id", "attempts", "subscriber__unsubscribe_token")
        .order_by("pk")
    )
    active: set[int] = set()
    sent: list[int] = []
    retry_attempts: list[int] = []

    def flush() -> None:
        if sent:
            NoticeDelivery.objects.filter(pk__in=sent, status=DeliveryState.SENDING).update(
                status=DeliveryState.SENT, sent_at=stamp(), error=""
            )
            report.sent += len(sent)
            sent.clear()

    def record(row: NoticeDelivery, failure: SendFailure) -> None:
        if failure.unknown:
            status, error = DeliveryState.UNKNOWN, f"outcome unknown: {failure.reason}"
            report.unknown += 1
        elif failure.permanent or row.attempts > len(backoff):
            status, error = DeliveryState.FAILED, failure.reason
            report.failed += 1
        else:
            status, error = DeliveryState.PENDING, failure.reason
            retry_attempts.append(row.attempts)
            report.retry += 1
        # A pending row's `sent_at` is when its next attempt is due (see the module's
        # docstring); the other outcomes have no sending time.
        next_at = stamp() + timedelta(seconds=_wait(backoff, row.attempts))
        NoticeDelivery.objects.filter(pk=row.pk, status=DeliveryState.SENDING).update(
            status=status,
            error=error[:2000],
            sent_at=next_at if status == DeliveryState.PENDING else None,
        )

    connection = _connection()
    opened = False
    started = time.monotonic()
    try:
        for index, row in enumerate(rows):
            if time.monotonic() - started > budget:
                _release([r.pk for r in rows[index:]], notice.pk, mode, report)
                break
            if index % RECHECK_EVERY == 0:
                # Someone may have unsubscribed since the batch began: one query per group.
                active = _active_subscribers(rows[index : index + RECHECK_EVERY])
            subscriber = row.subscriber
            if subscriber is None or subscriber.pk not in active:
                record(row, SendFailure("unsubscribed before it was sent", permanent=True))
                continue
            if not opened:
                try:
                    connection.open()
                    opened = True
                except (smtplib.SMTPException, OSError) as error:
                    failure = SendFailure(
                        f"could not reach the mail server: {one_line(error, 200)}",
                        permanent=False,
                    )
                    for rest in rows[index:]:
                        record(rest, failure)
                    break
            message = notice_email(
                parts,
                email=row.email,
                message_id=row.message_id,
                token=subscriber.unsubscribe_token,
                connection=connection,
            )
            _reset_tracking(connection)
            try:
                connection.send_messages([message])
            except (smtplib.SMTPException, OSError) as error:
                failure = classify(error, data_started=_data_started(connection))
                if not isinstance(error, smtplib.SMTPResponseException) or _closed(connection):
                    _close_quietly(connection)  # lost or unusable: reconnect for the next
                    opened = False
                flush()
                record(row, failure)
            except Exception as error:  # noqa: BLE001 - a bug must not leave the row claimed
                logger.exception("notice delivery %s crashed", row.pk)
                unknown = _data_started(connection)
                _close_quietly(connection)
                opened = False
                flush()
                record(row, SendFailure(f"unexpected error: {error}", True, unknown=unknown))
            else:
                sent.append(row.pk)
                if len(sent) >= SENT_FLUSH:
                    flush()
    finally:
        flush()
        if opened:
            _close_quietly(connection)
    if retry_attempts:
        wait = _wait(backoff, min(retry_attempts))
        transaction.on_commit(partial(_enqueue_batch, notice.pk, "retry", wait))


def _wait(backoff: tuple, attempts: int) -> int:
    """Seconds before the next attempt of a row tried `attempts` times."""
    return backoff[min(attempts, len(backoff)) - 1] if backoff and attempts > 0 else 0


def _active_subscribers(rows: list[NoticeDelivery]) -> set[int]:
    ids = [row.subscriber_id for row in rows if row.subscriber_id is not None]
    return set(
        Subscriber.objects.filter(
            pk__in=ids, confirmed_at__isnull=False, unsubscribed_at__isnull=True
        ).values_list("pk", flat=True)
    )


def _release(ids: list[int], notice_id: int, mode: str, report: BatchReport) -> None:
    """Claimed rows not attempted (the batch ran out of time) go back to pending, their
    attempt uncounted, and a task is queued for them."""
    released = NoticeDelivery.objects.filter(pk__in=ids, status=DeliveryState.SENDING).update(
        status=DeliveryState.PENDING, attempts=F("attempts") - 1, sent_at=None
    )
    report.released += released
    if released:
        transaction.on_commit(partial(_enqueue_batch, notice_id, mode))


def notice_finish_if_done(*, notice_id: int, now: datetime | None = None) -> bool:
    """A sending notice with no delivery pending or sending becomes sent (compare-and-set),
    with a summary on the incident's timeline. True if this call closed it."""
    now = now or timezone.now()
    with transaction.atomic():
        open_rows = NoticeDelivery.objects.filter(
            notice_id=notice_id, status__in=(DeliveryState.PENDING, DeliveryState.SENDING)
        )
        if open_rows.exists():
            return False
        if not CustomerNotice.objects.filter(pk=notice_id, status=NoticeStatus.SENDING).update(
            status=NoticeStatus.SENT, sent_at=now
        ):
            return False
        notice = CustomerNotice.objects.only("pk", "incident_id", "subject").get(pk=notice_id)
        if notice.incident_id:
            counts = delivery_counts(notice_id)
            timeline_record(
                incident=notice.incident_id,
                kind=EventKind.CUSTOMER_NOTICE,
                actor=None,
                actor_label="customer notices",
                now=now,
                value=notice.subject,
                message=f"Customer notice delivered: {counts['sent']} sent, "
                f"{counts['failed']} failed, {counts['unknown']} with an unknown outcome.",
            )
    return True


def delivery_counts(notice_id: int) -> dict[str, int]:
    """Deliveries of one notice by state (every state present, 0 when none)."""
    counts = dict.fromkeys(DeliveryState.values, 0)
    rows = (
        NoticeDelivery.objects.filter(notice_id=notice_id)
        .order_by()
        .values_list("status")
        .annotate(n=Count("pk"))
    )
    counts.update(dict(rows))
    return counts


def notices_with_counts() -> QuerySet[CustomerNotice]:
    """Notices with their deliveries counted by state (`pending_count`, ... `unknown_count`)
    in the same query."""
    return CustomerNotice.objects.annotate(
        **{
            f"{state}_count": Count("deliveries", filter=Q(deliveries__status=state))
            for state in DeliveryState.values
        }
    )


def notices_sweep(*, now: datetime | None = None) -> dict[str, int]:
    """Beat: deliveries left `sending` by a dead worker become unknown (never re-sent);
    sending notices with pending rows due for longer than NOTICE_REQUEUE_AFTER (their task
    was lost) get batch tasks again, and only then; notices with nothing left to do are
    closed. Idempotent, bounded."""
    now = now or timezone.now()
    stuck_before = now - timedelta(seconds=setting("NOTICE_SENDING_STUCK_AFTER"))
    # Only notices still sending can have rows in flight: their rows are found through the
    # notice's index, so the sweep's cost does not grow with the history of sent notices.
    sending_ids = list(
        CustomerNotice.objects.filter(status=NoticeStatus.SENDING)
        .order_by("pk")
        .values_list("pk", flat=True)[:SWEEP_LIMIT]
    )
    with transaction.atomic():
        stuck = list(
            NoticeDelivery.objects.select_for_update(skip_locked=True)
            .filter(
                notice_id__in=sending_ids,
                status=DeliveryState.SENDING,
                sent_at__lte=stuck_before,
            )
            .order_by("pk")
            .values_list("pk", flat=True)[:SWEEP_LIMIT]
        )
        marked = NoticeDelivery.objects.filter(pk__in=stuck, status=DeliveryState.SENDING).update(
            status=DeliveryState.UNKNOWN,
            sent_at=None,
            error="outcome unknown: the worker stopped during delivery",
        )
    requeue_before = now - timedelta(seconds=setting("NOTICE_REQUEUE_AFTER"))
    size = setting("NOTICE_BATCH_SIZE")
    queued = closed = 0
    sending = (
        CustomerNotice.objects.filter(status=NoticeStatus.SENDING)
        .order_by("pk")
        .values_list("pk", "send_requested_at")[:SWEEP_LIMIT]
    )
    for notice_id, requested_at in sending:
        if notice_finish_if_done(notice_id=notice_id, now=now):
            closed += 1
            continue
        if requested_at and requested_at > requeue_before:
            continue
        # Only rows already due for a while: a row in backoff has its retry task queued,
        # and a batch now would claim nothing of it.
        pending = NoticeDelivery.objects.filter(
            due(requeue_before), notice_id=notice_id, status=DeliveryState.PENDING
        ).count()
        for _ in range(min(math.ceil(pending / size), 10)):
            transaction.on_commit(partial(_enqueue_batch, notice_id, "any"))
            queued += 1
    return {"unknown": marked, "queued": queued, "closed": closed}
