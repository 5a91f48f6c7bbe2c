"""Who is on call: pure functions of a rotation, its members and its overrides. No writes.

Schedule
    Shift `k` (k = 0, 1, ...) starts at the wall-clock time `start_date + handoff_time +
    k * shift_length` in the rotation's `time_zone` and ends where shift `k + 1` starts.
    Lengths are wall-clock lengths: a weekly shift hands off at 09:00 local before and after
    a daylight-saving change (so that shift lasts 167 or 169 real hours), and 12-hour shifts
    keep their 09:00/21:00 handoffs. Shift `k` belongs to the member at position
    `k mod len(members)` (members in `position` order). Before the first handoff, and in a
    rotation without members, nobody is on call.

    A handoff that falls on a wall-clock time that does not exist (inside a spring-forward
    gap) happens at the moment the clocks jump, so handoffs never run backwards in time and
    a shift swallowed whole by the gap (possible only for shifts under a few hours) has no
    length and is skipped. An ambiguous wall-clock time (the repeated hour in autumn) is
    read as its first occurrence.

Overrides
    An override covering an instant (`starts_at <= at < ends_at`) replaces the scheduled
    person at that instant; when several cover it, the latest created wins (then the
    highest pk). Overrides replace someone scheduled: before the first handoff, or in a
    rotation without members, they do nothing. In `shifts_between`, overrides cut each
    scheduled shift into segments; a segment never crosses a scheduled handoff, so every
    segment (`Shift`) is fixed by its own scheduled shift and stays the same whatever
    window it is asked for in.

Data
    Every function reads `rotation.members.all()` (with `person`) and
    `rotation.overrides.all()` (with `person`), so prefetch them for many rotations
    (`escalation.selectors.prefetch_oncall`), or pass `members=` / `overrides=` lists. A
    prefetch may hold only the overrides near the instants asked about.

Results
    Every datetime is aware and in UTC (a same-zone `ZoneInfo` datetime subtracts and
    compares by wall clock, which is wrong across a DST change); convert with
    `local(rotation, dt)` for display. A naive `at`, `start` or `end` raises ValueError.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import Override, Person, Rotation, RotationMember

# More shifts than this in one call is a caller's mistake (1-hour shifts for 10 years).
MAX_SHIFTS = 100_000


@dataclass(frozen=True)
class Shift:
    """A stretch of time one person covers: a scheduled shift, or a segment of one.

    `index` is the scheduled shift's number (0 from `start_date`). `override` is the
    override that put `person` there, or None for the scheduled person.
    """

    start: datetime
    end: datetime
    person: Person
    index: int
    override: Override | None = None

    @property
    def is_override(self) -> bool:
        return self.override is not None

    @property
    def duration(self) -> timedelta:
        return self.end - self.start


def _as_time(value: time | str) -> time:
    # An unsaved instance still holds the field's string default ("09:00").
    return value if isinstance(value, time) else time.fromisoformat(str(value))


def _as_date(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def _utc(at: datetime, name: str = "at") -> datetime:
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {at!r}.")
    return at.astimezone(UTC)


def zone_of(rotation: Rotation) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(rotation.time_zone)


def local(rotation: Rotation, at: datetime) -> datetime:
    """`at` in the rotation's zone, for display."""
    return _utc(at).astimezone(zone_of(rotation))


