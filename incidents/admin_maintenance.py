"""Admin for maintenance windows: schedule, change, cancel and announce them. The form shows
the services' validation beside its fields; saving and the actions call the services in
`incidents.comms.maintenance` and nothing else."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpResponseRedirect
from django.utils import timezone
from django.utils.html import format_html

from .comms.maintenance import (
    WindowState,
    maintenance_announce,
    maintenance_cancel,
    maintenance_schedule,
    maintenance_update,
    maintenance_validate,
    window_state,
)
from .exceptions import DomainError, InvalidInput
from .models import MaintenanceWindow

ADMIN_CSS = {"all": ["incidents/admin.css"]}
FORM_FIELDS = ["title", "description", "services", "starts_at", "ends_at"]
# The form's field for each field name a service's InvalidInput may carry.
ERROR_FIELDS = {"service_ids": "services", "window": None}


def _message(error: InvalidInput) -> str:
    return str(error).removeprefix(f"{error.field}: ")


class MaintenanceWindowForm(forms.ModelForm):
    class Meta:
        model = MaintenanceWindow
        fields = FORM_FIELDS
        help_texts = {
            "starts_at": "UTC unless your admin time zone says otherwise.",
            "services": "Only public services show on the status page and in announcements. "
            "While the window runs, an incident that alerts open on these services only is "
            "not paged; incidents a person declares always are.",
        }

    def clean(self):
        cleaned = super().clean()
        window = self.instance if self.instance.pk else None
        if self.errors or (window is not None and not self.has_changed()):
            return cleaned  # nothing new to check: an unchanged save changes nothing
        values = {
            name: cleaned.get(name, getattr(window, name, None))
            for name in ("title", "description", "starts_at", "ends_at")
        }
        services = cleaned.get("services")
        if services is None and window is not None:
            services = window.services.all()
        try:
            maintenance_validate(
                **values,
                service_ids=[s.pk for s in services or []],
                now=timezone.now(),
                window=window,
            )
        except InvalidInput as error:
            field = ERROR_FIELDS.get(error.field, error.field)
            self.add_error(field if field in self.fields else None, _message(error))
        return cleaned


class WhenFilter(admin.SimpleListFilter):
    title = "when"
    parameter_name = "when"

    def lookups(self, request, model_admin):
        return [
            (WindowState.UPCOMING, "Upcoming"),
            (WindowState.RUNNING, "Running"),
            ("past", "Past"),
            (WindowState.CANCELLED, "Cancelled"),
        ]

    def queryset(self, request, queryset):
        now = timezone.now()
        live = queryset.filter(cancelled_at__isnull=True)
        return {
            WindowState.UPCOMING: lambda: live.filter(starts_at__gt=now),
            WindowState.RUNNING: lambda: live.filter(starts_at__lte=now, ends_at__gt=now),
            "past": lambda: live.filter(ends_at__lte=now),
            WindowState.CANCELLED: lambda: queryset.filter(cancelled_at__isnull=False),
        }.get(self.value(), lambda: queryset)()


@admin.register(MaintenanceWindow)
class MaintenanceWindowAdmin(admin.ModelAdmin):
    form = MaintenanceWindowForm
    list_display = [
        "title",
        "services_display",
        "starts_at",
        "ends_at",
        "state_display",
        "announced_at",
    ]
    list_filter = [WhenFilter]
    search_fields = ["title"]
    date_hierarchy = "starts_at"
    autocomplete_fields = ["services"]
    actions = ["announce_windows", "cancel_windows"]
    readonly_fields = ["state_display", "announced_at", "cancelled_at", "created_by", "created_at"]

    class Media:
        css = ADMIN_CSS

    def get_queryset(self, request):
        return (
            super().get_queryset(request).select_related("created_by").prefetch_related("services")
        )

    def has_delete_permission(self, request, obj=None):
        # Cancel instead: a window is history, and its announcement points at it.
        return False

    @admin.display(description="Services")
    def services_display(self, obj: MaintenanceWindow) -> str:
        return ", ".join(
            f"{s.name}" + ("" if s.is_public else " (internal)") for s in obj.services.all()
        )

    @admin.display(description="State")
    def state_display(self, obj: MaintenanceWindow):
        if obj.pk is None:
            return "—"
        state = window_state(obj, now=timezone.now())
        return format_html('<span class="badge">{}</span>', WindowState(state).label)

    def get_fieldsets(self, request, obj=None):
        main = [(None, {"fields": FORM_FIELDS})]
        if obj is None:
            return main
        return [
            *main,
            (
                "Record",
                {
                    "fields": [
                        "state_display",
                        "announced_at",
                        "cancelled_at",
                        "created_by",
                        "created_at",
                    ]
                },
            ),
        ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        state = window_state(obj, now=timezone.now())
        if state in (WindowState.COMPLETED, WindowState.CANCELLED):
            return [*FORM_FIELDS, *self.readonly_fields]  # history
        if state == WindowState.RUNNING:
            return ["starts_at", *self.readonly_fields]
        return self.readonly_fields

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        if change:
            changes = {
                ("service_ids" if name == "services" else name): (
                    [s.pk for s in data[name]] if name == "services" else data[name]
                )
                for name in form.changed_data
                if name in FORM_FIELDS
            }
            maintenance_update(window=obj.pk, changes=changes, actor=request.user)
            return
        window = maintenance_schedule(
            title=data["title"],
            description=data.get("description", ""),
            service_ids=[s.pk for s in data["services"]],
            starts_at=data["starts_at"],
            ends_at=data["ends_at"],
            actor=request.user,
        )
        obj.pk, obj.created_at, obj.created_by = window.pk, window.created_at, window.created_by
        obj._state.adding = False

    def save_related(self, request, form, formsets, change):
        """The services are set by the maintenance services, not by the form."""

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        """A refusal the form could not foresee (a window that started meanwhile) is shown
        as a message."""
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except DomainError as error:
            self.message_user(request, f"Not saved: {error}", messages.ERROR)
            return HttpResponseRedirect(request.path)

    # --- actions -----------------------------------------------------------------------------

    @admin.action(description="Announce selected windows to subscribers", permissions=["change"])
    def announce_windows(self, request, queryset: QuerySet[MaintenanceWindow]):
        for window in queryset.order_by("starts_at", "pk"):
            try:
                recipients = maintenance_announce(window=window, actor=request.user)
            except DomainError as error:
                self.message_user(request, f"Not announced: {error}", messages.ERROR)
                continue
            self.log_change(request, window, f"Announced to {recipients} subscribers.")
            self.message_user(
                request,
                f"“{window.title}” announced to {recipients} subscriber"
                f"{'' if recipients == 1 else 's'}.",
                messages.SUCCESS,
            )

    @admin.action(
        description="Cancel selected windows (end running ones now)", permissions=["change"]
    )
    def cancel_windows(self, request, queryset: QuerySet[MaintenanceWindow]):
        for window in queryset.order_by("starts_at", "pk"):
            was = window_state(window, now=timezone.now())
            try:
                window = maintenance_cancel(window=window, actor=request.user)
            except DomainError as error:
                self.message_user(request, f"Not cancelled: {error}", messages.ERROR)
                continue
            if was == WindowState.CANCELLED:
                self.message_user(
                    request, f"“{window.title}” was already cancelled.", messages.INFO
                )
                continue
            ended = window.cancelled_at is None
            self.log_change(request, window, "Ended early." if ended else "Cancelled.")
            self.message_user(
                request,
                f"“{window.title}” {'ended now' if ended else 'cancelled'}.",
                messages.SUCCESS,
            )
