"""GET /api/v1/oncall/ and GET /api/v1/rotations/<id>/calendar.ics."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import time_machine
from icalendar import Calendar
from rest_framework.authtoken.models import Token

from tests.escalation.factories import OverrideFactory, PersonFactory, rotation_with
from tests.incidents.factories import TeamFactory, UserFactory

pytestmark = pytest.mark.django_db

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
WEEK = timedelta(days=7)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def api(client):
    """A client with an API token (tokens do not expire, so time travel keeps it valid)."""
    token = Token.objects.create(user=UserFactory(is_staff=False))
    client.defaults["HTTP_AUTHORIZATION"] = f"Token {token.key}"
    return client


@pytest.fixture
def people():
    return [PersonFactory(name=name) for name in ("Ada", "Bo", "Cy")]


@pytest.fixture
def team(people):
    team = TeamFactory(name="Payments", slug="payments")
    primary = rotation_with(
        people, team=team, name="Primary", time_zone="America/New_York", start_date=date(2026, 3, 2)
    )
    rotation_with(
        people[1:],
        team=team,
        name="Database",
        time_zone="Europe/Berlin",
        start_date=date(2026, 3, 2),
    )
    OverrideFactory(
        rotation=primary,
        person=people[2],
        starts_at=utc("2026-03-10T00:00"),
        ends_at=utc("2026-03-11T00:00"),
        reason="dentist swap",
    )
    return team


def calendar_of(response) -> Calendar:
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/calendar")
    return Calendar.from_ical(response.content)


def events_of(response) -> list:
    return list(calendar_of(response).walk("VEVENT"))


# --- /oncall/ --------------------------------------------------------------------------------


def test_oncall_answers_who_is_on_call_and_next_for_each_rotation(api, team, people):
    ada, bo, cy = people

    response = api.get("/api/v1/oncall/", {"team": "payments", "at": "2026-03-09T13:00:00Z"})

    assert response.status_code == 200
    body = response.json()
    assert body["team"] == "payments"
    assert datetime.fromisoformat(body["at"]) == utc("2026-03-09T13:00")
    database, primary = body["rotations"]
    assert primary == {
        "id": team.rotations.get(name="Primary").pk,
        "name": "Primary",
        "time_zone": "America/New_York",
        "oncall": {"id": bo.pk, "name": "Bo"},
        "next": {"id": cy.pk, "name": "Cy"},
        "override": False,
        "shift_start": "2026-03-09T13:00:00Z",  # 09:00 EDT, the first handoff after DST
        "shift_end": "2026-03-10T00:00:00Z",  # when Cy's override starts
    }
    assert database["oncall"] == {"id": cy.pk, "name": "Cy"}
    assert database["next"] == {"id": bo.pk, "name": "Bo"}
    assert database["shift_end"] == "2026-03-16T08:00:00Z"  # 09:00 CET


def test_oncall_shows_an_override_with_its_own_start_and_end(api, team, people):
    response = api.get("/api/v1/oncall/", {"team": "payments", "at": "2026-03-10T12:00:00+01:00"})

    primary = response.json()["rotations"][1]
    assert primary["oncall"]["name"] == "Cy"
    assert primary["next"]["name"] == "Ada"  # after Bo (scheduled, replaced) and Cy (on call)
    assert primary["override"] is True
    assert (primary["shift_start"], primary["shift_end"]) == (
        "2026-03-10T00:00:00Z",
        "2026-03-11T00:00:00Z",
    )


def test_oncall_at_defaults_to_now(api, team):
    with time_machine.travel(utc("2026-03-03T12:00"), tick=False):
        body = api.get("/api/v1/oncall/", {"team": "payments"}).json()

    assert datetime.fromisoformat(body["at"]) == utc("2026-03-03T12:00")
    assert body["rotations"][1]["oncall"]["name"] == "Ada"


def test_oncall_reads_a_plus_offset_that_arrived_as_a_space(api, team):
    response = api.get("/api/v1/oncall/?team=payments&at=2026-03-10T12:00:00+01:00")

    assert response.status_code == 200
    assert datetime.fromisoformat(response.json()["at"]) == utc("2026-03-10T11:00")


def test_oncall_before_the_rotation_starts_is_nobody(api, team):
    body = api.get("/api/v1/oncall/", {"team": "payments", "at": "2026-01-01T00:00:00Z"}).json()

    assert [(r["oncall"], r["next"], r["shift_end"]) for r in body["rotations"]] == [
        (None, None, None),
        (None, None, None),
    ]


@pytest.mark.parametrize(
    ("query", "field", "reason"),
    [
        ({"team": "nope"}, "team", "No team has the slug 'nope'."),
        ({}, "team", "Give the team's slug"),
        ({"team": "payments", "at": "yesterday"}, "at", "Not an ISO 8601 date and time"),
        ({"team": "payments", "at": "2026-13-45T99:00Z"}, "at", "Not an ISO 8601"),
        ({"team": "payments", "at": "2026-03-10T12:00:00"}, "at", "no offset"),
        ({"team": "payments", "at": "9999-12-31T23:00:00Z"}, "at", "Out of range"),
    ],
)
def test_oncall_refuses_bad_input_naming_the_field_and_reason(api, team, query, field, reason):
    response = api.get("/api/v1/oncall/", query)

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    errors = response.json()
    assert list(errors) == [field]
    assert reason in errors[field][0]


def test_oncall_needs_an_authenticated_user(client, team):
    response = client.get("/api/v1/oncall/", {"team": "payments"})

    assert response.status_code == 401


def test_oncall_accepts_an_admin_session(client, team):
    client.force_login(UserFactory())

    response = client.get("/api/v1/oncall/", {"team": "payments"})

    assert response.status_code == 200


def add_team_rotations(count: int, team, people) -> None:
    for n in range(count):
        rotation = rotation_with(people, team=team, name=f"Extra {n}", start_date=date(2026, 3, 2))
        OverrideFactory(
            rotation=rotation,
            person=people[0],
            starts_at=utc("2026-03-09"),
            ends_at=utc("2026-03-10"),
        )


@pytest.mark.parametrize("extra", [0, 10])
def test_oncall_query_count_does_not_grow_with_rotations(
    api, team, people, extra, django_assert_max_num_queries
):
    add_team_rotations(extra, team, people)

    # session and user, team, rotations, members, overrides
    with django_assert_max_num_queries(6):
        response = api.get("/api/v1/oncall/", {"team": "payments", "at": "2026-03-09T12:00:00Z"})

    assert len(response.json()["rotations"]) == 2 + extra


# --- calendar.ics ----------------------------------------------------------------------------


def test_calendar_has_one_event_per_shift_with_who_and_rotation(api, team, people):
    rotation = team.rotations.get(name="Database")  # Bo, Cy weekly from 2 March, Berlin

    events = events_of(
        api.get(
            f"/api/v1/rotations/{rotation.pk}/calendar.ics",
            {"start": "2026-03-02", "end": "2026-04-05"},
        )
    )

    assert [str(e["SUMMARY"]) for e in events] == [
        "Bo on call (Database)",
        "Cy on call (Database)",
        "Bo on call (Database)",
        "Cy on call (Database)",
        "Bo on call (Database)",
    ]
    starts = [e.decoded("DTSTART") for e in events]
    ends = [e.decoded("DTEND") for e in events]
    assert starts[0] == datetime(2026, 3, 2, 9, tzinfo=BERLIN)
    assert all(start.astimezone(BERLIN).hour == 9 for start in starts)
    assert ends[:-1] == starts[1:]
    # The week of 29 March, when Berlin springs forward, is an hour short.
    assert ends[3] - starts[3] == WEEK - timedelta(hours=1)
    assert len({str(e["UID"]) for e in events}) == len(events)


def test_calendar_cuts_an_override_in_as_its_own_event(api, team, people):
    rotation = team.rotations.get(name="Primary")

    events = events_of(
        api.get(
            f"/api/v1/rotations/{rotation.pk}/calendar.ics",
            {"start": "2026-03-09", "end": "2026-03-15"},
        )
    )

    assert [(str(e["SUMMARY"]), e.decoded("DTSTART"), e.decoded("DTEND")) for e in events] == [
        (
            "Ada on call (Primary)",
            datetime(2026, 3, 2, 9, tzinfo=NEW_YORK),
            datetime(2026, 3, 9, 9, tzinfo=NEW_YORK),
        ),
        ("Bo on call (Primary)", datetime(2026, 3, 9, 9, tzinfo=NEW_YORK), utc("2026-03-10")),
        ("Cy on call (Primary)", utc("2026-03-10"), utc("2026-03-11")),
        ("Bo on call (Primary)", utc("2026-03-11"), datetime(2026, 3, 16, 9, tzinfo=NEW_YORK)),
    ]
    assert "dentist swap" in str(events[2]["DESCRIPTION"])
    assert "DESCRIPTION" not in events[0]


def test_calendar_uids_are_stable_across_windows_and_requests(api, team):
    rotation = team.rotations.get(name="Primary")
    url = f"/api/v1/rotations/{rotation.pk}/calendar.ics"

    wide = events_of(api.get(url, {"start": "2026-03-01", "end": "2026-04-30"}))
    narrow = events_of(api.get(url, {"start": "2026-03-10", "end": "2026-03-20"}))

    by_uid = {str(e["UID"]): (e.decoded("DTSTART"), str(e["SUMMARY"])) for e in wide}
    assert {str(e["UID"]): (e.decoded("DTSTART"), str(e["SUMMARY"])) for e in narrow}.items() <= (
        by_uid.items()
    )
    again = events_of(api.get(url, {"start": "2026-03-01", "end": "2026-04-30"}))
    assert [str(e["UID"]) for e in again] == [str(e["UID"]) for e in wide]


def test_calendar_default_window_is_four_weeks_back_to_twelve_ahead(api, team):
    rotation = team.rotations.get(name="Database")

    with time_machine.travel(utc("2026-06-03T12:00"), tick=False):
        events = events_of(api.get(f"/api/v1/rotations/{rotation.pk}/calendar.ics"))

    starts = [e.decoded("DTSTART") for e in events]
    assert starts[0] <= datetime(2026, 5, 6, tzinfo=BERLIN) < starts[1]
    assert starts[-1] < datetime(2026, 8, 27, tzinfo=BERLIN) <= events[-1].decoded("DTEND")
    assert len(events) == 17


def test_calendar_is_valid_icalendar(api, team):
    rotation = team.rotations.get(name="Primary")

    response = api.get(
        f"/api/v1/rotations/{rotation.pk}/calendar.ics",
        {"start": "2026-03-01", "end": "2026-03-31"},
        HTTP_ACCEPT="text/calendar",
    )

    calendar = calendar_of(response)
    assert len(calendar.walk("VEVENT")) == 7
    assert calendar.name == "VCALENDAR"
    assert str(calendar["VERSION"]) == "2.0"
    assert str(calendar["PRODID"])
    for event in calendar.walk("VEVENT"):
        for prop in ("UID", "DTSTAMP", "DTSTART", "DTEND", "SUMMARY"):
            assert prop in event
    assert b"BEGIN:VCALENDAR\r\n" in response.content


@pytest.mark.parametrize(
    ("query", "field", "reason"),
    [
        ({"start": "2026-01-01", "end": "2027-01-02"}, "end", "longer than a year"),
        ({"start": "2026-03-10", "end": "2026-03-01"}, "end", "before the start"),
        ({"start": "10 March"}, "start", "wrong format"),
        ({"end": "2026-03-10T00:00:00Z"}, "end", "wrong format"),
        ({"start": "9999-12-01", "end": "9999-12-31"}, "start", "Out of range"),
        ({"end": "0001-01-01"}, "end", "Out of range"),
    ],
)
def test_calendar_refuses_a_bad_window(api, team, query, field, reason):
    rotation = team.rotations.get(name="Primary")

    response = api.get(
        f"/api/v1/rotations/{rotation.pk}/calendar.ics", query, HTTP_ACCEPT="text/calendar"
    )

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert reason in response.json()[field][0]


def test_calendar_accepts_a_full_year(api, team):
    rotation = team.rotations.get(name="Primary")

    response = api.get(
        f"/api/v1/rotations/{rotation.pk}/calendar.ics",
        {"start": "2026-01-01", "end": "2026-12-31"},
    )

    assert (
        len(events_of(response)) == 46
    )  # 44 weekly shifts from 2 March; the override cuts one in 3


def test_calendar_of_an_unknown_rotation_is_404(api):
    assert api.get("/api/v1/rotations/999999/calendar.ics").status_code == 404


def test_calendar_needs_an_authenticated_user(client, team):
    rotation = team.rotations.get(name="Primary")

    assert client.get(f"/api/v1/rotations/{rotation.pk}/calendar.ics").status_code == 401


@pytest.mark.parametrize("overrides", [1, 30])
def test_calendar_query_count_does_not_grow_with_overrides(
    api, team, people, overrides, django_assert_max_num_queries
):
    rotation = team.rotations.get(name="Database")
    for n in range(overrides):
        OverrideFactory(
            rotation=rotation,
            person=people[0],
            starts_at=utc("2026-03-02T10:00") + n * timedelta(days=2),
            ends_at=utc("2026-03-02T12:00") + n * timedelta(days=2),
        )

    # session and user, the rotation's zone, the rotation, members, overrides
    with django_assert_max_num_queries(6):
        events = events_of(
            api.get(
                f"/api/v1/rotations/{rotation.pk}/calendar.ics",
                {"start": "2026-03-01", "end": "2026-06-01"},
            )
        )

    assert sum("Ada" in str(e["SUMMARY"]) for e in events) == overrides
