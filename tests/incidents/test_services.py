from __future__ import annotations

import itertools
import queue
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction

from incidents import services
from incidents.exceptions import InvalidInput, InvalidTransition
from incidents.models import (
    OPEN_STATUSES,
    STATUS_TIMESTAMP,
    TRANSITIONS,
    EventKind,
    Incident,
    IncidentStatus,
    RoleAssignment,
    TimelineEvent,
)

from .factories import (
    SEVERITY_TARGETS,
    ServiceFactory,
    SeverityFactory,
    TeamFactory,
    UserFactory,
    declare,
    role,
)

pytestmark = pytest.mark.django_db
S = IncidentStatus
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
DETECTED = T0 - 5 * MIN

# A path of legal moves from triggered to each status.
PATHS = {
    S.TRIGGERED: [],
    S.ACKNOWLEDGED: [S.ACKNOWLEDGED],
    S.INVESTIGATING: [S.ACKNOWLEDGED, S.INVESTIGATING],
    S.MITIGATING: [S.ACKNOWLEDGED, S.INVESTIGATING, S.MITIGATING],
    S.MONITORING: [S.ACKNOWLEDGED, S.INVESTIGATING, S.MITIGATING, S.MONITORING],
    S.RESOLVED: [S.ACKNOWLEDGED, S.RESOLVED],
    S.CLOSED: [S.ACKNOWLEDGED, S.RESOLVED, S.CLOSED],
}


def incident_in(status: str, *, actor=None, level: int = 1) -> Incident:
    incident = declare(severity=SeverityFactory(level=level), actor=actor, now=T0)
    for step, target in enumerate(PATHS[status], start=1):
        incident = services.incident_transition(
            incident=incident, to=target, actor=actor, now=T0 + step * MIN
        )
    return incident


ALL_PAIRS = list(itertools.product(S.values, S.values))
LEGAL = [(a, b) for a, b in ALL_PAIRS if b in TRANSITIONS[a]]
ILLEGAL = [(a, b) for a, b in ALL_PAIRS if a != b and b not in TRANSITIONS[a]]
# Legal moves back into a working state the path to `a` already entered (and stamped).
REENTRIES = [(a, b) for a, b in LEGAL if b in PATHS[a] and b not in {S.RESOLVED, S.CLOSED}]


def test_transition_table_covers_every_status_and_closed_is_final():
    assert set(TRANSITIONS) == set(S.values)
    assert TRANSITIONS[S.CLOSED] == frozenset()
    assert all(S.TRIGGERED not in targets for targets in TRANSITIONS.values())
    assert len(LEGAL) == 20
    assert len(ILLEGAL) == 22
    assert REENTRIES == [
        (S.MITIGATING, S.INVESTIGATING),
        (S.MONITORING, S.INVESTIGATING),
        (S.MONITORING, S.MITIGATING),
    ]


@pytest.mark.parametrize(("current", "to"), LEGAL)
def test_legal_transition_moves_stamps_and_records_one_event(current, to):
    user = UserFactory()
    incident = incident_in(current, actor=user)
    events_before = incident.timeline.count()
    earlier = Incident.objects.values_list(STATUS_TIMESTAMP[to], flat=True).get(pk=incident.pk)
    at = T0 + timedelta(hours=1)

    moved = services.incident_transition(incident=incident, to=to, actor=user, now=at)

    moved.refresh_from_db()
    assert moved.status == to
    if current == S.RESOLVED and to == S.INVESTIGATING:
        assert moved.reopened_at == at
        assert moved.reopened_count == 1
        assert moved.resolved_at is None
    # First entry stamps now; re-entering a working state keeps the first stamp.
    stamp = STATUS_TIMESTAMP[to]
    if (current, to) in REENTRIES:
        assert earlier is not None
        assert earlier < at
        assert getattr(moved, stamp) == earlier
    else:
        assert getattr(moved, stamp) == at
    event = moved.timeline.order_by("-pk").first()
    assert moved.timeline.count() == events_before + 1
    assert (event.previous, event.value, event.actor, event.at) == (current, to, user, at)
    expected_kind = {
        S.ACKNOWLEDGED: EventKind.ACKNOWLEDGED,
        S.RESOLVED: EventKind.RESOLVED,
        S.CLOSED: EventKind.CLOSED,
    }.get(to, EventKind.REOPENED if current == S.RESOLVED else EventKind.STATUS_CHANGED)
    assert event.kind == expected_kind


