"""Who is on call: shifts across both DST changes, in zones other than UTC, with overrides;
and the selectors that read it for teams without per-team queries."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from escalation import oncall, selectors
from escalation.models import Override, Rotation
from tests.escalation.factories import OverrideFactory, PersonFactory, rotation_with
from tests.incidents.factories import TeamFactory

pytestmark = pytest.mark.django_db

NEW_YORK = "America/New_York"
BERLIN = "Europe/Berlin"
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(days=7)


def local(text: str, zone: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def people():
    return [PersonFactory(name=name) for name in ("Ada", "Bo", "Cy")]


def loaded(rotation: Rotation) -> Rotation:
    """The rotation as the selectors hand it over: members and overrides prefetched."""
    return selectors.prefetch_oncall(Rotation.objects.filter(pk=rotation.pk), at=utc("2000-01-01"))[
        0
    ]


# --- weekly shifts across DST ----------------------------------------------------------------


def test_weekly_shift_across_spring_forward_hands_off_at_nine_local_and_lasts_167_hours(people):
    ada, bo, _ = people
    rotation = rotation_with(
        people, time_zone=NEW_YORK, shift_length=WEEK, start_date=date(2026, 3, 2)
    )

    shift = oncall.shift_at(rotation, local("2026-03-09T08:59:59", NEW_YORK))

    assert shift.person == ada
    assert shift.index == 0
    assert shift.start == local("2026-03-02T09:00", NEW_YORK) == utc("2026-03-02T14:00")
    assert shift.end == local("2026-03-09T09:00", NEW_YORK) == utc("2026-03-09T13:00")
    assert shift.duration == timedelta(hours=167)
    assert oncall.oncall_at(rotation, local("2026-03-09T09:00", NEW_YORK)) == bo


def test_weekly_shift_across_fall_back_hands_off_at_nine_local_and_lasts_169_hours(people):
    ada, bo, _ = people
    rotation = rotation_with(
        people, time_zone=NEW_YORK, shift_length=WEEK, start_date=date(2026, 10, 26)
    )

    shift = oncall.shift_at(rotation, local("2026-11-01T12:00", NEW_YORK))

    assert shift.person == ada
    assert shift.start == utc("2026-10-26T13:00")
    assert shift.end == utc("2026-11-02T14:00") == local("2026-11-02T09:00", NEW_YORK)
    assert shift.duration == timedelta(hours=169)
    following = oncall.shift_at(rotation, shift.end)
    assert (following.person, following.index, following.duration) == (bo, 1, WEEK)


def test_weekly_rotation_cycles_through_members_in_position_order(people):
    ada, bo, cy = people
    rotation = rotation_with([cy, ada, bo], time_zone=BERLIN, start_date=date(2026, 1, 5))

    who = [
        oncall.oncall_at(rotation, local("2026-01-05T09:00", BERLIN) + n * WEEK + HOUR)
        for n in range(7)
    ]

    assert who == [cy, ada, bo, cy, ada, bo, cy]


# --- daily and 12-hour shifts across DST -----------------------------------------------------


@pytest.mark.parametrize(
    ("day", "hours"),
    [
        (date(2026, 3, 28), 23),  # clocks go forward in the night of 28/29 March
        (date(2026, 10, 24), 25),  # and back in the night of 24/25 October
    ],
)
def test_daily_shift_over_a_berlin_dst_night_keeps_nine_oclock_handoffs(people, day, hours):
    rotation = rotation_with(
        people, time_zone=BERLIN, shift_length=DAY, start_date=date(2026, 1, 1)
    )

    shift = oncall.shift_at(rotation, datetime.combine(day, time(12), tzinfo=ZoneInfo(BERLIN)))

    assert shift.start == datetime.combine(day, time(9), tzinfo=ZoneInfo(BERLIN))
    assert shift.end == datetime.combine(day + DAY, time(9), tzinfo=ZoneInfo(BERLIN))
    assert shift.duration == timedelta(hours=hours)


@pytest.mark.parametrize(
    ("night", "hours"),
    [
        ("2026-03-07", 11),  # New York springs forward at 02:00 on 8 March
        ("2026-10-31", 13),  # and falls back at 02:00 on 1 November
    ],
)
def test_twelve_hour_night_shift_over_new_york_dst_keeps_local_handoffs(people, night, hours):
    rotation = rotation_with(
        people[:2],
        time_zone=NEW_YORK,
        shift_length=timedelta(hours=12),
        handoff_time="09:00",
        start_date=date(2026, 1, 1),
    )
    evening = local(f"{night}T21:00", NEW_YORK)

    shift = oncall.shift_at(rotation, evening + 3 * HOUR)

    assert shift.start == evening
    assert oncall.local(rotation, shift.end).time() == time(9)
    assert shift.duration == timedelta(hours=hours)
    day_shift = oncall.shift_at(rotation, shift.end)
    assert day_shift.duration == timedelta(hours=12)
    assert oncall.local(rotation, day_shift.end).time() == time(21)


def test_twelve_hour_shifts_alternate_over_berlin_spring_forward(people):
    ada, bo, _ = people
    rotation = rotation_with(
        [ada, bo],
        time_zone=BERLIN,
        shift_length=timedelta(hours=12),
        handoff_time="08:00",
        start_date=date(2026, 3, 27),
    )

    shifts = oncall.shifts_between(
        rotation, local("2026-03-28T08:00", BERLIN), local("2026-03-30T08:00", BERLIN)
    )

    assert [(oncall.local(rotation, s.start).strftime("%d %H:%M"), s.person) for s in shifts] == [
        ("28 08:00", ada),
        ("28 20:00", bo),
        ("29 08:00", ada),
        ("29 20:00", bo),
    ]
    assert [s.duration for s in shifts] == [
        timedelta(hours=12),
        timedelta(hours=11),
        timedelta(hours=12),
        timedelta(hours=12),
    ]


def test_handoff_inside_the_spring_gap_happens_when_the_clocks_jump(people):
    rotation = rotation_with(
        people,
        time_zone=BERLIN,
        shift_length=DAY,
        handoff_time="02:30",
        start_date=date(2026, 3, 1),
    )

    shift = oncall.shift_at(rotation, utc("2026-03-29T00:59:59"))

    # 02:30 does not exist on 29 March in Berlin: 02:00 CET is followed by 03:00 CEST.
    assert shift.end == utc("2026-03-29T01:00") == local("2026-03-29T03:00", BERLIN)
    assert shift.duration == timedelta(hours=23, minutes=30)
    following = oncall.shift_at(rotation, shift.end)
    assert following.start == shift.end
    assert following.end == local("2026-03-30T02:30", BERLIN)


def test_handoff_in_the_repeated_autumn_hour_is_its_first_occurrence(people):
    rotation = rotation_with(
        people,
        time_zone=BERLIN,
        shift_length=DAY,
        handoff_time="02:30",
        start_date=date(2026, 10, 1),
    )

    shift = oncall.shift_at(rotation, utc("2026-10-25T12:00"))

    assert shift.start == utc("2026-10-25T00:30")  # 02:30 CEST, not 02:30 CET
    assert shift.duration == timedelta(hours=25)


def test_hourly_shifts_over_the_spring_gap_skip_the_hour_that_does_not_exist(people):
    rotation = rotation_with(
        people,
        time_zone=BERLIN,
        shift_length=HOUR,
        handoff_time="00:00",
        start_date=date(2026, 3, 1),
    )

    shifts = oncall.shifts_between(rotation, utc("2026-03-28T23:00"), utc("2026-03-29T03:00"))

    assert [s.start for s in shifts] == [utc("2026-03-28T23:00")] + [
        utc(f"2026-03-29T0{h}:00") for h in range(3)
    ]
    assert all(s.duration == HOUR for s in shifts)
    # Local 02:00-03:00 does not exist: shift 674 (02:00) has no length and is skipped.
    assert [s.index for s in shifts] == [672, 673, 675, 676]
    assert oncall.shift_at(rotation, utc("2026-03-29T01:00")).index == 675


def test_hourly_shifts_over_the_autumn_repeat_give_the_repeated_hour_to_one_person(people):
    rotation = rotation_with(
        people,
        time_zone=BERLIN,
        shift_length=HOUR,
        handoff_time="00:00",
        start_date=date(2026, 10, 1),
    )

    shift = oncall.shift_at(rotation, utc("2026-10-25T01:30"))  # the second 02:30 (CET)

    assert shift.start == utc("2026-10-25T00:00")  # the first 02:00 (CEST)
    assert shift.end == utc("2026-10-25T02:00")  # 03:00 CET
    assert shift.duration == 2 * HOUR


# --- instants, zones, edges ------------------------------------------------------------------


def test_instant_exactly_at_a_handoff_belongs_to_the_incoming_person(people):
    ada, bo, _ = people
    rotation = rotation_with(people, time_zone=NEW_YORK, start_date=date(2026, 3, 2))
    handoff = local("2026-03-09T09:00", NEW_YORK)

    assert oncall.oncall_at(rotation, handoff - timedelta(microseconds=1)) == ada
    assert oncall.oncall_at(rotation, handoff) == bo
    assert oncall.shift_at(rotation, handoff).start == handoff


def test_the_instants_zone_does_not_matter_and_results_are_utc(people):
    rotation = rotation_with(people, time_zone=NEW_YORK, start_date=date(2026, 3, 2))
    tokyo = datetime(2026, 3, 9, 22, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # 09:00 New York

    shift = oncall.shift_at(rotation, tokyo)

    assert shift.index == 1
    assert shift.start == tokyo
    assert shift.start.tzinfo is UTC
    assert shift.end.tzinfo is UTC


def test_nobody_is_on_call_before_the_first_handoff_even_with_an_override(people):
    ada, bo, _ = people
    rotation = rotation_with(people, time_zone=BERLIN, start_date=date(2026, 3, 2))
    first = local("2026-03-02T09:00", BERLIN)
    OverrideFactory(rotation=rotation, person=bo, starts_at=first - DAY, ends_at=first - HOUR)

    before = first - timedelta(seconds=1)
    assert oncall.shift_at(rotation, before) is None
    assert oncall.oncall_at(rotation, before) is None
    assert oncall.next_in_line(rotation, before) is None
    assert oncall.segment_at(rotation, before) is None
    assert oncall.oncall_at(rotation, first) == ada
    upcoming = oncall.next_shift(rotation, before)
    assert (upcoming.person, upcoming.start) == (ada, first)
    assert oncall.shifts_between(rotation, first - WEEK, first) == []


def test_rotation_without_members_has_nobody(people):
    rotation = rotation_with([], start_date=date(2026, 1, 5))
    OverrideFactory(
        rotation=rotation,
        person=people[0],
        starts_at=utc("2026-02-01"),
        ends_at=utc("2026-02-02"),
    )
    at = utc("2026-02-01T12:00")

    assert oncall.shift_at(rotation, at) is None
    assert oncall.oncall_at(rotation, at) is None
    assert oncall.next_in_line(rotation, at) is None
    assert oncall.next_shift(rotation, at) is None
    assert oncall.shifts_between(rotation, at, at + WEEK) == []


def test_naive_instants_are_refused(people):
    rotation = rotation_with(people)

    with pytest.raises(ValueError, match="aware"):
        oncall.oncall_at(rotation, datetime(2026, 3, 9, 9))  # noqa: DTZ001
    with pytest.raises(ValueError, match="aware"):
        oncall.shifts_between(rotation, utc("2026-03-01"), datetime(2026, 3, 9))  # noqa: DTZ001


# --- overrides -------------------------------------------------------------------------------


def test_swap_override_replaces_the_scheduled_person_only_while_it_lasts(people):
    ada, bo, _ = people
    rotation = rotation_with(people, time_zone=NEW_YORK, start_date=date(2026, 3, 2))
    starts, ends = local("2026-03-04T18:00", NEW_YORK), local("2026-03-05T08:00", NEW_YORK)
    OverrideFactory(rotation=rotation, person=bo, starts_at=starts, ends_at=ends, reason="swap")

    assert oncall.oncall_at(rotation, starts - timedelta(microseconds=1)) == ada
    assert oncall.oncall_at(rotation, starts) == bo
    assert oncall.oncall_at(rotation, ends - timedelta(microseconds=1)) == bo
    assert oncall.oncall_at(rotation, ends) == ada
    assert oncall.shift_at(rotation, starts).person == ada  # the schedule itself is unchanged
    segment = oncall.segment_at(rotation, starts + HOUR)
    assert (segment.person, segment.start, segment.end, segment.is_override) == (
        bo,
        starts,
        ends,
        True,
    )


def test_absence_override_covers_a_whole_shift(people):
    ada, bo, cy = people
    rotation = rotation_with(people, time_zone=BERLIN, start_date=date(2026, 3, 2))
    week_two = local("2026-03-09T09:00", BERLIN)
    OverrideFactory(
        rotation=rotation, person=cy, starts_at=week_two, ends_at=week_two + WEEK, reason="leave"
    )

    assert oncall.shift_at(rotation, week_two + DAY).person == bo
    assert oncall.oncall_at(rotation, week_two + DAY) == cy
    assert oncall.oncall_at(rotation, week_two + WEEK) == cy  # Cy's own week follows
    segments = oncall.shifts_between(rotation, week_two, week_two + WEEK)
    assert [(s.person, s.is_override) for s in segments] == [(cy, True)]


def test_of_overlapping_overrides_the_latest_created_wins(people):
    ada, bo, cy = people
    rotation = rotation_with(people, time_zone=NEW_YORK, start_date=date(2026, 3, 2))
    day = local("2026-03-03T00:00", NEW_YORK)
    # Bo's override starts later but was created first; Cy's, created last, wins where
    # they overlap, whatever their starts.
    OverrideFactory(
        rotation=rotation,
        person=cy,
        starts_at=day + 6 * HOUR,
        ends_at=day + 12 * HOUR,
        created_at=utc("2026-02-02"),
    )
    OverrideFactory(
        rotation=rotation,
        person=bo,
        starts_at=day + 8 * HOUR,
        ends_at=day + 20 * HOUR,
        created_at=utc("2026-02-01"),
    )

    assert oncall.oncall_at(rotation, day + 7 * HOUR) == cy
    assert oncall.oncall_at(rotation, day + 10 * HOUR) == cy
    assert oncall.oncall_at(rotation, day + 13 * HOUR) == bo
    assert oncall.oncall_at(rotation, day + 21 * HOUR) == ada
    segments = oncall.shifts_between(rotation, day, day + DAY)
    assert [(s.person, s.start, s.end) for s in segments] == [
        (ada, local("2026-03-02T09:00", NEW_YORK), day + 6 * HOUR),
        (cy, day + 6 * HOUR, day + 12 * HOUR),
        (bo, day + 12 * HOUR, day + 20 * HOUR),
        (ada, day + 20 * HOUR, local("2026-03-09T09:00", NEW_YORK)),
    ]


def test_same_created_at_falls_back_to_the_newer_row(people):
    _, bo, cy = people
    rotation = rotation_with(people, start_date=date(2026, 3, 2))
    created = utc("2026-02-01")
    span = {"starts_at": utc("2026-03-03"), "ends_at": utc("2026-03-04"), "created_at": created}
    OverrideFactory(rotation=rotation, person=bo, **span)
    OverrideFactory(rotation=rotation, person=cy, **span)

    assert oncall.oncall_at(rotation, utc("2026-03-03T12:00")) == cy


def test_override_over_a_handoff_is_cut_into_one_segment_per_scheduled_shift(people):
    ada, bo, cy = people
    rotation = rotation_with(people, time_zone=NEW_YORK, start_date=date(2026, 3, 2))
    handoff = local("2026-03-09T09:00", NEW_YORK)  # the first handoff after spring forward
    override = OverrideFactory(
        rotation=rotation, person=cy, starts_at=handoff - DAY, ends_at=handoff + DAY
    )

    segments = oncall.shifts_between(rotation, handoff - 2 * DAY, handoff + 2 * DAY)

    assert [(s.person, s.start, s.end, s.index, s.override) for s in segments] == [
        (ada, local("2026-03-02T09:00", NEW_YORK), handoff - DAY, 0, None),
        (cy, handoff - DAY, handoff, 0, override),
        (cy, handoff, handoff + DAY, 1, override),
        (bo, handoff + DAY, local("2026-03-16T09:00", NEW_YORK), 1, None),
    ]


def test_segments_tile_time_and_do_not_depend_on_the_window(people):
    ada, bo, cy = people
    rotation = rotation_with(
        people, time_zone=BERLIN, shift_length=timedelta(hours=12), start_date=date(2026, 10, 20)
    )
    OverrideFactory(
        rotation=rotation,
        person=cy,
        starts_at=local("2026-10-24T15:00", BERLIN),
        ends_at=local("2026-10-25T12:00", BERLIN),
    )
    OverrideFactory(
        rotation=rotation,
        person=ada,
        starts_at=local("2026-10-25T01:00", BERLIN),
        ends_at=local("2026-10-25T02:30", BERLIN),
    )
    start, end = local("2026-10-23T00:00", BERLIN), local("2026-10-28T00:00", BERLIN)

    whole = oncall.shifts_between(rotation, start, end)

    assert whole[0].start <= start
    assert whole[-1].end >= end
    assert all(a.end == b.start for a, b in zip(whole, whole[1:], strict=False))
    assert all(s.end > s.start for s in whole)
    middle = oncall.shifts_between(
        rotation, local("2026-10-24T20:00", BERLIN), local("2026-10-25T10:00", BERLIN)
    )
    assert [s for s in whole if s in middle] == middle
    for segment in whole:
        probe = segment.start + (segment.end - segment.start) / 2
        assert oncall.oncall_at(rotation, probe) == segment.person
        assert oncall.segment_at(rotation, probe) == segment


def test_next_in_line_is_the_participant_after_the_scheduled_one(people):
    ada, bo, cy = people
    rotation = rotation_with(people, time_zone=NEW_YORK, start_date=date(2026, 3, 2))

    assert oncall.next_in_line(rotation, local("2026-03-03T12:00", NEW_YORK)) == bo
    assert oncall.next_in_line(rotation, local("2026-03-10T12:00", NEW_YORK)) == cy
    assert oncall.next_in_line(rotation, local("2026-03-17T12:00", NEW_YORK)) == ada


def test_next_in_line_skips_whoever_an_override_put_on_call(people):
    ada, bo, cy = people
    rotation = rotation_with(people, time_zone=NEW_YORK, start_date=date(2026, 3, 2))
    OverrideFactory(
        rotation=rotation, person=bo, starts_at=utc("2026-03-03"), ends_at=utc("2026-03-04")
    )

    assert oncall.oncall_at(rotation, utc("2026-03-03T12:00")) == bo
    assert oncall.next_in_line(rotation, utc("2026-03-03T12:00")) == cy


def test_next_in_line_is_nobody_when_nobody_else_is_left(people):
    ada, bo, _ = people
    alone = rotation_with([ada], start_date=date(2026, 3, 2))
    pair = rotation_with([ada, bo], start_date=date(2026, 3, 2))
    OverrideFactory(
        rotation=pair, person=bo, starts_at=utc("2026-03-03"), ends_at=utc("2026-03-04")
    )

    assert oncall.next_in_line(alone, utc("2026-03-03T12:00")) is None
    assert oncall.next_in_line(pair, utc("2026-03-03T12:00")) is None
    assert oncall.next_in_line(pair, utc("2026-03-04T12:00")) == bo


def test_next_shift_is_the_stretch_after_the_current_one(people):
    ada, bo, cy = people
    rotation = rotation_with(people, time_zone=BERLIN, start_date=date(2026, 3, 2))
    handoff = local("2026-03-09T09:00", BERLIN)
    OverrideFactory(rotation=rotation, person=cy, starts_at=handoff - DAY, ends_at=handoff - HOUR)

    during = oncall.next_shift(rotation, handoff - 2 * HOUR)
    assert (during.person, during.start, during.end) == (ada, handoff - HOUR, handoff)
    after = oncall.next_shift(rotation, handoff - 30 * timedelta(minutes=1))
    assert (after.person, after.start, after.index) == (bo, handoff, 1)


# --- data access -----------------------------------------------------------------------------


def test_prefetched_rotation_answers_without_queries(people, django_assert_num_queries):
    rotation = rotation_with(people, time_zone=NEW_YORK, start_date=date(2026, 3, 2))
    OverrideFactory(
        rotation=rotation, person=people[2], starts_at=utc("2026-03-03"), ends_at=utc("2026-03-04")
    )
    rotation = loaded(rotation)
    at = utc("2026-03-03T12:00")

    with django_assert_num_queries(0):
        assert oncall.oncall_at(rotation, at) == people[2]
        assert oncall.next_in_line(rotation, at) == people[1]
        oncall.next_shift(rotation, at)
        assert len(oncall.shifts_between(rotation, at, at + 8 * WEEK)) == 10


def test_prefetch_leaves_out_old_overrides_without_changing_answers(people):
    ada, bo, cy = people
    rotation = rotation_with(people, time_zone=NEW_YORK, start_date=date(2025, 1, 6))
    at = local("2026-03-03T12:00", NEW_YORK)
    OverrideFactory(rotation=rotation, person=cy, starts_at=at - 300 * DAY, ends_at=at - 299 * DAY)
    current = OverrideFactory(rotation=rotation, person=cy, starts_at=at - HOUR, ends_at=at + HOUR)
    OverrideFactory(rotation=rotation, person=bo, starts_at=at + 30 * DAY, ends_at=at + 31 * DAY)

    fetched = selectors.prefetch_oncall(Rotation.objects.filter(pk=rotation.pk), at=at)[0]

    assert len(fetched.overrides.all()) == 2
    assert current in fetched.overrides.all()
    fresh = Rotation.objects.get(pk=rotation.pk)
    assert selectors.rotation_oncall(fetched, at) == selectors.rotation_oncall(fresh, at)


def test_oncall_for_team_lists_each_rotation_with_who_next_and_shift_end(people):
    ada, bo, cy = people
    team = TeamFactory(slug="payments")
    primary = rotation_with(
        people, team=team, name="Primary", time_zone=NEW_YORK, start_date=date(2026, 3, 2)
    )
    rotation_with(
        [cy, ada], team=team, name="Database", time_zone=BERLIN, start_date=date(2026, 3, 2)
    )
    rotation_with([bo], name="Elsewhere")
    OverrideFactory(
        rotation=primary, person=cy, starts_at=utc("2026-03-03"), ends_at=utc("2026-03-04")
    )
    at = utc("2026-03-03T12:00")

    rows = selectors.oncall_for_team(team, at)

    assert [(r.rotation.name, r.oncall, r.next, r.shift_end) for r in rows] == [
        ("Database", cy, ada, local("2026-03-09T09:00", BERLIN)),
        ("Primary", cy, bo, utc("2026-03-04")),
    ]
    assert rows[1].shift.is_override
    assert rows[1].shift_start == utc("2026-03-03")
    assert rows[1].upcoming.person == ada


def make_teams(count: int, people) -> None:
    for n in range(count):
        team = TeamFactory()
        for name in ("Primary", "Secondary"):
            rotation = rotation_with(people, team=team, name=name, time_zone=BERLIN)
            Override.objects.create(
                rotation=rotation,
                person=people[n % 3],
                starts_at=utc("2026-03-03"),
                ends_at=utc("2026-03-04"),
            )


@pytest.mark.parametrize("teams", [2, 12])
def test_oncall_now_all_teams_takes_four_queries_whatever_the_number_of_teams(
    people, teams, django_assert_num_queries
):
    make_teams(teams, people)
    TeamFactory(name="Zz without rotations")

    with django_assert_num_queries(4):
        result = selectors.oncall_now_all_teams(utc("2026-03-03T12:00"))
        rows = [row for entry in result for row in entry.rotations]
        assert all(row.oncall is not None and row.upcoming is not None for row in rows)

    assert len(result) == teams + 1
    assert result[-1].rotations == []
    assert len(rows) == 2 * teams
