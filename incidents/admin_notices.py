"""Admin for customer notices (issue 6): subscribers, notices (compose -> preview -> send) and
their per-recipient deliveries. Display and actions that call `incidents.comms.notices`;
no logic here.

Subscribers come only through the public form (double opt-in): the admin lists them and can
unsubscribe them, never add one. Deliveries are records: read-only.
"""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.contrib.admin.widgets import AutocompleteSelect
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import Http404, HttpRequest, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from .comms import notices
from .exceptions import DomainError, InvalidInput
from .models import (
    CustomerNotice,
    DeliveryState,
    Incident,
    MaintenanceWindow,
    MessageTemplate,
    NoticeDelivery,
    NoticeStatus,
    Service,
    Subscriber,
    TemplateKind,
)
from .pagination import EstimatedCountPaginator

# Failed and unknown deliveries shown on a notice's page; the rest are in the delivery list.
PROBLEMS_SHOWN = 20


class ReadOnlyFormMixin:
    """Every field is read-only: rows change only through their services (a save here would
    write back a stale copy over a concurrent unsubscribe or send). No save buttons."""

    def save_model(self, request, obj, form, change):
        pass

    def save_related(self, request, form, formsets, change):
        pass

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
        }
        return super().change_view(request, object_id, form_url, extra_context)


# --- subscribers ----------------------------------------------------------------------------


class _YesNoFilter(admin.SimpleListFilter):
    field = ""

    def lookups(self, request, model_admin):
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request, queryset):
        if self.value() in {"yes", "no"}:
            return queryset.filter(**{f"{self.field}__isnull": self.value() == "no"})
        return queryset


class ConfirmedFilter(_YesNoFilter):
    title = "confirmed"
    parameter_name = "confirmed"
    field = "confirmed_at"


class UnsubscribedFilter(_YesNoFilter):
    title = "unsubscribed"
    parameter_name = "unsubscribed"
    field = "unsubscribed_at"


