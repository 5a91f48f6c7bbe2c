"""Alert sources and what they send: integrations, alerts, alert groups, runbooks and the
routes from alerts to runbooks.

Writes happen in `incidents.ingestion.services`; payload parsing is in
`incidents.ingestion.payloads`.
"""

from __future__ import annotations

import fnmatch
from datetime import timedelta

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from .core import Incident, Service, Severity


class IntegrationKind(models.TextChoices):
    ALERTMANAGER = "alertmanager", "Prometheus Alertmanager (webhook v4)"
    EVENTS_V2 = "events_v2", "Events v2 (PagerDuty-style)"
    GENERIC = "generic", "Generic JSON"


class Integration(models.Model):
    """One alert source and how its alerts become incidents.

    Only a SHA-256 of the token is stored: the token itself is shown once, when it is made
    or rotated. `token_prefix` (its first characters) tells tokens apart in the admin.
    """

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=IntegrationKind.choices)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_prefix = models.CharField(max_length=8, editable=False)
    token_rotated_at = models.DateTimeField(default=timezone.now, editable=False)
    is_active = models.BooleanField(default=True, help_text="An inactive integration gets 404.")
    default_service = models.ForeignKey(
        Service, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    default_severity = models.ForeignKey(
        Severity,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Used when neither a route nor the severity mapping decides. "
        "Empty: the least severe level.",
    )
    default_team = models.ForeignKey(
        "escalation.Team", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    severity_label = models.CharField(
        max_length=100,
        default="severity",
        help_text="The label (Alertmanager, generic) whose value picks the severity.",
    )
    severity_map = models.JSONField(
        default=dict,
        blank=True,
        help_text='Label value to severity level, e.g. {"critical": 1, "warning": 3}. Events '
        "v2 severities (critical, error, warning, info) use the same mapping.",
    )
    grouping_keys = models.JSONField(
        default=list,
        blank=True,
        help_text='Label names whose values group alerts into one incident, e.g. ["alertname",'
        ' "cluster"]. Empty: Alertmanager\'s groupKey; the dedup key for Events v2; the '
        '"group" field, else the fingerprint, for generic JSON.',
    )
    auto_resolve = models.BooleanField(
        default=True, help_text="Resolve the incident when every one of its alerts resolves."
    )
    rate_limit = models.PositiveIntegerField(
        default=600,
        validators=[MaxValueValidator(1_000_000)],
        help_text="Requests a minute before the endpoint answers 429; 0: no limit.",
    )
    heartbeat_interval = models.DurationField(
        null=True,
        blank=True,
        validators=[MinValueValidator(timedelta(minutes=1))],
        help_text="Expect a heartbeat this often; a missed one opens an incident.",
    )
    heartbeat_due_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_received_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Counters for /metrics; incremented with F() by the ingestion services.
    alerts_received = models.PositiveBigIntegerField(default=0, editable=False)
    requests_rejected = models.PositiveBigIntegerField(default=0, editable=False)

    class Meta:
        ordering = ["name"]
        indexes = [
            models.Index(
                fields=["heartbeat_due_at"],
                name="integration_heartbeat_due",
                condition=Q(heartbeat_due_at__isnull=False),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(kind__in=IntegrationKind.values), name="integration_kind_valid"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class AlertStatus(models.TextChoices):
    FIRING = "firing", "Firing"
    RESOLVED = "resolved", "Resolved"


class Alert(models.Model):
    """One alert episode from an integration: firing until its source says it resolved.

    At most one firing row per (integration, fingerprint), enforced by the database: a
    repeated delivery only bumps `count`. A new firing after the resolution is a new row.
    """

    integration = models.ForeignKey(Integration, on_delete=models.PROTECT, related_name="alerts")
    incident = models.ForeignKey(
        Incident, null=True, blank=True, on_delete=models.PROTECT, related_name="alerts"
    )
    fingerprint = models.CharField(max_length=255)
    group_key = models.CharField(max_length=255)
    status = models.CharField(
        max_length=10, choices=AlertStatus.choices, default=AlertStatus.FIRING
    )
    name = models.CharField(max_length=255, blank=True, help_text="alertname, or the summary.")
    summary = models.TextField(blank=True)
    source = models.CharField(max_length=255, blank=True)
    severity_label = models.CharField(max_length=100, blank=True)
    labels = models.JSONField(default=dict, blank=True)
    annotations = models.JSONField(default=dict, blank=True)
    # This alert's part of the request body, as received the last time it was delivered.
    payload = models.JSONField(default=dict, blank=True)
    starts_at = models.DateTimeField(null=True, blank=True)
    ends_at = models.DateTimeField(null=True, blank=True)
    first_received_at = models.DateTimeField(default=timezone.now)
    last_received_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)
    count = models.PositiveIntegerField(default=1, help_text="Deliveries of this alert.")

    class Meta:
        ordering = ["-first_received_at", "-pk"]
        indexes = [
            models.Index(fields=["incident", "status"], name="alert_incident_status"),
            models.Index(fields=["first_received_at", "id"], name="alert_received"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["integration", "fingerprint"],
                condition=Q(status="firing"),
                name="one_firing_alert_per_fingerprint",
            ),
            models.CheckConstraint(
                condition=Q(status__in=AlertStatus.values), name="alert_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return self.name or self.fingerprint


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    DONE = "done", "Applied"
    FAILED = "failed", "Failed"


class AlertDelivery(models.Model):
    """One accepted webhook request, stored as received before the answer, applied by a
    worker (`incidents.apply_alert_deliveries`).

    The webhook validates the body, stores it here with one INSERT and answers 2xx: the
    sender's retry loop ends only once the body is durable. The worker applies the
    deliveries of each integration in the order they arrived (deduplication, grouping,
    incidents) and marks them done; one it cannot apply yet (the database or the
    configuration is not ready) stays pending with its error and is tried again, and one
    that can never apply is marked failed, visible in the admin, never dropped.
    """

    integration = models.ForeignKey(
        Integration, on_delete=models.PROTECT, related_name="deliveries"
    )
    received_at = models.DateTimeField(default=timezone.now)
    # The request body as received (JSON text); an Events v2 event without its routing key
    # (the integration's secret) and with the dedup key it was answered with.
    body = models.TextField()
    status = models.CharField(
        max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    applied_at = models.DateTimeField(null=True, blank=True)
    alerts = models.PositiveIntegerField(default=0, help_text="Alerts in the body.")
    incidents = models.JSONField(default=list, blank=True, help_text="References touched.")

    class Meta:
        verbose_name_plural = "alert deliveries"
        ordering = ["-pk"]
        indexes = [
            # The worker's queue: pending deliveries of an integration, oldest first. Small:
            # applied rows leave it.
            models.Index(
                fields=["integration", "id"],
                condition=Q(status="pending"),
                name="alertdelivery_pending",
            ),
            # The few that failed, for /metrics and the admin filter.
            models.Index(fields=["id"], condition=Q(status="failed"), name="alertdelivery_failed"),
            # Pruning applied deliveries past their retention, oldest first.
            models.Index(
                fields=["received_at"], condition=Q(status="done"), name="alertdelivery_done"
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=DeliveryStatus.values), name="alertdelivery_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"delivery {self.pk} ({self.get_status_display().lower()})"


class AlertGroup(models.Model):
    """Alerts of one integration that share a grouping key go to one open incident.

    At most one open group per (integration, key), enforced by the database, so concurrent
    deliveries of one group cannot open two incidents. A group closes (lazily, by the next
    alert) once its incident is no longer open; the next alert then opens a new incident.
    """

    integration = models.ForeignKey(Integration, on_delete=models.PROTECT, related_name="+")
    key = models.CharField(max_length=255)
    incident = models.ForeignKey(Incident, on_delete=models.CASCADE, related_name="alert_groups")
    is_open = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["integration", "key"],
                condition=Q(is_open=True),
                name="one_open_group_per_key",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.integration_id}:{self.key}"


class Runbook(models.Model):
    """A documented procedure for a kind of incident (RB-01 "Backend service down")."""

    code = models.CharField(max_length=20, unique=True, help_text="For example RB-01.")
    title = models.CharField(max_length=200)
    severity = models.ForeignKey(
        Severity, null=True, blank=True, on_delete=models.SET_NULL, related_name="runbooks"
    )
    scope = models.TextField(blank=True)
    steps = models.TextField(blank=True, help_text="Markdown.")
    url = models.URLField(blank=True, help_text="Where the full runbook lives, if elsewhere.")
    review_interval = models.DurationField(
        default=timedelta(days=90), validators=[MinValueValidator(timedelta(days=1))]
    )
    last_reviewed_at = models.DateField(null=True, blank=True)

    class Meta:
        ordering = ["code"]

    def __str__(self) -> str:
        return f"{self.code}: {self.title}"

    def review_due_on(self):
        if self.last_reviewed_at is None:
            return None
        return self.last_reviewed_at + self.review_interval

    def review_overdue(self, today=None) -> bool:
        due = self.review_due_on()
        return due is None or due < (today or timezone.localdate())


class AlertRoute(models.Model):
    """Alerts whose name matches `alert_name` (exact, or a shell-style pattern such as
    `Database*`) and whose labels include `match_labels` take this route's runbook,
    severity, service and team. Routes are tried by `position`; the first match wins."""

    position = models.PositiveIntegerField(default=100)
    integration = models.ForeignKey(
        Integration,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="routes",
        help_text="Empty: alerts from every integration.",
    )
    alert_name = models.CharField(max_length=255, help_text="Exact name, or a pattern: * ? [ ]")
    match_labels = models.JSONField(
        default=dict, blank=True, help_text='Labels that must all be equal, e.g. {"env": "prod"}.'
    )
    runbook = models.ForeignKey(
        Runbook, null=True, blank=True, on_delete=models.SET_NULL, related_name="routes"
    )
    severity = models.ForeignKey(
        Severity, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    service = models.ForeignKey(
        Service, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    team = models.ForeignKey(
        "escalation.Team", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["position", "pk"]

    def __str__(self) -> str:
        return f"{self.alert_name} -> {self.runbook.code if self.runbook_id else '-'}"

    def matches(self, name: str, labels: dict) -> bool:
        if any(str(labels.get(k)) != str(v) for k, v in (self.match_labels or {}).items()):
            return False
        if any(ch in self.alert_name for ch in "*?["):
            return fnmatch.fnmatchcase(name, self.alert_name)
        return name == self.alert_name