def localize(naive: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    """The instant (UTC) of a wall-clock time in `zone`.

    Ambiguous: the first occurrence. Nonexistent (in a gap): the moment the clocks jump,
    which keeps the mapping non-decreasing.
    """
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return first
    # Inside a gap the two folds read the time with the offsets on either side of the jump;
    # the jump lies between them, on a whole second. Bisect for it.
    other = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    low = int(min(first, other).timestamp())
    high = int(max(first, other).timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, UTC).astimezone(zone).replace(tzinfo=None) < naive:
            low = middle
        else:
            high = middle
    return datetime.fromtimestamp(high, UTC)


class _Schedule:
    """A rotation read once per call: zone, first handoff, length, members in order."""

    def __init__(self, rotation: Rotation, members: Iterable[RotationMember] | None):
        self.rotation = rotation
        self.zone = zone_of(rotation)
        self.origin = datetime.combine(
            _as_date(rotation.start_date), _as_time(rotation.handoff_time)
        )
        self.length: timedelta = rotation.shift_length
        if self.length <= timedelta(0):
            raise ValueError(f"Rotation {rotation}: the shift length must be positive.")
        rows = rotation.members.all() if members is None else members
        self.people: list[Person] = [m.person for m in sorted(rows, key=lambda m: m.position)]

    def start(self, k: int) -> datetime:
        return localize(self.origin + k * self.length, self.zone)

    def index_at(self, at: datetime) -> int:
        """The last k whose shift starts at or before `at` (negative before the first)."""
        wall = at.astimezone(self.zone).replace(tzinfo=None)
        k = (wall - self.origin) // self.length
        while k >= 0 and self.start(k) > at:
            k -= 1
        while self.start(k + 1) <= at:
            k += 1
        return k

    def shift(self, k: int) -> Shift:
        return Shift(
            start=self.start(k),
            end=self.start(k + 1),
            person=self.people[k % len(self.people)],
            index=k,
        )

    def shift_at(self, at: datetime) -> Shift | None:
        if not self.people:
            return None
        k = self.index_at(at)
        return self.shift(k) if k >= 0 else None


def _overrides(rotation: Rotation, overrides: Iterable[Override] | None) -> list[Override]:
    return list(rotation.overrides.all() if overrides is None else overrides)


def _priority(override: Override) -> tuple[datetime, int]:
    return (override.created_at, override.pk or 0)


def _winner(overrides: Iterable[Override], at: datetime) -> Override | None:
    covering = [o for o in overrides if o.starts_at <= at < o.ends_at]
    return max(covering, key=_priority) if covering else None


def _segments(shift: Shift, overrides: Sequence[Override]) -> list[Shift]:
    """A scheduled shift cut by the overrides that overlap it, in time order."""
    inside = [o for o in overrides if o.starts_at < shift.end and o.ends_at > shift.start]
    if not inside:
        return [shift]
    cuts = {shift.start, shift.end}
    for override in inside:
        for edge in (override.starts_at, override.ends_at):
            if shift.start < edge < shift.end:
                cuts.add(_utc(edge))
    edges = sorted(cuts)
    out: list[Shift] = []
    for begin, finish in zip(edges, edges[1:], strict=False):
        winner = _winner(inside, begin)
        if out and out[-1].override is winner:
            out[-1] = Shift(out[-1].start, finish, out[-1].person, shift.index, winner)
            continue
        person = winner.person if winner is not None else shift.person
        out.append(Shift(begin, finish, person, shift.index, winner))
    return out


def shift_at(
    rotation: Rotation, at: datetime, *, members: Iterable[RotationMember] | None = None
) -> Shift | None:
    """The scheduled shift (overrides aside) covering `at`; None before the first handoff
    or without members. A shift covers [start, end): at a handoff, the incoming one."""
    return _Schedule(rotation, members).shift_at(_utc(at))


def segment_at(
    rotation: Rotation,
    at: datetime,
    *,
    members: Iterable[RotationMember] | None = None,
    overrides: Iterable[Override] | None = None,
) -> Shift | None:
    """The stretch covering `at` with overrides applied: who is on call, since and until
    when (until the override ends or the scheduled handoff, whichever comes first)."""
    moment = _utc(at)
    scheduled = _Schedule(rotation, members).shift_at(moment)
    if scheduled is None:
        return None
    for segment in _segments(scheduled, _overrides(rotation, overrides)):
        if segment.start <= moment < segment.end:
            return segment
    return None  # unreachable: the segments tile the shift


def oncall_at(
    rotation: Rotation,
    at: datetime,
    *,
    members: Iterable[RotationMember] | None = None,
    overrides: Iterable[Override] | None = None,
) -> Person | None:
    """Who is on call at `at`: the override's person if one covers it (the latest created
    of several), else the scheduled person; None before the first handoff or without
    members."""
    moment = _utc(at)
    scheduled = _Schedule(rotation, members).shift_at(moment)
    if scheduled is None:
        return None
    winner = _winner(_overrides(rotation, overrides), moment)
    return winner.person if winner is not None else scheduled.person


def next_in_line(
    rotation: Rotation,
    at: datetime,
    *,
    members: Iterable[RotationMember] | None = None,
    overrides: Iterable[Override] | None = None,
) -> Person | None:
    """The secondary at `at`: the first participant after the scheduled one, in rotation
    order, who is neither on call now nor the scheduled person an override replaced (an
    override may be an absence). None before the first handoff, or when nobody else is
    left (a one-person rotation)."""
    moment = _utc(at)
    schedule = _Schedule(rotation, members)
    scheduled = schedule.shift_at(moment)
    if scheduled is None:
        return None
    winner = _winner(_overrides(rotation, overrides), moment)
    busy = {scheduled.person.pk}
    if winner is not None:
        busy.add(winner.person.pk)
    count = len(schedule.people)
    for step in range(1, count):
        person = schedule.people[(scheduled.index + step) % count]
        if person.pk not in busy:
            return person
    return None


def shifts_between(
    rotation: Rotation,
    start: datetime,
    end: datetime,
    *,
    members: Iterable[RotationMember] | None = None,
    overrides: Iterable[Override] | None = None,
) -> list[Shift]:
    """Every stretch that overlaps [start, end), in time order, with overrides cut in as
    their own segments. Stretches are whole (not clipped to the window), so the first may
    start before `start` and the last end after `end`. Empty without members, or when the
    window ends before the first handoff."""
    begin, finish = _utc(start, "start"), _utc(end, "end")
    schedule = _Schedule(rotation, members)
    if not schedule.people or finish <= begin:
        return []
    k = max(schedule.index_at(begin), 0)
    first_start = schedule.start(k)
    relevant = [
        o
        for o in _overrides(rotation, overrides)
        if o.ends_at > first_start and o.starts_at < finish
    ]
    out: list[Shift] = []
    count = 0
    while True:
        shift = schedule.shift(k)
        if shift.start >= finish:
            break
        count += 1
        if count > MAX_SHIFTS:
            raise ValueError(f"More than {MAX_SHIFTS} shifts between {start} and {end}.")
        if shift.end > shift.start:  # a shift swallowed by a DST gap has no length
            out.extend(s for s in _segments(shift, relevant) if s.end > begin)
        k += 1
    return out


def next_shift(
    rotation: Rotation,
    at: datetime,
    *,
    members: Iterable[RotationMember] | None = None,
    overrides: Iterable[Override] | None = None,
) -> Shift | None:
    """The stretch that follows the one covering `at` (with overrides applied): who takes
    over next, and when. Before the first handoff, the first stretch. None without
    members."""
    moment = _utc(at)
    people = list(rotation.members.all() if members is None else members)
    schedule = _Schedule(rotation, people)
    if not schedule.people:
        return None
    rows = _overrides(rotation, overrides)
    current = segment_at(rotation, moment, members=people, overrides=rows)
    following = current.end if current is not None else schedule.start(0)
    return segment_at(rotation, following, members=people, overrides=rows)
