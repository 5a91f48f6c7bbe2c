"""Message templates: validation and rendering.

Templates are Django templates run by an engine of their own: autoescaping on, no template
loaders (an `{% include %}` or `{% extends %}` finds nothing), and a context of plain values
copied from the incident or maintenance window, never model instances, so a template can
reach only what the context for its audience lists and nothing internal (notes, people,
alerts) beyond it.

Two audiences (docs/notices.md):

- `customers` (every customer notice, whatever its kind; maintenance announcements): the
  incident's public name (`public_title`, as on the status page), its public services only,
  its impact and the customer impact a person wrote, and the latest public update; its
  `status` is that update's public stage. No INC reference (the status page shows none),
  no severity, no internal status.
- `responders` (the incident chat, reminders): everything above with every service, the
  reference, the severity and the internal status.

A template is checked when it is saved, previewed or rendered (`template_validate`,
`_compile`): a syntax error, an unknown tag or filter, anything that switches escaping off
(`|safe`, `|safeseq`, `{% autoescape off %}`) or loads a library (`{% load %}`), or a
subject that renders to more than one line is refused, so sending never meets one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.template import Context, Engine, TemplateDoesNotExist, TemplateSyntaxError
from django.template.base import FilterExpression, Node, Variable
from django.template.defaulttags import AutoEscapeControlNode, LoadNode
from django.template.smartif import TokenBase
from django.utils.html import linebreaks

from incidents.exceptions import InvalidInput
from incidents.models import Incident, MaintenanceWindow, MessageTemplate, TemplateKind

ENGINE = Engine(autoescape=True, string_if_invalid="", loaders=[])

HEADER_BREAKS = ("\r", "\n")
CUSTOMERS = "customers"
RESPONDERS = "responders"
AUDIENCES = (CUSTOMERS, RESPONDERS)
# Kinds of message written for customers: rendered for them whoever sends them.
CUSTOMER_KINDS = {TemplateKind.CUSTOMER_NOTICE, TemplateKind.MAINTENANCE}
# Names only responders' messages carry. A customer's context does not contain them (they
# render empty); a template meant for customers that names them is refused, so the blank
# shows as an error rather than in a customer's inbox.
RESPONDER_ONLY = ("incident.reference", "incident.severity", "incident.severity_level")
# Filters whose output is not escaped again: they would let incident text become markup.
UNESCAPING_FILTERS = ("safe", "safeseq")


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def audience_for(kind: str) -> str:
    """The audience a template of `kind` is written for."""
    return CUSTOMERS if kind in CUSTOMER_KINDS else RESPONDERS


def _compile(field: str, source: str):
    try:
        template = ENGINE.from_string(source)
    except TemplateSyntaxError as error:
        raise InvalidInput(field, f"template error: {error}") from error
    problem = _escaping_problem(template)
    if problem:
        raise InvalidInput(field, f"template error: {problem}")
    return template


def _nodes(template) -> Iterator[Node]:
    return iter(template.nodelist.get_nodes_by_type(Node))


def _expressions(value: Any, depth: int = 0) -> Iterator[FilterExpression]:
    """Every filter expression held by a node's attribute: `{{ }}`, `{% if %}` conditions,
    `{% for %}` sequences, `{% with %}` values, tag arguments."""
    if depth > 20:
        return
    if isinstance(value, FilterExpression):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _expressions(item, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _expressions(item, depth + 1)
    elif isinstance(value, TokenBase):  # an {% if %} condition: operators and literals
        for name in ("first", "second", "value"):
            yield from _expressions(getattr(value, name, None), depth + 1)


def _node_expressions(node: Node) -> Iterator[FilterExpression]:
    for name, value in vars(node).items():
        if name not in {"token", "origin"}:
            yield from _expressions(value)


def _escaping_problem(template) -> str:
    for node in _nodes(template):
        if isinstance(node, AutoEscapeControlNode) and not node.setting:
            return "{% autoescape off %} is not allowed: incident text must stay escaped."
        if isinstance(node, LoadNode):
            return "{% load %} is not allowed: templates use the built-in tags and filters."
        for expression in _node_expressions(node):
            for func, _args in expression.filters:
                name = getattr(func, "__name__", "")
                if name in UNESCAPING_FILTERS:
                    return (
                        f"the |{name} filter is not allowed: it would let incident text "
                        "become markup."
                    )
    return ""


def _names(template) -> set[str]:
    """Dotted names a template reads (the first two parts: `incident.severity`)."""
    names: set[str] = set()
    for node in _nodes(template):
        for expression in _node_expressions(node):
            variables = [expression.var] + [
                arg for _func, args in expression.filters for lookup, arg in args if lookup
            ]
            for variable in variables:
                if isinstance(variable, Variable) and variable.lookups:
                    names.add(".".join(variable.lookups[:2]))
    return names


def responder_names(field: str, source: str) -> list[str]:
    """The RESPONDER_ONLY names a template source reads (InvalidInput(field) if it does not
    compile). A courtesy check: what keeps them from customers is that their context does
    not hold them."""
    return sorted(_names(_compile(field, source)) & set(RESPONDER_ONLY))


def template_validate(*, subject: str, body: str, audience: str | None = None) -> None:
    """Refuse a template that cannot render: syntax errors, unknown tags or filters, escaping
    switched off, `{% load %}`, a subject with a line break. Renders both against a sample
    context, so an error that only shows when rendering (a bad filter argument) is found
    now. With `audience="customers"`, also refuses the names only responders get
    (RESPONDER_ONLY), naming the field."""
    if any(mark in subject for mark in HEADER_BREAKS):
        raise InvalidInput("subject", "must be one line (no CR or LF).")
    if audience == CUSTOMERS:
        for field, source in (("subject", subject), ("body", body)):
            used = responder_names(field, source)
            if used:
                raise InvalidInput(
                    field,
                    f"uses {', '.join(used)}, which customers are not told: a template for "
                    "customers cannot show it.",
                )
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


def template_source(kind: str, template: MessageTemplate | None = None) -> tuple[str, str, str]:
    """(name, subject, body) of `template`, else the kind's default, else the built-in."""
    if template is None:
        template = default_template(kind)
    if template is not None:
        return template.name, template.subject, template.body
    subject, body = BUILT_IN[kind]
    return f"{TemplateKind(kind).label} (built-in)", subject, body


