from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from incidents import services
from incidents.deadlines import compute_deadlines
from incidents.models import EventKind, Incident, IncidentStatus, RoleAssignment, TimelineEvent

from .factories import ServiceFactory, SeverityFactory, TeamFactory, UserFactory, declare, role

pytestmark = pytest.mark.django_db
S = IncidentStatus
CHANGELIST = "admin:incidents_incident_changelist"


@pytest.fixture
def responder(client):
    user = UserFactory(username="rita", groups=["Responders"])
    client.force_login(user)
    return user


@pytest.fixture
def viewer(client):
    user = UserFactory(username="vic", groups=["Viewers"])
    client.force_login(user)
    return user


def change_url(incident: Incident) -> str:
    return reverse("admin:incidents_incident_change", args=[incident.pk])


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def bulk_incidents(count: int, *, start: int = 1000) -> None:
    """Many incidents quickly, with services and a commander, for query-count pins."""
    now = timezone.now()
    severities = [SeverityFactory(level=level) for level in (1, 2, 3, 4)]
    team = TeamFactory()
    statuses = [S.TRIGGERED, S.ACKNOWLEDGED, S.INVESTIGATING, S.RESOLVED]
    rows = []
    for n in range(start, start + count):
        severity, status = severities[n % 4], statuses[n % 4]
        detected = now - timedelta(minutes=(n * 37) % 3000)
        deadlines = compute_deadlines(severity, detected, detected, status=status)
        rows.append(
            Incident(
                number=n,
                reference=f"INC-{n}",
                title=f"Incident {n}",
                severity=severity,
                status=status,
                team=team,
                detected_at=detected,
                created_at=detected,
                acknowledged_at=None if status == S.TRIGGERED else detected,
                resolved_at=detected if status == S.RESOLVED else None,
                **deadlines.as_fields(),
            )
        )
    created = Incident.objects.bulk_create(rows)
    service = ServiceFactory()
    Incident.services.through.objects.bulk_create(
        [Incident.services.through(incident=i, service=service) for i in created]
    )
    commander, user = role(), UserFactory(username="ic")
    RoleAssignment.objects.bulk_create(
        [RoleAssignment(incident=i, role=commander, user=user, since=now) for i in created[::3]]
    )


def count_queries(client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries)


@pytest.mark.parametrize(
    "query", ["", "?open=yes", "?breached=yes", "?status__exact=triggered", "?q=Incident"]
)
def test_changelist_runs_the_same_queries_with_10_and_1000_incidents(admin_client, query):
    url = reverse(CHANGELIST) + query
    bulk_incidents(10)
    small = count_queries(admin_client, url)
    bulk_incidents(990, start=5000)
    assert Incident.objects.count() == 1000
    assert count_queries(admin_client, url) == small


def test_dashboard_runs_the_same_queries_with_10_and_1000_incidents(admin_client):
    bulk_incidents(10)
    small = count_queries(admin_client, reverse("admin:index"))
    bulk_incidents(990, start=5000)
    assert count_queries(admin_client, reverse("admin:index")) == small


def test_dashboard_shows_open_incidents_by_severity_with_sla_state(admin_client):
    now = timezone.now()
    late = declare(
        severity=SeverityFactory(level=1),
        title="Checkout <b>down</b>",
        detected_at=now - timedelta(minutes=20),
        now=now - timedelta(minutes=20),
    )
    fresh = declare(severity=SeverityFactory(level=3), title="Slow search", now=now)
    resolved = declare(severity=SeverityFactory(level=3), title="Old thing", now=now)
    services.incident_resolve(incident=resolved, actor=None)

    html = admin_client.get(reverse("admin:index")).content.decode()

    assert "Open incidents by severity" in html
    assert late.reference in html
    assert fresh.reference in html
    assert resolved.reference not in html
    assert "acknowledge: breached by 5m" in html  # Sev1 ack target 15 min, detected 20 min ago
    assert "acknowledge: 1h 59m left" in html or "acknowledge: 2h 00m left" in html
    assert "Checkout &lt;b&gt;down&lt;/b&gt;" in html  # incident text is escaped
    assert "1 breached" in html


def test_changelist_shows_badges_sla_services_and_commander(admin_client):
    incident = declare(services=[ServiceFactory(name="Payments")])
    services.incident_assign_role(
        incident=incident, role=role(), user=UserFactory(username="carol"), actor=None
    )
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert 'class="badge sev sev-1"' in html
    assert 'class="badge status-triggered"' in html
    assert "acknowledge: 15m left" in html or "acknowledge: 14m left" in html
    assert "Payments" in html
    assert "carol" in html


