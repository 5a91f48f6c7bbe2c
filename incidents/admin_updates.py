"""Admin for status updates and message templates (docs/status-updates.md).

- Message templates: validated when saved (a template error is a form error on subject or
  body), previewed against a real incident or the sample context, one default per kind.
- Status updates: append-only (listed, never changed or deleted here); posted from the
  incident's page through `status_update_post` and listed there, read-only.
- The incident list's "update overdue" column and filter.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404, HttpResponseNotAllowed
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from .comms.templates import (
    audience_for,
    message_template_make_default,
    template_preview,
    template_validate,
)
from .comms.updates import MAX_UPDATE_LENGTH, status_update_post
from .exceptions import DomainError, InvalidInput
from .formatting import humanize_duration
from .models import Incident, MessageTemplate, PublicStage, StatusUpdate

# --- message templates ----------------------------------------------------------------------


class MessageTemplateForm(forms.ModelForm):
    class Meta:
        model = MessageTemplate
        fields = ["name", "kind", "subject", "body", "is_default"]
        widgets = {
            "subject": forms.TextInput(attrs={"size": 100}),
            "body": forms.Textarea(attrs={"rows": 14, "cols": 100}),
        }

    def clean(self):
        data = super().clean()
        subject, body, kind = data.get("subject"), data.get("body"), data.get("kind")
        if subject is not None and body is not None:
            try:
                # A customer-facing template is checked against what customers may be told.
                audience = audience_for(kind) if kind else None
                template_validate(subject=subject, body=body, audience=audience)
            except InvalidInput as error:
                field = error.field if error.field in {"subject", "body"} else None
                self.add_error(field, str(error).removeprefix(f"{error.field}: "))
        kind = data.get("kind")
        if data.get("is_default") and kind:
            other = (
                MessageTemplate.objects.filter(kind=kind, is_default=True)
                .exclude(pk=self.instance.pk)
                .first()
            )
            if other is not None:
                self.add_error(
                    "is_default",
                    f"“{other.name}” is already the default for this kind. Save this one "
                    "without the tick, then use the action “Make default” on the list.",
                )
        return data


@admin.register(MessageTemplate)
class MessageTemplateAdmin(admin.ModelAdmin):
    form = MessageTemplateForm
    list_display = ["name", "kind", "is_default", "updated_at"]
    list_filter = ["kind", "is_default"]
    search_fields = ["name", "subject"]
    readonly_fields = ["updated_at", "placeholders"]
    actions = ["make_default"]
    change_form_template = "admin/incidents/messagetemplate/change_form.html"

    @admin.display(description="What a template may use")
    def placeholders(self, obj=None):
        return format_html(
            "<code>{}</code>",
            "{{ site_name }} {{ status_url }} {{ incident.reference }} {{ incident.title }} "
            "{{ incident.severity }} {{ incident.severity_level }} {{ incident.status }} "
            "{{ incident.impact }} {{ incident.customer_impact }} {{ incident.services_list }} "
            "{{ incident.detected_at }} {{ incident.resolved_at }} {{ incident.is_resolved }} "
            "{{ update.body }} {{ update.stage }} {{ update.posted_at }} "
            "{{ maintenance.title }} {{ maintenance.description }} "
            "{{ maintenance.services_list }} {{ maintenance.starts_at }} "
            "{{ maintenance.ends_at }}",
        )

    def save_model(self, request, obj, form, change):
        obj.updated_at = timezone.now()
        super().save_model(request, obj, form, change)

    @admin.action(description="Make the selected template the default of its kind")
    def make_default(self, request, queryset):
        chosen = list(queryset[:2])
        if len(chosen) != 1:
            self.message_user(request, "Select exactly one template.", messages.ERROR)
            return
        template = chosen[0]
        try:
            message_template_make_default(template=template, actor=request.user)
        except DomainError as error:
            self.message_user(request, f"Not changed: {error}", messages.ERROR)
            return
        self.message_user(
            request,
            f"“{template.name}” is now the default {template.get_kind_display().lower()}.",
            messages.SUCCESS,
        )

    def get_urls(self):
        return [
            path(
                "<path:object_id>/preview/",
                self.admin_site.admin_view(self.preview_view),
                name="incidents_messagetemplate_preview",
            ),
            *super().get_urls(),
        ]

    def preview_view(self, request, object_id):
        """The template rendered with a real incident (`?incident=INC-12`) or the sample
        context: subject, plain text, and the HTML part in a sandboxed frame."""
        template = self.get_object(request, unquote(object_id))
        if template is None:
            raise Http404("No such template.")
        if not self.has_view_or_change_permission(request, template):
            raise PermissionDenied
        reference = request.GET.get("incident", "").strip()[:30]
        incident = None
        problem = ""
        if reference:
            incident = (
                Incident.objects.select_related("severity")
                .defer("escalation_plan")
                .filter(reference__iexact=reference)
                .first()
            )
            if incident is None:
                problem = f"There is no incident {reference}; showing the sample instead."
        try:
            rendered = template_preview(template, incident=incident)
        except InvalidInput as error:
            rendered, problem = None, f"This template cannot render: {error}"
        return TemplateResponse(
            request,
            "admin/incidents/messagetemplate/preview.html",
            {
                **self.admin_site.each_context(request),
                "title": f"Preview: {template.name}",
                "opts": self.opts,
                "original": template,
                "incident": incident,
                "reference": reference,
                "rendered": rendered,
                "problem": problem,
                "recent": Incident.objects.only("reference", "title").order_by("-number")[:10],
            },
        )


# --- status updates -------------------------------------------------------------------------


@admin.register(StatusUpdate)
class StatusUpdateAdmin(admin.ModelAdmin):
    """Every status update, newest first. Append-only: posted from the incident's page
    (or the API), never changed or deleted."""

    list_display = ["posted_at", "incident", "kind_display", "stage", "short_body", "posted_by"]
    list_filter = ["public", "stage"]
    list_select_related = ["incident"]
    search_fields = ["incident__reference", "body"]
    show_full_result_count = False
    fields = ["incident", "public", "stage", "body", "posted_at", "posted_by_label", "next_due_at"]
    readonly_fields = fields

    @admin.display(description="Kind", ordering="public")
    def kind_display(self, obj: StatusUpdate) -> str:
        return "public" if obj.public else "internal"

    @admin.display(description="Update")
    def short_body(self, obj: StatusUpdate) -> str:
        return obj.body if len(obj.body) <= 120 else obj.body[:117] + "..."

    @admin.display(description="Posted by")
    def posted_by(self, obj: StatusUpdate) -> str:
        return obj.posted_by_label

    def get_queryset(self, request):
        # The incident column shows its reference and title only.
        return super().get_queryset(request).defer("incident__escalation_plan")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class StatusUpdateForm(forms.Form):
    body = forms.CharField(widget=forms.Textarea(attrs={"rows": 4}), max_length=MAX_UPDATE_LENGTH)
    public = forms.BooleanField(
        required=False,
        label="Public",
        help_text="Shown on the status page; otherwise internal (and sent to the team's chat).",
    )
    stage = forms.ChoiceField(
        required=False,
        label="Public stage",
        choices=[("", "From the incident's status"), *PublicStage.choices],
    )


def may_post_update(request, model_admin, incident: Incident) -> bool:
    return model_admin.has_change_permission(request, incident) and request.user.has_perm(
        "incidents.add_statusupdate"
    )


def post_update_view(model_admin, request, object_id):
    """The incident page's "post a status update" form: one call to status_update_post;
    a refusal (closed incident, bad input) is an admin message and nothing is posted."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    incident = model_admin._changeable(request, object_id)
    if not request.user.has_perm("incidents.add_statusupdate"):
        raise PermissionDenied
    form = StatusUpdateForm(request.POST)
    if not form.is_valid():
        problems = "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items())
        model_admin.message_user(request, f"The update was not posted: {problems}", messages.ERROR)
        return model_admin._back(incident)
    data = form.cleaned_data
    try:
        update = status_update_post(
            incident=incident,
            body=data["body"],
            public=data["public"],
            stage=data["stage"] or None,
            actor=request.user,
        )
    except DomainError as error:
        model_admin.message_user(request, f"The update was not posted: {error}", messages.ERROR)
        return model_admin._back(incident)
    due = (
        f" The next one is due at {timezone.localtime(update.next_due_at):%Y-%m-%d %H:%M}."
        if update.next_due_at
        else ""
    )
    kind = "Public" if update.public else "Internal"
    model_admin.message_user(request, f"{kind} update posted.{due}", messages.SUCCESS)
    return model_admin._back(incident)


