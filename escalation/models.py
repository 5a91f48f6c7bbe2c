"""Teams, people and their contact methods, rotations, escalation policies, and pages.

Writes happen in `escalation.services`; on-call arithmetic is in `escalation.oncall`,
business-hours arithmetic in `escalation.business_hours`.
"""

from __future__ import annotations

import zoneinfo
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


def validate_time_zone(value: str) -> None:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
        raise ValidationError(f"{value!r} is not a known IANA time zone.") from error


class Team(models.Model):
    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="teams")
    # Where the weekly on-call summary goes (an email address); empty: to each member.
    summary_email = models.EmailField(blank=True)
    # Internal status updates go to this Slack-compatible incoming webhook, when set, for
    # the incident's channel, named from the pattern: {year}, {month}, {day}, {date}
    # (YYYY-MM-DD), {number} (the incident's), {seq} (its place among the team's incidents
    # of that day), with format specs: "#incident-{date}-{seq:03d}".
    chat_webhook_url = models.URLField(blank=True)
    chat_channel_pattern = models.CharField(
        max_length=80, blank=True, default="#incident-{date}-{seq:03d}"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Person(models.Model):
    """Someone who can be paged: a user, or an outside contact (an executive, a vendor)."""

    name = models.CharField(max_length=100)
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="person",
    )
    time_zone = models.CharField(max_length=64, default="UTC", validators=[validate_time_zone])
    backup_after = models.DurationField(
        default=timedelta(minutes=10),
        validators=[MinValueValidator(timedelta(minutes=1))],
        help_text="With no acknowledgement this long after a page, try the next contact method.",
    )
    opt_in_drills = models.BooleanField(
        default=False, help_text="Paged for drills (tabletop exercises) too."
    )
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "people"

    def __str__(self) -> str:
        return self.name


class ContactKind(models.TextChoices):
    EMAIL = "email", "Email"
    SMS_WEBHOOK = "sms_webhook", "SMS gateway webhook"
    SLACK_WEBHOOK = "slack_webhook", "Slack-style incoming webhook"
    WEBHOOK = "webhook", "Generic webhook"


class ContactMethod(models.Model):
    """One way to reach a person. Position 0 is the primary; the rest are backups in order."""

    person = models.ForeignKey(Person, on_delete=models.CASCADE, related_name="contact_methods")
    kind = models.CharField(max_length=20, choices=ContactKind.choices)
    address = models.CharField(max_length=500, help_text="An email address or an http(s) URL.")
    position = models.PositiveSmallIntegerField(default=0)
    label = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["person", "position", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["person", "position"], name="contact_position_unique")
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.address}"

    def clean(self) -> None:
        from .channels import validate_contact_address

        validate_contact_address(self.kind, self.address)


