"""Triage in the admin. Display, filters, and actions that call services; no logic here."""

from __future__ import annotations

from functools import partial

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.contrib.admin.widgets import AutocompleteSelect
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
    JsonResponse,
)
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html_join

# The admin_* modules register their own admins when imported.
from . import (  # noqa: F401
    admin_alerts,
    admin_maintenance,
    admin_notices,
    admin_updates,
    services,
)
from .admin_updates import (
    UpdateOverdueFilter,
    post_update_view,
    status_update_context,
    update_due_column,
)
from .deadlines import target_states
from .exceptions import DomainError
from .formatting import humanize_duration, severity_badge, status_badge, target_badge
from .markdown import render_markdown
from .models import (
    OPEN_STATUSES,
    Incident,
    IncidentStatus,
    Role,
    RoleAssignment,
    Service,
    Severity,
    TimelineEvent,
)
from .pagination import EstimatedCountPaginator
from .selectors import (
    COMMANDER_SLUG,
    breached_q,
    incidents_breached,
    incidents_open,
    incidents_with_commander,
)

ADMIN_CSS = {"all": ["incidents/admin.css"]}
# Stamped by the services, shown read-only.
TIMESTAMP_FIELDS = [
    "created_at",
    "declared_by",
    "acknowledged_at",
    "investigating_at",
    "mitigating_at",
    "monitoring_at",
    "resolved_at",
    "closed_at",
    "reopened_count",
    "ack_due_at",
    "resolve_due_at",
    "next_update_due_at",
]


@admin.register(Service)
class ServiceAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "team", "is_public"]
    list_filter = ["is_public", "team"]
    list_select_related = ["team"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    autocomplete_fields = ["team"]


@admin.register(Severity)
class SeverityAdmin(admin.ModelAdmin):
    list_display = [
        "badge",
        "level",
        "ack_target_display",
        "resolve_target_display",
        "update_display",
        "postmortem_required",
        "notify_customers",
    ]
    list_display_links = ["badge"]
    ordering = ["level"]
    search_fields = ["name"]

    class Media:
        css = ADMIN_CSS

    @admin.display(description="Severity", ordering="level")
    def badge(self, obj: Severity):
        return severity_badge(obj.level, obj.name)

    @admin.display(description="Acknowledge within", ordering="ack_target")
    def ack_target_display(self, obj: Severity) -> str:
        return humanize_duration(obj.ack_target)

    @admin.display(description="Resolve within", ordering="resolve_target")
    def resolve_target_display(self, obj: Severity) -> str:
        return humanize_duration(obj.resolve_target)

    @admin.display(description="Update every", ordering="update_interval")
    def update_display(self, obj: Severity) -> str:
        return humanize_duration(obj.update_interval)


@admin.register(Role)
class RoleAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "sort_order"]
    search_fields = ["name"]
    prepopulated_fields = {"slug": ["name"]}


