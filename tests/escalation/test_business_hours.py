from __future__ import annotations

import random
import time as clock
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from escalation.business_hours import (
    add_business_time,
    business_time_between,
    is_business_time,
    next_business_day_start,
    next_business_start,
)
from escalation.models import BusinessCalendar
from incidents import services
from incidents.deadlines import target_states
from tests.incidents.factories import SeverityFactory, declare

from .factories import CalendarFactory

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
H = timedelta(hours=1)


def office(time_zone: str = "UTC", **kwargs) -> BusinessCalendar:
    """An unsaved Monday-to-Friday 09:00-17:00 calendar: the pure functions need no row."""
    return BusinessCalendar(name="Office", time_zone=time_zone, **kwargs)


def local(zone: ZoneInfo, *args: int) -> datetime:
    return datetime(*args, tzinfo=zone)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- inside and outside business hours ---------------------------------------------------


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (utc(2026, 1, 5, 9, 0), True),  # Monday, the opening counts
        (utc(2026, 1, 5, 12, 30), True),
        (utc(2026, 1, 5, 16, 59, 59), True),
        (utc(2026, 1, 5, 17, 0), False),  # the closing does not
        (utc(2026, 1, 5, 8, 59), False),
        (utc(2026, 1, 10, 12, 0), False),  # Saturday
        (utc(2026, 1, 11, 12, 0), False),  # Sunday
    ],
)
def test_is_business_time_follows_working_days_and_hours(at, expected):
    assert is_business_time(office(), at) is expected


def test_a_holiday_is_not_business_time():
    calendar = office(holidays=["2026-12-25"])
    assert not is_business_time(calendar, utc(2026, 12, 25, 12, 0))
    assert is_business_time(calendar, utc(2026, 12, 24, 12, 0))


def test_business_hours_are_read_in_the_calendars_zone():
    calendar = office("Europe/Berlin")
    # 08:30 UTC on a winter Monday is 09:30 in Berlin.
    assert is_business_time(calendar, utc(2026, 1, 5, 8, 30))
    # 16:30 UTC is 17:30 in Berlin: closed, though 16:30 is inside 09:00-17:00.
    assert not is_business_time(calendar, utc(2026, 1, 5, 16, 30))


def test_next_business_start_is_the_moment_itself_inside_hours():
    at = utc(2026, 1, 5, 11, 17, 3)
    assert next_business_start(office(), at) == at


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (utc(2026, 1, 5, 7, 0), utc(2026, 1, 5, 9, 0)),  # before opening: today
        (utc(2026, 1, 5, 17, 0), utc(2026, 1, 6, 9, 0)),  # at closing: tomorrow
        (utc(2026, 1, 9, 18, 0), utc(2026, 1, 12, 9, 0)),  # Friday evening: Monday
        (utc(2026, 1, 10, 12, 0), utc(2026, 1, 12, 9, 0)),  # Saturday: Monday
    ],
)
def test_next_business_start_outside_hours_is_the_next_opening(at, expected):
    assert next_business_start(office(), at) == expected


def test_next_business_start_skips_holidays():
    calendar = office(holidays=["2026-12-25", "2026-12-28"])
    assert next_business_start(calendar, utc(2026, 12, 24, 17, 0)) == utc(2026, 12, 29, 9, 0)


# --- next business day -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (utc(2026, 1, 5, 7, 0), utc(2026, 1, 6, 9, 0)),  # before Monday's opening: Tuesday
        (utc(2026, 1, 5, 10, 0), utc(2026, 1, 6, 9, 0)),
        (utc(2026, 1, 9, 10, 0), utc(2026, 1, 12, 9, 0)),  # Friday: Monday
        (utc(2026, 1, 10, 10, 0), utc(2026, 1, 12, 9, 0)),  # Saturday: Monday
        (utc(2026, 12, 24, 10, 0), utc(2026, 12, 28, 9, 0)),  # over Christmas Day
    ],
)
def test_next_business_day_start_is_the_first_business_day_after_the_local_date(at, expected):
    assert next_business_day_start(office(holidays=["2026-12-25"]), at) == expected