def render_message(
    *,
    kind: str,
    template: MessageTemplate | None = None,
    incident: Incident | None = None,
    maintenance: MaintenanceWindow | None = None,
    extra: dict[str, Any] | None = None,
    audience: str | None = None,
) -> Rendered:
    """Render a message of `kind` from `template` (else the kind's default template, else
    the built-in one) with the context of the incident or maintenance window for
    `audience` (default: the kind's, `audience_for`). Customer notices pass
    `audience="customers"` whatever their kind."""
    audience = audience or audience_for(kind)
    if audience not in AUDIENCES:
        raise ValueError(f"audience must be one of {AUDIENCES}")
    _name, subject, body = template_source(kind, template)
    context = {"site_name": settings.SITE_NAME, "status_url": f"{settings.SITE_URL}/status/"}
    if incident is not None:
        context.update(incident_context(incident, audience=audience))
    if maintenance is not None:
        context.update(maintenance_context(maintenance, audience=audience))
    context.update(extra or {})
    return render_source(subject=subject, body=body, context=context)


def default_template(kind: str) -> MessageTemplate | None:
    return MessageTemplate.objects.filter(kind=kind, is_default=True).first()


def template_preview(
    template: MessageTemplate, *, incident: Incident | None = None, audience: str | None = None
) -> Rendered:
    """Render a saved template as it would go out to `audience` (default: its kind's): with
    a real incident's context when one is given (the sample for any part it lacks, e.g. a
    maintenance window), else with the sample context. A name the audience does not get
    renders empty, as it would in the message. Raises InvalidInput naming subject or body
    if it cannot render."""
    audience = audience or audience_for(template.kind)
    context = sample_context(audience)
    if incident is not None:
        context.update(incident_context(incident, audience=audience))
    return render_source(subject=template.subject, body=template.body, context=context)


def message_template_make_default(*, template: MessageTemplate, actor=None) -> MessageTemplate:
    """Make `template` the default of its kind, and the previous default an ordinary one,
    in one transaction (the one-default-per-kind constraint holds throughout).
    Idempotent. The template is checked again first, for its kind's audience
    (InvalidInput)."""
    from django.db import transaction
    from django.utils import timezone

    template_validate(
        subject=template.subject, body=template.body, audience=audience_for(template.kind)
    )
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
    services = sorted(owner.services.all(), key=lambda s: s.name)
    if public_only:
        services = [s for s in services if s.is_public]
    return [s.name for s in services]


def incident_context(incident: Incident, *, audience: str = RESPONDERS) -> dict[str, Any]:
    """What a template may say about an incident to `audience` (see the module's
    docstring). The `update` is the latest public update for both audiences."""
    from .status import public_title

    if audience not in AUDIENCES:
        raise ValueError(f"audience must be one of {AUDIENCES}")
    customers = audience == CUSTOMERS
    latest = (
        incident.updates.filter(public=True).order_by("-posted_at", "-pk").first()
        if incident.pk
        else None
    )
    services = _service_names(incident, public_only=customers)
    if latest is not None:
        stage = latest.get_stage_display()
    else:
        stage = "Resolved" if incident.resolved_at else "Investigating"
    values: dict[str, Any] = {
        "title": public_title(incident, service_names=services) if customers else incident.title,
        "status": stage if customers else incident.get_status_display(),
        "impact": incident.get_impact_display(),
        "customer_impact": incident.customer_impact,
        "services": services,
        "services_list": ", ".join(services),
        "detected_at": _iso(incident.detected_at),
        "resolved_at": _iso(incident.resolved_at),
        "is_resolved": incident.resolved_at is not None,
    }
    if not customers:
        values.update(
            reference=incident.reference,
            severity=incident.severity.name,
            severity_level=incident.severity.level,
        )
    return {
        "incident": values,
        "update": {
            "body": latest.body if latest else "",
            "stage": latest.get_stage_display() if latest else "",
            "posted_at": _iso(latest.posted_at) if latest else "",
        },
    }


def maintenance_context(window: MaintenanceWindow, *, audience: str = CUSTOMERS) -> dict[str, Any]:
    services = _service_names(window, public_only=audience == CUSTOMERS)
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


def sample_context(audience: str = RESPONDERS) -> dict[str, Any]:
    """A context with every name a template for `audience` may use (responders: all of
    them), for validation and for a preview when no incident is chosen."""
    context: dict[str, Any] = {
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
    if audience == CUSTOMERS:
        for name in RESPONDER_ONLY:
            context["incident"].pop(name.split(".", 1)[1])
    return context


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