UPDATES_SHOWN = 20


def status_update_context(request, model_admin, incident: Incident) -> dict:
    """What the incident page's status-update panel shows: the latest updates (one query,
    read-only: the page's form does not carry them), the next due times, whether they are
    overdue, and the form when the user may post."""
    now = timezone.now()
    due, public_due = incident.next_update_due_at, incident.public_update_due_at
    latest = list(
        StatusUpdate.objects.filter(incident=incident).order_by("-posted_at", "-pk")[
            : UPDATES_SHOWN + 1
        ]
    )
    return {
        "status_updates": latest[:UPDATES_SHOWN],
        "status_updates_more": len(latest) > UPDATES_SHOWN,
        "status_updates_url": reverse("admin:incidents_statusupdate_changelist")
        + f"?incident__exact={incident.pk}",
        "update_form": StatusUpdateForm()
        if may_post_update(request, model_admin, incident)
        else None,
        "update_due": due,
        "update_overdue": humanize_duration(now - due) if due and due <= now else "",
        "public_update_due": public_due,
        "public_update_overdue": (
            humanize_duration(now - public_due) if public_due and public_due <= now else ""
        ),
        "update_post_url": reverse("admin:incidents_incident_status_update", args=[incident.pk]),
    }


# --- the incident list: overdue updates -----------------------------------------------------