def test_next_business_day_uses_the_local_date_of_the_calendar():
    calendar = office("Asia/Tokyo")
    # Monday 23:30 UTC is already Tuesday 08:30 in Tokyo: the next business day is Wednesday.
    at = utc(2026, 1, 5, 23, 30)
    assert next_business_day_start(calendar, at) == local(TOKYO, 2026, 1, 7, 9, 0)


# --- adding business time --------------------------------------------------------------


def test_duration_inside_one_day():
    assert add_business_time(office(), utc(2026, 1, 5, 10, 0), 2 * H) == utc(2026, 1, 5, 12, 0)


def test_a_duration_that_fills_the_day_ends_at_the_closing():
    assert add_business_time(office(), utc(2026, 1, 5, 9, 0), 8 * H) == utc(2026, 1, 5, 17, 0)


def test_start_before_opening_starts_the_clock_at_the_opening():
    assert add_business_time(office(), utc(2026, 1, 5, 3, 0), 2 * H) == utc(2026, 1, 5, 11, 0)


def test_zero_duration_outside_hours_is_the_next_opening():
    at = utc(2026, 1, 10, 12, 0)
    assert add_business_time(office(), at, timedelta(0)) == next_business_start(office(), at)


def test_friday_afternoon_spills_to_monday():
    # Friday 15:00 + 4 h: two hours on Friday, two on Monday.
    assert add_business_time(office(), utc(2026, 1, 9, 15, 0), 4 * H) == utc(2026, 1, 12, 11, 0)


def test_a_weekend_start_waits_for_monday():
    assert add_business_time(office(), utc(2026, 1, 10, 8, 0), 30 * timedelta(minutes=1)) == utc(
        2026, 1, 12, 9, 30
    )


def test_holidays_do_not_count():
    calendar = office(holidays=["2026-12-25", "2026-12-31", "2027-01-01"])
    # Thursday 24th 16:00 + 2 h: one hour that day, Friday 25th is a holiday, one on Monday.
    assert add_business_time(calendar, utc(2026, 12, 24, 16, 0), 2 * H) == utc(2026, 12, 28, 10, 0)
    # Wednesday 30th 09:00 + 9 h: a full Wednesday, then New Year's Eve and Day are off.
    assert add_business_time(calendar, utc(2026, 12, 30, 9, 0), 9 * H) == utc(2027, 1, 4, 10, 0)


def test_multi_day_durations_count_only_working_hours():
    calendar = office()
    monday = utc(2026, 1, 5, 9, 0)
    assert add_business_time(calendar, monday, 40 * H) == utc(2026, 1, 9, 17, 0)
    assert add_business_time(calendar, monday, 41 * H) == utc(2026, 1, 12, 10, 0)
    # The 72 h resolve target of a low severity is nine working days.
    assert add_business_time(calendar, monday, 72 * H) == utc(2026, 1, 15, 17, 0)


def test_years_of_business_time_are_cheap():
    calendar = office()
    started = clock.perf_counter()
    # Ten years of working weeks (520 weeks of 40 h) from a Monday opening end on a Friday.
    due = add_business_time(calendar, utc(2026, 1, 5, 9, 0), 520 * 40 * H)
    elapsed = clock.perf_counter() - started
    assert due == utc(2026, 1, 5, 17, 0) + timedelta(weeks=519, days=4)
    assert elapsed < 2, f"took {elapsed:.2f}s: stepping, not walking windows?"


def test_calendar_zone_differs_from_utc_and_the_result_keeps_the_input_zone():
    calendar = office("Asia/Tokyo")
    # Monday 23:30 UTC = Tuesday 08:30 JST: the clock starts at 09:00 JST (00:00 UTC).
    due = add_business_time(calendar, utc(2026, 1, 5, 23, 30), 90 * timedelta(minutes=1))
    assert due == utc(2026, 1, 6, 1, 30)
    assert due.tzinfo is UTC
    berlin_start = local(BERLIN, 2026, 1, 6, 1, 30)  # the same instant as 00:30 UTC
    assert add_business_time(calendar, berlin_start, H).tzinfo is BERLIN


