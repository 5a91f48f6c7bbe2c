"""Reads used by the admin, the API and tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count, OuterRef, Prefetch, Q, QuerySet, Subquery

from escalation.models import Page, PageAttempt

from .deadlines import TargetState, target_states
from .models import (
    OPEN_STATUSES,
    Alert,
    Incident,
    RoleAssignment,
    Service,
    Severity,
    TimelineEvent,
)

COMMANDER_SLUG = "incident-commander"
DASHBOARD_LIMIT = 20  # per severity


def incidents_with_commander(queryset: QuerySet[Incident]) -> QuerySet[Incident]:
    """Annotate `commander_name`: the current Incident Commander's username, in the same query."""
    commander = RoleAssignment.objects.filter(
        incident=OuterRef("pk"), role__slug=COMMANDER_SLUG, until__isnull=True
    ).values("user__username")[:1]
    return queryset.annotate(commander_name=Subquery(commander))


def breached_q(now: datetime) -> Q:
    """Past the acknowledge or resolve deadline. Only pending deadlines are stored, so this
    holds for open incidents only; both columns are indexed."""
    return Q(ack_due_at__lte=now) | Q(resolve_due_at__lte=now)


def incidents_breached(queryset: QuerySet[Incident], *, now: datetime) -> QuerySet[Incident]:
    """Open incidents past their acknowledge or resolve deadline."""
    return queryset.filter(breached_q(now))


def incidents_open(queryset: QuerySet[Incident] | None = None) -> QuerySet[Incident]:
    queryset = Incident.objects.all() if queryset is None else queryset
    return queryset.filter(status__in=OPEN_STATUSES)


@dataclass
class SeverityGroup:
    severity: Severity
    open_count: int = 0
    breached_count: int = 0
    incidents: list[tuple[Incident, list[TargetState]]] = field(default_factory=list)


def dashboard(*, now: datetime, limit: int = DASHBOARD_LIMIT) -> list[SeverityGroup]:
    """Open incidents by severity with their SLA state, worst severity first.

    Two queries plus one per severity, whatever the table size: the severities, the open
    and breached counts per severity, and for each severity its `limit` longest-running
    open incidents, read in order from the partial index on open incidents.
    """
    groups = [SeverityGroup(severity=s) for s in Severity.objects.select_related("calendar")]
    by_pk = {group.severity.pk: group for group in groups}
    counts = (
        incidents_open()
        .values("severity")
        .annotate(
            total=Count("pk"),
            breached=Count("pk", filter=breached_q(now)),
        )
        .order_by()
    )
    for row in counts:
        group = by_pk[row["severity"]]
        group.open_count, group.breached_count = row["total"], row["breached"]
    for group in groups:
        urgent = incidents_with_commander(
            incidents_open().filter(severity=group.severity)
        ).order_by("detected_at")[:limit]
        for incident in urgent:
            incident.severity = group.severity
            group.incidents.append((incident, target_states(incident, now)))
    return groups


# --- The REST API's reads -------------------------------------------------------------------
# Each returns a queryset with everything its serializer touches joined or prefetched, so a
# page of any size costs the same number of queries.


def current_roles_prefetch(lookup: str = "role_assignments") -> Prefetch:
    """Each incident's current role holders (`incident.current_roles`), with role and user."""
    return Prefetch(
        lookup,
        queryset=RoleAssignment.objects.filter(until__isnull=True)
        .select_related("role", "user")
        .order_by("role__sort_order", "role__name"),
        to_attr="current_roles",
    )


def incidents_for_api(queryset: QuerySet[Incident] | None = None) -> QuerySet[Incident]:
    """Incidents with their severity, team, people, runbook, merge target, services and
    current roles: three queries for a page of any size. The escalation plan (a JSON
    snapshot the API does not show) stays in the database."""
    queryset = Incident.objects.all() if queryset is None else queryset
    return (
        queryset.select_related("severity", "team", "declared_by", "runbook", "merged_into")
        .defer("escalation_plan", "merged_into__escalation_plan")
        .prefetch_related(
            Prefetch("services", queryset=Service.objects.order_by("name")),
            current_roles_prefetch(),
        )
    )


def incident_timeline(incident: Incident) -> QuerySet[TimelineEvent]:
    """An incident's timeline, oldest first, with actors and merge origins joined."""
    return (
        TimelineEvent.objects.filter(incident=incident)
        .select_related("actor", "origin")
        .defer("origin__escalation_plan")
        .order_by("at", "pk")
    )


def incident_pages(incident: Incident) -> QuerySet[Page]:
    """The pages sent for an incident, oldest first, with recipients and every attempt."""
    return (
        Page.objects.filter(incident=incident)
        .select_related("person")
        .prefetch_related(
            Prefetch("attempt_log", queryset=PageAttempt.objects.order_by("at", "pk"))
        )
        .order_by("created_at", "pk")
    )


def alerts_for_api(queryset: QuerySet[Alert] | None = None, *, with_payload: bool = False):
    """Alerts with their integration and incident joined; the raw payload (which can be
    large) only when asked for."""
    queryset = Alert.objects.all() if queryset is None else queryset
    queryset = queryset.select_related("integration", "incident").defer("incident__escalation_plan")
    return queryset if with_payload else queryset.defer("payload")