def update_overdue_q(now) -> Q:
    """An update is overdue: the cadence's, or a public incident's first public one. Both
    deadlines are stored only while they apply, and both columns are indexed."""
    return Q(next_update_due_at__lte=now) | Q(public_update_due_at__lte=now)


class UpdateOverdueFilter(admin.SimpleListFilter):
    title = "status updates"
    parameter_name = "update_overdue"

    def lookups(self, request, model_admin):
        return [
            ("yes", "Update overdue"),
            ("public", "Public update overdue"),
            ("no", "Up to date"),
        ]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "yes":
            return queryset.filter(update_overdue_q(now))
        if self.value() == "public":
            return queryset.filter(public_update_due_at__lte=now)
        if self.value() == "no":
            return queryset.exclude(update_overdue_q(now))
        return queryset


@admin.display(description="Update", ordering="next_update_due_at")
def update_due_column(obj: Incident):
    """ "overdue 12m" (red) when the next update, or the first public one, is overdue;
    "due in 8m" while one is pending; "—" when none is due."""
    now = timezone.now()
    overdue = [d for d in (obj.next_update_due_at, obj.public_update_due_at) if d and d <= now]
    if overdue:
        late = humanize_duration(now - min(overdue))
        public = obj.public_update_due_at is not None and obj.public_update_due_at <= now
        return format_html(
            '<span class="sla sla-breached update-overdue">{}overdue {}</span>',
            "public update " if public else "",
            late,
        )
    due = obj.next_update_due_at
    if due is None:
        return "—"
    return format_html(
        '<span class="sla sla-pending">due in {}</span>', humanize_duration(due - now)
    )
