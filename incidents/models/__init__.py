"""The incident models: the core (`core`), alert ingestion (`alerts`) and communications
(`comms`).

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
from .comms import (
    CustomerNotice,
    DeliveryState,
    MaintenanceWindow,
    MessageTemplate,
    NoticeDelivery,
    NoticeStatus,
    PublicStage,
    StatusUpdate,
    Subscriber,
    TemplateKind,
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
    "TemplateKind",
    "Subscriber",
    "StatusUpdate",
    "PublicStage",
    "NoticeStatus",
    "NoticeDelivery",
    "MessageTemplate",
    "MaintenanceWindow",
    "DeliveryState",
    "CustomerNotice",
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
