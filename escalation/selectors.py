"""Reads used by the admin, the API and tasks: who is on call, per rotation and per team."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from django.db.models import F, Prefetch, QuerySet, Value

from . import oncall
from .models import Override, Person, Rotation, RotationMember, Team

# Slack around a prefetch's override window: more than any DST shift of a handoff.
OVERRIDE_MARGIN = timedelta(days=1)


class RotationOncall(NamedTuple):
    """One rotation at one instant. `shift` is the stretch `oncall` covers (an override's
    segment or the scheduled shift); `upcoming` is the stretch after it."""

    rotation: Rotation
    oncall: Person | None
    next: Person | None
    shift_end: datetime | None
    shift: oncall.Shift | None
    upcoming: oncall.Shift | None

    @property
    def shift_start(self) -> datetime | None:
        return self.shift.start if self.shift else None


class TeamOncall(NamedTuple):
    team: Team
    rotations: list[RotationOncall]


def members_prefetch(lookup: str = "members") -> Prefetch:
    return Prefetch(
        lookup,
        queryset=RotationMember.objects.select_related("person").order_by("position"),
    )


def overrides_prefetch(
    start: datetime, end: datetime | None = None, lookup: str = "overrides"
) -> Prefetch:
    """The overrides that can matter for stretches overlapping [start, end): such a stretch
    starts at most one shift length before `start` and, counting the stretch after the one
    covering `end`, ends at most two shift lengths after `end`. Past overrides pile up
    over the years and are left out; with no `end`, every later override is kept (a
    rotation that starts in the future needs those around its first handoff)."""
    length = F("rotation__shift_length")
    queryset = Override.objects.select_related("person").filter(
        ends_at__gt=Value(start - OVERRIDE_MARGIN) - length
    )
    if end is not None:
        queryset = queryset.filter(starts_at__lt=Value(end + OVERRIDE_MARGIN) + length + length)
    return Prefetch(lookup, queryset=queryset.order_by("starts_at", "pk"))


def prefetch_oncall(queryset: QuerySet[Rotation], *, at: datetime) -> QuerySet[Rotation]:
    """Rotations with what `escalation.oncall` needs to answer for `at` (who is on call,
    the secondary, the current and the next stretch): 2 queries for any number of
    rotations."""
    return queryset.prefetch_related(members_prefetch(), overrides_prefetch(at))


def rotation_oncall(rotation: Rotation, at: datetime) -> RotationOncall:
    """One rotation at `at`; give it a rotation from `prefetch_oncall` (no queries)."""
    members = list(rotation.members.all())
    overrides = list(rotation.overrides.all())
    shift = oncall.segment_at(rotation, at, members=members, overrides=overrides)
    return RotationOncall(
        rotation=rotation,
        oncall=shift.person if shift else None,
        next=oncall.next_in_line(rotation, at, members=members, overrides=overrides),
        shift_end=shift.end if shift else None,
        shift=shift,
        upcoming=oncall.next_shift(rotation, at, members=members, overrides=overrides),
    )


def oncall_for_team(team: Team, at: datetime) -> list[RotationOncall]:
    """Who is on call at `at` in each rotation of `team` (by rotation name): the person,
    the secondary, and when the current stretch ends. 3 queries, whatever the size."""
    rotations = prefetch_oncall(
        Rotation.objects.filter(team=team).select_related("team").order_by("name", "pk"), at=at
    )
    return [rotation_oncall(rotation, at) for rotation in rotations]


def oncall_now_all_teams(at: datetime) -> list[TeamOncall]:
    """Every team (by name) with each of its rotations at `at`, for the admin index.
    4 queries, whatever the number of teams, rotations and members."""
    rotations = prefetch_oncall(Rotation.objects.order_by("name", "pk"), at=at)
    teams = Team.objects.order_by("name", "pk").prefetch_related(
        Prefetch("rotations", queryset=rotations)
    )
    return [
        TeamOncall(team, [rotation_oncall(rotation, at) for rotation in team.rotations.all()])
        for team in teams
    ]


def rotation_for_calendar(rotation_id: int, start: datetime, end: datetime) -> Rotation | None:
    """A rotation with its members and the overrides `oncall.shifts_between` needs for
    [start, end); None if there is no such rotation."""
    return (
        Rotation.objects.select_related("team")
        .prefetch_related(members_prefetch(), overrides_prefetch(start, end))
        .filter(pk=rotation_id)
        .first()
    )