def test_changelist_filters_breached_and_drill(admin_client):
    now = timezone.now()
    breached = declare(title="Late one", detected_at=now - timedelta(hours=1), now=now)
    on_time = declare(title="On time", now=now)
    drill = declare(title="Tabletop", is_drill=True, now=now)
    url = reverse(CHANGELIST)
    html = admin_client.get(url + "?breached=yes").content.decode()
    assert breached.reference in html
    assert on_time.reference not in html
    html = admin_client.get(url + "?breached=no").content.decode()
    assert on_time.reference in html
    assert breached.reference not in html
    html = admin_client.get(url + "?is_drill__exact=1").content.decode()
    assert drill.reference in html
    assert on_time.reference not in html


def test_bulk_acknowledge_reports_each_refusal_with_its_reason(client, responder):
    open_one, resolved = declare(title="open"), declare(title="done")
    services.incident_resolve(incident=resolved, actor=None)
    response = client.post(
        reverse(CHANGELIST),
        {"action": "acknowledge", "_selected_action": [open_one.pk, resolved.pk]},
        follow=True,
    )
    notes = messages_of(response)
    assert (
        f"{resolved.reference} refused: {resolved.reference} cannot go from resolved to "
        "acknowledged" in " ".join(notes)
    )
    assert f"{open_one.reference} acknowledged." in notes
    open_one.refresh_from_db()
    resolved.refresh_from_db()
    assert (open_one.status, resolved.status) == (S.ACKNOWLEDGED, S.RESOLVED)
    event = open_one.timeline.get(kind=EventKind.ACKNOWLEDGED)
    assert event.actor == responder


def test_bulk_assign_me_as_commander_and_resolve(client, responder):
    role()
    first, second = declare(title="a"), declare(title="b")
    client.post(
        reverse(CHANGELIST),
        {"action": "assign_me_commander", "_selected_action": [first.pk, second.pk]},
    )
    assert RoleAssignment.objects.filter(user=responder, until__isnull=True).count() == 2
    client.post(
        reverse(CHANGELIST), {"action": "resolve", "_selected_action": [first.pk, second.pk]}
    )
    assert set(Incident.objects.values_list("status", flat=True)) == {S.RESOLVED}


def test_bulk_change_severity_goes_through_the_service(client, responder):
    sev3 = SeverityFactory(level=3)
    incident = declare(severity=SeverityFactory(level=1))
    client.post(
        reverse(CHANGELIST), {"action": "set_severity_3", "_selected_action": [incident.pk]}
    )
    incident.refresh_from_db()
    assert incident.severity == sev3
    event = incident.timeline.get(kind=EventKind.SEVERITY_CHANGED)
    assert (event.previous, event.value, event.actor) == ("Sev1", "Sev3", responder)


def test_viewer_sees_incidents_but_gets_no_actions_and_cannot_transition(client, viewer):
    incident = declare()
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    assert 'name="action"' not in response.content.decode()
    response = client.post(
        reverse("admin:incidents_incident_transition", args=[incident.pk, "acknowledged"])
    )
    assert response.status_code == 403
    response = client.post(
        reverse(CHANGELIST), {"action": "acknowledge", "_selected_action": [incident.pk]}
    )
    incident.refresh_from_db()
    assert incident.status == S.TRIGGERED
    html = client.get(change_url(incident)).content.decode()
    assert "data-transition" not in html
    assert "Add a note" not in html


def test_change_page_offers_only_legal_transitions(admin_client):
    incident = declare()
    services.incident_transition(incident=incident, to=S.MITIGATING, actor=None)
    html = admin_client.get(change_url(incident)).content.decode()
    offered = {s for s in S.values if f'data-transition="{s}"' in html}
    assert offered == {S.INVESTIGATING, S.MONITORING, S.RESOLVED}


def test_transition_button_acknowledges_and_illegal_one_shows_the_reason(admin_client):
    incident = declare()
    url = reverse("admin:incidents_incident_transition", args=[incident.pk, "acknowledged"])
    assert admin_client.get(url).status_code == 405
    response = admin_client.post(url, follow=True)
    assert f"{incident.reference} is now acknowledged." in messages_of(response)
    incident.refresh_from_db()
    assert incident.status == S.ACKNOWLEDGED
    closed_url = reverse("admin:incidents_incident_transition", args=[incident.pk, "closed"])
    response = admin_client.post(closed_url, follow=True)
    assert any("cannot go from acknowledged to closed" in m for m in messages_of(response))
    incident.refresh_from_db()
    assert incident.status == S.ACKNOWLEDGED


def test_note_form_appends_to_the_timeline_and_refuses_empty(admin_client, admin_user):
    incident = declare()
    url = reverse("admin:incidents_incident_note", args=[incident.pk])
    admin_client.post(url, {"body": "Rolled back <script>x</script>"})
    admin_client.post(url, {"body": ""})
    notes = incident.timeline.filter(kind=EventKind.NOTE)
    assert [(n.message, n.actor) for n in notes] == [("Rolled back <script>x</script>", admin_user)]
    html = admin_client.get(change_url(incident)).content.decode()
    assert "Rolled back &lt;script&gt;x&lt;/script&gt;" in html


