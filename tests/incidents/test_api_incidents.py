"""The incidents REST API: /api/v1/incidents/ and its actions, permissions and errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from escalation import services as engine
from escalation.models import TargetKind
from incidents import services
from incidents.ingestion import intake
from incidents.models import Alert, EventKind, Incident, IncidentStatus
from tests.escalation.factories import ContactMethodFactory, PersonFactory, PolicyFactory, step
from tests.incidents.factories import (
    ServiceFactory,
    SeverityFactory,
    TeamFactory,
    UserFactory,
    alertmanager_body,
    declare,
    integration,
    role,
)

pytestmark = pytest.mark.django_db
S = IncidentStatus
URL = "/api/v1/incidents/"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def client_for(user) -> APIClient:
    """An API client authenticated as `user` with a DRF token (Authorization: Token ...)."""
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def url(incident: Incident, action: str = "") -> str:
    return f"{URL}{incident.reference}/" + (f"{action}/" if action else "")


@pytest.fixture
def sev1():
    return SeverityFactory(level=1)


@pytest.fixture
def sev2():
    return SeverityFactory(level=2)


@pytest.fixture
def team():
    return TeamFactory(name="Payments", slug="payments")


@pytest.fixture
def checkout():
    return ServiceFactory(name="Checkout", slug="checkout")


@pytest.fixture
def responder(team):
    """A member of the payments team, in the Responders group, not staff."""
    user = UserFactory(username="rita", is_staff=False, groups=["Responders"])
    team.members.add(user)
    return user


@pytest.fixture
def outsider():
    """A responder of no team."""
    return UserFactory(username="otto", is_staff=False, groups=["Responders"])


@pytest.fixture
def viewer():
    return UserFactory(username="vera", is_staff=False, groups=["Viewers"])


@pytest.fixture
def team_incident(sev1, team, checkout):
    return declare(severity=sev1, team=team, services=[checkout], title="Payments failing")


@pytest.fixture
def rita(responder):
    return client_for(responder)


# --- Authentication -------------------------------------------------------------------------


def test_anonymous_requests_are_refused_with_a_token_challenge(team_incident):
    response = APIClient().get(URL)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert APIClient().post(URL, {"title": "x"}, format="json").status_code == 401


def test_a_bad_token_is_refused():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert client.get(URL).status_code == 401


def test_the_api_root_lists_every_resource(viewer):
    response = client_for(viewer).get("/api/v1/")
    assert response.status_code == 200
    for name in (
        "incidents",
        "alerts",
        "severities",
        "services",
        "runbooks",
        "alert-routes",
        "integrations",
        "teams",
        "rotations",
        "escalation-policies",
        "oncall",
    ):
        assert response.json()[name].endswith(f"/api/v1/{name}/"), name


def test_the_admin_session_also_authenticates(client, team_incident, viewer):
    client.force_login(viewer)
    assert client.get(URL).status_code == 200


# --- Declaring ------------------------------------------------------------------------------


def test_declare_creates_an_incident_through_the_service(rita, sev1, team, checkout, responder):
    body = {
        "title": "Checkout errors",
        "severity": 1,
        "summary": "5xx on pay",
        "services": ["checkout"],
        "team": "payments",
        "impact": "partial_outage",
        "customer_impact": "Some payments fail",
        "is_drill": False,
        "detected_at": "2026-03-02T08:55:00Z",
    }
    with time_machine.travel(T0, tick=False):
        response = rita.post(URL, body, format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    incident = Incident.objects.get(reference=data["reference"])
    assert response["Location"].endswith(f"/api/v1/incidents/{incident.reference}/")
    assert data["status"] == "triggered"
    assert data["severity"] == {"level": 1, "name": "Sev1"}
    assert data["services"] == ["checkout"]
    assert data["team"] == "payments"
    assert data["declared_by"] == "rita"
    assert data["detected_at"] == "2026-03-02T08:55:00Z"
    # Deadlines run from detection: Sev1 acknowledges within 15 minutes.
    assert data["ack_due_at"] == "2026-03-02T09:10:00Z"
    assert data["allowed_statuses"] == [
        "acknowledged",
        "investigating",
        "mitigating",
        "monitoring",
        "resolved",
    ]
    [event] = incident.timeline.all()
    assert (event.kind, event.actor, event.value) == (EventKind.DECLARED, responder, "Sev1")


def test_declare_needs_only_title_and_severity(rita, sev1):
    response = rita.post(URL, {"title": "Minimal", "severity": "1"}, format="json")
    assert response.status_code == 201
    assert response.json()["team"] is None
    assert response.json()["services"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"severity": 1}, "title"),
        ({"title": "  ", "severity": 1}, "title"),
        ({"title": "x"}, "severity"),
        ({"title": "x", "severity": 9}, "severity"),
        ({"title": "x", "severity": "high"}, "severity"),
        ({"title": "x", "severity": True}, "severity"),
        ({"title": "x", "severity": 1, "services": ["nope"]}, "services"),
        ({"title": "x", "severity": 1, "services": "checkout"}, "services"),
        ({"title": "x", "severity": 1, "team": "nope"}, "team"),
        ({"title": "x", "severity": 1, "team": "a\x00b"}, "team"),
        ({"title": "x", "severity": 1, "impact": "apocalyptic"}, "impact"),
        ({"title": "x", "severity": 1, "detected_at": "yesterday"}, "detected_at"),
        ({"title": "x", "severity": 1, "detected_at": "2026-03-02T08:00:00"}, "detected_at"),
        ({"title": "x" * 201, "severity": 1}, "title"),
    ],
)
def test_declare_refuses_bad_input_naming_the_field(rita, sev1, checkout, team, body, field):
    response = rita.post(URL, body, format="json")
    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert not Incident.objects.exists()


def test_a_domain_refusal_is_a_400_naming_the_field(rita, sev1):
    with time_machine.travel(T0, tick=False):
        response = rita.post(
            URL,
            {"title": "x", "severity": 1, "detected_at": "2026-03-02T10:00:00Z"},
            format="json",
        )
    assert response.status_code == 400
    assert response.json() == {
        "detail": "detected_at: is in the future.",
        "code": "invalid",
        "field": "detected_at",
    }


def test_declaring_needs_the_add_incident_permission(viewer, sev1):
    response = client_for(viewer).post(URL, {"title": "x", "severity": 1}, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "missing_permission"
    assert "add_incident" in response.json()["detail"]
    assert not Incident.objects.exists()


# --- Reading --------------------------------------------------------------------------------


def test_detail_by_reference(viewer, team_incident):
    response = client_for(viewer).get(url(team_incident))
    assert response.status_code == 200
    data = response.json()
    assert data["reference"] == team_incident.reference
    assert data["title"] == "Payments failing"
    assert data["url"].endswith(url(team_incident))


@pytest.mark.parametrize("reference", ["INC-999", "inc-1", "nothing"])
def test_an_unknown_incident_is_404(viewer, team_incident, reference):
    response = client_for(viewer).get(f"{URL}{reference}/")
    assert response.status_code == 404
    assert "detail" in response.json()


def test_list_is_newest_first_and_cursor_paginated(viewer, sev1):
    made = [declare(severity=sev1, title=f"Incident {n}") for n in range(5)]
    client = client_for(viewer)
    first = client.get(URL, {"page_size": 2}).json()
    assert [i["reference"] for i in first["results"]] == [made[4].reference, made[3].reference]
    assert first["previous"] is None
    second = client.get(first["next"]).json()
    assert [i["reference"] for i in second["results"]] == [made[2].reference, made[1].reference]
    third = client.get(second["next"]).json()
    assert [i["reference"] for i in third["results"]] == [made[0].reference]
    assert third["next"] is None


def test_a_bad_cursor_is_a_404_not_a_500(viewer, team_incident):
    response = client_for(viewer).get(URL, {"cursor": "garbage"})
    assert response.status_code == 404


@pytest.fixture
def mixed(sev1, sev2, team, checkout):
    """Four incidents: a Sev1 payments incident on checkout (acknowledged), a Sev2 drill,
    a resolved Sev2, and a closed Sev1 declared a day earlier."""
    with time_machine.travel(T0 - timedelta(days=1), tick=False):
        old = declare(severity=sev1, title="Old outage")
        services.incident_resolve(incident=old, actor=None)
        services.incident_close(incident=old, actor=None)
    with time_machine.travel(T0, tick=False):
        pay = declare(severity=sev1, team=team, services=[checkout], title="Payments down")
        services.incident_acknowledge(incident=pay, actor=None)
        drill = declare(severity=sev2, title="Tabletop", is_drill=True)
        done = declare(severity=sev2, title="Slow search")
        services.incident_resolve(incident=done, actor=None)
    return {"old": old, "pay": pay, "drill": drill, "done": done}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["done", "drill", "pay", "old"]),
        ({"status": "triggered"}, ["drill"]),
        ({"status": ["acknowledged", "resolved"]}, ["done", "pay"]),
        ({"severity": 2}, ["done", "drill"]),
        ({"service": "checkout"}, ["pay"]),
        ({"team": "payments"}, ["pay"]),
        ({"created_after": "2026-03-02T00:00:00Z"}, ["done", "drill", "pay"]),
        ({"created_before": "2026-03-02T00:00:00Z"}, ["old"]),
        ({"is_drill": "true"}, ["drill"]),
        ({"is_drill": "false"}, ["done", "pay", "old"]),
        ({"open": "true"}, ["drill", "pay"]),
        ({"open": "false"}, ["done", "old"]),
        ({"q": "payments"}, ["pay"]),
        ({"q": "OUTAGE"}, ["old"]),
        ({"open": "true", "severity": 1}, ["pay"]),
    ],
)
def test_list_filters(viewer, mixed, params, expected):
    response = client_for(viewer).get(URL, params)
    assert response.status_code == 200, response.json()
    references = [i["reference"] for i in response.json()["results"]]
    assert references == [mixed[name].reference for name in expected]


def test_search_by_reference(viewer, mixed):
    reference = mixed["drill"].reference
    response = client_for(viewer).get(URL, {"q": reference.lower()})
    assert [i["reference"] for i in response.json()["results"]] == [reference]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "broken"}, "status"),
        ({"severity": 7}, "severity"),
        ({"severity": "one"}, "severity"),
        ({"severity": "99999999999999999999"}, "severity"),
        ({"service": "nope"}, "service"),
        ({"team": "nope"}, "team"),
        ({"team": "a\x00b"}, "team"),
        ({"created_after": "last week"}, "created_after"),
        ({"created_before": "2026-13-45"}, "created_before"),
        ({"is_drill": "maybe"}, "is_drill"),
        ({"open": "perhaps"}, "open"),
    ],
)
def test_bad_filters_are_a_400_naming_the_parameter(viewer, mixed, params, field):
    response = client_for(viewer).get(URL, params)
    assert response.status_code == 400
    assert field in response.json()


def _populate(count: int, sev1, team, checkout, people) -> None:
    commander = role("incident-commander")
    for n in range(count):
        incident = declare(
            severity=sev1, team=team, services=[checkout], title=f"Incident {n}", actor=people[0]
        )
        services.incident_assign_role(
            incident=incident, role=commander, user=people[n % 2], actor=people[0]
        )


@pytest.mark.parametrize("count", [3, 30])
def test_list_query_count_does_not_grow_with_the_page(
    count, viewer, sev1, team, checkout, responder, outsider, django_assert_max_num_queries
):
    _populate(count, sev1, team, checkout, [responder, outsider])
    client = client_for(viewer)
    # token + user, incidents, services, roles.
    with django_assert_max_num_queries(4):
        response = client.get(URL, {"page_size": 50})
    assert len(response.json()["results"]) == count
    assert response.json()["results"][0]["roles"][0]["role"] == "incident-commander"


# --- Changing: PATCH ------------------------------------------------------------------------


def test_patch_edits_descriptive_fields_through_the_service(
    rita, team_incident, responder, checkout
):
    ServiceFactory(name="Search", slug="search")
    response = rita.patch(
        url(team_incident),
        {
            "title": "Payments failing in EU",
            "summary": "EU only",
            "services": ["checkout", "search"],
            "impact": "major_outage",
            "false_positive": False,
        },
        format="json",
    )
    assert response.status_code == 200, response.json()
    data = response.json()
    assert data["title"] == "Payments failing in EU"
    assert data["services"] == ["checkout", "search"]
    assert data["impact"] == "major_outage"
    edits = team_incident.timeline.filter(kind=EventKind.EDITED)
    assert sorted(edits.values_list("message", flat=True)) == [
        "impact",
        "services",
        "summary",
        "title",
    ]
    assert {e.actor for e in edits} == {responder}


def test_patch_severity_and_status_go_through_their_services(rita, team_incident, sev2):
    response = rita.patch(
        url(team_incident),
        {"severity": 2, "status": "investigating", "reason": "smaller than feared"},
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert response.json()["severity"]["level"] == 2
    assert response.json()["status"] == "investigating"
    events = {e.kind: e for e in team_incident.timeline.all()}
    assert (events[EventKind.SEVERITY_CHANGED].previous, events["severity_changed"].value) == (
        "Sev1",
        "Sev2",
    )
    assert events[EventKind.SEVERITY_CHANGED].message == "smaller than feared"
    assert events[EventKind.STATUS_CHANGED].value == "investigating"


def test_an_illegal_transition_is_a_409_and_nothing_changes(rita, team_incident):
    response = rita.patch(
        url(team_incident), {"title": "Renamed", "status": "closed"}, format="json"
    )
    assert response.status_code == 409
    assert response.json()["code"] == "invalid_transition"
    assert "cannot go from triggered to closed" in response.json()["detail"]
    team_incident.refresh_from_db()
    assert (team_incident.title, team_incident.status) == ("Payments failing", S.TRIGGERED)
    assert not team_incident.timeline.filter(kind=EventKind.EDITED).exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "exploded"}, "status"),
        ({"severity": 42}, "severity"),
        ({"team": "ghosts"}, "team"),
        ({"title": ""}, "title"),
        ({"is_drill": "sometimes"}, "is_drill"),
    ],
)
def test_patch_refuses_bad_input_naming_the_field(rita, team_incident, body, field):
    response = rita.patch(url(team_incident), body, format="json")
    assert response.status_code == 400
    assert field in response.json()


def test_put_is_not_offered(rita, team_incident):
    response = rita.put(url(team_incident), {"title": "x"}, format="json")
    assert response.status_code == 405


def test_patch_of_an_unknown_incident_is_404(rita, team_incident):
    assert rita.patch(f"{URL}INC-999/", {"title": "x"}, format="json").status_code == 404


# --- Permissions ----------------------------------------------------------------------------


def test_outside_the_team_read_but_not_change(outsider, team_incident):
    client = client_for(outsider)
    assert client.get(url(team_incident)).status_code == 200
    assert client.get(url(team_incident, "timeline")).status_code == 200
    response = client.patch(url(team_incident), {"title": "Mine now"}, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "not_team_member"
    assert "payments" in response.json()["detail"]
    response = client.post(url(team_incident, "acknowledge"), {}, format="json")
    assert response.status_code == 403
    team_incident.refresh_from_db()
    assert (team_incident.title, team_incident.status) == ("Payments failing", S.TRIGGERED)


def test_staff_may_change_any_team_incident(team_incident):
    staff = UserFactory(username="sam", is_staff=True, groups=["Responders"])
    response = client_for(staff).post(url(team_incident, "acknowledge"), {}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "acknowledged"


def test_a_superuser_may_change_anything(team_incident):
    root = UserFactory(username="root", is_staff=True, is_superuser=True)
    response = client_for(root).patch(url(team_incident), {"title": "Root"}, format="json")
    assert response.status_code == 200


def test_staff_still_need_the_change_permission(team_incident):
    staff = UserFactory(username="bare", is_staff=True)
    response = client_for(staff).patch(url(team_incident), {"title": "x"}, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "missing_permission"


def test_any_responder_may_change_an_incident_without_a_team(outsider, sev1):
    incident = declare(severity=sev1)
    response = client_for(outsider).patch(url(incident), {"title": "Taken"}, format="json")
    assert response.status_code == 200
    assert response.json()["title"] == "Taken"


def test_viewers_may_not_change(viewer, sev1):
    incident = declare(severity=sev1)
    client = client_for(viewer)
    response = client.patch(url(incident), {"title": "x"}, format="json")
    assert response.status_code == 403
    assert "change_incident" in response.json()["detail"]
    assert client.post(url(incident, "notes"), {"body": "hi"}, format="json").status_code == 403


def test_the_change_permission_can_come_from_the_user_directly(team, team_incident):
    user = UserFactory(username="direct", is_staff=False)
    user.user_permissions.add(Permission.objects.get(codename="change_incident"))
    team.members.add(user)
    response = client_for(user).patch(url(team_incident), {"title": "Direct"}, format="json")
    assert response.status_code == 200


# --- Actions --------------------------------------------------------------------------------


def test_acknowledge_resolve_close_and_reopen(rita, team_incident, responder):
    response = rita.post(url(team_incident, "acknowledge"), {}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "acknowledged"
    assert response.json()["acknowledged_at"] is not None

    response = rita.post(
        url(team_incident, "resolve"), {"resolution": "rolled back"}, format="json"
    )
    assert response.json()["status"] == "resolved"
    resolved = team_incident.timeline.get(kind=EventKind.RESOLVED)
    assert (resolved.message, resolved.actor) == ("rolled back", responder)

    response = rita.post(url(team_incident, "reopen"), {"reason": "back again"}, format="json")
    assert response.json()["status"] == "investigating"
    assert team_incident.timeline.get(kind=EventKind.REOPENED).message == "back again"

    rita.post(url(team_incident, "resolve"), {}, format="json")
    response = rita.post(url(team_incident, "close"), {}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "closed"
    assert response.json()["allowed_statuses"] == []


def test_acknowledging_twice_is_harmless(rita, team_incident):
    rita.post(url(team_incident, "acknowledge"), {}, format="json")
    response = rita.post(url(team_incident, "acknowledge"), {}, format="json")
    assert response.status_code == 200
    assert team_incident.timeline.filter(kind=EventKind.ACKNOWLEDGED).count() == 1


@pytest.mark.parametrize("action", ["close", "reopen"])
def test_an_action_illegal_in_this_state_is_a_409(rita, team_incident, action):
    response = rita.post(url(team_incident, action), {}, format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "invalid_transition"
    assert team_incident.reference in response.json()["detail"]


def test_actions_on_an_unknown_incident_are_404(rita, team_incident):
    assert rita.post(f"{URL}INC-404/acknowledge/", {}, format="json").status_code == 404


def test_notes_answer_the_event(rita, team_incident):
    response = rita.post(url(team_incident, "notes"), {"body": "Looking at the DB"}, format="json")
    assert response.status_code == 201
    data = response.json()
    assert (data["kind"], data["actor"], data["message"]) == ("note", "rita", "Looking at the DB")
    assert data["origin"] is None
    assert team_incident.timeline.filter(kind=EventKind.NOTE, pk=data["id"]).exists()


@pytest.mark.parametrize("body", [{}, {"body": ""}, {"body": "   "}, {"body": "x" * 10_001}])
def test_a_note_needs_a_body(rita, team_incident, body):
    response = rita.post(url(team_incident, "notes"), body, format="json")
    assert response.status_code == 400
    assert response.json().get("field") == "body" or "body" in response.json()


def test_assign_a_role(rita, team_incident, responder, outsider):
    role("incident-commander")
    response = rita.post(
        url(team_incident, "roles"),
        {"role": "incident-commander", "username": "otto"},
        format="json",
    )
    assert response.status_code == 200, response.json()
    [holder] = response.json()["roles"]
    assert (holder["role"], holder["user"]) == ("incident-commander", "otto")
    event = team_incident.timeline.get(kind=EventKind.ROLE_ASSIGNED)
    assert (event.value, event.actor) == ("otto", responder)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"role": "wizard", "username": "rita"}, "role"),
        ({"role": "incident-commander", "username": "nobody"}, "username"),
        ({"username": "rita"}, "role"),
    ],
)
def test_assign_a_role_refuses_unknown_names(rita, team_incident, body, field):
    role("incident-commander")
    response = rita.post(url(team_incident, "roles"), body, format="json")
    assert response.status_code == 400
    assert field in response.json()


def test_assigning_an_inactive_user_is_a_400_naming_the_field(rita, team_incident):
    role("incident-commander")
    UserFactory(username="gone", is_active=False)
    response = rita.post(
        url(team_incident, "roles"),
        {"role": "incident-commander", "username": "gone"},
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["field"] == "username"


@pytest.fixture
def paging_sev1(team):
    """Sev1 with a policy that pages Ann at once."""
    ann = PersonFactory(name="Ann")
    ContactMethodFactory(person=ann, address="ann@example.com")
    policy = PolicyFactory(name="Sev1 chain")
    step(policy, 0, timedelta(0), (TargetKind.PERSON, ann))
    step(policy, 1, timedelta(minutes=15), (TargetKind.PERSON, PersonFactory(name="Ben")))
    return SeverityFactory(level=1, escalation_policy=policy)


def test_escalate_and_pages(rita, paging_sev1, team):
    with time_machine.travel(T0, tick=False):
        incident = declare(severity=paging_sev1, team=team)
        engine.escalate_due(now=T0)
        response = rita.post(url(incident, "escalate"), {"reason": "need Ben"}, format="json")
        assert response.status_code == 200, response.json()
        assert response.json()["next_escalation_at"] == "2026-03-02T09:00:00Z"
        engine.escalate_due(now=T0)
    escalated = incident.timeline.get(kind=EventKind.ESCALATED, value="next level")
    assert "need Ben" in escalated.message

    response = rita.get(url(incident, "pages"))
    assert response.status_code == 200
    pages = response.json()["results"]
    assert [(p["step"], p["recipient"]["name"], p["status"]) for p in pages] == [
        (1, "Ann", "pending"),
        (2, "Ben", "pending"),
    ]
    assert pages[0]["attempts"] == 0
    assert pages[0]["created_at"] == "2026-03-02T09:00:00Z"
    assert pages[0]["sent_at"] is None
    assert pages[0]["acked_at"] is None


def test_escalating_without_a_policy_is_a_409(rita, team_incident):
    response = rita.post(url(team_incident, "escalate"), {}, format="json")
    assert response.status_code == 409
    assert "no escalation policy" in response.json()["detail"]


def test_merge_moves_the_timeline_and_closes_the_source(rita, team, sev1, responder):
    with time_machine.travel(T0, tick=False):
        survivor = declare(severity=sev1, team=team, title="DB down")
        duplicate = declare(severity=sev1, team=team, title="API errors")
        services.incident_add_note(incident=duplicate, body="seen in API", actor=responder)
    response = rita.post(
        url(duplicate, "merge"),
        {"into": survivor.reference, "reason": "same cause"},
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert response.json()["reference"] == duplicate.reference
    assert response.json()["status"] == "closed"
    assert response.json()["merged_into"] == survivor.reference

    timeline = rita.get(url(survivor, "timeline")).json()["results"]
    copied = [e for e in timeline if e["origin"] == duplicate.reference]
    assert [e["kind"] for e in copied] == ["declared", "note"]
    assert timeline[-1]["kind"] == "merged"
    assert "same cause" in timeline[-1]["message"]


@pytest.mark.parametrize("into", ["INC-999", "", None])
def test_merge_needs_a_known_target(rita, team_incident, into):
    response = rita.post(url(team_incident, "merge"), {"into": into}, format="json")
    assert response.status_code == 400
    assert "into" in response.json()


def test_merging_into_itself_is_a_400(rita, team_incident):
    response = rita.post(
        url(team_incident, "merge"), {"into": team_incident.reference}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["field"] == "into"


def test_merge_needs_the_right_to_change_the_target_too(rita, team_incident, sev1):
    other_team = TeamFactory(name="Search", slug="search")
    theirs = declare(severity=sev1, team=other_team)
    response = rita.post(url(team_incident, "merge"), {"into": theirs.reference}, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "not_team_member"
    team_incident.refresh_from_db()
    assert team_incident.status == S.TRIGGERED


# --- Timeline -------------------------------------------------------------------------------


def test_timeline_lists_events_oldest_first(viewer, sev1, team, responder):
    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        incident = declare(severity=sev1, team=team)
    with time_machine.travel(T0, tick=False):
        services.incident_acknowledge(incident=incident, actor=responder)
        services.incident_add_note(incident=incident, body="on it", actor=responder)
    response = client_for(viewer).get(url(incident, "timeline"))
    assert response.status_code == 200
    events = response.json()["results"]
    assert [e["kind"] for e in events] == ["declared", "acknowledged", "note"]
    ack = events[1]
    assert ack == {
        "id": ack["id"],
        "kind": "acknowledged",
        "at": "2026-03-02T09:00:00Z",
        "actor": "rita",
        "previous": "triggered",
        "value": "acknowledged",
        "message": "",
        "origin": None,
    }
    assert events[0]["actor"] == "system"


def test_timeline_of_an_unknown_incident_is_404(viewer):
    assert client_for(viewer).get(f"{URL}INC-1/timeline/").status_code == 404


def test_the_list_filters_do_not_hide_one_incident(viewer, team_incident):
    response = client_for(viewer).get(url(team_incident), {"status": "closed"})
    assert response.status_code == 200


# --- Alerts ---------------------------------------------------------------------------------

ALERTS = "/api/v1/alerts/"


def fire(client, token: str, *alerts: dict, group_key: str = '{}:{alertname="X"}') -> None:
    response = client.post(
        f"/api/v1/integrations/{token}/alertmanager/",
        alertmanager_body(*alerts, group_key=group_key),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    assert intake.deliveries_apply().applied == 1


@pytest.fixture
def prom(sev1):
    return integration(name="prom", kind="alertmanager")


@pytest.fixture
def fired(client, prom):
    """Two alerts of one group (one incident), then a third in another group."""
    _source, token = prom
    fire(client, token, {"fingerprint": "aa"}, {"fingerprint": "bb"})
    fire(
        client,
        token,
        {"fingerprint": "cc", "labels": {"alertname": "Disk"}},
        group_key='{}:{alertname="Disk"}',
    )
    return {alert.fingerprint: alert for alert in Alert.objects.all()}


def test_alerts_list_newest_first(viewer, fired, prom):
    response = client_for(viewer).get(ALERTS)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [a["fingerprint"] for a in results] == ["cc", "bb", "aa"]
    first = results[0]
    assert first["integration"] == {"id": prom[0].pk, "name": "prom", "kind": "alertmanager"}
    assert first["incident"] == fired["cc"].incident.reference
    assert first["status"] == "firing"
    assert first["labels"] == {"alertname": "Disk"}
    assert "payload" not in first


def test_alert_detail_has_the_raw_payload(viewer, fired):
    alert = fired["aa"]
    response = client_for(viewer).get(f"{ALERTS}{alert.pk}/")
    assert response.status_code == 200
    assert response.json()["fingerprint"] == "aa"
    assert response.json()["payload"]["fingerprint"] == "aa"


def test_an_unknown_alert_is_404(viewer, fired):
    client = client_for(viewer)
    assert client.get(f"{ALERTS}999999/").status_code == 404
    assert client.get(f"{ALERTS}abc/").status_code == 404


def test_alert_filters(viewer, fired, prom, client):
    other, token = integration(name="other", kind="alertmanager")
    fire(client, token, {"fingerprint": "aa"}, group_key="other")
    api = client_for(viewer)

    def fingerprints(**params):
        response = api.get(ALERTS, params)
        assert response.status_code == 200, response.json()
        return [(a["integration"]["name"], a["fingerprint"]) for a in response.json()["results"]]

    assert fingerprints(integration=other.pk) == [("other", "aa")]
    assert fingerprints(fingerprint="aa") == [("other", "aa"), ("prom", "aa")]
    reference = fired["aa"].incident.reference
    assert fingerprints(incident=reference) == [("prom", "bb"), ("prom", "aa")]
    assert fingerprints(status="resolved") == []
    assert len(fingerprints(status="firing")) == 4


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"integration": 999999}, "integration"),
        ({"integration": "prom"}, "integration"),
        ({"incident": "INC-999"}, "incident"),
        ({"status": "exploded"}, "status"),
    ],
)
def test_bad_alert_filters_are_a_400(viewer, fired, params, field):
    response = client_for(viewer).get(ALERTS, params)
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.parametrize("count", [3, 30])
def test_alerts_list_query_count_does_not_grow(
    count, viewer, prom, client, django_assert_max_num_queries
):
    _source, token = prom
    for n in range(count):
        fire(client, token, {"fingerprint": f"fp{n}"}, group_key=f"group-{n % 3}")
    api = client_for(viewer)
    # token + user, alerts with their integration and incident.
    with django_assert_max_num_queries(2):
        response = api.get(ALERTS, {"page_size": 50})
    assert len(response.json()["results"]) == count


def test_alerts_cursor_pagination(viewer, fired):
    api = client_for(viewer)
    first = api.get(ALERTS, {"page_size": 2}).json()
    assert [a["fingerprint"] for a in first["results"]] == ["cc", "bb"]
    second = api.get(first["next"]).json()
    assert [a["fingerprint"] for a in second["results"]] == ["aa"]
