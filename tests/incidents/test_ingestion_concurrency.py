"""Deduplication under concurrent deliveries, on real PostgreSQL with real threads (each
with its own connection): the database constraints, not a Python check, keep one incident
per group and one firing row per fingerprint."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable

import pytest
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.test import Client

from incidents import services
from incidents.ingestion import intake, payloads
from incidents.ingestion.services import alerts_ingest
from incidents.models import (
    OPEN_STATUSES,
    Alert,
    AlertDelivery,
    AlertGroup,
    AlertStatus,
    DeliveryStatus,
    EventKind,
    Incident,
    Integration,
    TimelineEvent,
)

from .factories import SeverityFactory, alertmanager_body, integration

pytestmark = pytest.mark.django_db(transaction=True)
THREADS = 8


def run_together(work: list[Callable[[], object]], *, timeout: float = 120) -> list[object]:
    """Run each callable in its own thread, released at the same moment by a barrier; each
    thread closes its database connection. Returns the results; fails on any error."""
    barrier = threading.Barrier(len(work))
    results: list[object] = [None] * len(work)
    errors: list[BaseException] = []

    def runner(index: int, job: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = job()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=runner, args=(i, job)) for i, job in enumerate(work)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert errors == []
    return results


def post_alertmanager(token: str, body: dict) -> tuple[int, dict]:
    response = Client().post(
        f"/api/v1/integrations/{token}/alertmanager/",
        data=json.dumps(body),
        content_type="application/json",
    )
    return response.status_code, response.json()


def apply_together() -> None:
    """Workers applying the stored deliveries at once, as several would."""
    reports = run_together([intake.deliveries_apply] * 4)
    assert sum(report.applied for report in reports) == AlertDelivery.objects.count()
    assert not AlertDelivery.objects.exclude(status=DeliveryStatus.DONE).exists()


def assert_consistent() -> None:
    """What must hold after any interleaving: no firing alert on a finished incident (with
    auto-resolve), at most one open group per key, and every alert has its incident."""
    assert not Alert.objects.filter(incident__isnull=True).exists()
    firing_on_finished = Alert.objects.filter(status=AlertStatus.FIRING).exclude(
        incident__status__in=OPEN_STATUSES
    )
    assert list(firing_on_finished.values_list("fingerprint", "incident__status")) == []
    for group in AlertGroup.objects.filter(is_open=True):
        assert (
            AlertGroup.objects.filter(
                integration=group.integration_id, key=group.key, is_open=True
            ).count()
            == 1
        )


def test_the_same_alert_from_many_senders_at_once_is_one_alert_and_one_incident():
    SeverityFactory(level=1)
    source, token = integration()
    body = alertmanager_body({"fingerprint": "same", "labels": {"severity": "critical"}})

    answers = run_together([lambda: post_alertmanager(token, body)] * THREADS)

    assert [status for status, _ in answers] == [202] * THREADS
    assert AlertDelivery.objects.count() == THREADS  # every delivery stored
    apply_together()
    assert Alert.objects.get().count == THREADS
    incident = Incident.objects.get()
    alert = Alert.objects.get()
    assert (alert.status, alert.count, alert.incident) == (AlertStatus.FIRING, THREADS, incident)
    assert incident.timeline.filter(kind=EventKind.DECLARED).count() == 1
    assert incident.timeline.filter(kind=EventKind.ALERT_FIRED).count() == 1
    assert AlertGroup.objects.count() == 1
    assert Integration.objects.get(pk=source.pk).alerts_received == THREADS
    assert_consistent()


def test_different_alerts_of_one_group_at_once_open_one_incident():
    SeverityFactory(level=2)
    source, _ = integration()

    def deliver(n: int):
        body = alertmanager_body({"fingerprint": f"fp{n}"}, group_key="one-group")
        return alerts_ingest(integration=source, delivery=payloads.parse_alertmanager(body))

    results = run_together([lambda n=n: deliver(n) for n in range(THREADS)])

    incident = Incident.objects.get()
    assert sum(len(r.opened) for r in results) == 1
    assert all(r.incidents == {incident.reference} for r in results)
    assert Alert.objects.filter(incident=incident, status=AlertStatus.FIRING).count() == THREADS
    assert TimelineEvent.objects.filter(kind=EventKind.ALERT_FIRED).count() == THREADS
    assert AlertGroup.objects.get().incident == incident
    assert_consistent()


def test_repeated_mixed_deliveries_at_once_count_every_delivery():
    """Each sender sends the shared alert and one of its own, in one delivery, twice."""
    SeverityFactory(level=2)
    source, token = integration()

    def sender(n: int):
        body = alertmanager_body(
            {"fingerprint": "shared"}, {"fingerprint": f"own{n}"}, group_key="g"
        )
        return [post_alertmanager(token, body)[0] for _ in range(2)]

    statuses = run_together([lambda n=n: sender(n) for n in range(THREADS)])

    assert statuses == [[202, 202]] * THREADS
    apply_together()
    incident = Incident.objects.get()
    assert Alert.objects.get(fingerprint="shared").count == 2 * THREADS
    assert set(Alert.objects.exclude(fingerprint="shared").values_list("count", flat=True)) == {2}
    assert Alert.objects.filter(incident=incident).count() == THREADS + 1
    assert_consistent()


def test_an_alert_storm_from_many_senders_opens_one_incident_per_group():
    """400 alerts in 20 groups, from 8 senders in deliveries of 5 (each mixing groups), every
    delivery sent twice: exactly 20 open incidents and 400 alerts, each counted twice."""
    SeverityFactory(level=3)
    source, _ = integration(kind="generic")
    total, groups, batch = 400, 20, 5

    def sender(t: int) -> int:
        mine = [
            {"id": f"fp{i}", "title": f"Storm {i % groups}", "group": f"g{i % groups}"}
            for i in range(t, total, THREADS)
        ]
        sent = 0
        for start in range(0, len(mine), batch):
            delivery = payloads.parse_generic({"alerts": mine[start : start + batch]})
            for _ in range(2):
                alerts_ingest(integration=source, delivery=delivery)
                sent += len(delivery.alerts)
        return sent

    sent = run_together([lambda t=t: sender(t) for t in range(THREADS)], timeout=300)

    assert sum(sent) == 2 * total
    assert Incident.objects.filter(status__in=OPEN_STATUSES).count() == groups
    assert Incident.objects.count() == groups
    assert Alert.objects.count() == total
    assert set(Alert.objects.values_list("count", flat=True)) == {2}
    assert AlertGroup.objects.filter(is_open=True).count() == groups
    for incident in Incident.objects.all():
        keys = set(incident.alerts.values_list("group_key", flat=True))
        assert len(keys) == 1
        assert incident.alerts.count() == total // groups
    assert TimelineEvent.objects.filter(kind=EventKind.ALERT_FIRED).count() == total
    assert TimelineEvent.objects.filter(kind=EventKind.DECLARED).count() == groups
    assert_consistent()


def test_a_resolution_racing_a_new_alert_of_the_group_never_strands_it():
    """The last alert of a group resolves while a new alert of the group fires: either the
    new alert joined in time (the incident stays open) or it opened a new incident. Never a
    firing alert on a resolved incident."""
    SeverityFactory(level=2)
    source, _ = integration()

    def deliver(fingerprint: str, status: str):
        body = alertmanager_body({"fingerprint": fingerprint}, group_key="race", status=status)
        return alerts_ingest(integration=source, delivery=payloads.parse_alertmanager(body))

    for round_ in range(10):
        deliver(f"base{round_}", "firing")
        run_together(
            [
                lambda r=round_: deliver(f"base{r}", "resolved"),
                lambda r=round_: deliver(f"new{r}", "firing"),
            ]
        )
        assert_consistent()
        new = Alert.objects.get(fingerprint=f"new{round_}")
        assert new.status == AlertStatus.FIRING
        assert new.incident.status in OPEN_STATUSES
        # Close this round: resolve the new alert so the next round starts clean.
        deliver(f"new{round_}", "resolved")
        assert not Incident.objects.filter(status__in=OPEN_STATUSES).exists()
    assert_consistent()


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def wait_until_blocked(waiter: int, holder: int, *, timeout: float = 10.0) -> None:
    """Return once backend `waiter` waits on a lock held by backend `holder`, as PostgreSQL
    reports it to a third connection."""
    observer = connections.create_connection(DEFAULT_DB_ALIAS)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with observer.cursor() as cursor:
                cursor.execute(
                    "SELECT wait_event_type, %s = ANY(pg_blocking_pids(pid))"
                    " FROM pg_stat_activity WHERE pid = %s",
                    [holder, waiter],
                )
                row = cursor.fetchone()
            if row == ("Lock", True):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"backend {waiter} did not wait on {holder}'s lock: {row}")
            time.sleep(0.01)
    finally:
        observer.close()


def test_an_alert_waiting_on_an_incident_that_is_being_merged_joins_the_target():
    """A new alert of the source's group has read the group (pointing at the source) and
    waits on the source's row lock while a merge moves the group to the target. Once the
    merge commits, the alert must join the target, not open a third incident."""
    SeverityFactory(level=2)
    source, _ = integration()

    def deliver(fingerprint: str, group: str):
        body = alertmanager_body({"fingerprint": fingerprint}, group_key=group)
        return alerts_ingest(integration=source, delivery=payloads.parse_alertmanager(body))

    deliver("t1", "target-group")
    deliver("s1", "source-group")
    target = Alert.objects.get(fingerprint="t1").incident
    merged = Alert.objects.get(fingerprint="s1").incident
    pids: queue.Queue[int] = queue.Queue()
    errors: list[BaseException] = []

    def late_alert():
        try:
            pids.put(backend_pid())
            deliver("s2", "source-group")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    thread = threading.Thread(target=late_alert)
    try:
        with transaction.atomic():
            Incident.objects.select_for_update().get(pk=merged.pk)
            thread.start()
            wait_until_blocked(pids.get(timeout=10), holder=backend_pid())
            services.incident_merge(source=merged, target=target, actor=None)
    finally:
        if thread.ident is not None:
            thread.join(timeout=30)

    assert not thread.is_alive()
    assert errors == []
    assert Incident.objects.count() == 2
    assert Alert.objects.get(fingerprint="s2").incident == target
    assert AlertGroup.objects.get(key="source-group", is_open=True).incident == target
    assert_consistent()


def test_a_merge_racing_a_delivery_of_the_source_alerts_never_deadlocks():
    """A delivery re-sending the source's firing alert (plus a new one) locks that alert's
    row, then the incident; the merge takes the same locks in the same order, so neither
    is ever picked as a deadlock victim. Ten rounds, each released by a barrier."""
    SeverityFactory(level=2)
    source, _ = integration()

    def deliver(*fingerprints: str, group: str):
        body = alertmanager_body(*({"fingerprint": f} for f in fingerprints), group_key=group)
        return alerts_ingest(integration=source, delivery=payloads.parse_alertmanager(body))

    deliver("t0", group="target")
    target = Alert.objects.get(fingerprint="t0").incident
    for round_ in range(10):
        group = f"source-{round_}"
        deliver(f"s{round_}a", group=group)
        merged = Alert.objects.get(fingerprint=f"s{round_}a").incident
        run_together(
            [
                lambda g=group, r=round_: deliver(f"s{r}a", f"s{r}b", group=g),
                lambda m=merged: services.incident_merge(source=m, target=target, actor=None),
            ]
        )
        assert set(
            Alert.objects.filter(fingerprint__startswith=f"s{round_}").values_list(
                "incident", flat=True
            )
        ) == {target.pk}
    assert_consistent()
