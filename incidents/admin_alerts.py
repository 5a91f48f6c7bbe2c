"""Admin for alert ingestion: integrations (with their tokens), alerts, runbooks and the
routes from alerts to runbooks. Display, filters and actions that call services.

A token exists in clear only in the response that creates or rotates it: it is rendered
on that page (never put in a message, which would sit in a cookie or the session until
shown) and only its hash is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import DateTimeField, ExpressionWrapper, F
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html

from .exceptions import DomainError
from .formatting import humanize_duration
from .ingestion.intake import deliveries_requeue
from .ingestion.services import (
    INTEGRATION_EDITABLE,
    integration_create,
    integration_rotate_token,
    integration_update,
)
from .markdown import render_markdown
from .models import (
    Alert,
    AlertDelivery,
    AlertRoute,
    DeliveryStatus,
    Integration,
    IntegrationKind,
    Runbook,
    Severity,
)
from .pagination import EstimatedCountPaginator

ADMIN_CSS = {"all": ["incidents/admin.css"]}
SHOWN_ONCE_TEMPLATE = "admin/incidents/integration/token.html"
ROTATE_TEMPLATE = "admin/incidents/integration/rotate_confirmation.html"


# --- where a sender posts ------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    """Where an integration's sender delivers: the webhook URL, the Events v2 routing key
    (the token itself) and, when heartbeats are expected, the heartbeat URL."""

    webhook_url: str
    routing_key: str = ""
    heartbeat_url: str = ""


def integration_endpoints(integration: Integration, token: str) -> Endpoints:
    """The full URLs (from settings.SITE_URL) for `integration` with `token`."""
    base = settings.SITE_URL
    heartbeat = (
        base + reverse("webhook-heartbeat", args=[token]) if integration.heartbeat_interval else ""
    )
    if integration.kind == IntegrationKind.EVENTS_V2:
        return Endpoints(base + reverse("events-v2-enqueue"), token, heartbeat)
    name = (
        "webhook-alertmanager"
        if integration.kind == IntegrationKind.ALERTMANAGER
        else "webhook-generic"
    )
    return Endpoints(base + reverse(name, args=[token]), "", heartbeat)


def _token_response(request, admin_site, opts, rows, title: str) -> TemplateResponse:
    """The one page that shows tokens; it must not be cached anywhere."""
    response = TemplateResponse(
        request,
        SHOWN_ONCE_TEMPLATE,
        {
            **admin_site.each_context(request),
            "title": title,
            "opts": opts,
            "rows": rows,
            "changelist_url": reverse("admin:incidents_integration_changelist"),
        },
    )
    add_never_cache_headers(response)
    return response


# --- integrations --------------------------------------------------------------------------


class IntegrationForm(forms.ModelForm):
    class Meta:
        model = Integration
        # What the integration_update service may change, and the kind when adding.
        fields = ["name", "kind", *INTEGRATION_EDITABLE[1:]]

    def clean_severity_map(self):
        value = self.cleaned_data.get("severity_map")
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise forms.ValidationError(
                'Enter an object of label value to severity level, e.g. {"critical": 1}.'
            )
        levels = set(Severity.objects.values_list("level", flat=True))
        known = ", ".join(str(level) for level in sorted(levels)) or "none configured"
        for key, level in value.items():
            if not key.strip():
                raise forms.ValidationError("A label value may not be blank.")
            if isinstance(level, bool) or not isinstance(level, int):
                raise forms.ValidationError(
                    f"{key!r}: the severity must be a level number, not {level!r}."
                )
            if level not in levels:
                raise forms.ValidationError(
                    f"{key!r}: there is no severity level {level} (levels: {known})."
                )
        return value

    def clean_grouping_keys(self):
        value = self.cleaned_data.get("grouping_keys")
        if value in (None, ""):
            return []
        if not isinstance(value, list):
            raise forms.ValidationError('Enter a list of label names, e.g. ["alertname"].')
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise forms.ValidationError(
                    f"Each grouping key must be a label name (text); got {item!r}."
                )
        if len(set(value)) != len(value):
            raise forms.ValidationError("A label name is listed twice.")
        return value


@admin.register(Integration)
class IntegrationAdmin(admin.ModelAdmin):
    form = IntegrationForm
    list_display = [
        "name",
        "kind",
        "is_active",
        "token_display",
        "last_received_at",
        "alerts_received",
        "requests_rejected",
        "heartbeat_display",
    ]
    list_filter = ["kind", "is_active"]
    list_select_related: list[str] = []
    search_fields = ["name"]
    autocomplete_fields = ["default_service", "default_team"]
    actions = ["rotate_tokens"]
    change_form_template = "admin/incidents/integration/change_form.html"
    readonly_fields = [
        "token_display",
        "token_rotated_at",
        "endpoint_display",
        "created_at",
        "last_received_at",
        "alerts_received",
        "requests_rejected",
        "last_heartbeat_at",
        "heartbeat_due_at",
    ]

    class Media:
        css = ADMIN_CSS

    @admin.display(description="Token", ordering="token_prefix")
    def token_display(self, obj: Integration) -> str:
        return f"{obj.token_prefix}…" if obj.token_prefix else "—"

    @admin.display(description="Heartbeat due", ordering="heartbeat_due_at")
    def heartbeat_display(self, obj: Integration) -> str:
        if not obj.heartbeat_interval:
            return "—"
        every = f"every {humanize_duration(obj.heartbeat_interval)}"
        if obj.heartbeat_due_at is None:
            return f"{every}; waiting for the first ping"
        due = timezone.localtime(obj.heartbeat_due_at).strftime("%Y-%m-%d %H:%M")
        late = " (missed)" if obj.heartbeat_due_at <= timezone.now() else ""
        return f"{due}{late}; {every}"

    @admin.display(description="Endpoint")
    def endpoint_display(self, obj: Integration) -> str:
        if obj.pk is None:
            return "—"
        endpoints = integration_endpoints(obj, "<token>")
        text = endpoints.webhook_url
        if endpoints.routing_key:
            text += " (routing_key: the token)"
        if endpoints.heartbeat_url:
            text += f"; heartbeats: {endpoints.heartbeat_url}"
        return text

    def get_fieldsets(self, request, obj=None):
        config = [f for f in INTEGRATION_EDITABLE if f not in ("name", "is_active")]
        if obj is None:
            return [(None, {"fields": ["name", "kind", "is_active", *config]})]
        return [
            (None, {"fields": ["name", "kind", "is_active", "token_display", "endpoint_display"]}),
            ("How alerts become incidents", {"fields": config}),
            (
                "Activity",
                {
                    "fields": [
                        "created_at",
                        "token_rotated_at",
                        "last_received_at",
                        "alerts_received",
                        "requests_rejected",
                        "last_heartbeat_at",
                        "heartbeat_due_at",
                    ]
                },
            ),
        ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        # The kind decides which endpoint accepts the token: fixed once senders use it.
        return [*self.readonly_fields, "kind"]

    def save_model(self, request, obj, form, change):
        """Adding goes through the service, which makes the token; editing writes only the
        fields the form changed, so it never puts back a token hash, counter or heartbeat
        time that the webhooks or a rotation changed meanwhile."""
        if change:
            changed = [name for name in form.changed_data if name in INTEGRATION_EDITABLE]
            integration_update(
                integration=obj, changes={name: form.cleaned_data[name] for name in changed}
            )
            return
        data = dict(form.cleaned_data)
        integration, token = integration_create(
            name=data.pop("name"),
            kind=data.pop("kind"),
            default_severity=data.pop("default_severity"),
            heartbeat_interval=data.pop("heartbeat_interval"),
            **data,
        )
        obj.pk, obj.token_prefix, obj.token_hash = (
            integration.pk,
            integration.token_prefix,
            integration.token_hash,
        )
        obj.heartbeat_due_at, obj.created_at = integration.heartbeat_due_at, integration.created_at
        obj._state.adding = False
        obj.issued_token = token

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        """A refusal by the service (a name taken meanwhile) is shown as a message."""
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except DomainError as error:
            self.message_user(request, f"Not saved: {error}", messages.ERROR)
            return HttpResponseRedirect(request.path)

    def response_add(self, request, obj, post_url_continue=None):
        token = getattr(obj, "issued_token", None)
        if token is None:
            return super().response_add(request, obj, post_url_continue)
        return _token_response(
            request,
            self.admin_site,
            self.opts,
            [(obj, token, integration_endpoints(obj, token))],
            f"Integration “{obj.name}” created",
        )

    # --- token rotation ----------------------------------------------------------------------

    def get_urls(self):
        return [
            path(
                "<path:object_id>/rotate-token/",
                self.admin_site.admin_view(self.rotate_token_view),
                name="incidents_integration_rotate_token",
            ),
            *super().get_urls(),
        ]

    def _rotate(self, request, integrations: list[Integration]) -> TemplateResponse:
        rows = []
        for integration in integrations:
            token = integration_rotate_token(integration=integration)
            self.log_change(request, integration, "Rotated the token.")
            rows.append((integration, token, integration_endpoints(integration, token)))
        names = ", ".join(i.name for i in integrations)
        return _token_response(request, self.admin_site, self.opts, rows, f"New token for {names}")

    def _rotate_confirmation(self, request, integrations, *, bulk: bool) -> TemplateResponse:
        return TemplateResponse(
            request,
            ROTATE_TEMPLATE,
            {
                **self.admin_site.each_context(request),
                "title": "Rotate tokens?",
                "opts": self.opts,
                "integrations": integrations,
                "bulk": bulk,
                "cache_seconds": f"{settings.INTEGRATION_CACHE_SECONDS:g}",
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "changelist_url": reverse("admin:incidents_integration_changelist"),
            },
        )

    def rotate_token_view(self, request, object_id):
        """GET asks for confirmation; POST rotates and shows the new token once."""
        integration = self.get_object(request, unquote(object_id))
        if integration is None:
            raise Http404("No such integration.")
        if not self.has_change_permission(request, integration):
            raise PermissionDenied
        if request.method == "POST":
            return self._rotate(request, [integration])
        return self._rotate_confirmation(request, [integration], bulk=False)

    @admin.action(description="Rotate the token of selected integrations", permissions=["change"])
    def rotate_tokens(self, request, queryset):
        integrations = list(queryset.order_by("name"))
        if request.POST.get("post") == "yes":
            return self._rotate(request, integrations)
        return self._rotate_confirmation(request, integrations, bulk=True)


# --- alerts --------------------------------------------------------------------------------


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    """Alerts are what senders said: read-only here."""

    list_display = [
        "__str__",
        "integration",
        "status",
        "incident_link",
        "count",
        "first_received_at",
        "last_received_at",
    ]
    list_filter = ["status", "integration"]
    list_select_related = ["integration", "incident"]
    search_fields = ["=fingerprint", "name"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 50
    fields = [
        "integration",
        "incident_link",
        "status",
        "name",
        "summary",
        "source",
        "severity_label",
        "fingerprint",
        "group_key",
        "count",
        "starts_at",
        "ends_at",
        "first_received_at",
        "last_received_at",
        "resolved_at",
        "labels",
        "annotations",
        "payload",
    ]
    readonly_fields = fields

    @admin.display(description="Incident", ordering="incident__number")
    def incident_link(self, obj: Alert):
        if obj.incident_id is None:
            return "—"
        return format_html(
            '<a href="{}">{}</a>',
            reverse("admin:incidents_incident_change", args=[obj.incident_id]),
            obj.incident.reference,
        )

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(AlertDelivery)
class AlertDeliveryAdmin(admin.ModelAdmin):
    """Accepted webhook requests as received, and whether the worker has applied them.
    Read-only, except that failed ones can be queued again once their cause is fixed."""

    list_display = [
        "__str__",
        "integration",
        "status",
        "alerts",
        "received_at",
        "applied_at",
        "attempts",
        "short_error",
    ]
    list_filter = ["status", "integration"]
    list_select_related = ["integration"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 50
    fields = [
        "integration",
        "status",
        "alerts",
        "received_at",
        "applied_at",
        "attempts",
        "error",
        "incidents",
        "body",
    ]
    readonly_fields = fields
    actions = ["requeue"]

    @admin.display(description="Error")
    def short_error(self, obj: AlertDelivery) -> str:
        return obj.error[:80]

    @admin.action(description="Queue the selected failed deliveries again", permissions=["change"])
    def requeue(self, request, queryset):
        failed = queryset.filter(status=DeliveryStatus.FAILED).values_list("pk", flat=True)
        count = deliveries_requeue(ids=failed)
        skipped = queryset.count() - count
        message = f"{count} queued again; they are applied within seconds."
        if skipped:
            message += f" {skipped} not failed, left as they were."
        self.message_user(request, message, messages.SUCCESS if count else messages.WARNING)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        # The change permission allows the requeue action only: every field is read-only.
        return super().has_change_permission(request, obj)

    def save_model(self, request, obj, form, change):
        # Nothing is editable, and saving the whole row would write back a status the
        # worker may have changed since the page was loaded.
        return

    def render_change_form(self, request, context, *args, **kwargs):
        context.update(
            show_save=False, show_save_and_continue=False, show_save_and_add_another=False
        )
        return super().render_change_form(request, context, *args, **kwargs)

    def has_delete_permission(self, request, obj=None):
        return False


# --- runbooks ------------------------------------------------------------------------------


def _start_of_today() -> datetime:
    return datetime.combine(timezone.localdate(), time.min, tzinfo=UTC)


class ReviewFilter(admin.SimpleListFilter):
    """Review state computed in the database: due = last review + interval."""

    title = "review"
    parameter_name = "review"

    def lookups(self, request, model_admin):
        return [("overdue", "Overdue"), ("ok", "Up to date"), ("never", "Never reviewed")]

    def queryset(self, request, queryset):
        if self.value() == "never":
            return queryset.filter(last_reviewed_at__isnull=True)
        if self.value() not in ("overdue", "ok"):
            return queryset
        reviewed = queryset.filter(last_reviewed_at__isnull=False).annotate(
            review_due=ExpressionWrapper(
                F("last_reviewed_at") + F("review_interval"), output_field=DateTimeField()
            )
        )
        if self.value() == "overdue":
            return reviewed.filter(review_due__lt=_start_of_today())
        return reviewed.filter(review_due__gte=_start_of_today())


@admin.register(Runbook)
class RunbookAdmin(admin.ModelAdmin):
    list_display = [
        "code",
        "title",
        "severity",
        "review_due_display",
        "review_overdue_display",
    ]
    list_display_links = ["code", "title"]
    list_filter = [ReviewFilter, "severity"]
    list_select_related = ["severity"]
    search_fields = ["code", "title"]
    fields = [
        "code",
        "title",
        "severity",
        "scope",
        "steps",
        "steps_preview",
        "url",
        "review_interval",
        "last_reviewed_at",
        "review_due_display",
    ]
    readonly_fields = ["steps_preview", "review_due_display"]

    class Media:
        css = ADMIN_CSS

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "url":
            kwargs["assume_scheme"] = "https"
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    @admin.display(description="Review due")
    def review_due_display(self, obj: Runbook) -> str:
        if obj.pk is None:
            return "—"
        due = obj.review_due_on()
        return due.isoformat() if due else "never reviewed"

    @admin.display(description="Review overdue", boolean=True)
    def review_overdue_display(self, obj: Runbook) -> bool:
        return obj.review_overdue()

    @admin.display(description="Steps as shown")
    def steps_preview(self, obj: Runbook):
        if obj.pk is None or not obj.steps:
            return "—"
        return format_html('<div class="runbook-steps">{}</div>', render_markdown(obj.steps))


# --- alert routes --------------------------------------------------------------------------


class AlertRouteForm(forms.ModelForm):
    class Meta:
        model = AlertRoute
        fields = [
            "position",
            "integration",
            "alert_name",
            "match_labels",
            "runbook",
            "severity",
            "service",
            "team",
            "is_active",
        ]

    def clean_alert_name(self):
        name = (self.cleaned_data.get("alert_name") or "").strip()
        if not name:
            raise forms.ValidationError("Give an alert name or a pattern.")
        return name

    def clean_match_labels(self):
        value = self.cleaned_data.get("match_labels")
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise forms.ValidationError('Enter an object of label to value, e.g. {"env": "prod"}.')
        for key, label_value in value.items():
            if not key.strip():
                raise forms.ValidationError("A label name may not be blank.")
            if not isinstance(label_value, str):
                raise forms.ValidationError(
                    f"{key!r}: the value must be text (in quotes), not {label_value!r}."
                )
        return value


@admin.register(AlertRoute)
class AlertRouteAdmin(admin.ModelAdmin):
    form = AlertRouteForm
    list_display = [
        "position",
        "alert_name",
        "labels_display",
        "integration",
        "runbook",
        "severity",
        "service",
        "team",
        "is_active",
    ]
    list_display_links = ["alert_name"]
    list_editable = ["position"]
    list_filter = ["is_active", "runbook", "integration"]
    list_select_related = ["integration", "runbook", "severity", "service", "team"]
    ordering = ["position", "pk"]
    search_fields = ["alert_name"]
    autocomplete_fields = ["integration", "runbook", "service", "team"]

    @admin.display(description="Labels")
    def labels_display(self, obj: AlertRoute) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted((obj.match_labels or {}).items())) or "—"
