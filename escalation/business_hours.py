"""Business-hours arithmetic: working days, hours and holidays in a time zone.

Pure functions of a `BusinessCalendar` (saved or not) and aware datetimes; no queries.

Business time
    A calendar opens one window per working day that is not a holiday: from `day_start` to
    `day_end`, wall-clock time in the calendar's `time_zone` (holidays are local dates too).
    Business time is the real time elapsed inside those windows. A window opens at
    `day_start` (inclusive) and closes at `day_end` (exclusive). A 09:00-17:00 window is
    8 hours on every day, DST change days included, because clocks change at night; a
    window that itself spans a change (00:00-23:00 on the day clocks go forward) is an
    hour shorter, as it really is. A wall-clock time that does not exist on a given day
    (inside the spring-forward gap) is read with the offset in force before the change;
    an ambiguous one is its first occurrence.

Results
    Every function takes aware datetimes and returns one in the zone of its input (UTC in,
    UTC out), so callers can store it as is. A naive datetime, a negative duration or a
    calendar with no working day raises ValueError.

Severities and "next business day"
    A severity with a calendar counts each of its targets (acknowledge, resolve, update
    cadence) in business time: a target of N hours is due when N hours of business time
    have elapsed since the start, and the clock starts at the next opening when the start
    is outside business hours (`incidents.deadlines.due_at`). No other rule applies, so:

    - "Respond within 2 hours, during business hours" (the multi-service runbook's Sev3):
      an ack target of 2 h on the calendar.
    - "Respond by the next business day" (its Sev4): a target of one working day's length,
      8 h on a 09:00-17:00 calendar. Declared Monday 14:00 it is due Tuesday 14:00; declared
      on Saturday, or Friday after 17:00, it is due Monday 17:00, the end of the next
      business day. That is "within one business day", never less than a full working day.

    `next_business_day_start` answers the other question one may ask ("when does the next
    business day begin?": the opening of the first business day after the local date of
    `at`); it is for display and for steps, not a deadline rule.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.core.exceptions import ValidationError

ONE_DAY = timedelta(days=1)


def validate_calendar(calendar) -> None:
    errors = {}
    try:
        days = [int(d) for d in calendar.working_days.split(",") if d.strip()]
    except ValueError:
        days = []
    if not days or any(d < 1 or d > 7 for d in days):
        errors["working_days"] = "List ISO weekdays 1 (Monday) to 7 (Sunday), e.g. 1,2,3,4,5."
    if calendar.day_start and calendar.day_end and calendar.day_start >= calendar.day_end:
        errors["day_end"] = "The working day must end after it starts."
    if not isinstance(calendar.holidays, list):
        errors["holidays"] = "A list of ISO dates."
    else:
        for value in calendar.holidays:
            try:
                date.fromisoformat(str(value))
            except ValueError:
                errors["holidays"] = f"{value!r} is not an ISO date (YYYY-MM-DD)."
                break
    if errors:
        raise ValidationError(errors)


def _as_time(value: time | str) -> time:
    # An unsaved instance still holds the field's string default ("09:00").
    return value if isinstance(value, time) else time.fromisoformat(str(value))


@dataclass(frozen=True)
class _Hours:
    """A calendar parsed once per call: the fields as the arithmetic needs them."""

    zone: zoneinfo.ZoneInfo
    weekdays: frozenset[int]
    opens: time
    closes: time
    holidays: frozenset[date]

    @classmethod
    def of(cls, calendar) -> _Hours:
        try:
            weekdays = frozenset(
                int(d) for d in (calendar.working_days or "").split(",") if d.strip()
            )
        except ValueError as error:
            raise ValueError(
                f"Calendar {calendar}: working days {calendar.working_days!r} are not ISO weekdays."
            ) from error
        weekdays = weekdays & frozenset(range(1, 8))
        if not weekdays:
            raise ValueError(f"Calendar {calendar} has no working days.")
        return cls(
            zone=zoneinfo.ZoneInfo(calendar.time_zone),
            weekdays=weekdays,
            opens=_as_time(calendar.day_start),
            closes=_as_time(calendar.day_end),
            holidays=frozenset(date.fromisoformat(str(d)) for d in calendar.holidays or ()),
        )

    def local_date(self, at: datetime) -> date:
        return at.astimezone(self.zone).date()

    def is_business_day(self, day: date) -> bool:
        return day.isoweekday() in self.weekdays and day not in self.holidays

    def window(self, day: date) -> tuple[datetime, datetime] | None:
        """The business window of a local date, in UTC; None on a day off."""
        if not self.is_business_day(day):
            return None
        opens = datetime.combine(day, self.opens, tzinfo=self.zone).astimezone(UTC)
        closes = datetime.combine(day, self.closes, tzinfo=self.zone).astimezone(UTC)
        if closes <= opens:  # only when a DST gap swallows a tiny window
            return None
        return opens, closes

    def windows_from(self, at: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Every window that closes after `at` (UTC), in order, without end.

        Ends for every valid calendar: it has a working day and finitely many holidays.
        """
        day = self.local_date(at)
        while True:
            window = self.window(day)
            if window is not None and window[1] > at:
                yield window
            day += ONE_DAY