@admin.register(Subscriber)
class SubscriberAdmin(ReadOnlyFormMixin, admin.ModelAdmin):
    list_display = [
        "email",
        "state_display",
        "services_display",
        "all_services",
        "created_at",
        "confirmed_at",
        "unsubscribed_at",
    ]
    list_filter = [ConfirmedFilter, UnsubscribedFilter, "all_services", "services"]
    search_fields = ["email"]
    ordering = ["email"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 100
    actions = ["unsubscribe"]
    fields = [
        "email",
        "state_display",
        "services_display",
        "all_services",
        "created_at",
        "confirmation_sent_at",
        "confirmed_at",
        "unsubscribed_at",
    ]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("services")

    def has_add_permission(self, request):
        # Only the address's owner subscribes it, through the public form (double opt-in).
        return False

    @admin.display(description="state")
    def state_display(self, obj: Subscriber) -> str:
        if obj.unsubscribed_at is not None:
            return "Unsubscribed"
        return "Confirmed" if obj.confirmed_at is not None else "Waiting for confirmation"

    @admin.display(description="services")
    def services_display(self, obj: Subscriber) -> str:
        if obj.all_services:
            return "All services"
        return ", ".join(sorted(service.name for service in obj.services.all())) or "-"

    @admin.action(description="Unsubscribe selected subscribers", permissions=["change"])
    def unsubscribe(self, request, queryset):
        done = 0
        for token in queryset.filter(unsubscribed_at__isnull=True).values_list(
            "unsubscribe_token", flat=True
        ):
            notices.subscriber_unsubscribe(token=token)
            done += 1
        self.message_user(request, f"{done} subscriber(s) unsubscribed.", messages.SUCCESS)


# --- notices --------------------------------------------------------------------------------


class ComposeForm(forms.Form):
    kind = forms.ChoiceField(choices=TemplateKind.choices, initial=TemplateKind.CUSTOMER_NOTICE)
    incident = forms.ModelChoiceField(
        queryset=Incident.objects.all(),
        required=False,
        help_text="What the notice is about: an incident, or a maintenance window below.",
    )
    maintenance = forms.ModelChoiceField(
        queryset=MaintenanceWindow.objects.none(),
        required=False,
        label="Maintenance window",
    )
    template = forms.ModelChoiceField(
        queryset=MessageTemplate.objects.order_by("kind", "name"),
        required=False,
        help_text="Empty: the default template of the kind (or the built-in one).",
    )
    services = forms.ModelMultipleChoiceField(
        queryset=Service.objects.filter(is_public=True).order_by("name"),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Empty: the public services of the incident or the window.",
    )

    def __init__(self, *args, admin_site=None, **kwargs):
        super().__init__(*args, **kwargs)
        if admin_site is not None:
            # The admin's select2 search over incidents: the table is too big for a list.
            plain = self.fields["incident"]
            self.fields["incident"] = forms.ModelChoiceField(
                queryset=plain.queryset,
                required=False,
                help_text=plain.help_text,
                widget=AutocompleteSelect(CustomerNotice._meta.get_field("incident"), admin_site),
            )
        # Windows that are still ahead, running or recent: a short list.
        recent = timezone.now() - timedelta(days=30)
        self.fields["maintenance"].queryset = MaintenanceWindow.objects.filter(
            ends_at__gte=recent
        ).order_by("starts_at")


class NoticeChangeList(ChangeList):
    """Counts the deliveries of the notices on the page by state, in one query."""

    def get_results(self, request):
        super().get_results(request)
        counts: dict[int, dict[str, int]] = {}
        ids = [notice.pk for notice in self.result_list]
        rows = (
            NoticeDelivery.objects.filter(notice_id__in=ids)
            .order_by()
            .values_list("notice_id", "status")
            .annotate(n=Count("pk"))
        )
        for notice_id, status, n in rows:
            counts.setdefault(notice_id, {})[status] = n
        for notice in self.result_list:
            notice.delivery_counts = counts.get(notice.pk, {})


def _counts_text(counts: dict[str, int]) -> str:
    shown = [(state.label.lower(), counts.get(state.value, 0)) for state in DeliveryState]
    return ", ".join(f"{n} {label}" for label, n in shown if n) or "none"


@admin.register(CustomerNotice)
class CustomerNoticeAdmin(ReadOnlyFormMixin, admin.ModelAdmin):
    list_display = [
        "subject",
        "kind",
        "about_display",
        "status",
        "recipients",
        "deliveries_display",
        "created_at",
        "sent_at",
    ]
    list_filter = ["status", "kind"]
    list_select_related = ["incident", "maintenance"]
    search_fields = ["subject", "incident__reference"]
    show_full_result_count = False
    list_per_page = 50
    actions = ["send_selected"]
    fields = [
        "subject",
        "kind",
        "about_display",
        "template",
        "services_display",
        "status",
        "recipients",
        "deliveries_display",
        "problems_display",
        "created_by",
        "created_at",
        "send_requested_at",
        "sent_at",
        "preview_display",
    ]
    readonly_fields = fields

    def get_changelist(self, request, **kwargs):
        return NoticeChangeList

    def get_fields(self, request, obj=None):
        fields = list(super().get_fields(request, obj))
        if not notices.may_see_addresses(request.user):
            # The failed/unknown table lists customers' addresses.
            fields.remove("problems_display")
        return fields

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if not notices.may_see_addresses(request.user):
            fields.remove("problems_display")
        return fields

    def has_delete_permission(self, request, obj=None):
        # Only drafts: a sent notice is part of the record.
        if obj is not None and obj.status != NoticeStatus.DRAFT:
            return False
        return super().has_delete_permission(request, obj)

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path(
                "<path:object_id>/preview/",
                view(self.preview_view),
                name="incidents_customernotice_preview",
            ),
            path(
                "<path:object_id>/send/",
                view(self.send_view),
                name="incidents_customernotice_send",
            ),
            *super().get_urls(),
        ]

    # --- display ----------------------------------------------------------------------------

    @admin.display(description="about")
    def about_display(self, obj: CustomerNotice):
        if obj.incident_id:
            url = reverse("admin:incidents_incident_change", args=[obj.incident_id])
            return format_html('<a href="{}">{}</a>', url, obj.incident.reference)
        if obj.maintenance_id:
            return format_html("Maintenance: {}", obj.maintenance.title)
        return "-"

    @admin.display(description="services")
    def services_display(self, obj: CustomerNotice) -> str:
        return ", ".join(obj.services.order_by("name").values_list("name", flat=True)) or "-"

    @admin.display(description="deliveries")
    def deliveries_display(self, obj: CustomerNotice):
        counts = getattr(obj, "delivery_counts", None)
        if counts is None:
            counts = notices.delivery_counts(obj.pk)
        url = reverse("admin:incidents_noticedelivery_changelist") + f"?notice={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, _counts_text(counts))

    @admin.display(description="failed or unknown (latest)")
    def problems_display(self, obj: CustomerNotice):
        rows = list(
            obj.deliveries.filter(status__in=(DeliveryState.FAILED, DeliveryState.UNKNOWN))
            .order_by("-pk")
            .values_list("email", "status", "attempts", "error")[:PROBLEMS_SHOWN]
        )
        if not rows:
            return "-"
        return format_html(
            "<table><tr><th>email</th><th>state</th><th>attempts</th><th>error</th></tr>{}</table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                ((email, status, attempts, error) for email, status, attempts, error in rows),
            ),
        )

    @admin.display(description="preview")
    def preview_display(self, obj: CustomerNotice):
        if not obj.pk:
            return "-"
        url = reverse("admin:incidents_customernotice_preview", args=[obj.pk])
        label = "Preview and send" if obj.status == NoticeStatus.DRAFT else "Preview"
        return format_html('<a class="button" href="{}">{}</a>', url, label)

    # --- compose, preview, send -------------------------------------------------------------

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context=None):
        """Compose: choose what the notice is about, the template and the services; the
        service renders a draft, then the preview page shows it."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            form = ComposeForm(request.POST, admin_site=self.admin_site)
            if form.is_valid():
                data = form.cleaned_data
                try:
                    notice = notices.notice_compose(
                        kind=data["kind"],
                        incident=data["incident"],
                        maintenance=data["maintenance"],
                        template=data["template"],
                        service_ids=[s.pk for s in data["services"]] or None,
                        actor=request.user,
                    )
                except InvalidInput as error:
                    field = error.field if error.field in form.fields else None
                    form.add_error(field, str(error))
                else:
                    self.message_user(
                        request, "Draft saved: check it, then send it.", messages.SUCCESS
                    )
                    return HttpResponseRedirect(
                        reverse("admin:incidents_customernotice_preview", args=[notice.pk])
                    )
        else:
            initial = {
                key: request.GET[key]
                for key in ("incident", "maintenance", "kind")
                if request.GET.get(key)
            }
            form = ComposeForm(initial=initial, admin_site=self.admin_site)
        context = {
            **self.admin_site.each_context(request),
            "title": "Compose a customer notice",
            "opts": self.opts,
            "form": form,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, "admin/incidents/customernotice/compose.html", context)

    def _notice(self, request: HttpRequest, object_id: str) -> CustomerNotice:
        notice = self.get_object(request, unquote(object_id))
        if notice is None:
            raise Http404("No such notice.")
        if not self.has_view_or_change_permission(request, notice):
            raise PermissionDenied
        return notice

    def preview_view(self, request: HttpRequest, object_id: str):
        """The notice as subscribers will get it: subject, plain text, and the HTML part in
        a sandboxed frame (no scripts, no same-origin access), with the recipients."""
        notice = self._notice(request, object_id)
        service_ids = list(notice.services.values_list("pk", flat=True))
        draft = notice.status == NoticeStatus.DRAFT
        sample = notices.notice_email(
            notices._parts(notice),
            email="subscriber@example.org",
            message_id=notices.notice_message_id(notice.pk, 0),
            token="example-token",  # noqa: S106 - a placeholder in the preview
        )
        context = {
            **self.admin_site.each_context(request),
            "title": f"Preview: {notice.subject}",
            "opts": self.opts,
            "original": notice,
            "notice": notice,
            "html_document": sample.alternatives[0][0],
            "text_body": sample.body,
            "headers": [(name, value) for name, value in sample.extra_headers.items()],
            "recipients": notices.notice_recipients(service_ids).count() if draft else None,
            "services": ", ".join(notice.services.order_by("name").values_list("name", flat=True)),
            "can_send": draft and self.has_change_permission(request, notice),
        }
        return TemplateResponse(request, "admin/incidents/customernotice/preview.html", context)

    def send_view(self, request: HttpRequest, object_id: str):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        notice = self._notice(request, object_id)
        if not self.has_change_permission(request, notice):
            raise PermissionDenied
        self._send(request, notice)
        return HttpResponseRedirect(
            reverse("admin:incidents_customernotice_change", args=[notice.pk])
        )

    def _send(self, request: HttpRequest, notice: CustomerNotice) -> None:
        if notice.status != NoticeStatus.DRAFT:
            self.message_user(
                request, f"“{notice.subject}” was already sent: unchanged.", messages.INFO
            )
            return
        try:
            count = notices.notice_send(notice=notice, actor=request.user)
        except DomainError as error:
            self.message_user(request, f"“{notice.subject}” not sent: {error}", messages.ERROR)
            return
        self.message_user(
            request, f"“{notice.subject}” is being sent to {count} subscriber(s).", messages.SUCCESS
        )

    @admin.action(description="Send selected draft notices", permissions=["change"])
    def send_selected(self, request, queryset: QuerySet[CustomerNotice]):
        for notice in queryset.order_by("pk"):
            self._send(request, notice)


# --- deliveries -----------------------------------------------------------------------------


class NoticeFilter(admin.SimpleListFilter):
    title = "notice"
    parameter_name = "notice"
    SHOWN = 20

    def lookups(self, request, model_admin):
        rows = CustomerNotice.objects.order_by("-pk").values_list("pk", "subject")[: self.SHOWN]
        choices = [(str(pk), f"#{pk} {subject[:60]}") for pk, subject in rows]
        value = self.value()
        if value and value not in {pk for pk, _ in choices} and value.isdigit():
            choices.append((value, f"#{value}"))
        return choices

    def queryset(self, request, queryset):
        value = self.value()
        if value:
            if not value.isdigit():
                return queryset.none()
            return queryset.filter(notice_id=int(value))
        return queryset


@admin.register(NoticeDelivery)
class NoticeDeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "email",
        "notice_display",
        "status",
        "attempts",
        "sent_display",
        "error_display",
        "message_id",
    ]
    list_filter = ["status", NoticeFilter]
    list_select_related = ["notice"]
    search_fields = ["=email", "=message_id"]
    ordering = ["-pk"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 100
    fields = [
        "notice",
        "email",
        "status",
        "attempts",
        "sent_display",
        "error",
        "message_id",
        "created_at",
    ]
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="notice")
    def notice_display(self, obj: NoticeDelivery):
        url = reverse("admin:incidents_customernotice_change", args=[obj.notice_id])
        return format_html('<a href="{}">#{} {}</a>', url, obj.notice_id, obj.notice.subject)

    @admin.display(description="sent at")
    def sent_display(self, obj: NoticeDelivery):
        # While sending, `sent_at` holds when the attempt started, and while pending after a
        # failed attempt when the next one is due: neither is a sending time.
        return obj.sent_at if obj.status == DeliveryState.SENT else "-"

    @admin.display(description="error")
    def error_display(self, obj: NoticeDelivery) -> str:
        return obj.error if len(obj.error) <= 120 else obj.error[:117] + "..."


def notify_customers(modeladmin, request, queryset: QuerySet[Incident]):
    """The incident changelist's action: compose a customer notice about one incident."""
    incidents = list(queryset.values_list("pk", flat=True)[:2])
    if len(incidents) != 1:
        modeladmin.message_user(
            request, "Choose exactly one incident to notify customers about.", messages.WARNING
        )
        return None
    url = reverse("admin:incidents_customernotice_add")
    return HttpResponseRedirect(f"{url}?incident={incidents[0]}")


notify_customers.short_description = "Notify customers about this incident…"
# Composing also needs the add permission on notices (checked by the compose page).
notify_customers.allowed_permissions = ("change",)
