"""Alert ingestion at the service level: deduplication, grouping, auto-resolve, routes,
severity mapping, heartbeats and Events v2 acknowledgements, on real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.conf import settings

from incidents.ingestion import payloads
from incidents.ingestion.services import (
    DEFAULT_SEVERITY_MAP,
    HEARTBEAT_FINGERPRINT,
    NotConfigured,
    alerts_ingest,
    group_key_for,
    heartbeat_ping,
    heartbeats_check,
    integration_by_token,
    integration_create,
)
from incidents.models import (
    Alert,
    AlertGroup,
    AlertStatus,
    EventKind,
    Incident,
    IncidentStatus,
    Severity,
)
from incidents.services import incident_resolve

from .factories import (
    AlertRouteFactory,
    RunbookFactory,
    ServiceFactory,
    SeverityFactory,
    TeamFactory,
    alertmanager_body,
    integration,
)

pytestmark = pytest.mark.django_db
S = IncidentStatus
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


@pytest.fixture
def sev():
    return {level: SeverityFactory(level=level) for level in (1, 2, 3, 4)}


def am(*alerts, group_key='{}:{alertname="X"}', status="firing"):
    return payloads.parse_alertmanager(
        alertmanager_body(*alerts, group_key=group_key, status=status)
    )


def ingest(source, delivery, at=T0):
    return alerts_ingest(integration=source, delivery=delivery, now=at)


def kinds(incident) -> list[str]:
    return list(incident.timeline.order_by("at", "pk").values_list("kind", flat=True))


# --- deduplication and grouping -------------------------------------------------------------


def test_the_same_fingerprint_again_only_counts(sev):
    source, _ = integration()
    first = ingest(source, am({"fingerprint": "fp1"}))
    second = ingest(source, am({"fingerprint": "fp1"}), at=T0 + MIN)

    assert (first.created, first.duplicates) == (1, 0)
    assert (second.created, second.duplicates) == (0, 1)
    assert second.opened == set()
    alert = Alert.objects.get()
    assert alert.count == 2
    assert alert.first_received_at == T0
    assert alert.last_received_at == T0 + MIN
    incident = Incident.objects.get()
    assert second.incidents == {incident.reference}
    assert kinds(incident) == [EventKind.DECLARED, EventKind.ALERT_FIRED]


def test_a_repeat_inside_one_delivery_is_one_alert(sev):
    source, _ = integration()
    result = ingest(source, am({"fingerprint": "fp1"}, {"fingerprint": "fp1"}))
    assert result.created == 1
    assert Alert.objects.get().count == 1


def test_alerts_sharing_the_group_key_join_one_incident(sev):
    source, _ = integration()
    ingest(source, am({"fingerprint": "fp1"}, {"fingerprint": "fp2"}))
    later = ingest(source, am({"fingerprint": "fp3"}), at=T0 + MIN)
    other = ingest(source, am({"fingerprint": "fp4"}, group_key="other"), at=T0 + 2 * MIN)

    assert later.opened == set()
    assert Incident.objects.count() == 2
    incident = Alert.objects.get(fingerprint="fp1").incident
    assert set(incident.alerts.values_list("fingerprint", flat=True)) == {"fp1", "fp2", "fp3"}
    assert other.opened == {Alert.objects.get(fingerprint="fp4").incident.reference}
    assert AlertGroup.objects.filter(is_open=True).count() == 2


def test_grouping_keys_group_by_labels(sev):
    source, _ = integration(grouping_keys=["alertname", "cluster"])
    ingest(
        source,
        am(
            {"fingerprint": "a", "labels": {"alertname": "Down", "cluster": "eu", "pod": "1"}},
            {"fingerprint": "b", "labels": {"alertname": "Down", "cluster": "eu", "pod": "2"}},
            {"fingerprint": "c", "labels": {"alertname": "Down", "cluster": "us"}},
            {"fingerprint": "d", "labels": {"alertname": "Slow", "cluster": "eu"}},
            group_key="one Alertmanager group",
        ),
    )
    by_fp = {a.fingerprint: a for a in Alert.objects.all()}
    assert by_fp["a"].incident == by_fp["b"].incident
    assert len({by_fp[f].incident_id for f in "acd"}) == 3
    assert by_fp["a"].group_key == '["Down","eu"]'
    assert Incident.objects.count() == 3


def test_a_long_group_key_is_hashed_to_fit():
    source, _ = integration()
    long_key = "k" * 1000
    alert = payloads.AlertIn(fingerprint="f", status="firing", name="n", group_hint=long_key)
    key = group_key_for(source, alert)
    assert key.startswith("sha256:")
    assert len(key) <= 255
    assert key == group_key_for(source, alert)


# --- auto-resolve and re-firing ---------------------------------------------------------------


def test_auto_resolve_when_every_alert_resolves(sev):
    source, _ = integration(auto_resolve=True)
    ingest(source, am({"fingerprint": "fp1"}, {"fingerprint": "fp2"}))
    incident = Incident.objects.get()

    one = ingest(source, am({"fingerprint": "fp1"}, status="resolved"), at=T0 + MIN)
    assert one.resolved == 1
    incident.refresh_from_db()
    assert incident.status == S.TRIGGERED  # fp2 still fires

    ingest(source, am({"fingerprint": "fp2"}, status="resolved"), at=T0 + 2 * MIN)
    incident.refresh_from_db()
    assert incident.status == S.RESOLVED
    assert incident.resolved_at == T0 + 2 * MIN
    assert kinds(incident) == [
        EventKind.DECLARED,
        EventKind.ALERT_FIRED,
        EventKind.ALERT_FIRED,
        EventKind.ALERT_RESOLVED,
        EventKind.ALERT_RESOLVED,
        EventKind.RESOLVED,
    ]
    resolved = incident.timeline.get(kind=EventKind.RESOLVED)
    assert resolved.actor_label == f"integration {source.name}"
    assert "Every alert" in resolved.message
    assert set(Alert.objects.values_list("status", flat=True)) == {AlertStatus.RESOLVED}
    assert Alert.objects.get(fingerprint="fp2").resolved_at == T0 + 2 * MIN


def test_without_auto_resolve_the_incident_stays_open(sev):
    source, _ = integration(auto_resolve=False)
    ingest(source, am({"fingerprint": "fp1"}))
    ingest(source, am({"fingerprint": "fp1"}, status="resolved"), at=T0 + MIN)
    incident = Incident.objects.get()
    assert incident.status == S.TRIGGERED
    assert Alert.objects.get().status == AlertStatus.RESOLVED
    assert kinds(incident)[-1] == EventKind.ALERT_RESOLVED
    # The group is still the open incident's: the alert firing again joins it.
    again = ingest(source, am({"fingerprint": "fp1"}), at=T0 + 2 * MIN)
    assert again.opened == set()
    assert Alert.objects.filter(incident=incident).count() == 2


def test_a_new_firing_after_resolution_opens_a_new_incident(sev):
    source, _ = integration()
    ingest(source, am({"fingerprint": "fp1"}))
    ingest(source, am({"fingerprint": "fp1"}, status="resolved"), at=T0 + MIN)
    first = Incident.objects.get()
    assert first.status == S.RESOLVED

    again = ingest(source, am({"fingerprint": "fp1"}), at=T0 + 2 * MIN)
    second = Incident.objects.exclude(pk=first.pk).get()
    assert again.opened == {second.reference}
    assert second.status == S.TRIGGERED
    rows = Alert.objects.order_by("pk")
    assert [(a.incident_id, a.status) for a in rows] == [
        (first.pk, AlertStatus.RESOLVED),
        (second.pk, AlertStatus.FIRING),
    ]
    assert AlertGroup.objects.get(is_open=True).incident == second
    assert AlertGroup.objects.get(is_open=False).incident == first


def test_a_new_alert_after_a_manual_resolution_opens_a_new_incident(sev):
    source, _ = integration()
    ingest(source, am({"fingerprint": "fp1"}))
    first = Incident.objects.get()
    incident_resolve(incident=first, actor=None, now=T0 + MIN)
    ingest(source, am({"fingerprint": "fp2"}), at=T0 + 2 * MIN)
    assert Alert.objects.get(fingerprint="fp2").incident != first
    assert Incident.objects.count() == 2


def test_a_resolution_of_an_unknown_alert_is_ignored(sev):
    source, _ = integration()
    result = ingest(source, am({"fingerprint": "never"}, status="resolved"))
    assert result.ignored == 1
    assert Alert.objects.count() == 0
    assert Incident.objects.count() == 0


def test_firing_then_resolved_in_one_delivery_the_last_word_wins(sev):
    source, _ = integration()
    ingest(source, am({"fingerprint": "fp1"}))
    body = alertmanager_body({"fingerprint": "fp1"}, {"fingerprint": "fp1", "status": "resolved"})
    ingest(source, payloads.parse_alertmanager(body), at=T0 + MIN)
    assert Alert.objects.get().status == AlertStatus.RESOLVED
    assert Incident.objects.get().status == S.RESOLVED


# --- routes -----------------------------------------------------------------------------------


def test_a_route_by_exact_name_sets_runbook_severity_service_and_team(sev):
    source, _ = integration()
    service, team = ServiceFactory(), TeamFactory()
    runbook = RunbookFactory(code="RB-01", title="Backend service down")
    AlertRouteFactory(
        alert_name="BackendServiceDown",
        runbook=runbook,
        severity=sev[1],
        service=service,
        team=team,
    )
    ingest(
        source,
        am({"fingerprint": "fp1", "labels": {"alertname": "BackendServiceDown"}}),
    )
    incident = Incident.objects.get()
    assert incident.runbook == runbook
    assert incident.severity == sev[1]
    assert list(incident.services.all()) == [service]
    assert incident.team == team
    assert incident.title == "BackendServiceDown"


def test_a_pattern_route_with_labels_and_first_match_by_position(sev):
    source, _ = integration()
    db_prod = RunbookFactory(code="RB-02")
    db_any = RunbookFactory(code="RB-03")
    # Created first but tried second: position decides.
    AlertRouteFactory(alert_name="Database*", runbook=db_any, severity=sev[3], position=20)
    AlertRouteFactory(
        alert_name="Database*",
        match_labels={"env": "prod"},
        runbook=db_prod,
        severity=sev[1],
        position=10,
    )
    AlertRouteFactory(alert_name="Other", runbook=RunbookFactory(code="RB-04"), position=1)

    ingest(
        source,
        am(
            {"fingerprint": "p", "labels": {"alertname": "DatabaseDown", "env": "prod"}},
            group_key="prod",
        ),
    )
    ingest(
        source,
        am(
            {"fingerprint": "s", "labels": {"alertname": "DatabaseSlow", "env": "staging"}},
            group_key="staging",
        ),
    )
    ingest(
        source,
        am({"fingerprint": "n", "labels": {"alertname": "DiskFull"}}, group_key="none"),
    )
    prod = Alert.objects.get(fingerprint="p").incident
    staging = Alert.objects.get(fingerprint="s").incident
    unrouted = Alert.objects.get(fingerprint="n").incident
    assert (prod.runbook, prod.severity) == (db_prod, sev[1])
    assert (staging.runbook, staging.severity) == (db_any, sev[3])
    assert unrouted.runbook is None


def test_routes_of_another_integration_and_inactive_routes_do_not_apply(sev):
    source, _ = integration()
    other, _ = integration()
    AlertRouteFactory(alert_name="X", integration=other, runbook=RunbookFactory(code="RB-10"))
    AlertRouteFactory(alert_name="X", is_active=False, runbook=RunbookFactory(code="RB-11"))
    mine = RunbookFactory(code="RB-12")
    AlertRouteFactory(alert_name="X", integration=source, runbook=mine, position=500)
    ingest(source, am({"fingerprint": "fp1"}))
    assert Incident.objects.get().runbook == mine


def test_defaults_of_the_integration_apply_without_a_route(sev):
    service, team = ServiceFactory(), TeamFactory()
    source, _ = integration(default_service=service, default_team=team, default_severity=sev[2])
    ingest(source, am({"fingerprint": "fp1", "labels": {"severity": "unknown-word"}}))
    incident = Incident.objects.get()
    assert incident.severity == sev[2]
    assert list(incident.services.all()) == [service]
    assert incident.team == team


# --- severity mapping -------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "level"), sorted(DEFAULT_SEVERITY_MAP.items()))
def test_the_default_mapping(sev, label, level):
    source, _ = integration()
    ingest(source, am({"fingerprint": "fp1", "labels": {"severity": label}}))
    assert Incident.objects.get().severity == sev[level]


def test_the_integration_mapping_replaces_the_default_and_the_worst_alert_wins(sev):
    source, _ = integration(severity_label="priority", severity_map={"P1": 1, "p3": "3"})
    ingest(
        source,
        am(
            {"fingerprint": "a", "labels": {"priority": "p3"}},
            {"fingerprint": "b", "labels": {"priority": "P1", "severity": "info"}},
        ),
    )
    incident = Incident.objects.get()
    assert incident.severity == sev[1]
    assert Alert.objects.get(fingerprint="a").severity_label == "p3"
    # "critical" is in the default map, not in this integration's.
    ingest(source, am({"fingerprint": "c", "labels": {"severity": "critical"}}, group_key="g2"))
    assert Alert.objects.get(fingerprint="c").incident.severity == sev[4]
    # A level typed as a string in the admin's JSON ("3") counts as that level.
    ingest(source, am({"fingerprint": "d", "labels": {"priority": "P3"}}, group_key="g3"))
    assert Alert.objects.get(fingerprint="d").incident.severity == sev[3]


def test_default_severity_then_the_least_severe_level(sev):
    with_default, _ = integration(default_severity=sev[2])
    without, _ = integration()
    ingest(with_default, am({"fingerprint": "a"}))
    ingest(without, am({"fingerprint": "b"}))
    assert Alert.objects.get(fingerprint="a").incident.severity == sev[2]
    assert Alert.objects.get(fingerprint="b").incident.severity == sev[4]


def test_a_mapping_to_a_level_that_does_not_exist_falls_back(sev):
    source, _ = integration(severity_map={"critical": 9})
    ingest(source, am({"fingerprint": "a", "labels": {"severity": "critical"}}))
    assert Incident.objects.get().severity == sev[4]


def test_without_any_severity_nothing_is_stored_and_it_is_not_the_senders_fault():
    assert not Severity.objects.exists()
    source, _ = integration()
    with pytest.raises(NotConfigured):
        ingest(source, am({"fingerprint": "a"}))
    assert Alert.objects.count() == 0


# --- Events v2 ----------------------------------------------------------------------------------


def events(action: str, key: str = "k1", **payload) -> payloads.Delivery:
    event = {"routing_key": "r", "event_action": action, "dedup_key": key}
    if action == "trigger":
        event["payload"] = {"summary": "Disk full", "source": "db1", "severity": "critical"}
        event["payload"].update(payload)
    return payloads.parse_events_v2(event)[1]


def test_events_v2_acknowledge_acknowledges_the_incident(sev):
    source, _ = integration(kind="events_v2")
    ingest(source, events("trigger"))
    result = ingest(source, events("acknowledge"), at=T0 + MIN)
    incident = Incident.objects.get()
    assert result.incidents == {incident.reference}
    assert incident.status == S.ACKNOWLEDGED
    assert incident.acknowledged_at == T0 + MIN
    # Again: idempotent.
    ingest(source, events("acknowledge"), at=T0 + 2 * MIN)
    assert incident.timeline.filter(kind=EventKind.ACKNOWLEDGED).count() == 1
    assert Alert.objects.get().status == AlertStatus.FIRING

    ingest(source, events("resolve"), at=T0 + 3 * MIN)
    incident.refresh_from_db()
    assert incident.status == S.RESOLVED
    # Acknowledging a resolved incident's key changes nothing.
    after = ingest(source, events("acknowledge"), at=T0 + 4 * MIN)
    assert after.ignored == 1
    incident.refresh_from_db()
    assert incident.status == S.RESOLVED


def test_events_v2_trigger_after_resolve_opens_a_new_incident(sev):
    source, _ = integration(kind="events_v2")
    ingest(source, events("trigger"))
    ingest(source, events("resolve"), at=T0 + MIN)
    ingest(source, events("trigger"), at=T0 + 2 * MIN)
    assert Incident.objects.count() == 2
    assert Alert.objects.filter(status=AlertStatus.FIRING).count() == 1


# --- heartbeats -------------------------------------------------------------------------------


def test_a_missed_heartbeat_opens_an_incident_and_a_later_ping_resolves_it(sev):
    with time_machine.travel(T0, tick=False):
        source, token = integration(kind="generic", heartbeat_interval=timedelta(minutes=5))
    assert source.heartbeat_due_at == T0 + 5 * MIN

    with time_machine.travel(T0 + 4 * MIN, tick=False):
        assert heartbeats_check() == 0
        heartbeat_ping(integration=source)
    with time_machine.travel(T0 + 8 * MIN, tick=False):
        assert heartbeats_check() == 0  # due at 9 min now
    with time_machine.travel(T0 + 10 * MIN, tick=False):
        from incidents.tasks import check_heartbeats

        assert check_heartbeats() == 1  # the beat task, run in-process
        assert heartbeats_check() == 0  # a second check does nothing
    incident = Incident.objects.get()
    assert incident.status == S.TRIGGERED
    assert incident.title == f"Heartbeat missed: {source.name}"
    alert = Alert.objects.get()
    assert (alert.fingerprint, alert.status, alert.incident) == (
        HEARTBEAT_FINGERPRINT,
        AlertStatus.FIRING,
        incident,
    )
    assert kinds(incident) == [EventKind.DECLARED, EventKind.ALERT_FIRED]
    source.refresh_from_db()
    assert source.heartbeat_due_at is None

    with time_machine.travel(T0 + 20 * MIN, tick=False):
        assert heartbeats_check() == 0
        source = integration_by_token(token)
        heartbeat_ping(integration=source)
    incident.refresh_from_db()
    assert incident.status == S.RESOLVED
    assert incident.resolved_at == T0 + 20 * MIN
    assert kinds(incident)[-2:] == [EventKind.ALERT_RESOLVED, EventKind.RESOLVED]
    source.refresh_from_db()
    assert source.heartbeat_due_at == T0 + 25 * MIN

    # Missed again: a new incident.
    with time_machine.travel(T0 + 26 * MIN, tick=False):
        assert heartbeats_check() == 1
    assert Incident.objects.count() == 2


def test_a_ping_without_auto_resolve_leaves_the_incident_open(sev):
    source, _ = integration(
        kind="generic",
        heartbeat_interval=timedelta(minutes=5),
        auto_resolve=False,
        now=T0,
    )
    assert heartbeats_check(now=T0 + 6 * MIN) == 1
    heartbeat_ping(integration=source, now=T0 + 7 * MIN)
    assert Incident.objects.get().status == S.TRIGGERED
    assert Alert.objects.get().status == AlertStatus.RESOLVED


def test_inactive_integrations_are_not_checked(sev):
    source, _ = integration(kind="generic", heartbeat_interval=timedelta(minutes=5), now=T0)
    type(source).objects.filter(pk=source.pk).update(is_active=False)
    assert heartbeats_check(now=T0 + 6 * MIN) == 0
    assert Incident.objects.count() == 0


def test_heartbeat_check_is_on_the_beat_schedule():
    from config.celery import app

    tasks = {entry["task"]: entry for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert "incidents.check_heartbeats" in tasks
    assert tasks["incidents.check_heartbeats"]["schedule"] == settings.HEARTBEAT_CHECK_SECONDS
    import incidents.tasks  # noqa: F401 - registers the task

    assert "incidents.check_heartbeats" in app.tasks


# --- integrations ---------------------------------------------------------------------------


def test_integration_tokens_are_stored_hashed_and_found_by_kind():
    source, token = integration_create(name="prom", kind="alertmanager")
    assert len(token) >= 32
    assert token not in source.token_hash
    assert source.token_prefix == token[:8]
    assert integration_by_token(token) == source
    assert integration_by_token(token, kind="alertmanager") == source
    assert integration_by_token(token, kind="generic") is None
    assert integration_by_token(token + "x") is None
    assert integration_by_token("") is None


def test_clearing_the_heartbeat_interval_stops_expecting_heartbeats(sev):
    from incidents.ingestion.services import integration_update

    source, _ = integration(kind="generic", heartbeat_interval=timedelta(minutes=5), now=T0)
    integration_update(integration=source, changes={"heartbeat_interval": None}, now=T0)
    source.refresh_from_db()
    assert source.heartbeat_due_at is None
    assert heartbeats_check(now=T0 + 60 * MIN) == 0
    assert Incident.objects.count() == 0


def test_setting_a_heartbeat_interval_expects_the_first_beat_from_now(sev):
    from incidents.ingestion.services import integration_update

    source, _ = integration(kind="generic", now=T0)
    integration_update(
        integration=source, changes={"heartbeat_interval": timedelta(minutes=10)}, now=T0
    )
    source.refresh_from_db()
    assert source.heartbeat_due_at == T0 + 10 * MIN
    assert heartbeats_check(now=T0 + 9 * MIN) == 0
    assert heartbeats_check(now=T0 + 11 * MIN) == 1


def test_integration_update_refuses_fields_it_does_not_own(sev):
    from incidents.exceptions import InvalidInput
    from incidents.ingestion.services import integration_update

    source, _ = integration(kind="generic", now=T0)
    with pytest.raises(InvalidInput, match="token_hash"):
        integration_update(integration=source, changes={"token_hash": "x" * 64})


def test_a_route_for_heartbeat_missed_matches_the_heartbeat_alert(sev):
    runbook = RunbookFactory(code="RB-HB", title="Source silent")
    AlertRouteFactory(alert_name="HeartbeatMissed", runbook=runbook)
    integration(kind="generic", heartbeat_interval=timedelta(minutes=5), now=T0)
    assert heartbeats_check(now=T0 + 6 * MIN) == 1
    assert Incident.objects.get().runbook == runbook
