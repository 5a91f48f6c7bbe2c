"""Input and output of the incidents API.

Input serializers only parse and check shapes (types, lengths, that a slug names a row);
every rule about what may change lives in `incidents.services`. Output serializers read
what the selectors joined and prefetched: they make no queries of their own.
"""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.db import models
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from escalation.api.serializers import AwareDateTimeField, PersonRefSerializer
from escalation.models import Team

from ..comms.updates import MAX_UPDATE_LENGTH
from ..markdown import render_markdown
from ..models import (
    Alert,
    AlertRoute,
    AlertStatus,
    Impact,
    Incident,
    IncidentStatus,
    Integration,
    PublicStage,
    Role,
    Runbook,
    Service,
    Severity,
    StatusUpdate,
    TimelineEvent,
)
from ..services import MAX_NOTE_LENGTH

# Targets longer than this are refused: a deadline ten years out is a typo, and datetime
# arithmetic on much longer ones overflows.
MAX_TARGET = timedelta(days=3650)


def choice_field(choices: type[models.TextChoices], component_name: str):
    """A ChoiceField over `choices`, named `component_name` in the schema (several models
    have a `status`; each set of statuses gets its own, stable name)."""

    @extend_schema_field(
        {"type": "string", "enum": list(choices.values)}, component_name=component_name
    )
    class Field(serializers.ChoiceField):
        def __init__(self, **kwargs):
            super().__init__(choices=choices.choices, **kwargs)

    Field.__name__ = f"{component_name}Field"
    return Field


IncidentStatusField = choice_field(IncidentStatus, "IncidentStatus")
AlertStatusField = choice_field(AlertStatus, "AlertStatus")
PublicStageField = choice_field(PublicStage, "PublicStage")


# --- References to other rows ---------------------------------------------------------------


class SlugRef(serializers.SlugRelatedField):
    """A row named by one of its unique fields; an unknown value is a 400 on the field."""

    default_error_messages = {
        "does_not_exist": "No {model} has {slug_name} {value!r}.",
        "invalid": "Give the {slug_name} as a string.",
    }

    def __init__(self, *, model_name: str = "", **kwargs):
        self.model_name = model_name
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str | int) or isinstance(data, bool):
            self.fail("invalid", slug_name=self.slug_field)
        if isinstance(data, str) and ("\x00" in data or len(data) > 255):
            self.fail(
                "does_not_exist", model=self.model_name, slug_name=self.slug_field, value=data
            )
        queryset = self.get_queryset()
        try:
            return queryset.get(**{self.slug_field: data})
        except queryset.model.DoesNotExist:
            self.fail(
                "does_not_exist", model=self.model_name, slug_name=self.slug_field, value=data
            )
        except (TypeError, ValueError):
            self.fail("invalid", slug_name=self.slug_field)


class LevelRef(SlugRef):
    """A severity named by its level (1 is the worst)."""

    default_error_messages = {
        "does_not_exist": "No severity has level {value!r}.",
        "invalid": "Give the severity level as a whole number, e.g. 1.",
    }

    def __init__(self, **kwargs):
        kwargs.setdefault("queryset", Severity.objects.all())
        super().__init__(slug_field="level", model_name="severity", **kwargs)

    def to_internal_value(self, data):
        if isinstance(data, str) and data.strip().isdigit():
            data = int(data)
        if not isinstance(data, int) or isinstance(data, bool) or not 0 <= data < 32768:
            self.fail("invalid")
        return super().to_internal_value(data)


def severity_ref(**kwargs) -> LevelRef:
    return LevelRef(help_text="A severity level, e.g. 1.", **kwargs)


def service_refs(**kwargs) -> SlugRef:
    return SlugRef(
        slug_field="slug",
        model_name="service",
        queryset=Service.objects.all(),
        many=True,
        help_text="Service slugs.",
        **kwargs,
    )


def team_ref(**kwargs) -> SlugRef:
    return SlugRef(
        slug_field="slug",
        model_name="team",
        queryset=Team.objects.all(),
        allow_null=True,
        help_text="A team slug, or null.",
        **kwargs,
    )


# --- Incidents: output ----------------------------------------------------------------------