# --- daylight saving ---------------------------------------------------------------------


def test_berlin_spring_forward_weekend():
    calendar = office("Europe/Berlin")
    # Friday 27 March 16:00 CET (UTC+1) + 3 h: one hour Friday, two on Monday in CEST (UTC+2).
    due = add_business_time(calendar, local(BERLIN, 2026, 3, 27, 16, 0), 3 * H)
    assert due == local(BERLIN, 2026, 3, 30, 11, 0)
    assert due == utc(2026, 3, 30, 9, 0)


def test_berlin_fall_back_weekend():
    calendar = office("Europe/Berlin")
    # Friday 23 October 16:00 CEST (UTC+2) + 3 h: Monday 11:00 CET (UTC+1).
    due = add_business_time(calendar, utc(2026, 10, 23, 14, 0), 3 * H)
    assert due == utc(2026, 10, 26, 10, 0)
    assert due.astimezone(BERLIN).hour == 11


def test_new_york_spring_forward_weekend():
    calendar = office("America/New_York")
    # Friday 6 March 16:00 EST (UTC-5) + 2 h: Monday 10:00 EDT (UTC-4).
    due = add_business_time(calendar, local(NEW_YORK, 2026, 3, 6, 16, 0), 2 * H)
    assert due == utc(2026, 3, 9, 14, 0)


def test_new_york_fall_back_weekend():
    calendar = office("America/New_York")
    # Friday 30 October 16:00 EDT (UTC-4) + 2 h: Monday 10:00 EST (UTC-5).
    due = add_business_time(calendar, local(NEW_YORK, 2026, 10, 30, 16, 0), 2 * H)
    assert due == utc(2026, 11, 2, 15, 0)


@pytest.mark.parametrize(
    ("zone", "day"),
    [
        ("Europe/Berlin", (2026, 3, 29)),
        ("Europe/Berlin", (2026, 10, 25)),
        ("America/New_York", (2026, 3, 8)),
        ("America/New_York", (2026, 11, 1)),
    ],
)
def test_a_working_day_on_a_dst_change_day_is_still_eight_hours(zone, day):
    calendar = office(zone, working_days="1,2,3,4,5,6,7")
    opening = local(ZoneInfo(zone), *day, 9, 0)
    assert add_business_time(calendar, opening, 8 * H) == local(ZoneInfo(zone), *day, 17, 0)
    assert business_time_between(calendar, opening - 9 * H, opening + 14 * H) == 8 * H


def test_a_window_that_spans_the_change_counts_real_time():
    # 00:00-23:00 on the day Berlin's clocks go forward holds 22 real hours, not 23.
    calendar = office("Europe/Berlin", working_days="7", day_start=time(0), day_end=time(23))
    sunday = local(BERLIN, 2026, 3, 29, 0, 0)
    assert business_time_between(calendar, sunday, sunday + 48 * H) == 22 * H
    assert add_business_time(calendar, sunday, 22 * H) == local(BERLIN, 2026, 3, 29, 23, 0)


# --- agreement with a brute-force reference -------------------------------------------------

QUARTER = timedelta(minutes=15)


def reference_add(calendar, start: datetime, quarters: int) -> datetime:
    """Step through real time a quarter-hour at a time: slow, obviously right."""
    moment = start
    while quarters:
        if is_business_time(calendar, moment):
            quarters -= 1
        moment += QUARTER
    return moment


@pytest.mark.parametrize(
    "calendar",
    [
        office("Europe/Berlin", holidays=["2026-03-30", "2026-10-26"]),
        office("America/New_York", working_days="1,2,3,4,5,6,7", day_start=time(7, 30)),
        office("Europe/Berlin", working_days="6,7", day_start=time(0), day_end=time(23)),
    ],
    ids=["berlin-office", "new-york-every-day", "berlin-weekends-long-days"],
)
def test_agrees_with_stepping_through_dst_weekends(calendar):
    rng = random.Random(4)
    for _ in range(40):
        base = rng.choice([utc(2026, 3, 5), utc(2026, 3, 26), utc(2026, 10, 22)])
        start = base + rng.randrange(4 * 96) * QUARTER  # quarter hours over four days
        quarters = rng.randrange(1, 3 * 32)  # up to three 8-hour days
        due = add_business_time(calendar, start, quarters * QUARTER)
        assert due == reference_add(calendar, start, quarters), (start, quarters)
        assert business_time_between(calendar, start, due) == quarters * QUARTER


