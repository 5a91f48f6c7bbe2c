"""Reads used by the admin, the API and tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery

from .deadlines import TargetState, target_states
from .models import OPEN_STATUSES, Incident, RoleAssignment, Severity

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