class SeverityRefSerializer(serializers.Serializer):
    level = serializers.IntegerField()
    name = serializers.CharField()


class RoleHolderSerializer(serializers.Serializer):
    role = serializers.CharField(source="role.slug")
    role_name = serializers.CharField(source="role.name")
    user = serializers.CharField(source="user.username")
    since = serializers.DateTimeField()


class IncidentSerializer(serializers.ModelSerializer):
    """An incident. `roles` are the current holders; `allowed_statuses` are the statuses
    it may move to next."""

    url = serializers.HyperlinkedIdentityField(
        view_name="incident-detail", lookup_field="reference"
    )
    severity = SeverityRefSerializer(read_only=True)
    services = serializers.SlugRelatedField(slug_field="slug", many=True, read_only=True)
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    declared_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )
    runbook = serializers.SlugRelatedField(slug_field="code", read_only=True, allow_null=True)
    merged_into = serializers.SlugRelatedField(
        slug_field="reference", read_only=True, allow_null=True
    )
    status = IncidentStatusField(read_only=True)
    roles = RoleHolderSerializer(source="current_roles", many=True, read_only=True)
    allowed_statuses = serializers.ListField(
        source="legal_transitions", child=IncidentStatusField(), read_only=True
    )

    class Meta:
        model = Incident
        fields = [
            "url",
            "reference",
            "number",
            "title",
            "summary",
            "severity",
            "status",
            "allowed_statuses",
            "services",
            "team",
            "impact",
            "customer_impact",
            "is_drill",
            "false_positive",
            "declared_by",
            "runbook",
            "merged_into",
            "roles",
            "detected_at",
            "created_at",
            "updated_at",
            "acknowledged_at",
            "investigating_at",
            "mitigating_at",
            "monitoring_at",
            "resolved_at",
            "closed_at",
            "reopened_at",
            "reopened_count",
            "last_update_at",
            "ack_due_at",
            "resolve_due_at",
            "next_update_due_at",
            "next_escalation_at",
            "ack_breached_at",
            "resolve_breached_at",
            "update_breached_at",
            "public_update_due_at",
            "public_update_breached_at",
            "chat_channel",
        ]
        read_only_fields = fields


class TimelineEventSerializer(serializers.ModelSerializer):
    """One timeline event. `actor` is the username, or who acted otherwise ("system", an
    integration, the escalation engine); `origin` is the incident an event was merged
    from, else null."""

    actor = serializers.CharField(source="actor_display", read_only=True)
    origin = serializers.SlugRelatedField(slug_field="reference", read_only=True, allow_null=True)

    class Meta:
        model = TimelineEvent
        fields = ["id", "kind", "at", "actor", "previous", "value", "message", "origin"]
        read_only_fields = fields


class PageAttemptSerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    channel = serializers.CharField()
    outcome = serializers.CharField()
    error = serializers.CharField()


class PageSerializer(serializers.Serializer):
    """One page: a notification to one person for one escalation step and round. `step`
    counts from 1; `attempts` is how many deliveries were tried, `attempt_log` each try."""

    id = serializers.IntegerField()
    step = serializers.SerializerMethodField()
    round = serializers.IntegerField()
    recipient = PersonRefSerializer(source="person")
    channel = serializers.CharField()
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    due_at = serializers.DateTimeField()
    sent_at = serializers.DateTimeField(allow_null=True)
    acked_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField()
    attempt_log = PageAttemptSerializer(many=True)

    def get_step(self, page) -> int:
        return page.step_index + 1


# --- Incidents: input -----------------------------------------------------------------------


class IncidentDeclareSerializer(serializers.Serializer):
    title = serializers.CharField(max_length=200)
    severity = severity_ref()
    summary = serializers.CharField(required=False, allow_blank=True, max_length=MAX_NOTE_LENGTH)
    services = service_refs(required=False)
    team = team_ref(required=False)
    impact = serializers.ChoiceField(choices=Impact.choices, required=False)
    customer_impact = serializers.CharField(
        required=False, allow_blank=True, max_length=MAX_NOTE_LENGTH
    )
    is_drill = serializers.BooleanField(required=False)
    detected_at = AwareDateTimeField(
        required=False, help_text="When the problem was first seen; default now."
    )