# --- invalid input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "function",
    [
        lambda calendar, at: add_business_time(calendar, at, H),
        next_business_start,
        next_business_day_start,
        is_business_time,
    ],
)
def test_a_calendar_without_working_days_is_refused(function):
    with pytest.raises(ValueError, match="no working days"):
        function(office(working_days=""), utc(2026, 1, 5, 9, 0))


def test_a_naive_datetime_is_refused():
    with pytest.raises(ValueError, match="aware"):
        add_business_time(office(), datetime(2026, 1, 5, 9, 0), H)  # noqa: DTZ001


def test_a_negative_duration_is_refused():
    with pytest.raises(ValueError, match="negative"):
        add_business_time(office(), utc(2026, 1, 5, 9, 0), -H)


# --- deadlines of incidents --------------------------------------------------------------


@pytest.mark.django_db
def test_declared_incident_gets_business_hour_deadlines():
    severity = SeverityFactory(
        level=13,
        calendar=CalendarFactory(time_zone="Europe/Berlin"),
        ack_target=2 * H,
        resolve_target=24 * H,
        update_interval=4 * H,
    )
    friday = local(BERLIN, 2026, 3, 27, 16, 0)  # the spring-forward weekend follows

    incident = declare(severity=severity, now=friday)
    incident.refresh_from_db()

    # 1 h on Friday, then Monday in CEST.
    assert incident.ack_due_at == local(BERLIN, 2026, 3, 30, 10, 0)
    assert incident.next_update_due_at == local(BERLIN, 2026, 3, 30, 12, 0)
    # 24 business hours: 1 on Friday, 8 Monday, 8 Tuesday, 7 Wednesday.
    assert incident.resolve_due_at == local(BERLIN, 2026, 4, 1, 16, 0)
    ack, resolve = target_states(incident, friday)
    assert (ack.due_at, resolve.due_at) == (incident.ack_due_at, incident.resolve_due_at)


@pytest.mark.django_db
def test_a_severity_without_calendar_keeps_wall_clock_deadlines():
    severity = SeverityFactory(level=14, ack_target=2 * H, resolve_target=24 * H)
    saturday = utc(2026, 1, 10, 12, 0)
    incident = declare(severity=severity, now=saturday)
    assert incident.ack_due_at == saturday + 2 * H
    assert incident.resolve_due_at == saturday + 24 * H


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("declared", "due"),
    [
        ((2026, 1, 5, 14, 0), (2026, 1, 6, 14, 0)),  # Monday afternoon: Tuesday, same time
        ((2026, 1, 9, 18, 0), (2026, 1, 12, 17, 0)),  # Friday evening: end of Monday
        ((2026, 1, 10, 11, 0), (2026, 1, 12, 17, 0)),  # Saturday: end of Monday
    ],
)
def test_next_business_day_is_one_working_day_of_business_time(declared, due):
    calendar = CalendarFactory(time_zone="America/New_York")
    sev4 = SeverityFactory(level=15, calendar=calendar, ack_target=8 * H)
    incident = declare(severity=sev4, now=local(NEW_YORK, *declared))
    assert incident.ack_due_at == local(NEW_YORK, *due)


@pytest.mark.django_db
def test_changing_to_a_severity_with_calendar_rebases_on_business_time():
    saturday = utc(2026, 1, 10, 12, 0)
    incident = declare(severity=SeverityFactory(level=16, ack_target=2 * H), now=saturday)
    office_hours = SeverityFactory(level=17, calendar=CalendarFactory(), ack_target=2 * H)

    incident = services.incident_change_severity(
        incident=incident, severity=office_hours, actor=None, now=saturday + H
    )
    incident.refresh_from_db()

    assert incident.ack_due_at == utc(2026, 1, 12, 11, 0)