@pytest.mark.parametrize(("current", "to"), ILLEGAL)
def test_illegal_transition_is_refused_naming_both_statuses_and_changes_nothing(current, to):
    incident = incident_in(current)
    before = Incident.objects.values().get(pk=incident.pk)
    events_before = TimelineEvent.objects.count()

    with pytest.raises(InvalidTransition) as error:
        services.incident_transition(incident=incident, to=to, actor=None, now=T0 + 2 * 60 * MIN)

    message = str(error.value)
    assert f"from {current} to {to}" in message
    assert incident.reference in message
    assert Incident.objects.values().get(pk=incident.pk) == before
    assert TimelineEvent.objects.count() == events_before


@pytest.mark.parametrize("status", S.values)
def test_transition_to_the_current_status_is_a_no_op(status):
    incident = incident_in(status)
    events_before = incident.timeline.count()
    services.incident_transition(incident=incident, to=status, actor=None, now=T0 + 60 * MIN)
    assert incident.timeline.count() == events_before


def test_unknown_status_is_refused_as_input():
    incident = incident_in(S.TRIGGERED)
    with pytest.raises(InvalidInput, match="status: 'sleeping' is not one of"):
        services.incident_transition(incident=incident, to="sleeping", actor=None)


# --- deadlines ------------------------------------------------------------------------------


@pytest.mark.parametrize("level", sorted(SEVERITY_TARGETS))
def test_declare_sets_deadlines_from_the_severity_targets(level):
    ack, resolve, update = SEVERITY_TARGETS[level]
    detected = T0 - 5 * MIN
    incident = declare(severity=SeverityFactory(level=level), detected_at=detected, now=T0)
    assert incident.ack_due_at == detected + ack
    assert incident.resolve_due_at == detected + resolve
    # The update cadence runs from the declaration, the first moment anyone could post.
    assert incident.next_update_due_at == T0 + update


@pytest.mark.parametrize("level", sorted(SEVERITY_TARGETS))
def test_acknowledge_clears_the_ack_deadline_and_resolve_clears_the_rest(level):
    incident = incident_in(S.TRIGGERED, level=level)
    _, resolve, update = SEVERITY_TARGETS[level]
    incident = services.incident_acknowledge(incident=incident, actor=None, now=T0 + MIN)
    assert incident.ack_due_at is None
    assert incident.resolve_due_at == T0 + resolve
    assert incident.next_update_due_at == T0 + update
    incident = services.incident_resolve(incident=incident, actor=None, now=T0 + 2 * MIN)
    assert (incident.ack_due_at, incident.resolve_due_at, incident.next_update_due_at) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize(("old", "new"), [(3, 1), (1, 4), (2, 3)])
def test_severity_change_rebases_deadlines_on_detection(old, new):
    incident = incident_in(S.TRIGGERED, level=old)
    new_severity = SeverityFactory(level=new)
    at = T0 + 10 * MIN
    changed = services.incident_change_severity(
        incident=incident, severity=new_severity, actor=None, reason="impact grew", now=at
    )
    ack, resolve, update = SEVERITY_TARGETS[new]
    assert changed.ack_due_at == T0 + ack
    assert changed.resolve_due_at == T0 + resolve
    assert changed.next_update_due_at == T0 + update
    event = changed.timeline.order_by("-pk").first()
    assert (event.kind, event.previous, event.value, event.message) == (
        EventKind.SEVERITY_CHANGED,
        f"Sev{old}",
        f"Sev{new}",
        "impact grew",
    )


def deadlines_of(incident: Incident) -> tuple:
    """The stored pending deadlines, read back from the database."""
    return Incident.objects.values_list(
        "ack_due_at", "resolve_due_at", "next_update_due_at", "next_escalation_at"
    ).get(pk=incident.pk)


def declared_after_detection(level: int) -> Incident:
    """Declared at T0 for a problem detected 5 minutes earlier, so the two bases differ."""
    return declare(severity=SeverityFactory(level=level), detected_at=DETECTED, now=T0)


