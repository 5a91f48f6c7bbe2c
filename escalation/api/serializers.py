"""Input and output of the escalation API: who is on call, calendars, and the read-only
teams, rotations and escalation policies."""

from __future__ import annotations

import re
from datetime import date, timedelta

from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..models import (
    EscalationPolicy,
    EscalationStep,
    Rotation,
    RotationMember,
    StepTarget,
    Team,
)

# A "+" in a query string arrives as a space: "09:00:00 01:00" meant "09:00:00+01:00".
_SPACED_OFFSET = re.compile(r"\s(\d{2}(?::?\d{2})?)$")

MAX_CALENDAR_WINDOW = timedelta(days=366)
# Shift arithmetic near datetime's own limits overflows; nobody schedules that far out.
EARLIEST = date(1970, 1, 1)
LATEST = date(9000, 1, 1)
RANGE_ERROR = "Out of range: give a time between 1970 and 9000."


@extend_schema_field(OpenApiTypes.DATETIME)
class AwareDateTimeField(serializers.Field):
    """An ISO 8601 date and time with an offset (or Z). A naive time is refused: which
    zone it meant is a guess."""

    default_error_messages = {
        "invalid": "Not an ISO 8601 date and time; give one like 2026-03-08T09:00:00Z.",
        "naive": "The time has no offset; add one, e.g. Z or +01:00.",
        "range": RANGE_ERROR,
    }

    def to_internal_value(self, data):
        text = str(data).strip()
        try:
            value = parse_datetime(text) or parse_datetime(_SPACED_OFFSET.sub(r"+\1", text))
        except ValueError:
            value = None
        if value is None:
            self.fail("invalid")
        if value.tzinfo is None or value.utcoffset() is None:
            self.fail("naive")
        if not EARLIEST <= value.date() < LATEST:
            self.fail("range")
        return value

    def to_representation(self, value):
        return value.isoformat()


class OncallQuerySerializer(serializers.Serializer):
    """`?team=<slug>&at=<ISO time>`; `at` defaults to now (the view fills it in)."""

    team = serializers.SlugRelatedField(
        slug_field="slug",
        queryset=Team.objects.all(),
        error_messages={
            "required": "Give the team's slug, e.g. ?team=platform.",
            "does_not_exist": "No team has the slug {value!r}.",
            "invalid": "Give the team's slug, e.g. ?team=platform.",
        },
    )
    at = AwareDateTimeField(required=False)


class PersonRefSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="pk")
    name = serializers.CharField()


class RotationOncallSerializer(serializers.Serializer):
    """One `escalation.selectors.RotationOncall`."""

    id = serializers.IntegerField(source="rotation.pk")
    name = serializers.CharField(source="rotation.name")
    time_zone = serializers.CharField(source="rotation.time_zone")
    oncall = PersonRefSerializer(allow_null=True)
    next = PersonRefSerializer(allow_null=True)
    override = serializers.SerializerMethodField()
    shift_start = serializers.DateTimeField(allow_null=True)
    shift_end = serializers.DateTimeField(allow_null=True)

    def get_override(self, obj) -> bool:
        return bool(obj.shift and obj.shift.is_override)


class CalendarQuerySerializer(serializers.Serializer):
    """`?start=&end=`: ISO dates, both days included, in the rotation's zone; at most a
    year apart. Missing ones are filled in by the view."""

    start = serializers.DateField(required=False, input_formats=["iso-8601"])
    end = serializers.DateField(required=False, input_formats=["iso-8601"])

    def validate_start(self, value: date) -> date:
        if not EARLIEST <= value < LATEST:
            raise serializers.ValidationError(RANGE_ERROR)
        return value

    def validate_end(self, value: date) -> date:
        return self.validate_start(value)

    def validate(self, attrs):
        start, end = attrs.get("start"), attrs.get("end")
        if start and end:
            if end < start:
                raise serializers.ValidationError({"end": "The end is before the start."})
            if end - start >= MAX_CALENDAR_WINDOW:
                raise serializers.ValidationError(
                    {"end": "The window is longer than a year; ask for at most 366 days."}
                )
        return attrs


# --- Read-only configuration ----------------------------------------------------------------


def duration_field(**kwargs) -> serializers.DurationField:
    """Durations come out in ISO 8601 (P0DT00H30M00S)."""
    return serializers.DurationField(format="iso-8601", read_only=True, **kwargs)


class TeamSerializer(serializers.ModelSerializer):
    members = serializers.SlugRelatedField(slug_field="username", many=True, read_only=True)
    rotations = serializers.PrimaryKeyRelatedField(many=True, read_only=True)

    class Meta:
        model = Team
        fields = ["slug", "name", "description", "members", "rotations"]
        read_only_fields = fields


class RotationMemberSerializer(serializers.ModelSerializer):
    person = PersonRefSerializer()

    class Meta:
        model = RotationMember
        fields = ["position", "person"]
        read_only_fields = fields


class RotationSerializer(serializers.ModelSerializer):
    """A rotation: participants in order take shifts of `shift_length`, handing off at
    `handoff_time` in `time_zone`, counted from `start_date`."""

    team = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    shift_length = duration_field()
    handoff_notice = duration_field()
    members = RotationMemberSerializer(many=True, read_only=True)
    # A wall-clock time in the rotation's zone, so no offset: OpenAPI's "time" format
    # would demand one.
    handoff_time = serializers.CharField(
        read_only=True, help_text="Local time of day of each handoff, HH:MM:SS."
    )

    class Meta:
        model = Rotation
        fields = [
            "id",
            "team",
            "name",
            "time_zone",
            "shift_length",
            "handoff_time",
            "start_date",
            "handoff_notice",
            "members",
        ]
        read_only_fields = fields


class StepTargetSerializer(serializers.ModelSerializer):
    """Whom a step pages: `kind` says which of rotation, person or team is set."""

    rotation = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)
    person = PersonRefSerializer(allow_null=True)
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)

    class Meta:
        model = StepTarget
        fields = ["kind", "rotation", "person", "team"]
        read_only_fields = fields


class EscalationStepSerializer(serializers.ModelSerializer):
    """`delay` counts from the start of the incident (or of the round); the step pages its
    targets if `condition` still holds then."""

    delay = duration_field()
    calendar = serializers.StringRelatedField(allow_null=True)
    targets = StepTargetSerializer(many=True, read_only=True)

    class Meta:
        model = EscalationStep
        fields = ["position", "delay", "condition", "calendar", "targets"]
        read_only_fields = fields


class EscalationPolicySerializer(serializers.ModelSerializer):
    repeat_after = duration_field()
    steps = EscalationStepSerializer(many=True, read_only=True)

    class Meta:
        model = EscalationPolicy
        fields = ["id", "name", "description", "repeat", "repeat_after", "steps"]
        read_only_fields = fields
