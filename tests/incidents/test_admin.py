from __future__ import annotations

from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest
import time_machine
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
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def frozen():
    """The clock stands still at T0 for the whole test, so SLA texts are exact."""
    with time_machine.travel(T0, tick=False) as traveller:
        yield traveller


@pytest.fixture
def frozen_admin(frozen, client, admin_user):
    """A superuser's client, logged in at the frozen instant (the session dates from T0)."""
    client.force_login(admin_user)
    return client


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


VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"}


class InlineGroup(HTMLParser):
    """The rows and form controls inside the element with id `group_id` (an admin inline).

    `rows` holds one {field name: text} per `tr.form-row`, from its `td.field-<name>` cells;
    `controls` the attributes of every input, select and textarea in the group.
    """

    def __init__(self, group_id: str) -> None:
        super().__init__()
        self.group_id = group_id
        self.found = False
        self.rows: list[dict[str, str]] = []
        self.controls: list[dict[str, str]] = []
        self._depth = 0  # open elements inside the group; 0 outside it
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = {name: value or "" for name, value in attrs}
        classes = attributes.get("class", "").split()
        if not self._depth:
            if attributes.get("id") == self.group_id:
                self.found, self._depth = True, 1
            return
        if tag in {"input", "select", "textarea"}:
            self.controls.append({"tag": tag, **attributes})
        elif tag == "tr" and "form-row" in classes:
            self.rows.append({})
        elif tag == "td" and self.rows:
            fields = [c.removeprefix("field-") for c in classes if c.startswith("field-")]
            self._cell = fields[0] if fields else None
            if self._cell:
                self.rows[-1][self._cell] = ""
        if tag not in VOID_ELEMENTS:
            self._depth += 1

    def handle_endtag(self, tag):
        if not self._depth or tag in VOID_ELEMENTS:
            return
        self._depth -= 1
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._depth and self._cell:
            self.rows[-1][self._cell] = " ".join((self.rows[-1][self._cell] + data).split())


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


def bulk_timeline(total: int) -> None:
    """Three more incidents, then events on them until there are `total` in all: notes,
    edits and role changes, by two users and by the system."""
    incidents = [declare(title=f"Incident {n}") for n in range(3)]
    users = [UserFactory(username="ann"), UserFactory(username="ben"), None]
    kinds = [EventKind.NOTE, EventKind.EDITED, EventKind.ROLE_ASSIGNED]
    now = timezone.now()
    TimelineEvent.objects.bulk_create(
        TimelineEvent(
            incident=incidents[n % 3],
            at=now + timedelta(seconds=n),
            kind=kinds[n % 3],
            actor=users[n % 3],
            actor_label=users[n % 3].username if users[n % 3] else "system",
            message=f"event {n}",
        )
        for n in range(total - TimelineEvent.objects.count())
    )


@pytest.mark.parametrize("query", ["", "?kind__exact=note", "?q=INC-"])
def test_timeline_changelist_runs_the_same_queries_with_10_and_1000_events(admin_client, query):
    url = reverse("admin:incidents_timelineevent_changelist") + query
    bulk_timeline(10)
    assert TimelineEvent.objects.count() == 10
    small = count_queries(admin_client, url)
    bulk_timeline(1000)
    assert TimelineEvent.objects.count() == 1000
    assert count_queries(admin_client, url) == small


def test_dashboard_shows_open_incidents_by_severity_with_sla_state(frozen_admin):
    late = declare(
        severity=SeverityFactory(level=1),
        title="Checkout <b>down</b>",
        detected_at=T0 - timedelta(minutes=20),
        now=T0 - timedelta(minutes=20),
    )
    fresh = declare(severity=SeverityFactory(level=3), title="Slow search", now=T0)
    resolved = declare(severity=SeverityFactory(level=3), title="Old thing", now=T0)
    services.incident_resolve(incident=resolved, actor=None)

    html = frozen_admin.get(reverse("admin:index")).content.decode()

    assert "Open incidents by severity" in html
    assert late.reference in html
    assert fresh.reference in html
    assert resolved.reference not in html
    # Sev1: acknowledge within 15m, resolve within 4h, detected 20 minutes ago.
    assert "acknowledge: breached by 5m" in html
    assert "resolve: 3h 40m left" in html
    # Sev3: acknowledge within 2h, resolve within 24h, detected now.
    assert "acknowledge: 2h 00m left" in html
    assert "resolve: 1d 0h left" in html
    assert "Checkout &lt;b&gt;down&lt;/b&gt;" in html  # incident text is escaped
    assert "1 breached" in html


