"""The incident core: services, severities, roles, incidents and their timeline.

Writes happen only in `incidents.services`; this module holds fields, constraints, the
legal-transition table and tiny predicates.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Service(models.Model):
    """Something customers or other teams depend on, affected by incidents."""

    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    team = models.ForeignKey(
        "escalation.Team", null=True, blank=True, on_delete=models.SET_NULL, related_name="services"
    )
    is_public = models.BooleanField(default=True, help_text="Shown on the public status page.")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


POSITIVE_DURATION = MinValueValidator(timedelta(seconds=1), "Must be longer than zero.")


class Severity(models.Model):
    """A severity level and the targets the engine enforces for it. Level 1 is the worst."""

    level = models.PositiveSmallIntegerField(unique=True)
    name = models.CharField(max_length=50, unique=True)
    description = models.TextField(blank=True)
    examples = models.TextField(blank=True, help_text="One example per line.")
    ack_target = models.DurationField(
        validators=[POSITIVE_DURATION], help_text="Time to acknowledge, from detection."
    )
    resolve_target = models.DurationField(
        validators=[POSITIVE_DURATION], help_text="Time to resolve, from detection."
    )
    update_interval = models.DurationField(
        validators=[POSITIVE_DURATION], help_text="Internal status update cadence."
    )
    postmortem_required = models.BooleanField(default=False)
    postmortem_due_after = models.DurationField(
        null=True,
        blank=True,
        validators=[POSITIVE_DURATION],
        help_text="How long after resolution the post-mortem is due.",
    )
    notify_customers = models.BooleanField(default=False)
    escalation_policy = models.ForeignKey(
        "escalation.EscalationPolicy",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="severities",
        help_text="Copied onto each incident when it is declared.",
    )
    calendar = models.ForeignKey(
        "escalation.BusinessCalendar",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="severities",
        help_text="Count this severity's targets in business hours only.",
    )

    class Meta:
        ordering = ["level"]
        verbose_name_plural = "severities"
        constraints = [
            models.CheckConstraint(
                condition=Q(postmortem_required=False) | Q(postmortem_due_after__isnull=False),
                name="severity_postmortem_due_when_required",
                violation_error_message="A required post-mortem needs a due time.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def example_list(self) -> list[str]:
        return [line.strip() for line in self.examples.splitlines() if line.strip()]


class Role(models.Model):
    """An incident role. Rows, not fields, so a playbook can add its own without a migration."""

    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    responsibilities = models.TextField(blank=True, help_text="One responsibility per line.")
    sort_order = models.PositiveSmallIntegerField(default=100)

    class Meta:
        ordering = ["sort_order", "name"]

    def __str__(self) -> str:
        return self.name


class IncidentStatus(models.TextChoices):
    TRIGGERED = "triggered", "Triggered"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    INVESTIGATING = "investigating", "Investigating"
    MITIGATING = "mitigating", "Mitigating"
    MONITORING = "monitoring", "Monitoring"
    RESOLVED = "resolved", "Resolved"
    CLOSED = "closed", "Closed"


S = IncidentStatus
OPEN_STATUSES: frozenset[str] = frozenset(
    {S.TRIGGERED, S.ACKNOWLEDGED, S.INVESTIGATING, S.MITIGATING, S.MONITORING}
)

# The legal moves, in one table. Work may move back and forth between investigating,
# mitigating and monitoring (monitoring can reveal the fix did not hold); acknowledging is
# only from triggered; resolved -> investigating is a re-open; closed is final.
TRANSITIONS: dict[str, frozenset[str]] = {
    S.TRIGGERED: frozenset(
        {S.ACKNOWLEDGED, S.INVESTIGATING, S.MITIGATING, S.MONITORING, S.RESOLVED}
    ),
    S.ACKNOWLEDGED: frozenset({S.INVESTIGATING, S.MITIGATING, S.MONITORING, S.RESOLVED}),
    S.INVESTIGATING: frozenset({S.MITIGATING, S.MONITORING, S.RESOLVED}),
    S.MITIGATING: frozenset({S.INVESTIGATING, S.MONITORING, S.RESOLVED}),
    S.MONITORING: frozenset({S.INVESTIGATING, S.MITIGATING, S.RESOLVED}),
    S.RESOLVED: frozenset({S.INVESTIGATING, S.CLOSED}),
    S.CLOSED: frozenset(),
}

# The timestamp each status stamps the first time an incident enters it.
STATUS_TIMESTAMP: dict[str, str] = {
    S.ACKNOWLEDGED: "acknowledged_at",
    S.INVESTIGATING: "investigating_at",
    S.MITIGATING: "mitigating_at",
    S.MONITORING: "monitoring_at",
    S.RESOLVED: "resolved_at",
    S.CLOSED: "closed_at",
}


class Impact(models.TextChoices):
    """How badly the affected services are hurt; the status page derives its states from it."""

    NONE = "none", "No customer impact"
    DEGRADED = "degraded", "Degraded performance"
    PARTIAL_OUTAGE = "partial_outage", "Partial outage"
    MAJOR_OUTAGE = "major_outage", "Major outage"


class Incident(models.Model):
    number = models.PositiveIntegerField(unique=True, editable=False)
    reference = models.CharField(max_length=20, unique=True, editable=False)
    title = models.CharField(max_length=200)
    summary = models.TextField(blank=True)
    severity = models.ForeignKey(Severity, on_delete=models.PROTECT, related_name="incidents")
    status = models.CharField(
        max_length=20, choices=IncidentStatus.choices, default=IncidentStatus.TRIGGERED
    )
    services = models.ManyToManyField(Service, blank=True, related_name="incidents")
    team = models.ForeignKey(
        "escalation.Team",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="incidents",
    )
    impact = models.CharField(max_length=20, choices=Impact.choices, default=Impact.NONE)
    customer_impact = models.TextField(blank=True, help_text="What customers experience.")
    is_drill = models.BooleanField(default=False, help_text="A tabletop exercise, not real.")
    false_positive = models.BooleanField(default=False)
    declared_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="declared_incidents",
    )
    runbook = models.ForeignKey(
        "incidents.Runbook",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="incidents",
        help_text="Set from the alert route that opened the incident; can be changed.",
    )
    # A merged incident is closed and points at the one that carries on.
    merged_into = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="merged_incidents",
        editable=False,
    )

    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now, editable=False)
    detected_at = models.DateTimeField(help_text="When the problem was first seen.")
    acknowledged_at = models.DateTimeField(null=True, blank=True, editable=False)
    investigating_at = models.DateTimeField(null=True, blank=True, editable=False)
    mitigating_at = models.DateTimeField(null=True, blank=True, editable=False)
    monitoring_at = models.DateTimeField(null=True, blank=True, editable=False)
    resolved_at = models.DateTimeField(null=True, blank=True, editable=False)
    closed_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_update_at = models.DateTimeField(null=True, blank=True, editable=False)
    reopened_at = models.DateTimeField(null=True, blank=True, editable=False)
    reopened_count = models.PositiveSmallIntegerField(default=0, editable=False)

    # Pending obligations, stored and indexed so sweeps select `<= now` on an index. A
    # deadline that no longer applies (acknowledged, resolved) is NULL, so the index only
    # holds what can still fall due.
    ack_due_at = models.DateTimeField(null=True, blank=True, editable=False)
    resolve_due_at = models.DateTimeField(null=True, blank=True, editable=False)
    next_update_due_at = models.DateTimeField(null=True, blank=True, editable=False)
    next_escalation_at = models.DateTimeField(null=True, blank=True, editable=False)

    # The escalation policy as it was when the incident started (editing the policy does not
    # rewrite running incidents), and where the incident is in it.
    escalation_plan = models.JSONField(default=dict, blank=True, editable=False)
    escalation_step = models.PositiveSmallIntegerField(default=0, editable=False)
    escalation_round = models.PositiveSmallIntegerField(default=0, editable=False)
    escalation_started_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Each breached target is recorded on the timeline once; these say it was.
    ack_breached_at = models.DateTimeField(null=True, blank=True, editable=False)
    resolve_breached_at = models.DateTimeField(null=True, blank=True, editable=False)
    update_breached_at = models.DateTimeField(null=True, blank=True, editable=False)
    # A public incident (one on a public service) owes its first public update within
    # PUBLIC_UPDATE_DUE after declaration; cleared when it is posted.
    public_update_due_at = models.DateTimeField(null=True, blank=True, editable=False)
    public_update_breached_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The chat channel named for this incident from its team's pattern (#incident-2026-001).
    chat_channel = models.CharField(max_length=80, blank=True, editable=False)

    class Meta:
        ordering = ["-number"]
        indexes = [
            models.Index(fields=["status", "severity"], name="incident_status_sev"),
            models.Index(fields=["created_at"], name="incident_created"),
            models.Index(fields=["ack_due_at"], name="incident_ack_due"),
            models.Index(fields=["resolve_due_at"], name="incident_resolve_due"),
            models.Index(fields=["next_update_due_at"], name="incident_update_due"),
            models.Index(fields=["next_escalation_at"], name="incident_escalation_due"),
            # The dashboard's "most urgent open incidents of each severity": open incidents
            # are few, so this index stays small however long the history grows.
            models.Index(
                fields=["severity", "detected_at"],
                name="incident_open_by_severity",
                condition=Q(status__in=sorted(OPEN_STATUSES)),
            ),
            # The engine's breach sweep: only deadlines whose breach is not yet recorded, so
            # incidents long past their deadline are not read again on every tick.
            models.Index(
                fields=["ack_due_at"],
                name="incident_ack_breach_due",
                condition=Q(ack_breached_at__isnull=True),
            ),
            models.Index(
                fields=["resolve_due_at"],
                name="incident_resolve_breach_due",
                condition=Q(resolve_breached_at__isnull=True),
            ),
            models.Index(
                fields=["next_update_due_at"],
                name="incident_update_breach_due",
                condition=Q(update_breached_at__isnull=True),
            ),
            models.Index(
                fields=["public_update_due_at"],
                name="incident_public_update_due",
                condition=Q(public_update_breached_at__isnull=True),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=IncidentStatus.values), name="incident_status_valid"
            ),
            models.CheckConstraint(
                condition=~Q(status__in=[S.RESOLVED, S.CLOSED]) | Q(resolved_at__isnull=False),
                name="incident_resolved_has_resolved_at",
            ),
            models.CheckConstraint(
                condition=~Q(status=S.CLOSED) | Q(closed_at__isnull=False),
                name="incident_closed_has_closed_at",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reference}: {self.title}"

    @property
    def update_base(self):
        """Where the update cadence counts from: the latest update, re-open or declaration."""
        return max(t for t in (self.created_at, self.last_update_at, self.reopened_at) if t)

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def can_transition(self, to: str) -> bool:
        return to in TRANSITIONS[self.status]

    @property
    def legal_transitions(self) -> list[str]:
        return [s for s in IncidentStatus.values if s in TRANSITIONS[self.status]]


class RoleAssignment(models.Model):
    """Who holds a role on an incident, and since when. `until` is set when replaced."""

    incident = models.ForeignKey(
        Incident, on_delete=models.CASCADE, related_name="role_assignments"
    )
    role = models.ForeignKey(Role, on_delete=models.PROTECT, related_name="assignments")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="incident_roles"
    )
    since = models.DateTimeField()
    until = models.DateTimeField(null=True, blank=True)
    assigned_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    class Meta:
        ordering = ["role__sort_order", "since"]
        constraints = [
            models.UniqueConstraint(
                fields=["incident", "role"],
                condition=Q(until__isnull=True),
                name="one_current_holder_per_role",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} on {self.incident_id}: {self.user}"


class EventKind(models.TextChoices):
    DECLARED = "declared", "Declared"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    STATUS_CHANGED = "status_changed", "Status changed"
    SEVERITY_CHANGED = "severity_changed", "Severity changed"
    ROLE_ASSIGNED = "role_assigned", "Role assigned"
    NOTE = "note", "Note"
    EDITED = "edited", "Edited"
    RESOLVED = "resolved", "Resolved"
    REOPENED = "reopened", "Reopened"
    CLOSED = "closed", "Closed"
    TARGET_BREACHED = "target_breached", "Target breached"
    ESCALATED = "escalated", "Escalated"
    ESCALATION_REPLANNED = "escalation_replanned", "Escalation re-planned"
    PAGE_SENT = "page_sent", "Page sent"
    PAGE_FAILED = "page_failed", "Page failed"
    PAGE_CANCELLED = "page_cancelled", "Page cancelled"
    PAGE_UNKNOWN = "page_unknown", "Page outcome unknown"
    PAGE_BACKUP = "page_backup", "Backup contact tried"
    ESCALATION_OVERDUE = "escalation_overdue", "Escalation overdue"
    ALERT_FIRED = "alert_fired", "Alert fired"
    ALERT_RESOLVED = "alert_resolved", "Alert resolved"
    MERGED = "merged", "Merged"
    STATUS_UPDATE = "status_update", "Status update"
    UPDATE_REMINDER = "update_reminder", "Update reminder"
    CUSTOMER_NOTICE = "customer_notice", "Customer notice"
    PAGING_SILENCED = "paging_silenced", "Paging silenced"


class TimelineEventQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise TypeError("The timeline is append-only: events cannot be updated.")

    update.queryset_only = True

    def delete(self):
        raise TypeError("The timeline is append-only: events cannot be deleted.")

    delete.queryset_only = True


class TimelineEvent(models.Model):
    """One entry of an incident's append-only timeline: the audit log and post-mortem source."""

    incident = models.ForeignKey(Incident, on_delete=models.CASCADE, related_name="timeline")
    at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=40, choices=EventKind.choices)
    # A user who acted is protected from deletion (deactivate them instead), so the audit
    # log never loses who did what; `actor_label` keeps the name as it was at the time.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    # The username of a user who acted, or who acted otherwise: "system", an integration,
    # the escalation engine, "Ann (page link)".
    actor_label = models.CharField(max_length=150, blank=True)
    previous = models.TextField(blank=True)
    value = models.TextField(blank=True)
    message = models.TextField(blank=True)
    # Set on the copies a merge brings over from the merged incident: where it happened.
    origin = models.ForeignKey(
        Incident,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )

    objects = TimelineEventQuerySet.as_manager()

    class Meta:
        ordering = ["at", "pk"]
        indexes = [
            models.Index(fields=["incident", "at"], name="timeline_incident_at"),
            # The timeline admin lists every incident's events newest first.
            models.Index(fields=["at", "id"], name="timeline_at"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} at {self.at:%Y-%m-%d %H:%M:%S}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise TypeError("The timeline is append-only: events cannot be changed.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise TypeError("The timeline is append-only: events cannot be deleted.")

    @property
    def actor_display(self) -> str:
        return self.actor_label or "system"


class Counter(models.Model):
    """A named, monotonically increasing number: incident references come from here.

    Incrementing it with one UPDATE takes the row lock for the rest of the transaction, so
    concurrent declarations get distinct numbers and a rolled-back one leaves no gap.
    """

    name = models.CharField(max_length=50, primary_key=True)
    value = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.name}={self.value}"
