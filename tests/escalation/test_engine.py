from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.core import signing
from django.db import connection
from django.test import override_settings
from django.urls import reverse

from escalation import services as engine
from escalation.models import Page, PageStatus, StepCondition, TargetKind
from escalation.planning import policy_snapshot, schedule
from incidents import services
from incidents.exceptions import InvalidTransition
from incidents.models import EventKind, Incident, IncidentStatus
from tests.incidents.factories import SeverityFactory, TeamFactory, UserFactory, declare

from .factories import ContactMethodFactory, PersonFactory, PolicyFactory, step

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
S = IncidentStatus


@pytest.fixture
def people():
    return {name: PersonFactory(name=name) for name in ("Ann", "Ben", "Cal", "Dee")}


@pytest.fixture
def chain(people):
    """Page Ann at once; Ben if still unacknowledged at 15 min; Cal (manager) if unresolved
    at 30 min; Dee (director) at 60 min; the chain runs twice."""
    policy = PolicyFactory(name="Sev1 chain", repeat=1, repeat_after=timedelta(minutes=30))
    step(policy, 0, timedelta(0), (TargetKind.PERSON, people["Ann"]))
    step(policy, 1, 15 * MIN, (TargetKind.PERSON, people["Ben"]))
    step(
        policy, 2, 30 * MIN, (TargetKind.PERSON, people["Cal"]), condition=StepCondition.UNRESOLVED
    )
    step(
        policy, 3, 60 * MIN, (TargetKind.PERSON, people["Dee"]), condition=StepCondition.UNRESOLVED
    )
    return policy


@pytest.fixture
def sev1(chain):
    return SeverityFactory(level=1, escalation_policy=chain)


def paged(incident) -> list[tuple[str, int, int]]:
    return list(
        Page.objects.filter(incident=incident)
        .order_by("round", "step_index", "person__name")
        .values_list("person__name", "step_index", "round")
    )


def tick_until(now: datetime) -> None:
    """Run escalate_due as the beat would, until nothing more is due at `now`."""
    for _ in range(20):
        before = Incident.objects.filter(next_escalation_at__lte=now).count()
        if not before:
            return
        engine.escalate_due(now=now)


def test_snapshot_and_schedule_list_every_step_of_every_round(chain):
    plan = policy_snapshot(chain)
    due = [(s, r, (at - T0)) for s, r, at in schedule(plan, T0)]
    assert due == [
        (0, 0, timedelta(0)),
        (1, 0, 15 * MIN),
        (2, 0, 30 * MIN),
        (3, 0, 60 * MIN),
        (0, 1, 90 * MIN),
        (1, 1, 105 * MIN),
        (2, 1, 120 * MIN),
        (3, 1, 150 * MIN),
    ]


def test_declare_snapshots_the_policy_and_schedules_the_first_step(sev1, chain):
    incident = declare(severity=sev1, now=T0)
    assert incident.escalation_plan["policy"] == "Sev1 chain"
    assert incident.next_escalation_at == T0
    chain.steps.all().delete()  # editing the policy later ...
    incident.refresh_from_db()
    assert len(incident.escalation_plan["steps"]) == 4  # ... leaves the running incident be


def test_unacknowledged_incident_walks_the_chain_in_order_and_once(sev1):
    incident = declare(severity=sev1, now=T0)
    tick_until(T0)
    assert paged(incident) == [("Ann", 0, 0)]
    tick_until(T0 + 14 * MIN)
    assert paged(incident) == [("Ann", 0, 0)]
    tick_until(T0 + 61 * MIN)
    assert paged(incident) == [("Ann", 0, 0), ("Ben", 1, 0), ("Cal", 2, 0), ("Dee", 3, 0)]
    tick_until(T0 + 61 * MIN)  # again: nothing new
    assert Page.objects.filter(incident=incident).count() == 4
    events = incident.timeline.filter(kind=EventKind.ESCALATED)
    assert events.count() == 4
    assert "paging Ben" in events.get(value="step 2").message


def test_acknowledged_incident_skips_unacknowledged_steps_but_keeps_the_matrix(sev1):
    incident = declare(severity=sev1, now=T0)
    tick_until(T0)
    services.incident_acknowledge(incident=incident, actor=None, now=T0 + 5 * MIN)
    tick_until(T0 + 61 * MIN)
    assert paged(incident) == [("Ann", 0, 0), ("Cal", 2, 0), ("Dee", 3, 0)]


def test_acknowledging_cancels_pending_pages_of_unacknowledged_steps(sev1):
    incident = declare(severity=sev1, now=T0)
    tick_until(T0)
    services.incident_acknowledge(incident=incident, actor=None, now=T0 + MIN)
    page = Page.objects.get(incident=incident)
    assert page.status == PageStatus.CANCELLED
    assert incident.timeline.filter(kind=EventKind.PAGE_CANCELLED).count() == 1


