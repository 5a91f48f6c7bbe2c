"""Escalation configuration in the admin: teams, people and contact methods, rotations and
overrides, business calendars, escalation policies with their steps and targets.

Invalid configuration is refused by the forms, before anything is saved: a rotation without
participants, an override that ends before it starts, a contact method whose address its
channel cannot use, a step without a target. On-call columns come from `escalation.oncall`
over prefetched members and overrides (no per-row queries).
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlsplit

from django import forms
from django.contrib import admin
from django.db.models import Count, Prefetch
from django.forms.models import BaseInlineFormSet
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from . import oncall, selectors
from .models import (
    BusinessCalendar,
    ContactMethod,
    EscalationPolicy,
    EscalationStep,
    Override,
    Page,
    PageAttempt,
    Person,
    Rotation,
    RotationMember,
    StepTarget,
    Team,
)

# Stretches listed on a rotation's page.
UPCOMING_SHIFTS = 8


def _when(rotation: Rotation, at: datetime) -> str:
    return oncall.local(rotation, at).strftime("%a %d %b %Y %H:%M %Z")


# --- teams -----------------------------------------------------------------------------------


def mask_webhook_url(url: str) -> str:
    """Scheme and host of a webhook URL, the rest (its secret path, query, credentials)
    replaced by an ellipsis: "https://hooks.slack.com/…". "—" when there is none."""
    if not url:
        return "—"
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{port}/…" if parts.scheme and host else "…"


class TeamAdminForm(forms.ModelForm):
    """The chat webhook must be an http(s) URL a webhook may reach (checked again, with
    DNS, at each send); the channel pattern may use only the known placeholders."""

    chat_webhook_url = forms.URLField(
        required=False,
        max_length=200,
        assume_scheme="https",
        label="Chat webhook URL",
        help_text="A Slack-compatible incoming webhook; internal status updates, declarations "
        "and resolutions of the team's incidents are posted there.",
    )

    class Meta:
        model = Team
        fields = [
            "name",
            "slug",
            "description",
            "members",
            "summary_email",
            "chat_webhook_url",
            "chat_channel_pattern",
        ]

    def clean_chat_webhook_url(self) -> str:
        from django.core.exceptions import ValidationError

        from .channels import validate_webhook_url

        url = (self.cleaned_data.get("chat_webhook_url") or "").strip()
        if url:
            try:
                validate_webhook_url(url, resolve=False)
            except ValidationError as error:
                raise forms.ValidationError(error.error_dict["address"][0].messages) from error
        return url

    def clean_chat_channel_pattern(self) -> str:
        from incidents.comms.updates import chat_channel_pattern_validate
        from incidents.exceptions import InvalidInput

        pattern = (self.cleaned_data.get("chat_channel_pattern") or "").strip()
        try:
            chat_channel_pattern_validate(pattern)
        except InvalidInput as error:
            raise forms.ValidationError(str(error).removeprefix(f"{error.field}: ")) from error
        return pattern


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    form = TeamAdminForm
    list_display = ["name", "slug", "member_count", "rotation_count"]
    ordering = ["name"]  # annotated querysets drop Meta.ordering
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["members"]
    readonly_fields = ["oncall_display"]

    # The webhook URL is a credential (whoever has it can post to the channel): only those
    # who may change the team see it; everyone else sees where it goes, not the secret part.
    def get_fields(self, request, obj=None):
        fields = [f for f in super().get_fields(request, obj) if f != "chat_webhook_masked"]
        if self.has_change_permission(request, obj):
            return fields
        return ["chat_webhook_masked" if f == "chat_webhook_url" else f for f in fields]

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if not self.has_change_permission(request, obj):
            fields.append("chat_webhook_masked")
        return fields

    @admin.display(description="Chat webhook URL")
    def chat_webhook_masked(self, obj: Team) -> str:
        return mask_webhook_url(obj.chat_webhook_url)

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                member_total=Count("members", distinct=True),
                rotation_total=Count("rotations", distinct=True),
            )
        )

    @admin.display(description="Members", ordering="member_total")
    def member_count(self, obj: Team) -> int:
        return obj.member_total

    @admin.display(description="Rotations", ordering="rotation_total")
    def rotation_count(self, obj: Team) -> int:
        return obj.rotation_total

    @admin.display(description="On call now")
    def oncall_display(self, obj: Team):
        if obj.pk is None:
            return "—"
        rows = selectors.oncall_for_team(obj, timezone.now())
        if not rows:
            return "No rotations."
        return format_html(
            "<ul>{}</ul>",
            format_html_join(
                "",
                "<li>{}: {}</li>",
                ((row.rotation.name, _oncall_text(row)) for row in rows),
            ),
        )


# --- people ----------------------------------------------------------------------------------


class ContactMethodInline(admin.TabularInline):
    model = ContactMethod
    fields = ["position", "kind", "address", "label"]
    ordering = ["position", "pk"]
    extra = 1
    verbose_name = "contact method"
    verbose_name_plural = "Contact methods (position 0 is the primary, then backups in order)"


@admin.register(Person)
class PersonAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "time_zone", "primary_contact", "is_active"]
    list_filter = ["is_active", "opt_in_drills"]
    list_select_related = ["user"]
    search_fields = ["name", "user__username", "user__email"]
    autocomplete_fields = ["user"]
    inlines = [ContactMethodInline]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .prefetch_related(
                Prefetch(
                    "contact_methods", queryset=ContactMethod.objects.order_by("position", "pk")
                )
            )
        )

    @admin.display(description="Primary contact")
    def primary_contact(self, obj: Person) -> str:
        methods = list(obj.contact_methods.all())
        return str(methods[0]) if methods else "—"


# --- rotations -------------------------------------------------------------------------------


class AtLeastOneInline(admin.TabularInline):
    """An inline that needs at least `min_num` rows left after deletions (the admin does
    not pass `validate_min` to its formsets on its own)."""

    min_num = 1
    extra = 0

    def get_formset(self, request, obj=None, **kwargs):
        kwargs.setdefault("validate_min", True)
        return super().get_formset(request, obj, **kwargs)


class ParticipantFormSet(BaseInlineFormSet):
    default_error_messages = {
        "too_few_forms": "A rotation needs at least one participant.",
    }


class RotationMemberInline(AtLeastOneInline):
    model = RotationMember
    formset = ParticipantFormSet
    fields = ["position", "person"]
    ordering = ["position"]
    autocomplete_fields = ["person"]
    verbose_name = "participant"
    verbose_name_plural = "Participants (take shifts in position order)"


class OverrideForm(forms.ModelForm):
    class Meta:
        model = Override
        fields = ["rotation", "person", "starts_at", "ends_at", "reason"]

    def clean(self):
        cleaned = super().clean()
        starts_at, ends_at = cleaned.get("starts_at"), cleaned.get("ends_at")
        if starts_at and ends_at and ends_at <= starts_at:
            self.add_error("ends_at", "An override must end after it starts.")
        return cleaned


class OverrideInline(admin.TabularInline):
    """Current and upcoming overrides; past ones are in the override list."""

    model = Override
    form = OverrideForm
    fields = ["person", "starts_at", "ends_at", "reason"]
    autocomplete_fields = ["person"]
    extra = 0
    verbose_name_plural = "Overrides (current and upcoming)"

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .filter(ends_at__gt=timezone.now())
            .select_related("person")
            .order_by("starts_at", "pk")
        )


def _oncall_text(row: selectors.RotationOncall) -> str:
    if row.shift is None:
        return "nobody"
    text = f"{row.oncall} until {_when(row.rotation, row.shift.end)}"
    return f"{text} (override)" if row.shift.is_override else text


@admin.register(Rotation)
class RotationAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "time_zone", "shift_display", "oncall_now", "next_shift"]
    list_filter = ["team"]
    list_select_related = ["team"]
    search_fields = ["name", "team__name", "team__slug"]
    autocomplete_fields = ["team"]
    inlines = [RotationMemberInline, OverrideInline]
    readonly_fields = ["oncall_now", "next_shift", "upcoming_display", "calendar_link"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "team",
                    "name",
                    ("time_zone", "start_date", "handoff_time"),
                    "shift_length",
                    "handoff_notice",
                ]
            },
        ),
        ("Who is on call", {"fields": ["oncall_now", "next_shift", "upcoming_display"]}),
        ("Calendar", {"fields": ["calendar_link"]}),
    ]

    def get_queryset(self, request):
        return selectors.prefetch_oncall(super().get_queryset(request), at=timezone.now())

    def _summary(self, obj: Rotation) -> selectors.RotationOncall:
        # Two columns share one computation per row, from the prefetched members/overrides.
        summary = getattr(obj, "_oncall_summary", None)
        if summary is None:
            summary = selectors.rotation_oncall(obj, timezone.now())
            obj._oncall_summary = summary
        return summary

    @admin.display(description="Shift length", ordering="shift_length")
    def shift_display(self, obj: Rotation) -> str:
        return f"{obj.shift_length}, handoff {obj.handoff_time:%H:%M}"

    @admin.display(description="On call now")
    def oncall_now(self, obj: Rotation) -> str:
        if obj.pk is None:
            return "—"
        return _oncall_text(self._summary(obj))

    @admin.display(description="Next shift")
    def next_shift(self, obj: Rotation) -> str:
        if obj.pk is None:
            return "—"
        upcoming = self._summary(obj).upcoming
        if upcoming is None:
            return "—"
        return f"{upcoming.person} from {_when(obj, upcoming.start)}"

    @admin.display(description="Upcoming shifts")
    def upcoming_display(self, obj: Rotation):
        if obj.pk is None:
            return "—"
        now = timezone.now()
        shifts = oncall.shifts_between(obj, now, now + UPCOMING_SHIFTS * obj.shift_length)
        if not shifts:
            return "Nobody is scheduled."
        return format_html(
            "<table><thead><tr><th>Who</th><th>From</th><th>Until</th><th></th></tr></thead>"
            "<tbody>{}</tbody></table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                (
                    (
                        shift.person,
                        _when(obj, shift.start),
                        _when(obj, shift.end),
                        "override" if shift.is_override else "",
                    )
                    for shift in shifts[:UPCOMING_SHIFTS]
                ),
            ),
        )

    @admin.display(description="iCalendar feed")
    def calendar_link(self, obj: Rotation):
        if obj.pk is None:
            return "—"
        url = reverse("rotation-calendar", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, url)


@admin.register(Override)
class OverrideAdmin(admin.ModelAdmin):
    form = OverrideForm
    list_display = ["rotation", "person", "starts_at", "ends_at", "reason", "created_at"]
    list_filter = ["rotation__team", "rotation"]
    list_select_related = ["rotation", "rotation__team", "person"]
    search_fields = ["person__name", "rotation__name", "reason"]
    autocomplete_fields = ["rotation", "person"]
    date_hierarchy = "starts_at"
    readonly_fields = ["created_at"]


# --- business calendars ----------------------------------------------------------------------


@admin.register(BusinessCalendar)
class BusinessCalendarAdmin(admin.ModelAdmin):
    list_display = ["name", "time_zone", "working_days", "day_start", "day_end"]
    search_fields = ["name"]


# --- escalation policies ---------------------------------------------------------------------


def _targets_text(step: EscalationStep) -> str:
    return "; ".join(str(target) for target in step.targets.all()) or "—"


def _steps_with_targets():
    return EscalationStep.objects.select_related("policy", "calendar").prefetch_related(
        Prefetch(
            "targets",
            queryset=StepTarget.objects.select_related("rotation__team", "person", "team"),
        )
    )


class EscalationStepInline(admin.TabularInline):
    """A step's targets are edited on the step's own page, which requires at least one; so
    steps are added there too, never here without targets."""

    model = EscalationStep
    fields = ["position", "delay", "condition", "calendar", "targets_display"]
    readonly_fields = ["targets_display"]
    ordering = ["position", "pk"]
    extra = 0
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        return _steps_with_targets().order_by("position", "pk")

    @admin.display(description="Targets")
    def targets_display(self, obj: EscalationStep) -> str:
        return _targets_text(obj)


@admin.register(EscalationPolicy)
class EscalationPolicyAdmin(admin.ModelAdmin):
    list_display = ["name", "step_count", "repeat", "repeat_after"]
    ordering = ["name"]  # annotated querysets drop Meta.ordering
    search_fields = ["name"]
    inlines = [EscalationStepInline]
    readonly_fields = ["add_step_link", "preview"]
    fields = ["name", "description", "repeat", "repeat_after", "add_step_link", "preview"]

    @admin.display(description="If nobody acknowledges (from now)")
    def preview(self, obj: EscalationPolicy):
        """The same preview as `manage.py simulate_escalation`: who, when, how."""
        if obj.pk is None:
            return "-"
        from incidents.formatting import humanize_duration

        from .simulation import simulate

        pages = simulate(obj, start=timezone.now())
        if not pages:
            return "Nobody would be paged."
        rows = format_html_join(
            "",
            "<tr><td>+{}</td><td>step {}{}</td><td>{}</td><td>{}{}</td><td>{}</td></tr>",
            (
                (
                    humanize_duration(p.offset),
                    p.step,
                    f" (round {p.round})" if p.round > 1 else "",
                    p.person,
                    p.method,
                    " (backup)" if p.backup else "",
                    p.condition,
                )
                for p in pages
            ),
        )
        return format_html(
            '<table class="escalation-preview"><thead><tr><th>When</th><th>Step</th>'
            "<th>Who</th><th>How</th><th>Condition</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(step_total=Count("steps"))

    @admin.display(description="Steps", ordering="step_total")
    def step_count(self, obj: EscalationPolicy) -> int:
        return obj.step_total

    @admin.display(description="Steps")
    def add_step_link(self, obj: EscalationPolicy):
        if obj.pk is None:
            return "Save the policy, then add its steps (each with its targets)."
        url = reverse("admin:escalation_escalationstep_add")
        return format_html('<a class="addlink" href="{}?policy={}">Add a step</a>', url, obj.pk)


class TargetFormSet(BaseInlineFormSet):
    default_error_messages = {
        "too_few_forms": "A step needs at least one target.",
    }


class StepTargetInline(AtLeastOneInline):
    model = StepTarget
    formset = TargetFormSet
    fields = ["kind", "rotation", "person", "team"]
    autocomplete_fields = ["rotation", "person", "team"]


@admin.register(EscalationStep)
class EscalationStepAdmin(admin.ModelAdmin):
    list_display = ["__str__", "policy", "position", "delay", "condition", "targets_display"]
    list_filter = ["policy", "condition"]
    list_select_related = ["policy"]
    search_fields = ["policy__name"]
    autocomplete_fields = ["policy", "calendar"]
    fields = ["policy", "position", "delay", "condition", "calendar"]
    inlines = [StepTargetInline]
    ordering = ["policy__name", "position"]

    def get_queryset(self, request):
        return _steps_with_targets()

    @admin.display(description="Targets")
    def targets_display(self, obj: EscalationStep) -> str:
        return _targets_text(obj)


class PageAttemptInline(admin.TabularInline):
    model = PageAttempt
    fields = ["at", "channel", "address", "outcome", "error"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Page)
class PageAdmin(admin.ModelAdmin):
    """The outbox, read-only: every page with its attempts, as the engine recorded them."""

    list_display = [
        "created_at",
        "incident",
        "person",
        "step_display",
        "status",
        "channel",
        "attempts",
        "sent_at",
        "acked_at",
    ]
    list_filter = ["status", "channel"]
    list_select_related = ["incident", "person"]
    search_fields = ["incident__reference", "person__name"]
    show_full_result_count = False
    inlines = [PageAttemptInline]
    readonly_fields = [
        "incident",
        "person",
        "plan_version",
        "step_index",
        "round",
        "status",
        "method_index",
        "attempts",
        "channel",
        "due_at",
        "created_at",
        "next_attempt_at",
        "enqueued_at",
        "claimed_at",
        "sent_at",
        "acked_at",
        "backup_at",
        "last_error",
    ]

    @admin.display(description="Step")
    def step_display(self, obj: Page) -> str:
        return f"{obj.step_index + 1} (round {obj.round + 1})"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