class IncidentPatchSerializer(serializers.Serializer):
    """Any subset. Descriptive fields are edited together; `severity` and `status` each
    change through their own service, in that order after the edits, and `reason` goes
    on the timeline with them. All of it applies, or none."""

    title = serializers.CharField(required=False, max_length=200)
    summary = serializers.CharField(required=False, allow_blank=True, max_length=MAX_NOTE_LENGTH)
    services = service_refs(required=False)
    team = team_ref(required=False)
    impact = serializers.ChoiceField(choices=Impact.choices, required=False)
    customer_impact = serializers.CharField(
        required=False, allow_blank=True, max_length=MAX_NOTE_LENGTH
    )
    is_drill = serializers.BooleanField(required=False)
    false_positive = serializers.BooleanField(required=False)
    severity = severity_ref(required=False)
    status = IncidentStatusField(required=False)
    reason = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=MAX_NOTE_LENGTH,
        help_text="Recorded with a severity or status change.",
    )


class EmptyInput(serializers.Serializer):
    """No fields."""


class ResolveInput(serializers.Serializer):
    resolution = serializers.CharField(
        required=False, allow_blank=True, max_length=MAX_NOTE_LENGTH, help_text="What fixed it."
    )


class ReasonInput(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=MAX_NOTE_LENGTH)


class NoteInput(serializers.Serializer):
    body = serializers.CharField(max_length=MAX_NOTE_LENGTH)


class RoleInput(serializers.Serializer):
    role = SlugRef(
        slug_field="slug",
        model_name="role",
        queryset=Role.objects.all(),
        help_text="A role slug, e.g. incident-commander.",
    )
    username = SlugRef(
        slug_field="username",
        model_name="user",
        queryset=get_user_model().objects.all(),
        help_text="Who takes the role.",
    )


class StatusUpdateInput(serializers.Serializer):
    body = serializers.CharField(max_length=MAX_UPDATE_LENGTH)
    public = serializers.BooleanField(
        required=False,
        default=False,
        help_text="true: shown on the public status page; false (default): internal.",
    )
    status = PublicStageField(
        required=False,
        help_text="The public stage; default from the incident's status (mitigating: identified).",
    )


class StatusUpdateSerializer(serializers.ModelSerializer):
    """A status update. `status` is its public stage; `next_due_at` when the next update
    fell due after it (null once the incident no longer needs updates)."""

    status = PublicStageField(source="stage", read_only=True)
    posted_by = serializers.CharField(source="posted_by_label", read_only=True)

    class Meta:
        model = StatusUpdate
        fields = ["id", "status", "public", "body", "posted_at", "posted_by", "next_due_at"]
        read_only_fields = fields


class MergeInput(serializers.Serializer):
    into = SlugRef(
        slug_field="reference",
        model_name="incident",
        queryset=Incident.objects.all(),
        help_text="The reference of the incident that carries on, e.g. INC-12.",
    )
    reason = serializers.CharField(required=False, allow_blank=True, max_length=MAX_NOTE_LENGTH)


# --- Alerts ---------------------------------------------------------------------------------


class IntegrationRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    kind = serializers.CharField()


class AlertSerializer(serializers.ModelSerializer):
    integration = IntegrationRefSerializer()
    status = AlertStatusField(read_only=True)
    incident = serializers.SlugRelatedField(slug_field="reference", read_only=True, allow_null=True)

    class Meta:
        model = Alert
        fields = [
            "id",
            "integration",
            "incident",
            "fingerprint",
            "group_key",
            "status",
            "name",
            "summary",
            "source",
            "severity_label",
            "labels",
            "annotations",
            "starts_at",
            "ends_at",
            "first_received_at",
            "last_received_at",
            "resolved_at",
            "count",
        ]
        read_only_fields = fields


class AlertDetailSerializer(AlertSerializer):
    """An alert with the raw payload it was last delivered with."""

    class Meta(AlertSerializer.Meta):
        fields = [*AlertSerializer.Meta.fields, "payload"]
        read_only_fields = fields


# --- Configuration --------------------------------------------------------------------------