def test_resolving_stops_the_escalation_and_cancels_everything(sev1):
    incident = declare(severity=sev1, now=T0)
    services.incident_transition(incident=incident, to=S.INVESTIGATING, actor=None, now=T0 + MIN)
    services.incident_resolve(incident=incident, actor=None, now=T0 + 2 * MIN)
    incident.refresh_from_db()
    assert incident.next_escalation_at is None
    tick_until(T0 + 200 * MIN)
    assert paged(incident) == []


def test_reopening_escalates_to_the_next_level_at_once(sev1):
    incident = declare(severity=sev1, now=T0)
    tick_until(T0 + 16 * MIN)  # Ann and Ben paged
    services.incident_acknowledge(incident=incident, actor=None, now=T0 + 17 * MIN)
    services.incident_resolve(incident=incident, actor=None, now=T0 + 20 * MIN)
    services.incident_reopen(incident=incident, actor=None, reason="errors back", now=T0 + 22 * MIN)
    tick_until(T0 + 22 * MIN)
    assert ("Cal", 2, 0) in paged(incident)  # the next level, 8 minutes early
    assert incident.timeline.filter(kind=EventKind.ESCALATED, value="next level").exists()


def test_manual_escalate_pages_the_next_level_now_and_refuses_resolved(sev1):
    user = UserFactory()
    incident = declare(severity=sev1, now=T0)
    tick_until(T0)
    engine.incident_escalate(incident=incident, actor=user, reason="need a DBA", now=T0 + 2 * MIN)
    tick_until(T0 + 2 * MIN)
    assert ("Ben", 1, 0) in paged(incident)
    event = incident.timeline.filter(kind=EventKind.ESCALATED, value="next level").get()
    assert "need a DBA" in event.message
    services.incident_resolve(incident=incident, actor=user, now=T0 + 3 * MIN)
    with pytest.raises(InvalidTransition, match="only an open incident can be escalated"):
        engine.incident_escalate(incident=incident, actor=user, now=T0 + 4 * MIN)


def test_manual_escalate_without_a_policy_is_refused():
    incident = declare(severity=SeverityFactory(level=4), now=T0)
    with pytest.raises(InvalidTransition, match="no escalation policy"):
        engine.incident_escalate(incident=incident, actor=None, now=T0)


def test_raising_severity_replans_under_the_new_policy_at_once(people, sev1):
    quiet = PolicyFactory(name="Sev3 chain")
    step(quiet, 0, 60 * MIN, (TargetKind.PERSON, people["Dee"]))
    sev3 = SeverityFactory(level=3, escalation_policy=quiet)
    incident = declare(severity=sev3, now=T0)
    assert incident.next_escalation_at == T0 + 60 * MIN
    services.incident_change_severity(
        incident=incident, severity=sev1, actor=None, now=T0 + 20 * MIN
    )
    incident.refresh_from_db()
    assert incident.escalation_plan["policy"] == "Sev1 chain"
    assert incident.escalation_plan["version"] == 2
    tick_until(T0 + 20 * MIN)
    # Steps whose time has passed under the new plan fire at once, in order.
    assert paged(incident) == [("Ann", 0, 0), ("Ben", 1, 0)]
    assert incident.timeline.filter(kind=EventKind.ESCALATION_REPLANNED).count() == 1


def test_team_target_pages_each_member_once_and_drills_only_opted_in(people):
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    team = TeamFactory()
    team.members.add(alice, bob)
    a = PersonFactory(name="Alice", user=alice, opt_in_drills=True)
    PersonFactory(name="Bob", user=bob)
    policy = PolicyFactory()
    step(policy, 0, timedelta(0), (TargetKind.TEAM, team), (TargetKind.PERSON, a))
    severity = SeverityFactory(level=2, escalation_policy=policy)
    real = declare(severity=severity, now=T0)
    drill = declare(severity=severity, is_drill=True, now=T0)
    tick_until(T0)
    assert [name for name, *_ in paged(real)] == ["Alice", "Bob"]
    assert [name for name, *_ in paged(drill)] == ["Alice"]


def test_a_step_with_nobody_to_page_says_so_on_the_timeline():
    policy = PolicyFactory()
    step(policy, 0, timedelta(0), (TargetKind.PERSON, PersonFactory(is_active=False)))
    incident = declare(severity=SeverityFactory(level=2, escalation_policy=policy), now=T0)
    tick_until(T0)
    assert paged(incident) == []
    assert "nobody to page" in incident.timeline.get(kind=EventKind.ESCALATED).message


@pytest.mark.django_db(transaction=True)
def test_two_ticks_racing_on_two_connections_page_exactly_once(people, chain):
    sev1 = SeverityFactory(level=1, escalation_policy=chain)
    incidents = [declare(severity=sev1, now=T0) for _ in range(30)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def tick():
        try:
            barrier.wait(timeout=10)
            for _ in range(6):
                engine.escalate_due(now=T0 + 61 * MIN, batch=7)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=tick) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    tick_until(T0 + 61 * MIN)

    assert errors == []
    for incident in incidents:
        assert [name for name, *_ in paged(incident)] == ["Ann", "Ben", "Cal", "Dee"]
    assert Page.objects.count() == 4 * 30


# --- breaches and the auditor -----------------------------------------------------------------