class Rotation(models.Model):
    """Participants take turns in shifts of `shift_length`, handing off at `handoff_time`
    local time, counted from `start_date`. Shift lengths are wall-clock lengths in the
    rotation's zone, so a weekly shift still hands off at 09:00 across daylight saving."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="rotations")
    name = models.CharField(max_length=100)
    time_zone = models.CharField(max_length=64, default="UTC", validators=[validate_time_zone])
    shift_length = models.DurationField(
        default=timedelta(days=7), validators=[MinValueValidator(timedelta(hours=1))]
    )
    handoff_time = models.TimeField(default="09:00")
    start_date = models.DateField()
    handoff_notice = models.DurationField(
        default=timedelta(hours=1), help_text="Tell the incoming person this long before."
    )

    class Meta:
        ordering = ["team", "name"]
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="rotation_name_per_team")
        ]

    def __str__(self) -> str:
        return f"{self.team}: {self.name}"


class RotationMember(models.Model):
    rotation = models.ForeignKey(Rotation, on_delete=models.CASCADE, related_name="members")
    person = models.ForeignKey(Person, on_delete=models.PROTECT, related_name="rotations")
    position = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ["rotation", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["rotation", "position"], name="rotation_member_position_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.position}: {self.person}"


class Override(models.Model):
    """`person` covers the rotation from `starts_at` to `ends_at` (a swap or an absence)."""

    rotation = models.ForeignKey(Rotation, on_delete=models.CASCADE, related_name="overrides")
    person = models.ForeignKey(Person, on_delete=models.PROTECT, related_name="overrides")
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["rotation", "starts_at"]
        indexes = [models.Index(fields=["rotation", "starts_at", "ends_at"], name="override_span")]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=models.F("starts_at")),
                name="override_ends_after_start",
                violation_error_message="An override must end after it starts.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.person} covers {self.rotation} from {self.starts_at:%Y-%m-%d %H:%M}"


class BusinessCalendar(models.Model):
    """Working days and hours in a zone, with holidays: 'respond during business hours'."""

    name = models.CharField(max_length=100, unique=True)
    time_zone = models.CharField(max_length=64, default="UTC", validators=[validate_time_zone])
    # ISO weekdays, Monday = 1 ... Sunday = 7, comma-separated.
    working_days = models.CharField(max_length=20, default="1,2,3,4,5")
    day_start = models.TimeField(default="09:00")
    day_end = models.TimeField(default="17:00")
    holidays = models.JSONField(default=list, blank=True, help_text="ISO dates, e.g. 2026-12-25.")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from .business_hours import validate_calendar

        validate_calendar(self)


class EscalationPolicy(models.Model):
    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    repeat = models.PositiveSmallIntegerField(
        default=0, help_text="How many more times the whole chain runs after its last step."
    )
    repeat_after = models.DurationField(
        default=timedelta(minutes=30),
        validators=[MinValueValidator(timedelta(minutes=1))],
        help_text="A repeated round starts this long after the previous round's last step.",
    )

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "escalation policies"

    def __str__(self) -> str:
        return self.name


class StepCondition(models.TextChoices):
    UNACKNOWLEDGED = "unacknowledged", "Still unacknowledged"
    UNRESOLVED = "unresolved", "Still unresolved"


class EscalationStep(models.Model):
    """At `delay` after the incident started (and each round after), if `condition` still
    holds, page every target."""

    policy = models.ForeignKey(EscalationPolicy, on_delete=models.CASCADE, related_name="steps")
    position = models.PositiveSmallIntegerField(default=0)
    delay = models.DurationField(
        default=timedelta(0), help_text="From the start of the incident (or of the round)."
    )
    condition = models.CharField(
        max_length=20, choices=StepCondition.choices, default=StepCondition.UNACKNOWLEDGED
    )
    calendar = models.ForeignKey(
        BusinessCalendar,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        help_text="Only page within these business hours (the step waits for them).",
    )

    class Meta:
        ordering = ["policy", "position", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["policy", "position"], name="step_position_unique"),
            models.CheckConstraint(
                condition=Q(delay__gte=timedelta(0)), name="step_delay_not_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.policy}: step {self.position + 1} after {self.delay}"


class TargetKind(models.TextChoices):
    ONCALL = "oncall", "Rotation: who is on call"
    NEXT_IN_LINE = "next_in_line", "Rotation: next in line (secondary)"
    PERSON = "person", "A person"
    TEAM = "team", "Every member of a team"


class StepTarget(models.Model):
    step = models.ForeignKey(EscalationStep, on_delete=models.CASCADE, related_name="targets")
    kind = models.CharField(max_length=20, choices=TargetKind.choices)
    rotation = models.ForeignKey(Rotation, null=True, blank=True, on_delete=models.PROTECT)
    person = models.ForeignKey(Person, null=True, blank=True, on_delete=models.PROTECT)
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.PROTECT)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(
                        kind__in=[TargetKind.ONCALL, TargetKind.NEXT_IN_LINE],
                        rotation__isnull=False,
                        person__isnull=True,
                        team__isnull=True,
                    )
                    | Q(
                        kind=TargetKind.PERSON,
                        rotation__isnull=True,
                        person__isnull=False,
                        team__isnull=True,
                    )
                    | Q(
                        kind=TargetKind.TEAM,
                        rotation__isnull=True,
                        person__isnull=True,
                        team__isnull=False,
                    )
                ),
                name="step_target_matches_kind",
                violation_error_message="A target names exactly the rotation, person or team "
                "its kind needs.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.rotation or self.person or self.team}"

    def clean(self) -> None:
        needs = {
            TargetKind.ONCALL: "rotation",
            TargetKind.NEXT_IN_LINE: "rotation",
            TargetKind.PERSON: "person",
            TargetKind.TEAM: "team",
        }.get(self.kind)
        errors = {}
        for name in ("rotation", "person", "team"):
            value = getattr(self, f"{name}_id")
            if name == needs and value is None:
                errors[name] = f"A {self.get_kind_display().lower()} target needs a {name}."
            elif name != needs and value is not None:
                errors[name] = f"Leave empty for a {self.get_kind_display().lower()} target."
        if errors:
            raise ValidationError(errors)


class PageStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    UNKNOWN = "unknown", "Outcome unknown"


class Page(models.Model):
    """One notification to one person for one escalation step in one round: an outbox row.

    pending -> sending -> sent, or back to pending for a retry or a backup method, or
    failed when every method and attempt is spent. A page left in `sending` by a crashed
    worker is marked `unknown`, never silently re-sent. The unique key makes a second page
    for the same (incident, step, person, round) impossible.
    """

    incident = models.ForeignKey(
        "incidents.Incident", on_delete=models.CASCADE, related_name="pages"
    )
    # Which plan of the incident (a raised severity re-plans), step and round paged for.
    plan_version = models.PositiveSmallIntegerField(default=1)
    step_index = models.PositiveSmallIntegerField()
    round = models.PositiveSmallIntegerField(default=0)
    person = models.ForeignKey(Person, on_delete=models.PROTECT, related_name="pages")
    status = models.CharField(max_length=20, choices=PageStatus.choices, default=PageStatus.PENDING)
    method_index = models.PositiveSmallIntegerField(
        default=0, help_text="The contact method the next attempt uses."
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    channel = models.CharField(max_length=20, blank=True)
    due_at = models.DateTimeField(help_text="When the escalation step fell due.")
    created_at = models.DateTimeField(default=timezone.now)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(
        null=True, blank=True, help_text="When a delivery task was last queued for it."
    )
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    acked_at = models.DateTimeField(null=True, blank=True)
    backup_at = models.DateTimeField(
        null=True, blank=True, help_text="When to try the next method if still unacknowledged."
    )
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["created_at", "pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["incident", "plan_version", "step_index", "person", "round"],
                name="one_page_per_step",
            ),
            models.CheckConstraint(
                condition=Q(status__in=PageStatus.values), name="page_status_valid"
            ),
        ]
        indexes = [
            models.Index(
                fields=["next_attempt_at"], name="page_next_attempt", condition=Q(status="pending")
            ),
            models.Index(fields=["claimed_at"], name="page_sending", condition=Q(status="sending")),
            models.Index(
                fields=["backup_at"],
                name="page_backup_due",
                condition=Q(status="sent", acked_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"page {self.pk} to {self.person_id} ({self.status})"


class PageAttempt(models.Model):
    """One try to deliver a page over one contact method: every attempt is on record."""

    page = models.ForeignKey(Page, on_delete=models.CASCADE, related_name="attempt_log")
    at = models.DateTimeField(default=timezone.now)
    contact_method = models.ForeignKey(
        ContactMethod, null=True, blank=True, on_delete=models.SET_NULL
    )
    channel = models.CharField(max_length=20)
    address = models.CharField(max_length=500)
    outcome = models.CharField(max_length=20)  # sent, failed, unknown
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self) -> str:
        return f"{self.channel} {self.outcome} at {self.at:%H:%M:%S}"


class OncallNotice(models.Model):
    """A handoff notice or weekly summary that was sent: the unique key makes each go once."""

    kind = models.CharField(max_length=20)  # "handoff" or "weekly"
    key = models.CharField(max_length=200)  # rotation and shift start, or team and ISO week
    recipient = models.CharField(max_length=254)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["kind", "key", "recipient"], name="notice_once")
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.key} to {self.recipient}"


class EngineState(models.Model):
    """What the last engine tick did, for /metrics: one row per tick kind ("engine"),
    overwritten by each tick."""

    name = models.CharField(max_length=50, primary_key=True)
    ticks = models.PositiveBigIntegerField(default=0)
    last_tick_at = models.DateTimeField(null=True, blank=True)
    last_duration_seconds = models.FloatField(default=0.0)
    # How late the most overdue escalation was when the tick started (0: nothing was late).
    last_lag_seconds = models.FloatField(default=0.0)

    def __str__(self) -> str:
        return f"{self.name}: {self.ticks} ticks"