class BreachedFilter(admin.SimpleListFilter):
    title = "SLA"
    parameter_name = "breached"

    def lookups(self, request, model_admin):
        return [("yes", "Breached now"), ("no", "Within targets")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "yes":
            return incidents_breached(queryset, now=now)
        if self.value() == "no":
            return queryset.exclude(breached_q(now))
        return queryset


class OpenFilter(admin.SimpleListFilter):
    title = "open or closed"
    parameter_name = "open"

    def lookups(self, request, model_admin):
        return [("yes", "Open"), ("no", "Resolved or closed")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return incidents_open(queryset)
        if self.value() == "no":
            return queryset.exclude(status__in=OPEN_STATUSES)
        return queryset


class TimelineInline(admin.TabularInline):
    """The timeline, read-only: append-only means nobody edits or deletes it here."""

    model = TimelineEvent
    fk_name = "incident"
    fields = ["at", "kind", "actor_name", "previous", "value", "message"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = "Timeline"

    @admin.display(description="Actor")
    def actor_name(self, obj: TimelineEvent) -> str:
        return obj.actor_display

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class IncidentAdminForm(forms.ModelForm):
    class Meta:
        model = Incident
        fields = [
            "title",
            "summary",
            "severity",
            "services",
            "team",
            "impact",
            "customer_impact",
            "is_drill",
            "false_positive",
            "runbook",
            "detected_at",
        ]

    def clean_detected_at(self):
        detected_at = self.cleaned_data.get("detected_at")
        if detected_at and detected_at > timezone.now():
            raise forms.ValidationError("Detection time cannot be in the future.")
        return detected_at


class NoteForm(forms.Form):
    body = forms.CharField(widget=forms.Textarea, max_length=services.MAX_NOTE_LENGTH)


class MergeForm(forms.Form):
    target = forms.CharField(
        max_length=30,
        label="Merge into",
        help_text="The reference of the incident that carries on, e.g. INC-1042.",
    )
    reason = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        max_length=services.MAX_NOTE_LENGTH,
        help_text="Optional; recorded on both timelines.",
    )

    def clean_target(self) -> Incident:
        reference = self.cleaned_data["target"].strip()
        target = Incident.objects.filter(reference__iexact=reference).first()
        if target is None:
            raise forms.ValidationError(f"There is no incident {reference}.")
        return target


class UserAutocomplete(AutocompleteSelect):
    """The admin's select2 autocomplete, served by the incident admin's own user search,
    so responders pick people without access to the user directory."""

    def get_url(self):
        return reverse("admin:incidents_incident_user_autocomplete")


class RoleForm(forms.Form):
    role = forms.ModelChoiceField(queryset=Role.objects.all())
    user = forms.ModelChoiceField(queryset=get_user_model().objects.filter(is_active=True))

    def __init__(self, *args, admin_site=None, **kwargs):
        super().__init__(*args, **kwargs)
        if admin_site is not None:
            self.fields["user"] = forms.ModelChoiceField(
                queryset=self.fields["user"].queryset,
                widget=UserAutocomplete(RoleAssignment._meta.get_field("user"), admin_site),
            )


@admin.register(Incident)
class IncidentAdmin(admin.ModelAdmin):
    form = IncidentAdminForm
    list_display = [
        "reference",
        "title",
        "severity_display",
        "status_display",
        "sla_display",
        "services_display",
        "commander_display",
        "age_display",
        update_due_column,
    ]
    list_display_links = ["reference", "title"]
    list_filter = [
        OpenFilter,
        "status",
        "severity",
        "services",
        "team",
        BreachedFilter,
        UpdateOverdueFilter,
        "is_drill",
    ]
    list_select_related = ["severity", "severity__calendar"]
    search_fields = ["reference", "title", "summary"]
    date_hierarchy = "created_at"
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 50
    autocomplete_fields = ["services", "team", "runbook"]
    inlines = [TimelineInline]
    actions = [
        "acknowledge",
        "assign_me_commander",
        "escalate",
        "resolve",
        "merge_into",
        admin_notices.notify_customers,
    ]
    readonly_fields = ["reference", "status_display", *TIMESTAMP_FIELDS, "sla_display"]
    change_form_template = "admin/incidents/incident/change_form.html"

    class Media:
        css = ADMIN_CSS

    # --- querysets and display -------------------------------------------------------------

    def get_queryset(self, request):
        queryset = super().get_queryset(request).prefetch_related("services")
        return incidents_with_commander(queryset)

    @admin.display(description="Severity", ordering="severity__level")
    def severity_display(self, obj: Incident):
        return severity_badge(obj.severity.level, obj.severity.name)

    @admin.display(description="Status", ordering="status")
    def status_display(self, obj: Incident):
        return status_badge(obj.status, obj.get_status_display())

    @admin.display(description="SLA")
    def sla_display(self, obj: Incident):
        if obj.pk is None:
            return "—"
        return format_html_join(
            "", "{}", ((target_badge(s),) for s in target_states(obj, timezone.now()))
        )

    @admin.display(description="Services")
    def services_display(self, obj: Incident) -> str:
        return ", ".join(s.name for s in obj.services.all())

    @admin.display(description="Commander")
    def commander_display(self, obj: Incident) -> str:
        return getattr(obj, "commander_name", None) or "—"

    @admin.display(description="Age", ordering="created_at")
    def age_display(self, obj: Incident) -> str:
        return humanize_duration(timezone.now() - obj.created_at)

    # --- forms ------------------------------------------------------------------------------

    def get_fieldsets(self, request, obj=None):
        main = [
            "title",
            "summary",
            "severity",
            "services",
            "team",
            "impact",
            "customer_impact",
            "is_drill",
        ]
        if obj is None:
            return [(None, {"fields": [*main, "detected_at"]})]
        return [
            (
                None,
                {
                    "fields": [
                        "reference",
                        "status_display",
                        "sla_display",
                        *main,
                        "false_positive",
                        "runbook",
                    ]
                },
            ),
            (
                "Timestamps and deadlines",
                {
                    "classes": ["collapse"],
                    "fields": ["detected_at", *TIMESTAMP_FIELDS],
                },
            ),
        ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        fixed = [*self.readonly_fields, "severity", "detected_at"]
        if obj.status == IncidentStatus.CLOSED:
            fixed += [f for f in services.EDITABLE_FIELDS if f not in fixed]
        return fixed

    def get_changeform_initial_data(self, request):
        initial = super().get_changeform_initial_data(request)
        initial.setdefault("detected_at", timezone.now())
        return initial

    def save_model(self, request, obj, form, change):
        """Declaring and editing go through the services, which record the timeline."""
        if change:
            changes = {
                f: form.cleaned_data[f] for f in form.changed_data if f in services.EDITABLE_FIELDS
            }
            if changes:
                services.incident_update(incident=obj, changes=changes, actor=request.user)
            return
        data = form.cleaned_data
        incident = services.incident_declare(
            title=data["title"],
            summary=data.get("summary", ""),
            severity=data["severity"],
            services=data.get("services") or [],
            team=data.get("team"),
            impact=data.get("impact") or "none",
            customer_impact=data.get("customer_impact", ""),
            is_drill=data.get("is_drill", False),
            detected_at=data.get("detected_at"),
            actor=request.user,
        )
        obj.pk, obj.number, obj.reference = incident.pk, incident.number, incident.reference

    def save_related(self, request, form, formsets, change):
        """Services already saved the many-to-many fields (with timeline events); the
        read-only timeline formset saves nothing but is still processed."""
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)

    def has_delete_permission(self, request, obj=None):
        # Incidents are records: they are closed, never deleted.
        return False

    # --- the change page: transitions, notes, roles -----------------------------------------

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path(
                "users/autocomplete/",
                view(self.user_autocomplete_view),
                name="incidents_incident_user_autocomplete",
            ),
            path(
                "<path:object_id>/transition/",
                view(self.transition_view),
                name="incidents_incident_transition_form",
            ),
            path(
                "<path:object_id>/transition/<str:status>/",
                view(self.transition_view),
                name="incidents_incident_transition",
            ),
            path("<path:object_id>/note/", view(self.note_view), name="incidents_incident_note"),
            path(
                "<path:object_id>/status-update/",
                view(self.status_update_view),
                name="incidents_incident_status_update",
            ),
            path(
                "<path:object_id>/assign-role/",
                view(self.role_view),
                name="incidents_incident_assign_role",
            ),
            *super().get_urls(),
        ]

    def user_autocomplete_view(self, request):
        """Active usernames matching `term`, for the role picker (select2's JSON shape)."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        term = request.GET.get("term", "").strip()
        users = get_user_model().objects.filter(is_active=True).order_by("username")
        if term:
            users = users.filter(username__icontains=term)
        try:
            page = max(1, int(request.GET.get("page", "1")))
        except ValueError:
            page = 1
        size = 20
        rows = list(users.values_list("pk", "username")[(page - 1) * size : page * size + 1])
        return JsonResponse(
            {
                "results": [{"id": str(pk), "text": name} for pk, name in rows[:size]],
                "pagination": {"more": len(rows) > size},
            }
        )

    def _changeable(self, request: HttpRequest, object_id: str) -> Incident:
        incident = self.get_object(request, unquote(object_id))
        if incident is None:
            raise Http404("No such incident.")
        if not self.has_change_permission(request, incident):
            raise PermissionDenied
        return incident

    def _back(self, incident: Incident) -> HttpResponseRedirect:
        return HttpResponseRedirect(reverse("admin:incidents_incident_change", args=[incident.pk]))

    def _run(self, request, incident: Incident, call, success: str) -> HttpResponseRedirect:
        """Call one service; show its domain error, or `success`, as an admin message."""
        try:
            call()
        except DomainError as error:
            self.message_user(request, str(error), messages.ERROR)
        else:
            self.message_user(request, success, messages.SUCCESS)
        return self._back(incident)

    def transition_view(self, request, object_id, status=None):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        incident = self._changeable(request, object_id)
        status = status or request.POST.get("to", "")
        message = request.POST.get("message", "")
        if status == incident.status:
            self.message_user(request, f"{incident.reference} is already {status}.", messages.INFO)
            return self._back(incident)
        if status == IncidentStatus.ACKNOWLEDGED:
            call = partial(services.incident_acknowledge, incident=incident, actor=request.user)
        elif status == IncidentStatus.RESOLVED:
            call = partial(
                services.incident_resolve, incident=incident, actor=request.user, resolution=message
            )
        else:
            call = partial(
                services.incident_transition,
                incident=incident,
                to=status,
                actor=request.user,
                message=message,
            )
        return self._run(request, incident, call, f"{incident.reference} is now {status}.")

    def status_update_view(self, request, object_id):
        return post_update_view(self, request, object_id)

    def note_view(self, request, object_id):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        incident = self._changeable(request, object_id)
        form = NoteForm(request.POST)
        if not form.is_valid():
            self.message_user(
                request, "The note was not added: it is empty or too long.", messages.ERROR
            )
            return self._back(incident)
        return self._run(
            request,
            incident,
            partial(
                services.incident_add_note,
                incident=incident,
                body=form.cleaned_data["body"],
                actor=request.user,
            ),
            "Note added to the timeline.",
        )

    def role_view(self, request, object_id):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        incident = self._changeable(request, object_id)
        form = RoleForm(request.POST)
        if not form.is_valid():
            problems = "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items())
            self.message_user(request, f"The role was not assigned: {problems}", messages.ERROR)
            return self._back(incident)
        role, user = form.cleaned_data["role"], form.cleaned_data["user"]
        return self._run(
            request,
            incident,
            partial(
                services.incident_assign_role,
                incident=incident,
                role=role,
                user=user,
                actor=request.user,
            ),
            f"{role}: {user.get_username()}.",
        )

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        """A domain refusal while saving (the incident closed meanwhile, a concurrent change)
        is shown as a message on the form; nothing is saved."""
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except DomainError as error:
            self.message_user(request, f"Not saved: {error}", messages.ERROR)
            if object_id:
                return HttpResponseRedirect(request.path)
            return HttpResponseRedirect(reverse("admin:incidents_incident_changelist"))

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and obj.pk:
            context.update(
                legal_transitions=[(s, IncidentStatus(s).label) for s in obj.legal_transitions]
                if self.has_change_permission(request, obj)
                else [],
                current_roles=RoleAssignment.objects.filter(
                    incident=obj, until__isnull=True
                ).select_related("role", "user"),
                note_form=NoteForm(),
                role_form=RoleForm(admin_site=self.admin_site),
                **self._alert_context(obj),
                **status_update_context(request, self, obj),
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    ALERTS_SHOWN = 20

    def _alert_context(self, obj: Incident) -> dict:
        """The runbook (steps rendered safely), the latest alerts, and where a merge went."""
        runbook = obj.runbook
        alerts = list(
            obj.alerts.select_related("integration").order_by("-last_received_at", "-pk")[
                : self.ALERTS_SHOWN + 1
            ]
        )
        return {
            "runbook": runbook,
            "runbook_steps": render_markdown(runbook.steps) if runbook else "",
            # Only web links: a playbook file could hold any text in this field.
            "runbook_url": runbook.url
            if runbook and runbook.url.lower().startswith(("https://", "http://"))
            else "",
            "alerts": alerts[: self.ALERTS_SHOWN],
            "alerts_more": len(alerts) > self.ALERTS_SHOWN,
            "merged_into": (
                Incident.objects.only("pk", "reference", "title").get(pk=obj.merged_into_id)
                if obj.merged_into_id
                else None
            ),
            "merged_incidents": list(
                Incident.objects.filter(merged_into=obj)
                .only("pk", "reference", "title")
                .order_by("number")
            ),
        }

    # --- bulk actions -------------------------------------------------------------------------

    def get_actions(self, request):
        actions = super().get_actions(request)
        if self.has_change_permission(request):
            for severity in Severity.objects.all():
                name = f"set_severity_{severity.level}"
                actions[name] = (
                    self._severity_action(severity),
                    name,
                    f"Change severity to {severity.name}",
                )
        return actions

    def _severity_action(self, severity: Severity):
        def action(modeladmin, request, queryset):
            modeladmin._apply(
                request,
                queryset,
                f"changed to {severity.name}",
                lambda incident: services.incident_change_severity(
                    incident=incident, severity=severity, actor=request.user
                ),
                already=lambda incident: incident.severity_id == severity.pk,
            )

        return action

    def _apply(self, request, queryset: QuerySet[Incident], done: str, call, already=None) -> None:
        """Run one service per selected incident; report every refusal with its reason, and
        incidents that were already in the requested state."""
        succeeded: list[str] = []
        unchanged: list[str] = []
        for incident in queryset.order_by("number"):
            if already is not None and already(incident):
                unchanged.append(incident.reference)
                continue
            try:
                call(incident)
            except DomainError as error:
                self.message_user(
                    request, f"{incident.reference} refused: {error}", messages.WARNING
                )
            else:
                succeeded.append(incident.reference)
        if succeeded:
            self.message_user(request, f"{', '.join(succeeded)} {done}.", messages.SUCCESS)
        if unchanged:
            self.message_user(
                request, f"{', '.join(unchanged)} already {done}: unchanged.", messages.INFO
            )

    @admin.action(description="Acknowledge selected incidents", permissions=["change"])
    def acknowledge(self, request, queryset):
        self._apply(
            request,
            queryset,
            "acknowledged",
            lambda incident: services.incident_acknowledge(incident=incident, actor=request.user),
            already=lambda incident: incident.is_open and incident.acknowledged_at is not None,
        )

    @admin.action(description="Assign me as Incident Commander", permissions=["change"])
    def assign_me_commander(self, request, queryset):
        role = Role.objects.filter(slug=COMMANDER_SLUG).first()
        if role is None:
            self.message_user(request, "There is no Incident Commander role.", messages.ERROR)
            return

        def already(incident):
            return RoleAssignment.objects.filter(
                incident=incident, role=role, user=request.user, until__isnull=True
            ).exists()

        self._apply(
            request,
            queryset,
            f"now commanded by {request.user.get_username()}",
            lambda incident: services.incident_assign_role(
                incident=incident, role=role, user=request.user, actor=request.user
            ),
            already=already,
        )

    @admin.action(description="Escalate to the next level now", permissions=["change"])
    def escalate(self, request, queryset):
        from escalation.services import incident_escalate

        self._apply(
            request,
            queryset,
            "escalated: the next level is paged at the next engine tick",
            lambda incident: incident_escalate(incident=incident, actor=request.user),
        )

    @admin.action(description="Merge selected incidents into…", permissions=["change"])
    def merge_into(self, request, queryset):
        """Django's confirmation step: the first POST shows a form for the surviving
        incident; the second (with `post`) merges each selected incident into it."""
        confirmed = request.POST.get("post") == "yes"
        form = MergeForm(request.POST if confirmed else None)
        if confirmed and form.is_valid():
            target, reason = form.cleaned_data["target"], form.cleaned_data["reason"]
            self._apply(
                request,
                queryset,
                f"merged into {target.reference}",
                lambda incident: services.incident_merge(
                    source=incident, target=target, actor=request.user, reason=reason
                ),
                already=lambda incident: incident.merged_into_id == target.pk,
            )
            return None
        return TemplateResponse(
            request,
            "admin/incidents/incident/merge_confirmation.html",
            {
                **self.admin_site.each_context(request),
                "title": "Merge incidents",
                "opts": self.opts,
                "incidents": list(queryset.order_by("number").select_related("severity")),
                "form": form,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            },
        )

    @admin.action(description="Resolve selected incidents", permissions=["change"])
    def resolve(self, request, queryset):
        self._apply(
            request,
            queryset,
            "resolved",
            lambda incident: services.incident_resolve(incident=incident, actor=request.user),
            already=lambda incident: incident.status == IncidentStatus.RESOLVED,
        )


@admin.register(TimelineEvent)
class TimelineEventAdmin(admin.ModelAdmin):
    """A read-only view across every incident's timeline."""

    list_display = ["at", "incident", "kind", "actor", "previous", "value", "message"]
    list_filter = ["kind"]
    list_select_related = ["incident", "actor"]
    search_fields = ["incident__reference", "message"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