def test_each_breached_target_is_recorded_once():
    incident = declare(severity=SeverityFactory(level=1), now=T0)
    assert engine.record_breaches(now=T0 + 14 * MIN) == 0
    assert engine.record_breaches(now=T0 + 16 * MIN) == 1
    assert engine.record_breaches(now=T0 + 17 * MIN) == 0
    assert engine.record_breaches(now=T0 + 5 * 60 * MIN) == 2  # resolve, and update cadence
    events = incident.timeline.filter(kind=EventKind.TARGET_BREACHED).order_by("pk")
    assert [e.value for e in events] == ["acknowledge", "resolve", "status update"]
    assert "The acknowledge target of Sev1 (15m) was missed" in events[0].message


def test_auditor_reports_overdue_escalations_once_per_step(client, sev1):
    incident = declare(severity=sev1, now=T0)
    with override_settings(ESCALATION_OVERDUE_AFTER=60):
        assert engine.audit_escalations(now=T0 + 30 * MIN // 60) == 0
        assert engine.audit_escalations(now=T0 + 2 * MIN) == 1
        assert engine.audit_escalations(now=T0 + 3 * MIN) == 1
    assert incident.timeline.filter(kind=EventKind.ESCALATION_OVERDUE).count() == 1


def test_healthz_counts_overdue_escalations(client, sev1):
    declare(severity=sev1, now=datetime.now(UTC) - 5 * MIN)
    assert client.get("/healthz").json()["escalations_overdue"] == 1


# --- the acknowledgement link ----------------------------------------------------------------


def test_ack_link_acknowledges_once_as_the_recipient_and_get_changes_nothing(client, sev1):
    user = UserFactory(username="ann")
    incident = declare(severity=sev1, now=T0)
    tick_until(T0)
    page = Page.objects.get(incident=incident)
    page.person.user = user
    page.person.save()
    url = reverse("escalation:page-ack", args=[engine.ack_token(page)])

    response = client.get(url)
    assert response.status_code == 200
    assert b"Acknowledge" in response.content
    incident.refresh_from_db()
    assert incident.status == S.TRIGGERED  # a mail scanner's GET does nothing

    assert client.post(url).status_code == 200
    incident.refresh_from_db()
    assert incident.status == S.ACKNOWLEDGED
    event = incident.timeline.get(kind=EventKind.ACKNOWLEDGED)
    assert (event.actor, event.actor_label) == (user, f"{page.person.name} (page link)")
    response = client.post(url)
    assert response.status_code == 409
    assert b"already used" in response.content


def test_ack_link_refuses_forged_and_expired_tokens(client, sev1):
    incident = declare(severity=sev1, now=T0)
    tick_until(T0)
    page = Page.objects.get(incident=incident)
    forged = signing.dumps({"page": page.pk}, salt="another-salt")
    assert client.post(reverse("escalation:page-ack", args=[forged])).status_code == 404
    token = engine.ack_token(page)
    with override_settings(ACK_LINK_MAX_AGE=-1):
        response = client.post(reverse("escalation:page-ack", args=[token]))
    assert response.status_code == 410
    incident.refresh_from_db()
    assert incident.status == S.TRIGGERED


def test_contact_methods_are_ordered_primary_first(people):
    ann = people["Ann"]
    ContactMethodFactory(person=ann, position=1, address="ann-backup@example.com")
    ContactMethodFactory(person=ann, position=0, address="ann@example.com")
    assert [m.address for m in engine._methods(ann)] == [
        "ann@example.com",
        "ann-backup@example.com",
    ]


@pytest.mark.django_db(transaction=True)
def test_acknowledge_racing_the_tick_means_nobody_is_paged(people, chain):
    """The tick runs while an acknowledgement holds the incident's row lock: it skips the
    locked row instead of waiting, and once the acknowledgement commits the unacknowledged
    steps no longer page anyone."""
    from django.db import transaction

    sev1 = SeverityFactory(level=1, escalation_policy=chain)
    incident = declare(severity=sev1, now=T0)
    results: list[int] = []

    def tick():
        try:
            results.append(engine.escalate_due(now=T0 + 16 * MIN))
        finally:
            connection.close()

    with transaction.atomic():
        Incident.objects.select_for_update().get(pk=incident.pk)
        services.incident_acknowledge(incident=incident.pk, actor=None, now=T0 + MIN)
        racer = threading.Thread(target=tick)
        racer.start()
        racer.join(timeout=30)
        assert results == [0]  # skipped the locked row, did not wait for it
    tick_until(T0 + 16 * MIN)
    assert paged(incident) == []
    incident.refresh_from_db()
    assert incident.escalation_step == 2  # the unacknowledged steps passed without paging


def test_admin_escalate_action_pages_the_next_level(admin_client, sev1):
    incident = declare(severity=sev1, now=T0)
    tick_until(T0)
    admin_client.post(
        reverse("admin:incidents_incident_changelist"),
        {"action": "escalate", "_selected_action": [incident.pk]},
    )
    incident.refresh_from_db()
    assert incident.next_escalation_at is not None
    tick_until(incident.next_escalation_at)
    assert ("Ben", 1, 0) in paged(incident)
