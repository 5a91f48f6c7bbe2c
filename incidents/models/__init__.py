"""The incident models: the core (`core`) and alert ingestion (`alerts`).

Writes happen only in the services modules; these modules hold fields, constraints, the
legal-transition table and tiny predicates.
"""

from .alerts import (
    Alert,
    AlertDelivery,
    AlertGroup,
    AlertRoute,
    AlertStatus,
    DeliveryStatus,
    Integration,
    IntegrationKind,
    Runbook,
)
from .core import (
    OPEN_STATUSES,
    POSITIVE_DURATION,
    STATUS_TIMESTAMP,
    TRANSITIONS,
    Counter,
    EventKind,
    Impact,
    Incident,
    IncidentStatus,
    Role,
    RoleAssignment,
    Service,
    Severity,
    TimelineEvent,
    TimelineEventQuerySet,
)

__all__ = [
    "OPEN_STATUSES",
    "POSITIVE_DURATION",
    "STATUS_TIMESTAMP",
    "TRANSITIONS",
    "Alert",
    "AlertDelivery",
    "AlertGroup",
    "AlertRoute",
    "AlertStatus",
    "Counter",
    "DeliveryStatus",
    "EventKind",
    "Impact",
    "Incident",
    "IncidentStatus",
    "Integration",
    "IntegrationKind",
    "Role",
    "RoleAssignment",
    "Runbook",
    "Service",
    "Severity",
    "TimelineEvent",
    "TimelineEventQuerySet",
]
