"""The asynchronous intake: a webhook stores the delivery as received and answers; a
worker applies stored deliveries in arrival order.

Why: applying a delivery (deduplication, grouping, incidents, timeline) costs about ten
statements; storing it costs one INSERT. Senders retry until they get a 2xx, so what must
happen before the answer is that the body is durable, not that it is applied.

- `accept` runs in the request: one INSERT, autocommitted, of the body as received.
- `deliveries_apply` runs in a worker (`incidents.apply_alert_deliveries`, on a beat of
  ALERT_APPLY_SECONDS, one second by default). For each
  integration with pending deliveries it takes that integration's lease, then applies its
  deliveries oldest first through `alerts_ingest`. Only one process applies an
  integration's deliveries at a time, so a resolution is never applied before the firing
  it follows; different integrations are applied in parallel by different workers.
- A delivery that cannot be applied yet (the database fails, no severity is configured)
  stays pending with its error and attempts, and its integration's later deliveries wait
  behind it, in order. One that can never be applied (its stored body no longer parses)
  is marked failed and skipped; the admin shows it and can queue it again.

Applying is at least once: a worker that dies after `alerts_ingest` committed and before
the delivery is marked done applies it again, which deduplication absorbs (a firing alert
already stored only has its delivery count bumped).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from incidents.models import (
    AlertDelivery,
    Counter,
    DeliveryStatus,
    Integration,
    IntegrationKind,
)

from . import payloads
from .services import NotConfigured, alerts_ingest

logger = logging.getLogger(__name__)

BATCH = 100
# A lease outlives the longest drain (bounded by APPLY_BUDGET) by a wide margin; a worker
# killed while holding one delays its integration's deliveries by at most this long.
LEASE_SECONDS = 60
APPLY_BUDGET = 20.0  # seconds one task spends applying before it lets the next tick go on
ERROR_LIMIT = 2000


# --- in the request -------------------------------------------------------------------------


@functools.cache
def _insert_sql() -> str:
    meta = AlertDelivery._meta
    quote = connection.ops.quote_name
    columns = ["integration_id", "received_at", "body", "alerts", "status", "attempts", "error"]
    columns.append("incidents")
    names = ", ".join(quote(meta.get_field(c).column) for c in columns)
    return (
        f"INSERT INTO {quote(meta.db_table)} ({names}) "  # noqa: S608 - names from the model
        f"VALUES (%s, %s, %s, %s, 'pending', 0, '', '[]') RETURNING {quote(meta.pk.column)}"
    )


def accept(*, integration: Integration, body: str, alerts: int, now: datetime | None = None) -> int:
    """Store a validated delivery as received; returns its id. One autocommitted INSERT
    (a plain statement: the ORM's model machinery would cost as much again as the rest of
    the request): when this returns, the delivery is durable."""
    # Prepared as the ORM would (SQLite keeps datetimes as naive UTC text).
    received = _RECEIVED.get_db_prep_value(now or timezone.now(), connection)
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(), [integration.pk, received, body, alerts])
        return cursor.fetchone()[0]


_RECEIVED = AlertDelivery._meta.get_field("received_at")


def stored_events_v2_body(data: dict, dedup_key: str) -> str:
    """An Events v2 event as stored: without its routing key (the integration's secret
    token) and with the dedup key the sender was answered with (new for a trigger that
    came without one), so applying it later uses the same key."""
    event = {key: value for key, value in data.items() if key != "routing_key"}
    event["dedup_key"] = dedup_key
    return json.dumps(event, separators=(",", ":"))


# --- in the worker --------------------------------------------------------------------------


def parse_stored(kind: str, body: str) -> payloads.Delivery:
    data = payloads.parse_json(body.encode())
    if kind == IntegrationKind.ALERTMANAGER:
        return payloads.parse_alertmanager(data)
    if kind == IntegrationKind.EVENTS_V2:
        return payloads.parse_events_v2(data)[1]
    return payloads.parse_generic(data)


def _epoch_ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


def _lease_name(integration_id: int) -> str:
    return f"alert-apply:{integration_id}"


def _lease_take(integration_id: int, now: datetime) -> int | None:
    """Take the integration's apply lease unless another process holds it; returns the
    lease's expiry (its identity, for renewal and release) or None. A compare-and-set on a
    counter row: it holds on PostgreSQL and SQLite alike, and a dead holder's lease lapses."""
    name = _lease_name(integration_id)
    until = _epoch_ms(now) + LEASE_SECONDS * 1000
    taken = Counter.objects.filter(name=name, value__lt=_epoch_ms(now)).update(value=until)
    if taken:
        return until
    if not Counter.objects.filter(name=name).exists():
        try:
            with transaction.atomic():
                Counter.objects.create(name=name, value=until)
        except IntegrityError:
            return None  # created by another process just now: it holds the lease
        return until
    return None


def _lease_renew(integration_id: int, held: int, now: datetime) -> int | None:
    until = _epoch_ms(now) + LEASE_SECONDS * 1000
    renewed = Counter.objects.filter(name=_lease_name(integration_id), value=held).update(
        value=until
    )
    return until if renewed else None