def test_changelist_shows_badges_sla_services_and_commander(frozen_admin):
    incident = declare(services=[ServiceFactory(name="Payments")])
    services.incident_assign_role(
        incident=incident, role=role(), user=UserFactory(username="carol"), actor=None
    )
    html = frozen_admin.get(reverse(CHANGELIST)).content.decode()
    assert 'class="badge sev sev-1"' in html
    assert 'class="badge status-triggered"' in html
    assert "acknowledge: 15m left" in html
    assert "resolve: 4h 00m left" in html
    assert "Payments" in html
    assert "carol" in html


def test_changelist_filters_breached_and_drill(frozen_admin):
    breached = declare(title="Late one", detected_at=T0 - timedelta(hours=1), now=T0)
    on_time = declare(title="On time", now=T0)
    drill = declare(title="Tabletop", is_drill=True, now=T0)
    url = reverse(CHANGELIST)
    html = frozen_admin.get(url + "?breached=yes").content.decode()
    assert breached.reference in html
    assert on_time.reference not in html
    html = frozen_admin.get(url + "?breached=no").content.decode()
    assert on_time.reference in html
    assert breached.reference not in html
    html = frozen_admin.get(url + "?is_drill__exact=1").content.decode()
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


def test_bulk_change_severity_refuses_a_closed_incident_and_changes_the_open_one(client, responder):
    sev1, sev3 = SeverityFactory(level=1), SeverityFactory(level=3)
    closed, open_one = declare(severity=sev1, title="done"), declare(severity=sev1, title="open")
    services.incident_resolve(incident=closed, actor=None)
    services.incident_close(incident=closed, actor=None)
    closed_before = Incident.objects.values().get(pk=closed.pk)
    closed_events = closed.timeline.count()

    response = client.post(
        reverse(CHANGELIST),
        {"action": "set_severity_3", "_selected_action": [closed.pk, open_one.pk]},
        follow=True,
    )

    notes = messages_of(response)
    assert (
        f"{closed.reference} refused: {closed.reference} cannot go from closed to severity "
        "Sev3: a closed incident cannot change." in notes
    ), notes
    assert f"{open_one.reference} changed to Sev3." in notes, notes
    assert Incident.objects.values().get(pk=closed.pk) == closed_before
    assert closed.timeline.count() == closed_events
    open_one.refresh_from_db()
    assert open_one.severity == sev3
    assert open_one.timeline.filter(kind=EventKind.SEVERITY_CHANGED).count() == 1


def test_viewer_sees_incidents_but_cannot_change_them_by_any_route(client, viewer):
    SeverityFactory(level=3)  # so a `set_severity_3` action exists for those who may change
    incident = declare(severity=SeverityFactory(level=1))
    before = Incident.objects.values().get(pk=incident.pk)
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    assert 'name="action"' not in response.content.decode()
    for url, data in [
        (reverse("admin:incidents_incident_transition", args=[incident.pk, "acknowledged"]), {}),
        (reverse("admin:incidents_incident_note", args=[incident.pk]), {"body": "hello"}),
        (
            reverse("admin:incidents_incident_assign_role", args=[incident.pk]),
            {"role": role().pk, "user": viewer.pk},
        ),
    ]:
        assert client.post(url, data).status_code == 403, url
    for action in ["acknowledge", "set_severity_3"]:
        client.post(reverse(CHANGELIST), {"action": action, "_selected_action": [incident.pk]})
    assert Incident.objects.values().get(pk=incident.pk) == before
    assert list(incident.timeline.values_list("kind", flat=True)) == [EventKind.DECLARED]
    assert not RoleAssignment.objects.exists()
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
    services.incident_acknowledge(incident=incident, actor=None)
    html = admin_client.get(change_url(incident)).content.decode()
    assert "admin-autocomplete" in html  # the role picker's user field

    timeline = InlineGroup("timeline-group")
    timeline.feed(html)
    timeline.close()

    assert timeline.found, "no timeline inline on the change page"
    assert [row.get("kind") for row in timeline.rows] == ["Declared", "Acknowledged"]
    assert timeline.rows[0]["actor_name"] == "system"
    # Only the formset's hidden bookkeeping: nothing to type in, no field of an event.
    editable = [c for c in timeline.controls if c.get("type") != "hidden"]
    assert editable == []
    event_fields = {"at", "kind", "actor", "actor_label", "previous", "value", "message"}
    named = {c.get("name", "").rsplit("-", 1)[-1] for c in timeline.controls}
    assert not named & event_fields, named


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