def _utc(at: datetime, name: str) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {at!r}.")
    return at.astimezone(UTC)


def is_business_time(calendar, at: datetime) -> bool:
    """Whether `at` falls inside a business window of `calendar` (opening inclusive,
    closing exclusive)."""
    hours = _Hours.of(calendar)
    moment = _utc(at, "at")
    window = hours.window(hours.local_date(moment))
    return window is not None and window[0] <= moment < window[1]


def next_business_start(calendar, at: datetime) -> datetime:
    """`at` itself if it is business time, else the next opening of `calendar`."""
    hours = _Hours.of(calendar)
    moment = _utc(at, "at")
    opens, _ = next(hours.windows_from(moment))
    return max(opens, moment).astimezone(at.tzinfo)


def next_business_day_start(calendar, at: datetime) -> datetime:
    """The opening of the first business day after the local date of `at`.

    Strictly after: on a business day, even before it opens, the answer is the next one.
    Friday 10:00 and Saturday both give Monday's opening (holidays skipped).
    """
    hours = _Hours.of(calendar)
    moment = _utc(at, "at")
    tomorrow = datetime.combine(hours.local_date(moment) + ONE_DAY, time(), tzinfo=hours.zone)
    opens, _ = next(hours.windows_from(tomorrow.astimezone(UTC)))
    return opens.astimezone(at.tzinfo)


def add_business_time(calendar, start: datetime, duration: timedelta) -> datetime:
    """The moment when `duration` of business time has elapsed since `start`.

    Time outside working days, hours and holidays does not count; a start outside business
    hours starts the clock at the next opening, so a zero duration gives
    `next_business_start`. A duration that uses up a window exactly ends at its closing,
    not at the next opening. Walks whole windows, one per day: cheap for years.
    """
    if duration < timedelta(0):
        raise ValueError(f"duration must not be negative, got {duration}.")
    hours = _Hours.of(calendar)
    cursor = _utc(start, "start")
    remaining = duration
    for opens, closes in hours.windows_from(cursor):
        cursor = max(opens, cursor)
        available = closes - cursor
        if remaining <= available:
            return (cursor + remaining).astimezone(start.tzinfo)
        remaining -= available
    raise AssertionError("unreachable: windows_from never ends")  # pragma: no cover


def business_time_between(calendar, start: datetime, end: datetime) -> timedelta:
    """How much business time lies between `start` and `end` (zero if `end` <= `start`):
    the inverse of `add_business_time`, for reports such as time to acknowledge."""
    hours = _Hours.of(calendar)
    lower, upper = _utc(start, "start"), _utc(end, "end")
    total = timedelta(0)
    if upper <= lower:
        return total
    for opens, closes in hours.windows_from(lower):
        if opens >= upper:
            break
        total += min(closes, upper) - max(opens, lower)
    return total
