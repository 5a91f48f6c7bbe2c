"""Status updates: posting, the severity's cadence, the first-public-update rule, reminders
of overdue updates (through a real SMTP server and a real HTTP server), the team's chat
webhook, the admin's panel, list column and filter, and the API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
import time_machine
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from escalation import services as engine
from escalation.models import ContactKind, OncallNotice
from incidents import services
from incidents.comms import updates
from incidents.exceptions import InvalidInput, InvalidTransition
from incidents.models import (
    EventKind,
    Incident,
    IncidentStatus,
    PublicStage,
    StatusUpdate,
    TemplateKind,
)
from incidents.tasks import post_chat_message, send_update_reminder
from tests.escalation.factories import ContactMethodFactory, PersonFactory

from .factories import (
    ServiceFactory,
    SeverityFactory,
    TeamFactory,
    UserFactory,
    assign,
    declare,
)
from .test_admin import bulk_incidents, count_queries

pytestmark = pytest.mark.django_db
S = IncidentStatus
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
H = timedelta(hours=1)


@pytest.fixture
def sev1():
    return SeverityFactory(level=1)  # updates every 30 minutes


@pytest.fixture
def checkout():
    return ServiceFactory(name="Checkout", slug="checkout")  # public


@pytest.fixture
def ledger():
    return ServiceFactory(name="Ledger", slug="ledger", is_public=False)


@pytest.fixture
def team():
    return TeamFactory(name="Payments", slug="payments", summary_email="payments@example.com")


def events(incident, kind) -> list:
    return list(incident.timeline.filter(kind=kind).order_by("at", "pk"))


def breaches(incident, target: str) -> list:
    """The recorded breaches of one target ("status update", "public update", ...)."""
    return list(
        incident.timeline.filter(kind=EventKind.TARGET_BREACHED, value=target).order_by("at", "pk")
    )


def queued(callbacks, task) -> list[tuple]:
    """The arguments of each `task` queued on commit by the code under test."""
    return [
        cb.args[1:]
        for cb in callbacks
        if isinstance(cb, partial) and cb.args and cb.args[0] is task
    ]


def post(incident, body="Looking into it", **kwargs):
    kwargs.setdefault("actor", None)
    return updates.status_update_post(incident=incident, body=body, **kwargs)


# --- posting ----------------------------------------------------------------------------------


def test_internal_update_restarts_the_cadence_and_records_one_event(sev1, ledger):
    user = UserFactory(username="cora")
    incident = declare(severity=sev1, services=[ledger], now=T0)
    assert incident.next_update_due_at == T0 + 30 * MIN

    update = post(incident, "Error rate is falling", actor=user, now=T0 + 10 * MIN)

    incident.refresh_from_db()
    assert incident.last_update_at == T0 + 10 * MIN
    assert incident.next_update_due_at == T0 + 40 * MIN
    assert update.next_due_at == T0 + 40 * MIN
    assert (update.public, update.stage, update.posted_by, update.posted_by_label) == (
        False,
        PublicStage.INVESTIGATING,
        user,
        "cora",
    )
    [event] = events(incident, EventKind.STATUS_UPDATE)
    assert (event.value, event.message, event.actor) == ("internal", "Error rate is falling", user)


@pytest.mark.parametrize(
    ("status", "stage"),
    [
        (S.TRIGGERED, PublicStage.INVESTIGATING),
        (S.ACKNOWLEDGED, PublicStage.INVESTIGATING),
        (S.MITIGATING, PublicStage.IDENTIFIED),
        (S.MONITORING, PublicStage.MONITORING),
        (S.RESOLVED, PublicStage.RESOLVED),
    ],
)
def test_public_stage_defaults_from_the_incident_status(sev1, status, stage):
    incident = declare(severity=sev1, now=T0)
    services.incident_transition(incident=incident, to=status, actor=None, now=T0 + MIN)
    assert post(incident, public=True, now=T0 + 2 * MIN).stage == stage
    assert post(incident, stage=PublicStage.MONITORING, now=T0 + 3 * MIN).stage == "monitoring"


def test_update_on_a_resolved_incident_owes_no_next_update(sev1):
    incident = declare(severity=sev1, now=T0)
    services.incident_resolve(incident=incident, actor=None, now=T0 + 5 * MIN)
    update = post(incident, "Fixed by a rollback", public=True, now=T0 + 6 * MIN)
    incident.refresh_from_db()
    assert update.next_due_at is None
    assert incident.next_update_due_at is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"body": "   "}, "body"),
        ({"body": "x" * 5001}, "body"),
        ({"body": "nul \x00 byte"}, "body"),
        ({"stage": "fixed"}, "stage"),
        ({"public": "yes"}, "public"),
    ],
)
def test_bad_update_input_is_refused_and_changes_nothing(sev1, kwargs, field):
    incident = declare(severity=sev1, now=T0)
    before = Incident.objects.values().get(pk=incident.pk)
    with pytest.raises(InvalidInput) as refused:
        post(incident, **{"body": "ok", **kwargs}, now=T0 + MIN)
    assert refused.value.field == field
    assert not StatusUpdate.objects.exists()
    assert not events(incident, EventKind.STATUS_UPDATE)
    assert Incident.objects.values().get(pk=incident.pk) == before


def test_closed_incident_refuses_a_status_update(sev1):
    incident = declare(severity=sev1, now=T0)
    services.incident_resolve(incident=incident, actor=None, now=T0 + MIN)
    services.incident_close(incident=incident, actor=None, now=T0 + 2 * MIN)
    with pytest.raises(InvalidTransition, match="closed incident takes no more updates"):
        post(incident, now=T0 + 3 * MIN)
    assert not StatusUpdate.objects.exists()


# --- the cadence and its breach -----------------------------------------------------------


def test_overdue_update_is_recorded_once_and_again_when_the_next_one_is_late(sev1):
    incident = declare(severity=sev1, now=T0)
    engine.record_breaches(now=T0 + 29 * MIN)
    assert not breaches(incident, "status update")

    engine.record_breaches(now=T0 + 31 * MIN)
    engine.record_breaches(now=T0 + 32 * MIN)
    [first] = breaches(incident, "status update")
    assert "status update target of Sev1 (30m) was missed" in first.message

    post(incident, now=T0 + 35 * MIN)
    incident.refresh_from_db()
    assert incident.update_breached_at is None
    engine.record_breaches(now=T0 + 64 * MIN)
    assert len(breaches(incident, "status update")) == 1
    engine.record_breaches(now=T0 + 66 * MIN)
    assert len(breaches(incident, "status update")) == 2


@pytest.mark.parametrize(("level", "cadence"), [(2, timedelta(hours=1)), (4, timedelta(days=1))])
def test_cadence_follows_the_severity(level, cadence):
    incident = declare(severity=SeverityFactory(level=level), now=T0)
    update = post(incident, now=T0 + MIN)
    assert update.next_due_at == T0 + MIN + cadence


def test_reopening_starts_a_new_update_period(sev1):
    incident = declare(severity=sev1, now=T0)
    engine.record_breaches(now=T0 + 31 * MIN)
    services.incident_resolve(incident=incident, actor=None, now=T0 + 40 * MIN)
    services.incident_reopen(incident=incident, actor=None, now=T0 + 50 * MIN)
    incident.refresh_from_db()
    assert incident.update_breached_at is None
    assert incident.next_update_due_at == T0 + 80 * MIN
    engine.record_breaches(now=T0 + 81 * MIN)
    assert len(breaches(incident, "status update")) == 2


# --- the first public update ----------------------------------------------------------------


def test_public_incident_owes_its_first_public_update_within_15_minutes(sev1, checkout):
    incident = declare(severity=sev1, services=[checkout], now=T0)
    assert incident.public_update_due_at == T0 + 15 * MIN

    post(incident, "internal only", now=T0 + 5 * MIN)  # an internal update does not settle it
    engine.record_breaches(now=T0 + 16 * MIN)
    engine.record_breaches(now=T0 + 17 * MIN)
    [breach] = breaches(incident, "public update")
    assert "first public update (15m" in breach.message

    post(incident, "We are investigating errors at checkout.", public=True, now=T0 + 18 * MIN)
    incident.refresh_from_db()
    assert incident.public_update_due_at is None
    assert incident.public_update_breached_at == T0 + 16 * MIN  # the record stays


def test_public_update_in_time_is_no_breach(sev1, checkout):
    incident = declare(severity=sev1, services=[checkout], now=T0)
    post(incident, public=True, now=T0 + 14 * MIN)
    engine.record_breaches(now=T0 + 20 * MIN)
    assert not breaches(incident, "public update")


def test_drills_and_internal_services_owe_no_public_update(sev1, checkout, ledger):
    assert declare(severity=sev1, services=[ledger], now=T0).public_update_due_at is None
    drill = declare(severity=sev1, services=[checkout], is_drill=True, now=T0)
    assert drill.public_update_due_at is None
    assert declare(severity=sev1, now=T0).public_update_due_at is None


def test_services_added_later_start_the_public_clock_and_removing_them_stops_it(
    sev1, checkout, ledger
):
    incident = declare(severity=sev1, services=[ledger], now=T0)
    services.incident_update(
        incident=incident, changes={"services": [ledger, checkout]}, actor=None, now=T0 + 5 * MIN
    )
    incident.refresh_from_db()
    assert incident.public_update_due_at == T0 + 20 * MIN
    services.incident_update(
        incident=incident, changes={"services": [ledger]}, actor=None, now=T0 + 6 * MIN
    )
    incident.refresh_from_db()
    assert incident.public_update_due_at is None
    services.incident_update(
        incident=incident, changes={"services": [checkout]}, actor=None, now=T0 + 7 * MIN
    )
    services.incident_update(
        incident=incident, changes={"is_drill": True}, actor=None, now=T0 + 8 * MIN
    )
    incident.refresh_from_db()
    assert incident.public_update_due_at is None


def test_merging_a_public_incident_in_makes_the_survivor_public(sev1, checkout, ledger):
    survivor = declare(severity=sev1, services=[ledger], now=T0)
    merged = declare(severity=sev1, services=[checkout], now=T0)
    services.incident_merge(source=merged, target=survivor, actor=None, now=T0 + 2 * MIN)
    survivor.refresh_from_db()
    merged.refresh_from_db()
    assert survivor.public_update_due_at == T0 + 17 * MIN
    assert merged.public_update_due_at is None  # closed by the merge


def test_resolving_ends_the_public_obligation(sev1, checkout):
    incident = declare(severity=sev1, services=[checkout], now=T0)
    services.incident_resolve(incident=incident, actor=None, now=T0 + 5 * MIN)
    incident.refresh_from_db()
    assert incident.public_update_due_at is None
    engine.record_breaches(now=T0 + 20 * MIN)
    assert not breaches(incident, "public update")


def test_public_update_due_follows_the_setting(settings, sev1, checkout):
    settings.PUBLIC_UPDATE_DUE = timedelta(minutes=5)
    assert declare(severity=sev1, services=[checkout], now=T0).public_update_due_at == T0 + 5 * MIN


# --- reminders --------------------------------------------------------------------------------


def overdue_tick(incident, now, capture) -> list[tuple]:
    """Run the breach sweep at `now`; the reminders it queued (their task arguments)."""
    with capture(execute=False) as callbacks:
        engine.record_breaches(now=now)
    return queued(callbacks, send_update_reminder)


def test_overdue_update_reminds_the_communications_lead_by_email_once(
    sev1, smtp_server, django_capture_on_commit_callbacks
):
    cora = UserFactory(username="cora", email="cora@example.com")
    incident = declare(severity=sev1, title="Checkout <fails>", now=T0)
    assign(incident, "communications-lead", cora)

    [args] = overdue_tick(incident, T0 + 31 * MIN, django_capture_on_commit_callbacks)
    assert args == (incident.pk, (T0 + 30 * MIN).isoformat())
    [reminder] = events(incident, EventKind.UPDATE_REMINDER)
    assert reminder.value == "cora"
    assert "reminding cora (Communications Lead) through email" in reminder.message

    assert send_update_reminder.apply(args=args).get() == "sent"
    assert send_update_reminder.apply(args=args).get() == "sent already"
    [mail] = smtp_server.messages
    assert mail["To"] == "cora@example.com"
    assert mail["Subject"] == f"[Sev1] {incident.reference}: status update overdue"
    html = mail.get_body(preferencelist=("html",)).get_content()
    assert "Checkout &lt;fails&gt;" in html
    assert f"/admin/incidents/incident/{incident.pk}/change/#status-updates" in html

    # The same overdue period: no second reminder, event or mail.
    assert overdue_tick(incident, T0 + 40 * MIN, django_capture_on_commit_callbacks) == []
    assert len(events(incident, EventKind.UPDATE_REMINDER)) == 1

    # The next overdue period reminds again.
    post(incident, now=T0 + 45 * MIN)
    [again] = overdue_tick(incident, T0 + 76 * MIN, django_capture_on_commit_callbacks)
    assert send_update_reminder.apply(args=again).get() == "sent"
    assert len(smtp_server.messages) == 2
    assert len(events(incident, EventKind.UPDATE_REMINDER)) == 2


def test_a_reminder_whose_queueing_was_lost_is_queued_again_and_sent_once(
    sev1, smtp_server, django_capture_on_commit_callbacks
):
    cora = UserFactory(username="cora", email="cora@example.com")
    incident = declare(severity=sev1, title="Checkout fails", now=T0)
    assign(incident, "communications-lead", cora)
    # The breach is recorded, and its reminder's task never reaches the broker (the
    # callbacks are captured, not run: as if Redis were down at that moment).
    [args] = overdue_tick(incident, T0 + 31 * MIN, django_capture_on_commit_callbacks)

    # Within the grace period nothing is queued again: the task may still be on its way.
    assert updates.update_reminders_requeue(now=T0 + 31 * MIN) == []
    [again] = updates.update_reminders_requeue(now=T0 + 33 * MIN)
    assert again == args
    assert send_update_reminder.apply(args=again).get() == "sent"
    # Sent: the next sweeps queue nothing, and a duplicate task sends nothing.
    assert updates.update_reminders_requeue(now=T0 + 34 * MIN) == []
    assert send_update_reminder.apply(args=args).get() == "sent already"
    assert [m["To"] for m in smtp_server.messages] == ["cora@example.com"]
    # An hour after the due time the sweep gives up (the breach stays on the timeline).
    OncallNotice.objects.all().delete()
    assert updates.update_reminders_requeue(now=T0 + 91 * MIN) == []


def test_reminder_goes_through_the_escalation_contact_methods(
    sev1, http_server, allow_private_webhooks, django_capture_on_commit_callbacks
):
    cora = UserFactory(username="cora")
    person = PersonFactory(name="Cora Lead", user=cora)
    ContactMethodFactory(
        person=person, kind=ContactKind.SLACK_WEBHOOK, address=http_server.url("/cora")
    )
    incident = declare(severity=sev1, title="<!channel> alarm", now=T0)
    assign(incident, "communications-lead", cora)

    [args] = overdue_tick(incident, T0 + 31 * MIN, django_capture_on_commit_callbacks)
    assert (
        "through their escalation contact methods"
        in events(incident, EventKind.UPDATE_REMINDER)[0].message
    )
    assert send_update_reminder.apply(args=args).get() == "sent"
    [request] = http_server.requests
    assert request.path == "/cora"
    assert "Status update overdue" in request.json["text"]
    assert "&lt;!channel&gt;" in request.json["text"]  # no mention escapes into Slack


def test_reminder_tries_the_backup_method_when_the_first_fails(
    sev1, http_server, allow_private_webhooks, smtp_server
):
    cora = UserFactory(username="cora")
    person = PersonFactory(name="Cora", user=cora)
    ContactMethodFactory(
        person=person, kind=ContactKind.WEBHOOK, address=http_server.url("/down"), position=0
    )
    ContactMethodFactory(
        person=person, kind=ContactKind.EMAIL, address="cora@example.com", position=1
    )
    http_server.respond_with(404)
    incident = declare(severity=sev1, now=T0)
    assign(incident, "communications-lead", cora)
    engine.record_breaches(now=T0 + 31 * MIN)
    due = (T0 + 30 * MIN).isoformat()
    assert updates.update_reminder_send(incident_id=incident.pk, due_at=due) == "sent"
    assert [m["To"] for m in smtp_server.messages] == ["cora@example.com"]
    assert http_server.requests[0].json["event"] == "update_reminder"


def test_reminder_is_retried_while_the_mail_server_defers(sev1, smtp_server):
    cora = UserFactory(username="cora", email="cora@example.com")
    incident = declare(severity=sev1, now=T0)
    assign(incident, "communications-lead", cora)
    engine.record_breaches(now=T0 + 31 * MIN)
    due = (T0 + 30 * MIN).isoformat()
    smtp_server.reject_with("451 4.3.0 Try again later")
    with pytest.raises(updates.RetryLater):
        updates.update_reminder_send(incident_id=incident.pk, due_at=due)
    assert not OncallNotice.objects.exists()  # the claim was dropped: the retry may send
    smtp_server.reject_with(None)
    assert updates.update_reminder_send(incident_id=incident.pk, due_at=due) == "sent"
    assert len(smtp_server.messages) == 1


def test_no_reminder_goes_out_once_an_update_was_posted(
    sev1, smtp_server, django_capture_on_commit_callbacks
):
    cora = UserFactory(username="cora", email="cora@example.com")
    incident = declare(severity=sev1, now=T0)
    assign(incident, "communications-lead", cora)
    [args] = overdue_tick(incident, T0 + 31 * MIN, django_capture_on_commit_callbacks)
    post(incident, now=T0 + 32 * MIN)
    assert send_update_reminder.apply(args=args).get() == "skipped"
    assert smtp_server.messages == []


def test_without_a_communications_lead_the_commander_then_the_team_is_reminded(
    sev1, team, smtp_server, django_capture_on_commit_callbacks
):
    ida = UserFactory(username="ida", email="ida@example.com")
    led = declare(severity=sev1, team=team, title="Commanded", now=T0)
    assign(led, "incident-commander", ida)
    unled = declare(severity=sev1, team=team, title="Nobody", now=T0)
    lonely = declare(severity=sev1, title="No team", now=T0)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        engine.record_breaches(now=T0 + 31 * MIN)
    for args in queued(callbacks, send_update_reminder):
        send_update_reminder.apply(args=args)

    assert "ida (Incident Commander" in events(led, EventKind.UPDATE_REMINDER)[0].message
    assert "Payments (team" in events(unled, EventKind.UPDATE_REMINDER)[0].message
    [nobody] = events(lonely, EventKind.UPDATE_REMINDER)
    assert nobody.value == "nobody"
    assert "nobody can be reminded" in nobody.message
    assert sorted(m["To"] for m in smtp_server.messages) == [
        "ida@example.com",
        "payments@example.com",
    ]


def test_the_declarer_is_reminded_when_no_role_is_held(sev1, smtp_server):
    dora = UserFactory(username="dora", email="dora@example.com")
    incident = declare(severity=sev1, actor=dora, now=T0)
    engine.record_breaches(now=T0 + 31 * MIN)
    assert "dora (declarer" in events(incident, EventKind.UPDATE_REMINDER)[0].message
    updates.update_reminder_send(incident_id=incident.pk, due_at=(T0 + 30 * MIN).isoformat())
    assert [m["To"] for m in smtp_server.messages] == ["dora@example.com"]


def test_reminder_planning_queries_do_not_grow_with_breached_incidents(
    sev1, django_assert_max_num_queries
):
    cora = UserFactory(username="cora", email="cora@example.com")
    incidents = [declare(severity=sev1, now=T0) for _ in range(12)]
    for incident in incidents:
        assign(incident, "communications-lead", cora)
    rows = list(
        Incident.objects.select_related("severity").filter(pk__in=[i.pk for i in incidents])
    )
    with django_assert_max_num_queries(5):  # roles, declarers, people, their methods, teams
        recipients = updates.reminder_recipients(rows)
    assert {r.name for r in recipients.values()} == {"cora"}


# --- the chat channel -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("#incident-{when}", "{when} is not a known placeholder"),
        ("#incident-{}", "{} is not a known placeholder"),
        ("#incident-{seq!r}", "conversions"),
        ("#incident-{date:03d}", "cannot be filled in"),
        ("#incident {seq}", "spaces"),
        ("#" + "x" * 90, "at most 80"),
        ("#incident-{seq", "not a valid pattern"),
    ],
)
def test_bad_channel_patterns_are_refused_with_the_reason(pattern, problem):
    with pytest.raises(InvalidInput, match=problem.replace("{", r"\{").replace("}", r"\}")):
        updates.chat_channel_pattern_validate(pattern)


def test_channel_names_follow_the_pattern_and_count_the_teams_incidents_of_the_day(sev1, team):
    other = TeamFactory(name="Search", slug="search")
    first = declare(severity=sev1, team=team, now=T0)
    declare(severity=sev1, team=other, now=T0 + MIN)
    second = declare(severity=sev1, team=team, now=T0 + 2 * MIN)
    tomorrow = declare(severity=sev1, team=team, now=T0 + timedelta(days=1))
    names = [updates.chat_channel_for(i) for i in (second, first, tomorrow)]
    assert names == [
        "#incident-2026-03-02-002",
        "#incident-2026-03-02-001",
        "#incident-2026-03-03-001",
    ]
    first.refresh_from_db()
    assert first.chat_channel == "#incident-2026-03-02-001"  # stored at first use
    team.chat_channel_pattern = "#inc-{year}-{month:02d}-{number:04d}"
    team.save()
    assert updates.chat_channel_for(Incident.objects.get(pk=first.pk)) == first.chat_channel
    fresh = declare(severity=sev1, team=team, now=T0)
    assert updates.chat_channel_for(fresh) == f"#inc-2026-03-{fresh.number:04d}"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # Seed 002: a channel per day, numbered within the day.
        (
            "#incident-{date}-{seq:03d}",
            [
                "#incident-2026-12-31-001",
                "#incident-2027-01-01-001",
                "#incident-2027-01-01-002",
                "#incident-2027-01-02-001",
            ],
        ),
        # Seed 001: numbered within the year, starting again each January.
        (
            "#incident-{year}-{year_seq:03d}",
            [
                "#incident-2026-001",
                "#incident-2027-001",
                "#incident-2027-002",
                "#incident-2027-003",
            ],
        ),
    ],
)
def test_both_playbook_channel_patterns_name_the_channels(sev1, team, pattern, expected):
    team.chat_channel_pattern = pattern
    team.save()
    other = TeamFactory(name="Search", slug="search")
    new_year = datetime(2027, 1, 1, 9, 0, tzinfo=UTC)
    made = [
        declare(severity=sev1, team=team, now=new_year - timedelta(days=1)),
        declare(severity=sev1, team=team, now=new_year),
    ]
    declare(severity=sev1, team=other, now=new_year + 30 * MIN)  # another team's: not counted
    made += [
        declare(severity=sev1, team=team, now=new_year + H),
        declare(severity=sev1, team=team, now=new_year + timedelta(days=1)),
    ]
    assert [updates.chat_channel_for(i) for i in reversed(made)] == list(reversed(expected))


def test_team_admin_form_accepts_the_year_sequence_placeholder(admin_client):
    from escalation.models import Team

    response = admin_client.post(
        reverse("admin:escalation_team_add"),
        {"name": "Payments", "slug": "payments", "chat_channel_pattern": "#inc-{year_seq:03d}"},
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert Team.objects.get(slug="payments").chat_channel_pattern == "#inc-{year_seq:03d}"
    refused = admin_client.post(
        reverse("admin:escalation_team_add"),
        {"name": "Search", "slug": "search", "chat_channel_pattern": "#inc-{yearseq}"},
    )
    errors = refused.context["adminform"].form.errors["chat_channel_pattern"]
    assert "{yearseq} is not a known placeholder" in errors[0]
    assert "{year_seq}" in errors[0]


def test_a_viewer_sees_where_the_chat_webhook_goes_but_not_its_secret(client, team):
    secret = "T0001/B0002/XXXXsecretXXXX"
    team.chat_webhook_url = f"https://hooks.slack.com/services/{secret}?token=abc"
    team.save()
    url = reverse("admin:escalation_team_change", args=[team.pk])
    client.force_login(UserFactory(username="vic", groups=["Viewers"]))
    response = client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    assert "https://hooks.slack.com/…" in html
    assert "T0001" not in html
    assert "secret" not in html.lower()
    assert "token=abc" not in html
    assert 'name="chat_webhook_url"' not in html

    # Whoever may change the team sees and edits the whole URL.
    client.force_login(UserFactory(username="root", is_superuser=True))
    html = client.get(url).content.decode()
    assert 'name="chat_webhook_url"' in html
    assert secret in html


@pytest.fixture
def chat_team(team, http_server, allow_private_webhooks):
    team.chat_webhook_url = http_server.url("/chat")
    team.save()
    return team


def test_declaration_and_internal_updates_reach_the_team_chat_but_public_ones_do_not(
    sev1, chat_team, http_server, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        incident = declare(severity=sev1, team=chat_team, title="Payments <!channel>", now=T0)
        internal = post(incident, "Rolled back <@U123>", now=T0 + 5 * MIN)
        post(incident, "We are investigating.", public=True, now=T0 + 6 * MIN)
        services.incident_add_note(incident=incident, body="a note", actor=None)
    jobs = queued(callbacks, post_chat_message)
    assert jobs == [
        (incident.pk, TemplateKind.INITIAL, None),
        (incident.pk, TemplateKind.UPDATE, internal.pk),
    ]
    for job in jobs:
        assert post_chat_message.apply(args=job).get() == "sent"

    declared, update = http_server.requests
    assert declared.json["channel"] == update.json["channel"] == "#incident-2026-03-02-001"
    assert f"[Sev1] {incident.reference}: Payments &lt;!channel&gt;" in declared.json["text"]
    assert "Investigating: Rolled back &lt;@U123&gt;" in update.json["text"]
    assert "We are investigating." not in update.json["text"]
    assert declared.headers["User-Agent"].startswith("incident-tracker")


def test_resolution_reaches_the_chat_with_what_fixed_it(
    sev1, chat_team, http_server, django_capture_on_commit_callbacks
):
    incident = declare(severity=sev1, team=chat_team, now=T0)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.incident_resolve(
            incident=incident, actor=None, resolution="Rolled back 4.2", now=T0 + 9 * MIN
        )
    [job] = queued(callbacks, post_chat_message)
    assert job == (incident.pk, TemplateKind.RESOLUTION, None)
    post_chat_message.apply(args=job)
    [request] = http_server.requests
    assert "[Resolved]" in request.json["text"]
    assert "Rolled back 4.2" in request.json["text"]


def test_a_team_without_a_webhook_queues_nothing(sev1, team, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        incident = declare(severity=sev1, team=team, now=T0)
        post(incident, now=T0 + MIN)
    assert queued(callbacks, post_chat_message) == []


def test_a_temporary_chat_failure_is_retried_and_a_permanent_one_is_not(
    sev1, chat_team, http_server
):
    incident = declare(severity=sev1, team=chat_team, now=T0)
    http_server.respond_once(503)
    assert post_chat_message.apply(args=(incident.pk, TemplateKind.INITIAL)).get() == "sent"
    assert len(http_server.requests) == 2  # 503, then accepted on the retry
    http_server.respond_once(404)
    assert updates.chat_post(incident_id=incident.pk, kind=TemplateKind.INITIAL) == "failed"
    assert len(http_server.requests) == 3


def test_chat_webhook_to_a_private_address_is_refused_at_send_time(sev1, team, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    team.chat_webhook_url = "http://127.0.0.1:9/hook"
    team.save()
    incident = declare(severity=sev1, team=team, now=T0)
    assert updates.chat_post(incident_id=incident.pk, kind=TemplateKind.INITIAL) == "failed"


def test_team_admin_form_refuses_an_unknown_placeholder_and_a_private_webhook(admin_client):
    response = admin_client.post(
        reverse("admin:escalation_team_add"),
        {
            "name": "Payments",
            "slug": "payments",
            "chat_webhook_url": "http://10.0.0.5/hook",
            "chat_channel_pattern": "#incident-{when}",
        },
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "{when} is not a known placeholder" in errors["chat_channel_pattern"][0]
    assert "private address" in errors["chat_webhook_url"][0]
    from escalation.models import Team

    assert not Team.objects.filter(slug="payments").exists()


# --- the admin --------------------------------------------------------------------------------


def change_url(incident) -> str:
    return reverse("admin:incidents_incident_change", args=[incident.pk])


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def test_admin_posts_an_update_from_the_incident_page_and_lists_it(admin_client, sev1, checkout):
    incident = declare(severity=sev1, services=[checkout])
    page = admin_client.get(change_url(incident))
    assert b'id="status-updates"' in page.content
    assert b"First public update due" in page.content

    url = reverse("admin:incidents_incident_status_update", args=[incident.pk])
    response = admin_client.post(url, {"body": "Card payments fail <b>", "public": "on"})
    assert response.status_code == 302
    assert messages_of(response)[0].startswith("Public update posted.")
    update = StatusUpdate.objects.get()
    assert (update.public, update.stage, update.body) == (
        True,
        "investigating",
        "Card payments fail <b>",
    )

    page = admin_client.get(change_url(incident))
    assert b"Card payments fail &lt;b&gt;" in page.content  # in the read-only list
    assert b"First public update due" not in page.content


def test_admin_refuses_an_empty_update_and_one_on_a_closed_incident(admin_client, sev1):
    incident = declare(severity=sev1)
    url = reverse("admin:incidents_incident_status_update", args=[incident.pk])
    response = admin_client.post(url, {"body": ""})
    assert "The update was not posted: body" in messages_of(response)[-1]
    services.incident_resolve(incident=incident, actor=None)
    services.incident_close(incident=incident, actor=None)
    response = admin_client.post(url, {"body": "late"})
    assert "closed incident takes no more updates" in messages_of(response)[-1]
    assert not StatusUpdate.objects.exists()
    assert admin_client.get(url).status_code == 405


def test_viewers_cannot_post_updates(client, sev1):
    client.force_login(UserFactory(username="vic", groups=["Viewers"]))
    incident = declare(severity=sev1)
    url = reverse("admin:incidents_incident_status_update", args=[incident.pk])
    assert client.post(url, {"body": "x"}).status_code == 403
    assert b"Post a status update" not in client.get(change_url(incident)).content
    assert not StatusUpdate.objects.exists()


def test_responders_post_updates(client, sev1):
    client.force_login(UserFactory(username="rita", groups=["Responders"]))
    incident = declare(severity=sev1)
    assert b"Post a status update" in client.get(change_url(incident)).content
    url = reverse("admin:incidents_incident_status_update", args=[incident.pk])
    client.post(url, {"body": "On it", "stage": "identified"})
    assert StatusUpdate.objects.get().stage == "identified"


def test_status_updates_are_append_only_in_the_admin(admin_client, sev1):
    incident = declare(severity=sev1)
    update = post(incident)
    assert admin_client.get(reverse("admin:incidents_statusupdate_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:incidents_statusupdate_add")).status_code == 403
    assert (
        admin_client.post(
            reverse("admin:incidents_statusupdate_change", args=[update.pk]), {"body": "edited"}
        ).status_code
        == 403
    )
    assert (
        admin_client.post(
            reverse("admin:incidents_statusupdate_delete", args=[update.pk]), {"post": "yes"}
        ).status_code
        == 403
    )
    update.refresh_from_db()
    assert update.body == "Looking into it"


def test_changelist_shows_and_filters_overdue_updates(admin_client, sev1, checkout):
    with time_machine.travel(T0, tick=False):
        late = declare(severity=sev1, title="Late one")
        fresh = declare(severity=sev1, title="Fresh one", services=[checkout])
    with time_machine.travel(T0 + 20 * MIN, tick=False):
        post(fresh, "internal", now=T0 + 10 * MIN)
        changelist = reverse("admin:incidents_incident_changelist")
        response = admin_client.get(changelist)
        assert b"public update overdue 5m" in response.content
        overdue = admin_client.get(changelist + "?update_overdue=yes")
        public = admin_client.get(changelist + "?update_overdue=public")
        clear = admin_client.get(changelist + "?update_overdue=no")
    assert [i.pk for i in overdue.context["cl"].result_list] == [fresh.pk]
    assert [i.pk for i in public.context["cl"].result_list] == [fresh.pk]
    assert [i.pk for i in clear.context["cl"].result_list] == [late.pk]
    with time_machine.travel(T0 + 31 * MIN, tick=False):
        page = admin_client.get(change_url(late))
    assert b"overdue by 1m" in page.content


@pytest.mark.parametrize("query", ["?update_overdue=yes", "?update_overdue=no"])
def test_overdue_filter_runs_the_same_queries_with_10_and_1000_incidents(admin_client, query):
    url = reverse("admin:incidents_incident_changelist") + query
    bulk_incidents(10)
    small = count_queries(admin_client, url)
    bulk_incidents(990, start=5000)
    assert count_queries(admin_client, url) == small


def test_change_page_runs_the_same_queries_with_2_and_40_updates(admin_client, sev1):
    incident = declare(severity=sev1)
    for n in range(2):
        post(incident, f"update {n}")
    small = count_queries(admin_client, change_url(incident))
    for n in range(38):
        post(incident, f"more {n}", public=n % 2 == 0)
    assert count_queries(admin_client, change_url(incident)) == small
    page = admin_client.get(change_url(incident)).content.decode()
    assert page.count('class="status-update-row"') == 20
    everything = (
        reverse("admin:incidents_statusupdate_changelist") + f"?incident__exact={incident.pk}"
    )
    assert everything.replace("&", "&amp;") in page or everything in page
    declare(severity=sev1)  # another incident's updates stay out of the list
    listed = admin_client.get(everything)
    assert len(listed.context["cl"].result_list) == 40


def test_status_update_list_runs_the_same_queries_with_5_and_100_updates(admin_client, sev1):
    url = reverse("admin:incidents_statusupdate_changelist")
    incidents = [declare(severity=sev1) for _ in range(5)]
    for incident in incidents:
        post(incident)
    small = count_queries(admin_client, url)
    for n in range(95):
        post(incidents[n % 5], f"more {n}")
    assert count_queries(admin_client, url) == small


# --- the API ----------------------------------------------------------------------------------


def client_for(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def api_url(incident) -> str:
    return f"/api/v1/incidents/{incident.reference}/status-updates/"


@pytest.fixture
def rita(team):
    user = UserFactory(username="rita", is_staff=False, groups=["Responders"])
    team.members.add(user)
    return user


def test_api_posts_a_public_update_and_lists_the_updates_newest_first(rita, team, sev1, checkout):
    incident = declare(severity=sev1, team=team, services=[checkout])
    api = client_for(rita)
    response = api.post(
        api_url(incident),
        {"body": "Card payments fail for some.", "public": True, "status": "identified"},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["status"], body["public"], body["posted_by"]) == ("identified", True, "rita")
    api.post(api_url(incident), {"body": "internal note"}, format="json")

    listed = api.get(api_url(incident)).json()
    assert [u["body"] for u in listed["results"]] == [
        "internal note",
        "Card payments fail for some.",
    ]
    assert [u["public"] for u in listed["results"]] == [False, True]
    detail = api.get(f"/api/v1/incidents/{incident.reference}/").json()
    assert detail["public_update_due_at"] is None
    assert detail["last_update_at"] is not None


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"body": ""}, "body"),
        ({}, "body"),
        ({"body": "x" * 5001}, "body"),
        ({"body": "ok", "public": "maybe"}, "public"),
        ({"body": "ok", "status": "fixed"}, "status"),
    ],
)
def test_api_bad_update_input_is_a_400_naming_the_field(rita, team, sev1, payload, field):
    incident = declare(severity=sev1, team=team)
    response = client_for(rita).post(api_url(incident), payload, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not StatusUpdate.objects.exists()


def test_api_refuses_outsiders_viewers_and_closed_incidents(rita, team, sev1):
    incident = declare(severity=sev1, team=team)
    outsider = UserFactory(username="otto", is_staff=False, groups=["Responders"])
    viewer = UserFactory(username="vera", is_staff=False, groups=["Viewers"])
    refused = client_for(outsider).post(api_url(incident), {"body": "x"}, format="json")
    assert refused.status_code == 403
    assert refused.json()["code"] == "not_team_member"
    assert (
        client_for(viewer).post(api_url(incident), {"body": "x"}, format="json").status_code == 403
    )
    assert client_for(viewer).get(api_url(incident)).status_code == 200
    services.incident_resolve(incident=incident, actor=None)
    services.incident_close(incident=incident, actor=None)
    closed = client_for(rita).post(api_url(incident), {"body": "x"}, format="json")
    assert closed.status_code == 409
    assert not StatusUpdate.objects.exists()


@pytest.mark.parametrize("count", [3, 60])
def test_api_update_list_queries_are_pinned(rita, team, sev1, count, django_assert_num_queries):
    incident = declare(severity=sev1, team=team)
    StatusUpdate.objects.bulk_create(
        StatusUpdate(incident=incident, body=f"u{n}", posted_at=timezone.now())
        for n in range(count)
    )
    api = client_for(rita)
    # The token, the incident with its services and roles, the page's count and rows.
    with django_assert_num_queries(6):
        response = api.get(api_url(incident))
    assert response.json()["count"] == count