@pytest.mark.parametrize("to", [S.MITIGATING, S.MONITORING])
@pytest.mark.parametrize("level", sorted(SEVERITY_TARGETS))
def test_working_states_keep_resolve_from_detection_and_update_from_declaration(level, to):
    _, resolve, update = SEVERITY_TARGETS[level]
    incident = declared_after_detection(level)
    for step, status in enumerate(PATHS[to], start=1):
        services.incident_transition(incident=incident, to=status, actor=None, now=T0 + step * MIN)

    ack_due, resolve_due, update_due, _ = deadlines_of(incident)
    assert Incident.objects.get(pk=incident.pk).status == to
    assert ack_due is None
    assert resolve_due == DETECTED + resolve
    # No status update was posted: the cadence still counts from the declaration.
    assert update_due == T0 + update


@pytest.mark.parametrize("level", sorted(SEVERITY_TARGETS))
def test_reopen_restores_resolve_deadline_and_restarts_update_cadence(level):
    _, resolve, update = SEVERITY_TARGETS[level]
    incident = declared_after_detection(level)
    services.incident_acknowledge(incident=incident, actor=None, now=T0 + MIN)
    services.incident_resolve(incident=incident, actor=None, now=T0 + 2 * MIN)
    at = T0 + 30 * 60 * MIN

    incident = services.incident_reopen(incident=incident, actor=None, reason="errors back", now=at)

    assert incident.status == S.INVESTIGATING
    assert incident.reopened_at == at
    ack_due, resolve_due, update_due, _ = deadlines_of(incident)
    assert ack_due is None
    assert resolve_due == DETECTED + resolve  # still measured from detection
    assert update_due == at + update  # the cadence restarts at the re-open


@pytest.mark.parametrize("level", sorted(SEVERITY_TARGETS))
def test_severity_change_on_a_resolved_incident_records_it_and_sets_no_deadline(level):
    incident = declared_after_detection(level)
    services.incident_resolve(incident=incident, actor=None, now=T0 + MIN)
    assert deadlines_of(incident) == (None, None, None, None)
    events_before = incident.timeline.count()
    new = SeverityFactory(level=level % 4 + 1)

    services.incident_change_severity(
        incident=incident, severity=new, actor=None, reason="reclassified", now=T0 + 2 * MIN
    )

    assert Incident.objects.get(pk=incident.pk).severity == new
    assert deadlines_of(incident) == (None, None, None, None)
    assert incident.timeline.count() == events_before + 1
    event = incident.timeline.order_by("-pk").first()
    assert (event.kind, event.previous, event.value, event.message) == (
        EventKind.SEVERITY_CHANGED,
        f"Sev{level}",
        new.name,
        "reclassified",
    )


def test_reopen_refuses_an_incident_that_is_not_resolved():
    incident = incident_in(S.INVESTIGATING)
    with pytest.raises(InvalidTransition, match="only a resolved incident can be re-opened"):
        services.incident_reopen(incident=incident, actor=None)


def test_declare_refuses_blank_title_and_future_detection_and_stores_nothing():
    severity = SeverityFactory(level=2)
    with pytest.raises(InvalidInput, match="title: may not be blank"):
        services.incident_declare(title="  ", severity=severity, actor=None, now=T0)
    with pytest.raises(InvalidInput, match="detected_at: is in the future"):
        services.incident_declare(
            title="x", severity=severity, actor=None, detected_at=T0 + MIN, now=T0
        )
    assert not Incident.objects.exists()


# --- the timeline entry of every service ----------------------------------------------------


def test_declare_records_one_declared_event_with_the_actor():
    user = UserFactory()
    services_ = [ServiceFactory(), ServiceFactory()]
    incident = declare(
        actor=user, services=services_, team=TeamFactory(), title="Checkout down", now=T0
    )
    assert incident.reference == f"INC-{incident.number}"
    assert set(incident.services.all()) == set(services_)
    (event,) = incident.timeline.all()
    assert (event.kind, event.actor, event.value, event.message, event.at) == (
        EventKind.DECLARED,
        user,
        "Sev1",
        "Checkout down",
        T0,
    )


def test_declared_by_the_system_records_the_label():
    incident = declare(actor=None, actor_label="alertmanager", now=T0)
    (event,) = incident.timeline.all()
    assert event.actor is None
    assert event.actor_display == "alertmanager"


