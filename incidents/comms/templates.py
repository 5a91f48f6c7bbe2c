"""Message templates: validation and rendering.

Templates are Django templates run by an engine of their own: autoescaping on, no template
loaders (an `{% include %}` or `{% extends %}` finds nothing), and a context of plain values
copied from the incident or maintenance window, never model instances, so a template can
reach only what is listed in `incident_context` / `maintenance_context` and nothing
internal (notes, people, alerts) unless it is listed there.

A template is checked when it is saved or previewed (`template_validate`): a syntax error,
an unknown tag or filter, or a subject that renders to more than one line is refused then,
so sending never meets one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.template import Context, Engine, TemplateDoesNotExist, TemplateSyntaxError
from django.utils.html import linebreaks

from incidents.exceptions import InvalidInput
from incidents.models import Incident, MaintenanceWindow, MessageTemplate, TemplateKind

ENGINE = Engine(autoescape=True, string_if_invalid="", loaders=[])

HEADER_BREAKS = ("\r", "\n")
# Kinds of message customers receive: they name public services only.
CUSTOMER_KINDS = {TemplateKind.CUSTOMER_NOTICE, TemplateKind.MAINTENANCE}


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def _compile(field: str, source: str):
    try:
        return ENGINE.from_string(source)
    except TemplateSyntaxError as error:
        raise InvalidInput(field, f"template error: {error}") from error


def template_validate(*, subject: str, body: str) -> None:
    """Refuse a template that cannot render: syntax errors, unknown tags or filters, a
    subject with a line break. Renders both against a sample context, so an error that
    only shows when rendering (a bad filter argument) is found now."""
    if any(mark in subject for mark in HEADER_BREAKS):
        raise InvalidInput("subject", "must be one line (no CR or LF).")
    render_source(subject=subject, body=body, context=sample_context())


def render_source(*, subject: str, body: str, context: dict[str, Any]) -> Rendered:
    """Render a subject and body template. The subject is one line; the plain-text part is
    rendered without escaping (it is not HTML); the HTML part is the same template
    rendered with autoescaping, its line breaks made paragraphs."""
    subject_template = _compile("subject", subject)
    body_template = _compile("body", body)
    try:
        rendered_subject = subject_template.render(Context(context, autoescape=False)).strip()
        text = body_template.render(Context(context, autoescape=False)).strip()
        html = linebreaks(body_template.render(Context(context, autoescape=True)).strip())
    except (
        TemplateSyntaxError,
        TemplateDoesNotExist,
        ValueError,
        TypeError,
        AttributeError,
    ) as error:
        raise InvalidInput("body", f"template error: {error}") from error
    if any(mark in rendered_subject for mark in HEADER_BREAKS):
        raise InvalidInput("subject", "renders to more than one line (CR or LF).")
    return Rendered(subject=rendered_subject, text=text, html=html)


def render_message(
    *,
    kind: str,
    template: MessageTemplate | None = None,
    incident: Incident | None = None,
    maintenance: MaintenanceWindow | None = None,
    extra: dict[str, Any] | None = None,
) -> Rendered:
    """Render a message of `kind` from `template` (else the kind's default template, else
    the built-in one) with the context of the incident or maintenance window."""
    if template is None:
        template = default_template(kind)
    if template is not None:
        subject, body = template.subject, template.body
    else:
        subject, body = BUILT_IN[kind]
    context = {"site_name": settings.SITE_NAME, "status_url": f"{settings.SITE_URL}/status/"}
    # Customers are told only of public services; responders' messages name them all.
    public_only = kind in CUSTOMER_KINDS
    if incident is not None:
        context.update(incident_context(incident, public_only=public_only))
    if maintenance is not None:
        context.update(maintenance_context(maintenance, public_only=public_only))
    context.update(extra or {})
    return render_source(subject=subject, body=body, context=context)


def default_template(kind: str) -> MessageTemplate | None:
    return MessageTemplate.objects.filter(kind=kind, is_default=True).first()


def template_preview(template: MessageTemplate, *, incident: Incident | None = None) -> Rendered:
    """Render a saved template as it would go out: with a real incident's context when one
    is given (the sample for any part it lacks, e.g. a maintenance window), else with the
    sample context. Raises InvalidInput naming subject or body if it cannot render."""
    context = sample_context()
    if incident is not None:
        context.update(incident_context(incident))
    return render_source(subject=template.subject, body=template.body, context=context)


def message_template_make_default(*, template: MessageTemplate, actor=None) -> MessageTemplate:
    """Make `template` the default of its kind, and the previous default an ordinary one,
    in one transaction (the one-default-per-kind constraint holds throughout).
    Idempotent. The template is checked again first (InvalidInput)."""
    from django.db import transaction
    from django.utils import timezone

    template_validate(subject=template.subject, body=template.body)
    with transaction.atomic():
        now = timezone.now()
        MessageTemplate.objects.filter(kind=template.kind, is_default=True).exclude(
            pk=template.pk
        ).update(is_default=False, updated_at=now)
        MessageTemplate.objects.filter(pk=template.pk).update(is_default=True, updated_at=now)
    template.is_default = True
    return template


def _iso(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC") if at else ""


def _service_names(owner, public_only: bool) -> list[str]:
    if not owner.pk:
        return []
    services = owner.services.all()
    if public_only:
        services = [s for s in services if s.is_public]
    return [s.name for s in services]


def incident_context(incident: Incident, *, public_only: bool = True) -> dict[str, Any]:
    """What a template may say about an incident: customer-facing fields only, and only
    its public services unless `public_only` is off (messages to responders)."""
    latest = (
        incident.updates.filter(public=True).order_by("-posted_at", "-pk").first()
        if incident.pk
        else None
    )
    services = _service_names(incident, public_only)
    return {
        "incident": {
            "reference": incident.reference,
            "title": incident.title,
            "severity": incident.severity.name,
            "severity_level": incident.severity.level,
            "status": incident.get_status_display(),
            "impact": incident.get_impact_display(),
            "customer_impact": incident.customer_impact,
            "services": services,
            "services_list": ", ".join(services),
            "detected_at": _iso(incident.detected_at),
            "resolved_at": _iso(incident.resolved_at),
            "is_resolved": incident.resolved_at is not None,
        },
        "update": {
            "body": latest.body if latest else "",
            "stage": latest.get_stage_display() if latest else "",
            "posted_at": _iso(latest.posted_at) if latest else "",
        },
    }


def maintenance_context(window: MaintenanceWindow, *, public_only: bool = True) -> dict[str, Any]:
    services = _service_names(window, public_only)
    return {
        "maintenance": {
            "title": window.title,
            "description": window.description,
            "services": services,
            "services_list": ", ".join(services),
            "starts_at": _iso(window.starts_at),
            "ends_at": _iso(window.ends_at),
        }
    }


def sample_context() -> dict[str, Any]:
    """A context with every name a template may use, for validation and for a preview when
    no incident is chosen."""
    return {
        "site_name": settings.SITE_NAME,
        "status_url": f"{settings.SITE_URL}/status/",
        "incident": {
            "reference": "INC-1000",
            "title": "Checkout errors",
            "severity": "SEV-1",
            "severity_level": 1,
            "status": "Investigating",
            "impact": "Partial outage",
            "customer_impact": "Some payments fail.",
            "services": ["Checkout"],
            "services_list": "Checkout",
            "detected_at": "2026-01-01 09:00 UTC",
            "resolved_at": "",
            "is_resolved": False,
        },
        "update": {"body": "We are investigating.", "stage": "Investigating", "posted_at": ""},
        "maintenance": {
            "title": "Database upgrade",
            "description": "Planned upgrade.",
            "services": ["Checkout"],
            "services_list": "Checkout",
            "starts_at": "2026-01-02 02:00 UTC",
            "ends_at": "2026-01-02 03:00 UTC",
        },
    }


# Used when no template of the kind is marked default; also the seeds of the defaults.
BUILT_IN: dict[str, tuple[str, str]] = {
    TemplateKind.INITIAL: (
        "[{{ incident.severity }}] {{ incident.reference }}: {{ incident.title }}",
        "{{ incident.reference }} was declared at {{ incident.detected_at }}.\n\n"
        "Severity: {{ incident.severity }}\nStatus: {{ incident.status }}\n"
        "Services: {{ incident.services_list|default:'none named yet' }}\n"
        "Impact: {{ incident.impact }}\n\n{{ incident.customer_impact }}",
    ),
    TemplateKind.UPDATE: (
        "[{{ incident.severity }}] Update on {{ incident.reference }}: {{ incident.title }}",
        "{{ update.stage }}: {{ update.body }}\n\n"
        "Status: {{ incident.status }}\nImpact: {{ incident.impact }}",
    ),
    TemplateKind.RESOLUTION: (
        "[Resolved] {{ incident.reference }}: {{ incident.title }}",
        "{{ incident.reference }} was resolved at {{ incident.resolved_at }}.\n\n{{ update.body }}",
    ),
    TemplateKind.CUSTOMER_NOTICE: (
        "{{ site_name }}: {{ incident.title }}",
        "{% if incident.is_resolved %}This issue is resolved.{% else %}We are working on an "
        "issue affecting {{ incident.services_list|default:'our services' }}.{% endif %}\n\n"
        "{{ update.body|default:incident.customer_impact }}\n\n"
        "Current status: {{ status_url }}",
    ),
    TemplateKind.MAINTENANCE: (
        "{{ site_name }} maintenance: {{ maintenance.title }}",
        "Scheduled maintenance of {{ maintenance.services_list }} from "
        "{{ maintenance.starts_at }} to {{ maintenance.ends_at }}.\n\n"
        "{{ maintenance.description }}\n\nCurrent status: {{ status_url }}",
    ),
}
