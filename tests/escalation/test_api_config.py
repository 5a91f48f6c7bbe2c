"""Read-only escalation configuration: /api/v1/teams/, /api/v1/rotations/ and
/api/v1/escalation-policies/."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from escalation.models import StepCondition, TargetKind
from tests.incidents.factories import TeamFactory, UserFactory

from .factories import CalendarFactory, PersonFactory, PolicyFactory, rotation_with, step

pytestmark = pytest.mark.django_db


@pytest.fixture
def api():
    client = APIClient()
    token = Token.objects.create(user=UserFactory(username="vera", is_staff=False))
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def payments():
    team = TeamFactory(name="Payments", slug="payments", description="Money")
    team.members.add(UserFactory(username="bo"), UserFactory(username="al"))
    return team


@pytest.fixture
def people():
    return [PersonFactory(name=name) for name in ("Ada", "Bo", "Cy")]


def test_anonymous_is_refused(client):
    assert client.get("/api/v1/teams/").status_code == 401


def test_teams_by_slug(api, payments, people):
    rotation = rotation_with(people, team=payments, name="Primary")
    TeamFactory(name="Search", slug="search")
    response = api.get("/api/v1/teams/")
    assert response.status_code == 200
    assert [t["slug"] for t in response.json()["results"]] == ["payments", "search"]
    response = api.get("/api/v1/teams/payments/")
    assert response.json() == {
        "slug": "payments",
        "name": "Payments",
        "description": "Money",
        "members": ["al", "bo"],
        "rotations": [rotation.pk],
    }
    assert api.get("/api/v1/teams/nope/").status_code == 404


def test_rotations_by_id_with_members_in_order(api, payments, people):
    rotation = rotation_with(
        people[::-1],
        team=payments,
        name="Primary",
        time_zone="Europe/Berlin",
        shift_length=timedelta(days=7),
        start_date=date(2026, 3, 2),
    )
    response = api.get(f"/api/v1/rotations/{rotation.pk}/")
    assert response.status_code == 200
    data = response.json()
    assert data["team"] == "payments"
    assert data["time_zone"] == "Europe/Berlin"
    assert data["shift_length"] == "P7DT00H00M00S"
    assert data["handoff_time"] == "09:00:00"
    assert data["start_date"] == "2026-03-02"
    assert [(m["position"], m["person"]["name"]) for m in data["members"]] == [
        (0, "Cy"),
        (1, "Bo"),
        (2, "Ada"),
    ]
    assert api.get("/api/v1/rotations/").json()["results"][0]["id"] == rotation.pk
    assert api.get("/api/v1/rotations/999999/").status_code == 404
    # The calendar feed beside it still answers.
    calendar = api.get(f"/api/v1/rotations/{rotation.pk}/calendar.ics")
    assert calendar.status_code == 200
    assert calendar["Content-Type"].startswith("text/calendar")


def test_escalation_policies_with_steps_and_targets(api, payments, people):
    rotation = rotation_with(people, team=payments, name="Primary")
    policy = PolicyFactory(name="Sev1 chain", repeat=1, repeat_after=timedelta(minutes=30))
    hours = CalendarFactory(name="Office")
    step(policy, 0, timedelta(0), (TargetKind.ONCALL, rotation))
    step(
        policy,
        1,
        timedelta(minutes=15),
        (TargetKind.NEXT_IN_LINE, rotation),
        (TargetKind.PERSON, people[2]),
    )
    step(
        policy,
        2,
        timedelta(hours=1),
        (TargetKind.TEAM, payments),
        condition=StepCondition.UNRESOLVED,
        calendar=hours,
    )
    response = api.get(f"/api/v1/escalation-policies/{policy.pk}/")
    assert response.status_code == 200
    data = response.json()
    assert (data["name"], data["repeat"], data["repeat_after"]) == (
        "Sev1 chain",
        1,
        "P0DT00H30M00S",
    )
    assert [(s["position"], s["delay"], s["condition"]) for s in data["steps"]] == [
        (0, "P0DT00H00M00S", "unacknowledged"),
        (1, "P0DT00H15M00S", "unacknowledged"),
        (2, "P0DT01H00M00S", "unresolved"),
    ]
    assert data["steps"][0]["targets"] == [
        {"kind": "oncall", "rotation": rotation.pk, "person": None, "team": None}
    ]
    assert data["steps"][1]["targets"][1] == {
        "kind": "person",
        "rotation": None,
        "person": {"id": people[2].pk, "name": "Cy"},
        "team": None,
    }
    assert data["steps"][2]["targets"][0]["team"] == "payments"
    assert data["steps"][2]["calendar"] == "Office"
    assert api.get("/api/v1/escalation-policies/999999/").status_code == 404


def test_configuration_is_read_only(api, payments):
    assert api.post("/api/v1/teams/", {"slug": "x"}, format="json").status_code == 405
    assert api.patch("/api/v1/teams/payments/", {}, format="json").status_code == 405
    assert api.delete("/api/v1/teams/payments/").status_code == 405


@pytest.mark.parametrize("size", [2, 10])
@pytest.mark.parametrize(
    ("path", "queries"),
    [
        # token + user, count, teams, members, rotations
        ("/api/v1/teams/", 5),
        # token + user, count, rotations with teams, members with people
        ("/api/v1/rotations/", 4),
        # token + user, count, policies, steps with calendars, targets with people and teams
        ("/api/v1/escalation-policies/", 5),
    ],
)
def test_lists_make_a_fixed_number_of_queries(
    api, size, path, queries, django_assert_max_num_queries
):
    for n in range(size):
        team = TeamFactory(slug=f"team-{n}")
        team.members.add(UserFactory(username=f"member-{n}"))
        people = [PersonFactory(), PersonFactory()]
        rotation = rotation_with(people, team=team)
        policy = PolicyFactory()
        step(policy, 0, timedelta(0), (TargetKind.ONCALL, rotation), (TargetKind.TEAM, team))
        step(policy, 1, timedelta(minutes=5), (TargetKind.PERSON, people[1]))
    with django_assert_max_num_queries(queries):
        response = api.get(path)
    assert len(response.json()["results"]) == size
