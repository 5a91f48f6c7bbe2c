"""Who is on call, a rotation as an iCalendar feed, and the read-only teams, rotations and
escalation policies. Authenticated users only (the project's default permission)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from django.contrib.auth import get_user_model
from django.db.models import Prefetch
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from icalendar import Calendar, Event
from rest_framework import serializers, viewsets
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import oncall, selectors
from ..models import EscalationPolicy, EscalationStep, Rotation, StepTarget, Team
from .serializers import (
    CalendarQuerySerializer,
    EscalationPolicySerializer,
    OncallQuerySerializer,
    RotationOncallSerializer,
    RotationSerializer,
    TeamSerializer,
)

ERROR = OpenApiResponse(OpenApiTypes.OBJECT, description="Invalid query; names the field.")

CALENDAR_BEFORE = timedelta(weeks=4)
CALENDAR_AFTER = timedelta(weeks=12)
UID_DOMAIN = "oncall.incident-tracker"


@extend_schema(tags=["on-call"])
class OncallView(APIView):
    """`GET /api/v1/oncall/?team=<slug>&at=<ISO time>`: each rotation of the team at `at`
    (default now): who is on call, the secondary, and the current stretch."""

    @extend_schema(
        parameters=[OncallQuerySerializer],
        responses={
            200: inline_serializer(
                "OncallAnswer",
                {
                    "team": serializers.CharField(),
                    "at": serializers.DateTimeField(),
                    "rotations": RotationOncallSerializer(many=True),
                },
            ),
            400: ERROR,
        },
        summary="Who is on call in a team",
    )
    def get(self, request):
        query = OncallQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        team = query.validated_data["team"]
        at = query.validated_data.get("at") or timezone.now()
        rows = selectors.oncall_for_team(team, at)
        return Response(
            {
                "team": team.slug,
                "at": at.isoformat(),
                "rotations": RotationOncallSerializer(rows, many=True).data,
            }
        )


def shift_uid(rotation: Rotation, shift: oncall.Shift) -> str:
    """The same stretch always gets the same UID, whichever window it was fetched in."""
    stamp = shift.start.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    if shift.override is not None:
        return f"rotation-{rotation.pk}-override-{shift.override.pk}-{stamp}@{UID_DOMAIN}"
    return f"rotation-{rotation.pk}-shift-{shift.index}-{stamp}@{UID_DOMAIN}"


def rotation_calendar(rotation: Rotation, shifts: list[oncall.Shift], *, now: datetime) -> bytes:
    calendar = Calendar()
    calendar.add("prodid", "-//Incident tracker//On-call rotations//EN")
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    calendar.add("method", "PUBLISH")
    calendar.add("x-wr-calname", f"On call: {rotation}")
    for shift in shifts:
        event = Event()
        event.add("uid", shift_uid(rotation, shift))
        event.add("dtstamp", now.astimezone(UTC))
        event.add("dtstart", shift.start.astimezone(UTC))
        event.add("dtend", shift.end.astimezone(UTC))
        event.add("summary", f"{shift.person} on call ({rotation.name})")
        if shift.override is not None:
            reason = shift.override.reason or "no reason given"
            event.add("description", f"Override: {reason}")
        event.add("transp", "TRANSPARENT")
        calendar.add_component(event)
    return calendar.to_ical()


@extend_schema(tags=["on-call"])
class RotationCalendarView(APIView):
    """`GET /api/v1/rotations/<id>/calendar.ics[?start=YYYY-MM-DD&end=YYYY-MM-DD]`: one
    event per stretch (overrides as their own events) overlapping the window: by default
    4 weeks back to 12 weeks ahead; `start` and `end` are days in the rotation's zone, both
    included, at most a year apart."""

    def perform_content_negotiation(self, request, force=False):
        # Calendar clients ask for text/calendar; errors still answer in JSON, not 406.
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(
        parameters=[CalendarQuerySerializer],
        responses={
            (200, "text/calendar"): OpenApiResponse(OpenApiTypes.BINARY, description="iCalendar"),
            400: ERROR,
            404: OpenApiResponse(OpenApiTypes.OBJECT, description="No such rotation."),
        },
        summary="A rotation's shifts as an iCalendar feed",
    )
    def get(self, request, pk: int):
        query = CalendarQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        rotation = Rotation.objects.filter(pk=pk).only("time_zone").first()
        if rotation is None:
            raise NotFound("No such rotation.")
        now = timezone.now()
        zone = oncall.zone_of(rotation)
        first_day = query.validated_data.get("start")
        last_day = query.validated_data.get("end")
        if first_day is None and last_day is None:
            today = now.astimezone(zone).date()
            first_day, last_day = today - CALENDAR_BEFORE, today + CALENDAR_AFTER
        elif first_day is None:
            first_day = last_day - CALENDAR_BEFORE - CALENDAR_AFTER
        elif last_day is None:
            last_day = first_day + CALENDAR_BEFORE + CALENDAR_AFTER
        start = oncall.localize(datetime.combine(first_day, time.min), zone)
        end = oncall.localize(datetime.combine(last_day + timedelta(days=1), time.min), zone)
        rotation = selectors.rotation_for_calendar(pk, start, end)
        if rotation is None:  # deleted in between
            raise NotFound("No such rotation.")
        shifts = oncall.shifts_between(rotation, start, end)
        response = HttpResponse(
            rotation_calendar(rotation, shifts, now=now),
            content_type="text/calendar; charset=utf-8",
        )
        response["Content-Disposition"] = f'inline; filename="rotation-{rotation.pk}.ics"'
        return response


@extend_schema(tags=["on-call"])
class TeamViewSet(viewsets.ReadOnlyModelViewSet):
    """Teams by slug, with member usernames and rotation ids."""

    serializer_class = TeamSerializer
    lookup_field = "slug"
    lookup_value_regex = r"[-a-zA-Z0-9_]+"

    def get_queryset(self):
        return Team.objects.prefetch_related(
            Prefetch("members", queryset=get_user_model().objects.order_by("username")),
            Prefetch("rotations", queryset=Rotation.objects.order_by("name", "pk")),
        ).order_by("name")


@extend_schema(tags=["on-call"])
class RotationViewSet(viewsets.ReadOnlyModelViewSet):
    """Rotations by id, with their participants in order. Who is on call now:
    `/api/v1/oncall/?team=`; the shifts as a calendar: `.../calendar.ics`."""

    serializer_class = RotationSerializer
    lookup_value_regex = r"[0-9]{1,18}"

    def get_queryset(self):
        return (
            Rotation.objects.select_related("team")
            .prefetch_related(selectors.members_prefetch())
            .order_by("team__name", "name", "pk")
        )


@extend_schema(tags=["on-call"])
class EscalationPolicyViewSet(viewsets.ReadOnlyModelViewSet):
    """Escalation policies by id, with their steps and each step's targets."""

    serializer_class = EscalationPolicySerializer
    lookup_value_regex = r"[0-9]{1,18}"

    def get_queryset(self):
        targets = StepTarget.objects.select_related("person", "team").order_by("pk")
        steps = (
            EscalationStep.objects.select_related("calendar")
            .prefetch_related(Prefetch("targets", queryset=targets))
            .order_by("position", "pk")
        )
        return EscalationPolicy.objects.prefetch_related(
            Prefetch("steps", queryset=steps)
        ).order_by("name")