def test_role_form_assigns_a_role_with_a_timeline_event(admin_client):
    incident = declare()
    tech_lead, bob = role("technical-lead"), UserFactory(username="bob")
    url = reverse("admin:incidents_incident_assign_role", args=[incident.pk])
    response = admin_client.post(url, {"role": tech_lead.pk, "user": bob.pk}, follow=True)
    assert "Technical Lead: bob." in messages_of(response)
    assert incident.role_assignments.get(until__isnull=True).user == bob
    response = admin_client.post(url, {"role": tech_lead.pk, "user": 999999}, follow=True)
    assert any("The role was not assigned: user" in m for m in messages_of(response))
    assert incident.role_assignments.count() == 1


def test_change_page_has_role_autocomplete_and_read_only_timeline(admin_client):
    incident = declare()
    html = admin_client.get(change_url(incident)).content.decode()
    assert "admin-autocomplete" in html  # the role picker's user field
    assert 'id="timeline-group"' in html or "Timeline" in html
    assert 'name="timeline-0-message"' not in html  # no editable timeline fields
    assert "Declared" in html


def test_add_form_declares_through_the_service(admin_client, admin_user):
    severity = SeverityFactory(level=2)
    api = ServiceFactory(name="API")
    now = timezone.localtime()
    response = admin_client.post(
        reverse("admin:incidents_incident_add"),
        {
            "title": "Errors on /orders",
            "summary": "5xx spike",
            "severity": severity.pk,
            "services": [api.pk],
            "impact": "degraded",
            "customer_impact": "",
            "detected_at_0": now.strftime("%Y-%m-%d"),
            "detected_at_1": now.strftime("%H:%M:%S"),
            "timeline-TOTAL_FORMS": "0",
            "timeline-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    incident = Incident.objects.get(title="Errors on /orders")
    assert incident.reference.startswith("INC-")
    assert list(incident.services.all()) == [api]
    event = incident.timeline.get()
    assert (event.kind, event.actor) == (EventKind.DECLARED, admin_user)


def test_add_form_refuses_future_detection_time(admin_client):
    severity = SeverityFactory(level=2)
    later = timezone.localtime() + timedelta(days=1)
    response = admin_client.post(
        reverse("admin:incidents_incident_add"),
        {
            "title": "x",
            "severity": severity.pk,
            "impact": "none",
            "detected_at_0": later.strftime("%Y-%m-%d"),
            "detected_at_1": later.strftime("%H:%M:%S"),
            "timeline-TOTAL_FORMS": "0",
            "timeline-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 200
    assert "Detection time cannot be in the future." in response.content.decode()
    assert not Incident.objects.exists()


def test_change_form_edit_records_an_edited_event(admin_client):
    incident = declare(title="Old title", team=TeamFactory())
    response = admin_client.post(
        change_url(incident),
        {
            "title": "New title",
            "summary": "",
            "impact": "major_outage",
            "customer_impact": "",
            "team": incident.team_id,
            "timeline-TOTAL_FORMS": "1",
            "timeline-INITIAL_FORMS": "1",
            "timeline-MIN_NUM_FORMS": "0",
            "timeline-MAX_NUM_FORMS": "1000",
            "timeline-0-id": incident.timeline.get().pk,
            "timeline-0-incident": incident.pk,
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    incident.refresh_from_db()
    assert (incident.title, incident.impact) == ("New title", "major_outage")
    edits = incident.timeline.filter(kind=EventKind.EDITED).order_by("pk")
    assert [(e.message, e.previous, e.value) for e in edits] == [
        ("title", "Old title", "New title"),
        ("impact", "none", "major_outage"),
    ]


def test_incidents_and_timeline_cannot_be_deleted_or_changed_in_admin(admin_client):
    incident = declare()
    event = incident.timeline.get()
    assert (
        admin_client.get(reverse("admin:incidents_incident_delete", args=[incident.pk])).status_code
        == 403
    )
    url = reverse("admin:incidents_timelineevent_change", args=[event.pk])
    admin_client.post(url, {"message": "rewritten"})
    assert TimelineEvent.objects.get(pk=event.pk).message == event.message
    assert (
        admin_client.get(
            reverse("admin:incidents_timelineevent_delete", args=[event.pk])
        ).status_code
        == 403
    )


def test_permission_groups_come_from_the_migration():
    groups = {
        g.name: set(g.permissions.values_list("codename", flat=True)) for g in Group.objects.all()
    }
    assert "change_incident" in groups["Responders"]
    assert "change_incident" not in groups["Viewers"]
    assert "change_severity" in groups["Incident managers"]
    assert "change_severity" not in groups["Responders"]
    assert not any("delete_timelineevent" in perms for perms in groups.values())
