"""Merging two incidents opened for one cause (incidents.services.incident_merge)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from incidents import services
from incidents.exceptions import InvalidInput, InvalidTransition
from incidents.ingestion import payloads
from incidents.ingestion.services import alerts_ingest
from incidents.models import (
    Alert,
    AlertGroup,
    EventKind,
    Incident,
    IncidentStatus,
    TimelineEvent,
)

from .factories import (
    ServiceFactory,
    SeverityFactory,
    UserFactory,
    alertmanager_body,
    declare,
    integration,
)

pytestmark = pytest.mark.django_db
S = IncidentStatus
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def fire(source, fingerprint: str, group_key: str, at: datetime):
    body = alertmanager_body({"fingerprint": fingerprint}, group_key=group_key)
    return alerts_ingest(integration=source, delivery=payloads.parse_alertmanager(body), now=at)


@pytest.fixture
def pair():
    """Two incidents opened by alerts of two groups of one integration, with a note each."""
    SeverityFactory(level=1)
    SeverityFactory(level=3)
    source, _ = integration()
    fire(source, "a1", "group-a", T0)
    fire(source, "b1", "group-b", T0 + MIN)
    fire(source, "b2", "group-b", T0 + 2 * MIN)
    target = Alert.objects.get(fingerprint="a1").incident
    merged = Alert.objects.get(fingerprint="b1").incident
    services.incident_add_note(
        incident=merged, body="DNS looks wrong", actor=None, now=T0 + 3 * MIN
    )
    return source, target, merged


def test_merge_moves_alerts_groups_and_copies_the_timeline(pair):
    source, target, merged = pair
    user = UserFactory()
    service = ServiceFactory()
    merged.services.add(service)
    source_events = list(
        merged.timeline.order_by("at", "pk").values_list("kind", "at", "message", "actor_label")
    )
    target_events_before = target.timeline.count()

    result = services.incident_merge(
        source=merged, target=target, actor=user, reason="same DNS outage", now=T0 + 5 * MIN
    )

    assert result.pk == target.pk
    merged.refresh_from_db()
    target.refresh_from_db()
    # Alerts and groups now belong to the target.
    assert set(target.alerts.values_list("fingerprint", flat=True)) == {"a1", "b1", "b2"}
    assert not Alert.objects.filter(incident=merged).exists()
    assert set(AlertGroup.objects.filter(incident=target).values_list("key", flat=True)) == {
        "group-a",
        "group-b",
    }
    assert list(target.services.all()) == [service]
    # The source is closed and points at the target.
    assert merged.status == S.CLOSED
    assert merged.merged_into == target
    assert merged.resolved_at == T0 + 5 * MIN
    assert merged.closed_at == T0 + 5 * MIN
    assert target.status == S.TRIGGERED

    # The target has a copy of each source event, marked with its origin, at its own time.
    copies = list(
        target.timeline.filter(origin=merged)
        .order_by("at", "pk")
        .values_list("kind", "at", "message", "actor_label")
    )
    assert copies == source_events
    assert target.timeline.filter(origin__isnull=True).count() == target_events_before + 1
    # Both timelines say so.
    for incident in (target, merged):
        event = incident.timeline.get(kind=EventKind.MERGED)
        assert (event.previous, event.value) == (merged.reference, target.reference)
        assert event.actor == user
        assert "same DNS outage" in event.message
        assert event.at == T0 + 5 * MIN
    # The source's own timeline is kept as it was, then merged, resolved and closed.
    assert list(merged.timeline.order_by("at", "pk").values_list("kind", flat=True))[-3:] == [
        EventKind.MERGED,
        EventKind.RESOLVED,
        EventKind.CLOSED,
    ]
    assert not merged.timeline.filter(origin__isnull=False).exists()


def test_a_later_alert_of_the_merged_group_joins_the_target(pair):
    source, target, merged = pair
    services.incident_merge(source=merged, target=target, actor=None, now=T0 + 5 * MIN)
    result = fire(source, "b3", "group-b", T0 + 6 * MIN)
    assert result.opened == set()
    assert result.incidents == {target.reference}
    assert Alert.objects.get(fingerprint="b3").incident == target
    assert Incident.objects.count() == 2
    # A repeat of an alert that moved counts on the target.
    fire(source, "b1", "group-b", T0 + 7 * MIN)
    assert Alert.objects.get(fingerprint="b1").count == 2
    assert target.timeline.filter(kind=EventKind.ALERT_FIRED, origin__isnull=True).count() == 2


def test_a_merge_of_a_resolved_source_closes_it(pair):
    _, target, merged = pair
    services.incident_resolve(incident=merged, actor=None, now=T0 + 4 * MIN)
    services.incident_merge(source=merged.pk, target=target.pk, actor=None, now=T0 + 5 * MIN)
    merged.refresh_from_db()
    assert merged.status == S.CLOSED
    assert merged.merged_into_id == target.pk
    assert merged.resolved_at == T0 + 4 * MIN


def test_merge_refusals_change_nothing(pair):
    _, target, merged = pair
    third = declare(severity=SeverityFactory(level=1), now=T0 + 3 * MIN, title="Third")

    with pytest.raises(InvalidInput) as self_merge:
        services.incident_merge(source=merged, target=merged, actor=None)
    assert self_merge.value.field == "target"

    with pytest.raises(InvalidInput):
        services.incident_merge(source=merged, target=999_999, actor=None)

    services.incident_resolve(incident=third, actor=None, now=T0 + 4 * MIN)
    services.incident_close(incident=third, actor=None, now=T0 + 4 * MIN)
    counts = (TimelineEvent.objects.count(), Alert.objects.filter(incident=merged).count())
    with pytest.raises(InvalidTransition):
        services.incident_merge(source=merged, target=third, actor=None)
    with pytest.raises(InvalidTransition):
        services.incident_merge(source=third, target=merged, actor=None)
    assert (TimelineEvent.objects.count(), Alert.objects.filter(incident=merged).count()) == counts
    merged.refresh_from_db()
    assert merged.status == S.TRIGGERED
    assert merged.merged_into is None


def test_an_incident_merged_already_cannot_merge_again(pair):
    _, target, merged = pair
    other = declare(severity=SeverityFactory(level=1), now=T0 + 3 * MIN, title="Other")
    services.incident_merge(source=merged, target=target, actor=None, now=T0 + 5 * MIN)
    before = TimelineEvent.objects.count()
    with pytest.raises(InvalidTransition):
        services.incident_merge(source=merged, target=other, actor=None, now=T0 + 6 * MIN)
    with pytest.raises(InvalidTransition):
        services.incident_merge(source=other, target=merged, actor=None, now=T0 + 6 * MIN)
    assert TimelineEvent.objects.count() == before
    merged.refresh_from_db()
    assert merged.merged_into == target


def test_merging_a_merge_target_keeps_the_first_origin(pair):
    """A into B, then B into C: C's copies of A's events still say they came from A."""
    _, target, merged = pair
    final = declare(severity=SeverityFactory(level=1), now=T0 + 3 * MIN, title="Final")
    services.incident_merge(source=merged, target=target, actor=None, now=T0 + 5 * MIN)
    services.incident_merge(source=target, target=final, actor=None, now=T0 + 6 * MIN)
    origins = set(final.timeline.exclude(origin=None).values_list("origin", flat=True))
    assert origins == {merged.pk, target.pk}
    note = final.timeline.get(kind=EventKind.NOTE)
    assert note.origin_id == merged.pk
    assert set(final.alerts.values_list("fingerprint", flat=True)) == {"a1", "b1", "b2"}
