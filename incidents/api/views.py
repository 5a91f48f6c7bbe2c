"""The REST resources of the incidents app (docs/api.md).

Views are thin: they parse input with a serializer, call one service (a PATCH that
changes several things calls each one's service, together in one transaction), and
answer with an output serializer over a selector's queryset. Domain errors raised by the
services become 400/409 in `config.api.exception_handler`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from config.api import CursorPagination, PageNumberPagination
from escalation.services import incident_escalate

from .. import selectors, services
from ..comms.updates import status_update_post, updates_for
from ..exceptions import InvalidInput
from ..models import AlertRoute, Integration, Runbook, Service, Severity
from . import serializers as s
from .filters import AlertFilter, IncidentFilter
from .permissions import (
    CanViewIntegrations,
    IncidentPermission,
    StaffWritesOnly,
    may_change_incident,
)

ERROR = OpenApiResponse(OpenApiTypes.OBJECT, description='{"detail", "code"[, "field"]}')
INVALID = OpenApiResponse(OpenApiTypes.OBJECT, description="Invalid input; names the field.")
REFUSED = OpenApiResponse(OpenApiTypes.OBJECT, description="Not allowed; says why.")
CONFLICT = OpenApiResponse(
    OpenApiTypes.OBJECT, description="Illegal in the incident's current state."
)
NOT_FOUND = OpenApiResponse(OpenApiTypes.OBJECT, description="No such incident.")
ACTION_ERRORS = {400: INVALID, 403: REFUSED, 404: NOT_FOUND, 409: CONFLICT}


def path_parameter(name: str, kind, description: str, example) -> OpenApiParameter:
    return OpenApiParameter(
        name,
        kind,
        OpenApiParameter.PATH,
        description=description,
        examples=[OpenApiExample(str(example), value=example)],
    )


REFERENCE = path_parameter("reference", OpenApiTypes.STR, "An incident reference.", "INC-1")
LEVEL = path_parameter("level", OpenApiTypes.INT, "A severity level; 1 is the worst.", 1)


def parse(serializer_class, data):
    """Validated input, or a 400 naming each bad field."""
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


@contextmanager
def fields_named(**names: str) -> Iterator[None]:
    """Report a service's InvalidInput under the API's name for the field (the merge
    service's `target` is the API's `into`; the role service's `user`, `username`)."""
    try:
        yield
    except InvalidInput as error:
        if error.field not in names:
            raise
        message = str(error).removeprefix(f"{error.field}: ")
        raise InvalidInput(names[error.field], message) from error


class IncidentPagination(CursorPagination):
    ordering = "-number"


class AlertPagination(CursorPagination):
    ordering = "-pk"


def example(value: dict, name: str = "Example") -> list[OpenApiExample]:
    return [OpenApiExample(name, value=value, request_only=True)]


def _action(
    input_serializer,
    summary: str,
    *,
    output=s.IncidentSerializer,
    code: int = 200,
    examples: list[OpenApiExample] | None = None,
):
    return extend_schema(
        request=input_serializer,
        responses={code: output, **ACTION_ERRORS},
        summary=summary,
        parameters=[REFERENCE],
        examples=examples or [],
    )


@extend_schema(tags=["incidents"])
@extend_schema_view(
    list=extend_schema(summary="List incidents, newest first"),
    retrieve=extend_schema(
        summary="One incident",
        responses={200: s.IncidentSerializer, 404: NOT_FOUND},
        parameters=[REFERENCE],
    ),
)
class IncidentViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Incidents by reference (INC-12). Reading needs a login; declaring needs
    `add_incident`; changing needs `change_incident` and, for an incident with a team,
    membership of that team (staff excepted)."""

    serializer_class = s.IncidentSerializer
    permission_classes = [IncidentPermission]
    pagination_class = IncidentPagination
    filterset_class = IncidentFilter
    lookup_field = "reference"
    lookup_value_regex = r"[A-Za-z0-9_-]+"
    read_only_actions = ("timeline", "pages")

    def get_queryset(self):
        return selectors.incidents_for_api()

    def filter_queryset(self, queryset):
        # The list's filters do not apply to one incident or its actions.
        return super().filter_queryset(queryset) if self.action == "list" else queryset

    def answer(self, incident, code: int = status.HTTP_200_OK) -> Response:
        fresh = self.get_queryset().get(pk=incident.pk)
        return Response(self.get_serializer(fresh).data, status=code)

    @extend_schema(
        request=s.IncidentDeclareSerializer,
        responses={201: s.IncidentSerializer, 400: INVALID, 403: REFUSED},
        summary="Declare an incident",
        examples=example(
            {
                "title": "Checkout errors",
                "severity": 1,
                "services": ["checkout"],
                "team": "payments",
                "impact": "partial_outage",
            }
        ),
    )
    def create(self, request):
        data = parse(s.IncidentDeclareSerializer, request.data)
        incident = services.incident_declare(actor=request.user, **data)
        response = self.answer(incident, status.HTTP_201_CREATED)
        response["Location"] = response.data["url"]
        return response

    @extend_schema(
        request=s.IncidentPatchSerializer,
        responses={200: s.IncidentSerializer, **ACTION_ERRORS},
        summary="Edit an incident; change its severity or status",
        parameters=[REFERENCE],
        examples=example(
            {"severity": 2, "status": "investigating", "reason": "Only EU is affected"}
        ),
    )
    def partial_update(self, request, reference=None):
        incident = self.get_object()
        data = dict(parse(s.IncidentPatchSerializer, request.data))
        severity = data.pop("severity", None)
        to = data.pop("status", None)
        reason = data.pop("reason", "")
        actor = request.user
        with transaction.atomic():
            if data:
                services.incident_update(incident=incident, changes=data, actor=actor)
            if severity is not None:
                services.incident_change_severity(
                    incident=incident, severity=severity, actor=actor, reason=reason
                )
            if to is not None:
                services.incident_transition(incident=incident, to=to, actor=actor, message=reason)
        return self.answer(incident)

    @_action(s.EmptyInput, "Acknowledge")
    @action(detail=True, methods=["post"])
    def acknowledge(self, request, reference=None):
        incident = self.get_object()
        parse(s.EmptyInput, request.data)
        services.incident_acknowledge(incident=incident, actor=request.user)
        return self.answer(incident)

    @_action(s.ResolveInput, "Resolve", examples=example({"resolution": "Rolled back 4.2"}))
    @action(detail=True, methods=["post"])
    def resolve(self, request, reference=None):
        incident = self.get_object()
        data = parse(s.ResolveInput, request.data)
        services.incident_resolve(incident=incident, actor=request.user, **data)
        return self.answer(incident)

    @_action(s.EmptyInput, "Close a resolved incident")
    @action(detail=True, methods=["post"])
    def close(self, request, reference=None):
        incident = self.get_object()
        parse(s.EmptyInput, request.data)
        services.incident_close(incident=incident, actor=request.user)
        return self.answer(incident)

    @_action(s.ReasonInput, "Re-open a resolved incident")
    @action(detail=True, methods=["post"])
    def reopen(self, request, reference=None):
        incident = self.get_object()
        data = parse(s.ReasonInput, request.data)
        services.incident_reopen(incident=incident, actor=request.user, **data)
        return self.answer(incident)

    @_action(s.ReasonInput, "Escalate to the next level now")
    @action(detail=True, methods=["post"])
    def escalate(self, request, reference=None):
        incident = self.get_object()
        data = parse(s.ReasonInput, request.data)
        incident_escalate(incident=incident, actor=request.user, **data)
        return self.answer(incident)

    @_action(
        s.NoteInput,
        "Add a note",
        output=s.TimelineEventSerializer,
        code=201,
        examples=example({"body": "Error rate is falling"}),
    )
    @action(detail=True, methods=["post"])
    def notes(self, request, reference=None):
        incident = self.get_object()
        data = parse(s.NoteInput, request.data)
        event = services.incident_add_note(incident=incident, actor=request.user, **data)
        return Response(s.TimelineEventSerializer(event).data, status=status.HTTP_201_CREATED)

    @_action(
        s.RoleInput,
        "Assign a role",
        examples=example({"role": "incident-commander", "username": "ann"}),
    )
    @action(detail=True, methods=["post"])
    def roles(self, request, reference=None):
        incident = self.get_object()
        data = parse(s.RoleInput, request.data)
        with fields_named(user="username"):
            services.incident_assign_role(
                incident=incident, role=data["role"], user=data["username"], actor=request.user
            )
        return self.answer(incident)

    @_action(
        s.MergeInput,
        "Merge into another incident",
        examples=example({"into": "INC-2", "reason": "Same database outage"}),
    )
    @action(detail=True, methods=["post"])
    def merge(self, request, reference=None):
        """Merge this incident into `into`, which carries on. Answers this incident, now
        closed, with `merged_into` set. Needs the right to change both."""
        incident = self.get_object()
        data = parse(s.MergeInput, request.data)
        target = data["into"]
        allowed, why = may_change_incident(request.user, target)
        if not allowed:
            raise PermissionDenied(why)
        with fields_named(target="into"):
            services.incident_merge(
                source=incident, target=target, actor=request.user, reason=data.get("reason", "")
            )
        return self.answer(incident)

    @extend_schema(
        methods=["GET"],
        responses={200: s.StatusUpdateSerializer(many=True), 404: NOT_FOUND},
        summary="The incident's status updates, newest first",
        parameters=[REFERENCE],
    )
    @extend_schema(
        methods=["POST"],
        request=s.StatusUpdateInput,
        responses={201: s.StatusUpdateSerializer, **ACTION_ERRORS},
        summary="Post a status update, internal or public",
        parameters=[REFERENCE],
        examples=example(
            {"body": "We found the cause and are rolling back.", "public": True},
            "A public update",
        ),
    )
    @action(
        detail=True,
        methods=["get", "post"],
        url_path="status-updates",
        pagination_class=PageNumberPagination,
        filter_backends=[],
    )
    def status_updates(self, request, reference=None):
        """GET: the updates, newest first (any logged-in user). POST: post one; needs the
        right to change the incident (its team's rule) and `incidents.add_statusupdate`.
        The next update falls due after the severity's cadence; a public update also
        settles the first public update a public incident owes."""
        incident = self.get_object()
        if request.method == "GET":
            page = self.paginate_queryset(updates_for(incident))
            return self.get_paginated_response(s.StatusUpdateSerializer(page, many=True).data)
        if not request.user.has_perm("incidents.add_statusupdate"):
            raise PermissionDenied(
                {
                    "detail": "Posting a status update needs the incidents.add_statusupdate "
                    "permission.",
                    "code": "missing_permission",
                }
            )
        data = parse(s.StatusUpdateInput, request.data)
        with fields_named(stage="status"):
            update = status_update_post(
                incident=incident,
                body=data["body"],
                public=data["public"],
                stage=data.get("status"),
                actor=request.user,
            )
        return Response(s.StatusUpdateSerializer(update).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        responses={200: s.TimelineEventSerializer(many=True), 404: NOT_FOUND},
        summary="The incident's timeline, oldest first",
        parameters=[REFERENCE],
    )
    @action(
        detail=True,
        methods=["get"],
        pagination_class=PageNumberPagination,
        filter_backends=[],
    )
    def timeline(self, request, reference=None):
        incident = self.get_object()
        page = self.paginate_queryset(selectors.incident_timeline(incident))
        return self.get_paginated_response(s.TimelineEventSerializer(page, many=True).data)

    @extend_schema(
        responses={200: s.PageSerializer(many=True), 404: NOT_FOUND},
        summary="The pages sent for the incident, oldest first",
        parameters=[REFERENCE],
    )
    @action(
        detail=True,
        methods=["get"],
        pagination_class=PageNumberPagination,
        filter_backends=[],
    )
    def pages(self, request, reference=None):
        incident = self.get_object()
        page = self.paginate_queryset(selectors.incident_pages(incident))
        return self.get_paginated_response(s.PageSerializer(page, many=True).data)


@extend_schema(tags=["alerts"])
@extend_schema_view(
    list=extend_schema(summary="List alerts, newest first"),
    retrieve=extend_schema(summary="One alert, with its raw payload"),
)
class AlertViewSet(viewsets.ReadOnlyModelViewSet):
    pagination_class = AlertPagination
    filterset_class = AlertFilter
    lookup_value_regex = r"[0-9]{1,18}"

    def get_queryset(self):
        return selectors.alerts_for_api(with_payload=self.action == "retrieve")

    def get_serializer_class(self):
        return s.AlertDetailSerializer if self.action == "retrieve" else s.AlertSerializer


# The model's constraints that span fields, and the field their error is reported on.
@extend_schema(tags=["configuration"])
@extend_schema_view(retrieve=extend_schema(parameters=[LEVEL]))
class SeverityViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Severities by level. Changing targets and cadence is for staff."""

    serializer_class = s.SeveritySerializer
    permission_classes = [StaffWritesOnly]
    lookup_field = "level"
    lookup_value_regex = r"[0-9]{1,4}"

    def get_queryset(self):
        return Severity.objects.order_by("level")

    @extend_schema(
        request=s.SeverityPatchSerializer,
        responses={200: s.SeveritySerializer, 400: INVALID, 403: REFUSED, 404: ERROR},
        summary="Change a severity's targets and cadence (staff)",
        parameters=[LEVEL],
        examples=example({"ack_target": "PT15M", "resolve_target": "PT4H"}),
    )
    def partial_update(self, request, level=None):
        severity = self.get_object()
        data = parse(s.SeverityPatchSerializer, request.data)
        services.severity_update(severity=severity, changes=data, actor=request.user)
        return Response(self.get_serializer(severity).data)


@extend_schema(tags=["configuration"])
class ServiceViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = s.ServiceSerializer
    lookup_field = "slug"
    lookup_value_regex = r"[-a-zA-Z0-9_]+"

    def get_queryset(self):
        return Service.objects.select_related("team").order_by("name")


@extend_schema(tags=["configuration"])
class RunbookViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = s.RunbookSerializer
    lookup_field = "code"
    lookup_value_regex = r"[-A-Za-z0-9_.]+"

    def get_queryset(self):
        return Runbook.objects.select_related("severity").order_by("code")


@extend_schema(tags=["configuration"])
class AlertRouteViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = s.AlertRouteSerializer
    lookup_value_regex = r"[0-9]{1,18}"

    def get_queryset(self):
        return AlertRoute.objects.select_related("runbook", "severity", "service", "team").order_by(
            "position", "pk"
        )


@extend_schema(tags=["configuration"])
class IntegrationViewSet(viewsets.ReadOnlyModelViewSet):
    """Alert sources. Staff, or users with `incidents.view_integration`, only."""

    serializer_class = s.IntegrationSerializer
    permission_classes = [CanViewIntegrations]
    lookup_value_regex = r"[0-9]{1,18}"

    def get_queryset(self):
        return Integration.objects.select_related(
            "default_service", "default_severity", "default_team"
        ).order_by("name")