def test_acknowledge_is_idempotent_for_open_incidents_and_refused_once_resolved():
    user = UserFactory()
    incident = incident_in(S.TRIGGERED)
    services.incident_acknowledge(incident=incident, actor=user, now=T0 + MIN)
    services.incident_acknowledge(incident=incident, actor=user, now=T0 + 2 * MIN)
    investigating = incident_in(S.INVESTIGATING)
    services.incident_acknowledge(incident=investigating, actor=user, now=T0 + 3 * MIN)
    assert incident.timeline.filter(kind=EventKind.ACKNOWLEDGED).count() == 1
    assert investigating.timeline.filter(kind=EventKind.ACKNOWLEDGED).count() == 1
    with pytest.raises(InvalidTransition, match="from resolved to acknowledged"):
        services.incident_acknowledge(incident=incident_in(S.RESOLVED), actor=user)


def test_resolve_records_the_resolution_and_close_records_closed():
    user = UserFactory()
    incident = incident_in(S.MITIGATING)
    incident = services.incident_resolve(
        incident=incident, actor=user, resolution="Rolled back", now=T0 + 60 * MIN
    )
    assert incident.resolved_at == T0 + 60 * MIN
    event = incident.timeline.order_by("-pk").first()
    assert (event.kind, event.message, event.actor) == (
        EventKind.RESOLVED,
        "Rolled back",
        user,
    )
    incident = services.incident_close(incident=incident, actor=user, now=T0 + 90 * MIN)
    assert incident.closed_at == T0 + 90 * MIN
    assert incident.timeline.order_by("-pk").first().kind == EventKind.CLOSED


def test_assign_role_replaces_the_holder_and_records_both_names():
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    commander = role("incident-commander")
    incident = incident_in(S.INVESTIGATING)
    services.incident_assign_role(
        incident=incident, role=commander, user=alice, actor=alice, now=T0 + MIN
    )
    services.incident_assign_role(
        incident=incident, role=commander, user=alice, actor=alice, now=T0 + 2 * MIN
    )  # the same holder again: no change
    services.incident_assign_role(
        incident=incident, role=commander, user=bob, actor=alice, now=T0 + 3 * MIN
    )
    assignments = RoleAssignment.objects.filter(incident=incident).order_by("since")
    assert [(a.user.username, a.until) for a in assignments] == [
        ("alice", T0 + 3 * MIN),
        ("bob", None),
    ]
    events = incident.timeline.filter(kind=EventKind.ROLE_ASSIGNED).order_by("at")
    assert [(e.previous, e.value, e.message) for e in events] == [
        ("", "alice", "Incident Commander"),
        ("alice", "bob", "Incident Commander"),
    ]


def test_roles_are_rows_so_a_playbook_can_add_one_without_a_migration():
    sme = role("database-sme")
    user = UserFactory()
    incident = incident_in(S.INVESTIGATING)
    services.incident_assign_role(incident=incident, role=sme, user=user, actor=None)
    assert incident.role_assignments.get().role.name == "Database-Sme"


def test_assign_role_refuses_inactive_users_and_closed_incidents():
    user = UserFactory(is_active=False)
    with pytest.raises(InvalidInput, match="is not an active user"):
        services.incident_assign_role(
            incident=incident_in(S.TRIGGERED), role=role(), user=user, actor=None
        )
    with pytest.raises(InvalidTransition, match="a closed incident cannot change"):
        services.incident_assign_role(
            incident=incident_in(S.CLOSED), role=role(), user=UserFactory(), actor=None
        )
    assert not RoleAssignment.objects.exists()


def test_add_note_records_the_body_and_refuses_an_empty_one():
    user = UserFactory()
    incident = incident_in(S.INVESTIGATING)
    event = services.incident_add_note(
        incident=incident, body="  Cache hit rate 40%  ", actor=user, now=T0 + MIN
    )
    assert (event.kind, event.message, event.actor) == (EventKind.NOTE, "Cache hit rate 40%", user)
    with pytest.raises(InvalidInput, match="body: may not be blank"):
        services.incident_add_note(incident=incident, body="   ", actor=user)
    with pytest.raises(InvalidInput, match="at most 10000"):
        services.incident_add_note(incident=incident, body="x" * 10_001, actor=user)
    assert incident.timeline.filter(kind=EventKind.NOTE).count() == 1