def duration_field(**kwargs) -> serializers.DurationField:
    """ISO 8601 out (P0DT00H15M00S); in, ISO 8601 (PT15M) or DRF's form (00:15:00)."""
    return serializers.DurationField(format="iso-8601", **kwargs)


class SeveritySerializer(serializers.ModelSerializer):
    """A severity and its targets. Durations are ISO 8601."""

    ack_target = duration_field(read_only=True)
    resolve_target = duration_field(read_only=True)
    update_interval = duration_field(read_only=True)
    postmortem_due_after = duration_field(read_only=True, allow_null=True)
    escalation_policy = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)
    example_list = serializers.ListField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = Severity
        fields = [
            "level",
            "name",
            "description",
            "example_list",
            "ack_target",
            "resolve_target",
            "update_interval",
            "postmortem_required",
            "postmortem_due_after",
            "notify_customers",
            "escalation_policy",
        ]
        read_only_fields = fields


class SeverityPatchSerializer(serializers.Serializer):
    """The targets and cadence. Durations: ISO 8601 (PT15M) or DRF's form (00:15:00, or
    "1 00:00:00" for a day)."""

    ack_target = duration_field(required=False, max_value=MAX_TARGET)
    resolve_target = duration_field(required=False, max_value=MAX_TARGET)
    update_interval = duration_field(required=False, max_value=MAX_TARGET)
    postmortem_required = serializers.BooleanField(required=False)
    postmortem_due_after = duration_field(required=False, allow_null=True, max_value=MAX_TARGET)
    notify_customers = serializers.BooleanField(required=False)


class ServiceSerializer(serializers.ModelSerializer):
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)

    class Meta:
        model = Service
        fields = ["slug", "name", "description", "team", "is_public"]
        read_only_fields = fields


class RunbookSerializer(serializers.ModelSerializer):
    """A runbook. `steps` is the Markdown as written; `steps_html` the same rendered to
    sanitised HTML (raw HTML in the Markdown comes out as text)."""

    severity = serializers.SlugRelatedField(slug_field="level", read_only=True, allow_null=True)
    review_interval = duration_field(read_only=True)
    steps_html = serializers.SerializerMethodField()
    review_due_on = serializers.DateField(read_only=True, allow_null=True)
    url = serializers.CharField(
        read_only=True, help_text="Where the full runbook lives, if elsewhere; may be empty."
    )

    class Meta:
        model = Runbook
        fields = [
            "code",
            "title",
            "severity",
            "scope",
            "steps",
            "steps_html",
            "url",
            "review_interval",
            "last_reviewed_at",
            "review_due_on",
        ]
        read_only_fields = fields

    def get_steps_html(self, runbook: Runbook) -> str:
        return str(render_markdown(runbook.steps))


class AlertRouteSerializer(serializers.ModelSerializer):
    integration = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)
    runbook = serializers.SlugRelatedField(slug_field="code", read_only=True, allow_null=True)
    severity = serializers.SlugRelatedField(slug_field="level", read_only=True, allow_null=True)
    service = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)

    class Meta:
        model = AlertRoute
        fields = [
            "id",
            "position",
            "integration",
            "alert_name",
            "match_labels",
            "runbook",
            "severity",
            "service",
            "team",
            "is_active",
        ]
        read_only_fields = fields


class IntegrationSerializer(serializers.ModelSerializer):
    """An alert source. The token itself is never stored, and its hash is never shown:
    `token_prefix` tells tokens apart."""

    default_service = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, allow_null=True
    )
    default_severity = serializers.SlugRelatedField(
        slug_field="level", read_only=True, allow_null=True
    )
    default_team = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    heartbeat_interval = duration_field(read_only=True, allow_null=True)

    class Meta:
        model = Integration
        fields = [
            "id",
            "name",
            "kind",
            "is_active",
            "token_prefix",
            "token_rotated_at",
            "default_service",
            "default_severity",
            "default_team",
            "severity_label",
            "severity_map",
            "grouping_keys",
            "auto_resolve",
            "rate_limit",
            "heartbeat_interval",
            "heartbeat_due_at",
            "last_heartbeat_at",
            "created_at",
            "last_received_at",
            "alerts_received",
            "requests_rejected",
        ]
        read_only_fields = fields
