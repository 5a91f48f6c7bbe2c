"""Communications: status updates, message templates, subscribers, customer notices and
their per-recipient deliveries, and scheduled maintenance windows.

Writes happen in `incidents.comms` (services); the public status page reads through
`incidents.selectors`.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from .core import Incident, Service


class PublicStage(models.TextChoices):
    """The conventional stages a status page shows for an incident."""

    INVESTIGATING = "investigating", "Investigating"
    IDENTIFIED = "identified", "Identified"
    MONITORING = "monitoring", "Monitoring"
    RESOLVED = "resolved", "Resolved"


class StatusUpdate(models.Model):
    """One status update on an incident: internal (responders and stakeholders) or public
    (the status page, the Atom feed, subscribers). Append-only, like the timeline."""

    incident = models.ForeignKey(Incident, on_delete=models.CASCADE, related_name="updates")
    stage = models.CharField(
        max_length=20, choices=PublicStage.choices, default=PublicStage.INVESTIGATING
    )
    body = models.TextField()
    public = models.BooleanField(default=False)
    posted_at = models.DateTimeField(default=timezone.now)
    posted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    posted_by_label = models.CharField(max_length=150, blank=True)
    # When the next update is due after this one (the severity's cadence); empty once the
    # incident no longer needs updates.
    next_due_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-posted_at", "-pk"]
        indexes = [
            models.Index(fields=["incident", "posted_at"], name="update_incident_at"),
            # The status page and feed: recent public updates.
            models.Index(
                fields=["posted_at", "id"], name="update_public_at", condition=Q(public=True)
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(stage__in=PublicStage.values), name="update_stage_valid"
            ),
        ]

    def __str__(self) -> str:
        kind = "public" if self.public else "internal"
        return f"{kind} update at {self.posted_at:%Y-%m-%d %H:%M}"


class TemplateKind(models.TextChoices):
    INITIAL = "initial", "Initial alert"
    UPDATE = "update", "Status update"
    RESOLUTION = "resolution", "Resolution notice"
    CUSTOMER_NOTICE = "customer_notice", "Customer notice"
    MAINTENANCE = "maintenance", "Maintenance announcement"


class MessageTemplate(models.Model):
    """A Django template (autoescaped) for a kind of message, filled from an incident (or a
    maintenance window). Validated when saved: a syntax error is refused then, never met at
    send time. At most one default per kind."""

    kind = models.CharField(max_length=20, choices=TemplateKind.choices)
    name = models.CharField(max_length=100, unique=True)
    subject = models.CharField(max_length=300, help_text="A template; one line.")
    body = models.TextField(help_text="A template; plain text, the HTML part is derived.")
    is_default = models.BooleanField(default=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["kind", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind"], condition=Q(is_default=True), name="one_default_template_per_kind"
            ),
            models.CheckConstraint(
                condition=Q(kind__in=TemplateKind.values), name="template_kind_valid"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Subscriber(models.Model):
    """A customer who asked for notices about some public services (all of them when
    `all_services`). Confirmed by email (double opt-in) before anything but the confirmation
    is sent; the unsubscribe token goes in every message's one-click link."""

    email = models.EmailField(unique=True)
    services = models.ManyToManyField(Service, blank=True, related_name="subscribers")
    all_services = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    confirmation_sent_at = models.DateTimeField(null=True, blank=True)
    confirmed_at = models.DateTimeField(null=True, blank=True)
    unsubscribed_at = models.DateTimeField(null=True, blank=True)
    unsubscribe_token = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["email"]
        indexes = [
            models.Index(
                fields=["id"],
                name="subscriber_active",
                condition=Q(confirmed_at__isnull=False, unsubscribed_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return self.email

    @property
    def is_active(self) -> bool:
        return self.confirmed_at is not None and self.unsubscribed_at is None


class MaintenanceWindow(models.Model):
    """Scheduled maintenance of some services: announced to subscribers ahead, shown on the
    status page while it runs, and while it runs alerts on its services open incidents that
    page nobody (the timeline says why)."""

    title = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    services = models.ManyToManyField(Service, related_name="maintenance_windows")
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    cancelled_at = models.DateTimeField(null=True, blank=True)
    announced_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-starts_at"]
        indexes = [models.Index(fields=["ends_at", "starts_at"], name="maintenance_window")]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=F("starts_at")),
                name="maintenance_ends_after_start",
                violation_error_message="The window must end after it starts.",
            ),
        ]

    def __str__(self) -> str:
        return self.title


class NoticeStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"


class CustomerNotice(models.Model):
    """An email to the confirmed subscribers of the affected services, composed from a
    template (the rendered subject and bodies are kept as sent), previewed, then sent by
    Celery in batches. About an incident or a maintenance window."""

    kind = models.CharField(max_length=20, choices=TemplateKind.choices)
    incident = models.ForeignKey(
        Incident, null=True, blank=True, on_delete=models.PROTECT, related_name="notices"
    )
    maintenance = models.ForeignKey(
        MaintenanceWindow, null=True, blank=True, on_delete=models.PROTECT, related_name="notices"
    )
    template = models.ForeignKey(
        MessageTemplate, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    services = models.ManyToManyField(Service, related_name="notices")
    subject = models.CharField(max_length=300)
    body_text = models.TextField()
    body_html = models.TextField()
    status = models.CharField(
        max_length=10, choices=NoticeStatus.choices, default=NoticeStatus.DRAFT
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    send_requested_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    recipients = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=NoticeStatus.values), name="notice_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(kind__in=TemplateKind.values), name="notice_kind_valid"
            ),
        ]

    def __str__(self) -> str:
        return self.subject


class DeliveryState(models.TextChoices):
    PENDING = "pending", "Pending"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed"
    UNKNOWN = "unknown", "Outcome unknown"


class NoticeDelivery(models.Model):
    """One notice to one subscriber: an outbox row. Its Message-ID is fixed when the row is
    made, so a retry can never mail the same notice twice under two identities, and the
    row's state is claimed before each send."""

    notice = models.ForeignKey(CustomerNotice, on_delete=models.CASCADE, related_name="deliveries")
    subscriber = models.ForeignKey(
        Subscriber, null=True, on_delete=models.SET_NULL, related_name="deliveries"
    )
    email = models.EmailField()
    message_id = models.CharField(max_length=255, unique=True)
    status = models.CharField(
        max_length=10, choices=DeliveryState.choices, default=DeliveryState.PENDING
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["notice", "pk"]
        indexes = [
            models.Index(
                fields=["notice", "id"],
                name="noticedelivery_pending",
                condition=Q(status="pending"),
            ),
        ]
        constraints = [
            models.UniqueConstraint(fields=["notice", "email"], name="one_delivery_per_address"),
            models.CheckConstraint(
                condition=Q(status__in=DeliveryState.values), name="noticedelivery_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.email} ({self.status})"