def test_update_records_one_event_per_changed_field_and_ignores_unchanged():
    api, web = ServiceFactory(name="API"), ServiceFactory(name="Web")
    incident = declare(services=[api], title="Slow", now=T0)
    services.incident_update(
        incident=incident,
        changes={"title": "Slow", "impact": "degraded", "services": [api, web]},
        actor=None,
        now=T0 + MIN,
    )
    events = incident.timeline.filter(kind=EventKind.EDITED).order_by("pk")
    assert [(e.message, e.previous, e.value) for e in events] == [
        ("impact", "none", "degraded"),
        ("services", "API", "API, Web"),
    ]
    with pytest.raises(InvalidInput, match="status: cannot be changed here"):
        services.incident_update(incident=incident, changes={"status": "closed"}, actor=None)


def test_closed_incident_refuses_edits_and_severity_changes():
    incident = incident_in(S.CLOSED)
    with pytest.raises(InvalidTransition, match="a closed incident cannot change"):
        services.incident_update(incident=incident, changes={"title": "new"}, actor=None)
    with pytest.raises(InvalidTransition, match="a closed incident cannot change"):
        services.incident_change_severity(
            incident=incident, severity=SeverityFactory(level=3), actor=None
        )


def test_timeline_events_cannot_be_changed_or_bulk_updated():
    incident = incident_in(S.TRIGGERED)
    event = incident.timeline.get()
    event.message = "rewritten"
    with pytest.raises(TypeError, match="append-only"):
        event.save()
    with pytest.raises(TypeError, match="append-only"):
        TimelineEvent.objects.filter(pk=event.pk).update(message="rewritten")
    assert TimelineEvent.objects.get(pk=event.pk).message == "Checkout is down"


def test_open_statuses_are_the_ones_before_resolution():
    assert set(OPEN_STATUSES) == {
        S.TRIGGERED,
        S.ACKNOWLEDGED,
        S.INVESTIGATING,
        S.MITIGATING,
        S.MONITORING,
    }


# --- concurrency ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_concurrent_declarations_get_distinct_consecutive_references():
    severity = SeverityFactory(level=2)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker():
        try:
            barrier.wait(timeout=10)
            for _ in range(5):
                services.incident_declare(title="storm", severity=severity, actor=None)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    numbers = sorted(Incident.objects.values_list("number", flat=True))
    assert numbers == list(range(numbers[0], numbers[0] + 40))
    assert Incident.objects.values("reference").distinct().count() == 40


def backend_pid(conn) -> int:
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def wait_until_blocked(waiter: int, holder: int, *, timeout: float = 10.0) -> None:
    """Return once backend `waiter` waits on a lock that backend `holder` holds, as
    PostgreSQL reports it to a third connection; fail after `timeout` seconds."""
    observer = connections.create_connection(DEFAULT_DB_ALIAS)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with observer.cursor() as cursor:
                cursor.execute(
                    "SELECT wait_event_type, %s = ANY(pg_blocking_pids(pid))"
                    " FROM pg_stat_activity WHERE pid = %s AND datname = current_database()",
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


@pytest.mark.django_db(transaction=True)
def test_resolve_waiting_on_the_row_lock_resolves_after_the_acknowledgement_commits():
    incident = incident_in(S.TRIGGERED)
    waiter_pids: queue.Queue[int] = queue.Queue()
    errors: list[BaseException] = []

    def resolve_on_its_own_connection():
        try:
            waiter_pids.put(backend_pid(connection))
            services.incident_resolve(incident=incident.pk, actor=None)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    resolver = threading.Thread(target=resolve_on_its_own_connection)
    try:
        with transaction.atomic():
            Incident.objects.select_for_update().get(pk=incident.pk)
            resolver.start()
            wait_until_blocked(waiter_pids.get(timeout=10), holder=backend_pid(connection))
            # The resolver is parked on our row lock; acknowledge, then commit to release it.
            services.incident_acknowledge(incident=incident.pk, actor=None)
    finally:
        if resolver.ident is not None:
            resolver.join(timeout=30)

    assert not resolver.is_alive()
    assert errors == []
    incident.refresh_from_db()
    assert incident.status == S.RESOLVED
    assert incident.acknowledged_at <= incident.resolved_at
    events = list(incident.timeline.order_by("pk"))
    assert [(e.kind, e.previous, e.value) for e in events] == [
        (EventKind.DECLARED, "", "Sev1"),
        (EventKind.ACKNOWLEDGED, S.TRIGGERED, S.ACKNOWLEDGED),
        # The resolver re-read the row once the lock was released: it saw the acknowledgement.
        (EventKind.RESOLVED, S.ACKNOWLEDGED, S.RESOLVED),
    ]