def _lease_release(integration_id: int, held: int) -> None:
    Counter.objects.filter(name=_lease_name(integration_id), value=held).update(value=0)


@dataclass
class ApplyReport:
    applied: int = 0
    waiting: int = 0  # deliveries left pending after an error (retried on the next run)
    failed: int = 0
    busy: int = 0  # integrations another process was applying


def deliveries_apply(*, budget: float = APPLY_BUDGET, batch: int = BATCH) -> ApplyReport:
    """Apply pending deliveries, oldest first per integration, for at most `budget`
    seconds. Safe to run in several processes at once (each integration is leased to
    one); idempotent per delivery (see the module docstring). Enqueues what the services it
    calls enqueue (escalation, on commit)."""
    report = ApplyReport()
    deadline = time.monotonic() + budget
    pending = (
        AlertDelivery.objects.filter(status=DeliveryStatus.PENDING)
        .order_by()
        .values_list("integration_id", flat=True)
        .distinct()
    )
    for integration_id in list(pending):
        if time.monotonic() >= deadline:
            break
        held = _lease_take(integration_id, timezone.now())
        if held is None:
            report.busy += 1
            continue
        try:
            held = _apply_integration(integration_id, held, deadline, batch, report)
        finally:
            if held is not None:
                _lease_release(integration_id, held)
    return report


def _apply_integration(
    integration_id: int, held: int, deadline: float, batch: int, report: ApplyReport
) -> int | None:
    """Apply one integration's pending deliveries in order; returns the lease as it stands
    (None when it lapsed and another process took it over)."""
    integration = Integration.objects.get(pk=integration_id)
    while time.monotonic() < deadline:
        rows = list(
            AlertDelivery.objects.filter(
                integration_id=integration_id, status=DeliveryStatus.PENDING
            ).order_by("pk")[:batch]
        )
        if not rows:
            return held
        for row in rows:
            if not _apply_one(integration, row, report):
                # Later deliveries of this integration wait behind this one, in order.
                report.waiting += 1
                return held
            if time.monotonic() >= deadline:
                return held
        renewed = _lease_renew(integration_id, held, timezone.now())
        if renewed is None:
            return None  # lapsed and taken over: the other process carries on
        held = renewed
    return held


def _apply_one(integration: Integration, row: AlertDelivery, report: ApplyReport) -> bool:
    """Apply one delivery; False when it must be tried again later."""
    now = timezone.now()
    mine = Q(pk=row.pk, status=DeliveryStatus.PENDING)
    try:
        delivery = parse_stored(integration.kind, row.body)
    except payloads.PayloadError as error:
        AlertDelivery.objects.filter(mine).update(
            status=DeliveryStatus.FAILED,
            attempts=F("attempts") + 1,
            error=f"cannot be applied: {error}"[:ERROR_LIMIT],
            applied_at=now,
        )
        report.failed += 1
        return True
    try:
        result = alerts_ingest(integration=integration, delivery=delivery, now=row.received_at)
    except (OperationalError, InterfaceError, IntegrityError, NotConfigured) as error:
        logger.warning("alert delivery %s not applied yet: %s", row.pk, error)
        AlertDelivery.objects.filter(mine).update(
            attempts=F("attempts") + 1, error=str(error)[:ERROR_LIMIT]
        )
        return False
    except Exception as error:
        # A defect, not the sender's input (which was validated when it was accepted):
        # keep the delivery, out of the queue, with the error for whoever fixes it.
        logger.exception("alert delivery %s failed", row.pk)
        AlertDelivery.objects.filter(mine).update(
            status=DeliveryStatus.FAILED,
            attempts=F("attempts") + 1,
            error=f"{type(error).__name__}: {error}"[:ERROR_LIMIT],
            applied_at=now,
        )
        report.failed += 1
        return True
    AlertDelivery.objects.filter(mine).update(
        status=DeliveryStatus.DONE,
        attempts=F("attempts") + 1,
        error="",
        applied_at=now,
        incidents=sorted(result.incidents),
    )
    report.applied += 1
    return True


def deliveries_prune(
    *, now: datetime | None = None, keep: timedelta | None = None, batch: int = 5000
) -> int:
    """Delete applied deliveries received more than `keep` ago (ALERT_DELIVERY_RETENTION,
    7 days by default), in batches; returns how many. The alerts they made keep their own
    payloads. Pending and failed deliveries are never deleted."""
    now = now or timezone.now()
    cutoff = now - (keep or settings.ALERT_DELIVERY_RETENTION)
    deleted = 0
    while True:
        ids = list(
            AlertDelivery.objects.filter(status=DeliveryStatus.DONE, received_at__lt=cutoff)
            .order_by("received_at")
            .values_list("pk", flat=True)[:batch]
        )
        if not ids:
            return deleted
        deleted += AlertDelivery.objects.filter(pk__in=ids, status=DeliveryStatus.DONE).delete()[0]


def deliveries_requeue(*, ids) -> int:
    """Queue failed deliveries again (after the defect that failed them is fixed)."""
    return AlertDelivery.objects.filter(pk__in=list(ids), status=DeliveryStatus.FAILED).update(
        status=DeliveryStatus.PENDING, applied_at=None
    )
