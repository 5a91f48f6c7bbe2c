"""Message templates: validation (a template error is met when saving or previewing, never
when sending), rendering with autoescaping, the defaults the migration made, the admin's
form, preview and "make default" action, and the permission groups."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import Group
from django.contrib.messages import get_messages
from django.urls import reverse

from incidents.comms.templates import (
    BUILT_IN,
    message_template_make_default,
    render_message,
    template_preview,
    template_validate,
)
from incidents.exceptions import InvalidInput
from incidents.models import MessageTemplate, TemplateKind

from .factories import MessageTemplateFactory, ServiceFactory, SeverityFactory, declare

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def incident():
    return declare(
        severity=SeverityFactory(level=1),
        title="Checkout <script>alert(1)</script>",
        summary="INTERNAL: the db password rotated",
        services=[ServiceFactory(name="Checkout & Pay", slug="checkout")],
        customer_impact="Payments <b>fail</b>.",
        now=T0,
    )


# --- validation and rendering ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "body", "field", "problem"),
    [
        ("{% endif %} {{ incident.title }}", "ok", "subject", "template error"),
        ("ok", "{% if %}", "body", "template error"),
        ("ok", "{{ incident.title|nosuchfilter }}", "body", "template error"),
        ("ok", "{% load i18n %}", "body", "template error"),
        ("ok", "{% include 'x.html' %}", "body", "template error"),
        ("line one\nline two", "ok", "subject", "one line"),
        ("{{ incident.customer_impact }}", "ok", None, None),
    ],
)
def test_template_validate_names_the_field_at_fault(subject, body, field, problem):
    if field is None:
        template_validate(subject=subject, body=body)
        return
    with pytest.raises(InvalidInput, match=problem) as refused:
        template_validate(subject=subject, body=body)
    assert refused.value.field == field


def test_every_built_in_template_is_valid():
    for subject, body in BUILT_IN.values():
        template_validate(subject=subject, body=body)


def test_rendering_escapes_the_html_part_only_and_reaches_no_internal_field(incident):
    template = MessageTemplateFactory(
        kind=TemplateKind.UPDATE,
        subject="{{ incident.title }}",
        body="{{ incident.title }} on {{ incident.services_list }}. [{{ incident.summary }}]",
    )
    rendered = render_message(kind=TemplateKind.UPDATE, template=template, incident=incident)
    assert rendered.subject == "Checkout <script>alert(1)</script>"
    assert rendered.text == "Checkout <script>alert(1)</script> on Checkout & Pay. []"
    assert "&lt;script&gt;" in rendered.html
    assert "<script>" not in rendered.html
    assert "Checkout &amp; Pay" in rendered.html
    assert "password" not in rendered.text + rendered.html


def test_the_migration_made_one_default_per_kind_from_the_built_in_texts():
    defaults = {t.kind: t for t in MessageTemplate.objects.filter(is_default=True)}
    assert set(defaults) == set(TemplateKind.values)
    for kind, (subject, body) in BUILT_IN.items():
        assert (defaults[kind].subject, defaults[kind].body) == (subject, body)


def test_make_default_swaps_the_default_of_a_kind():
    old = MessageTemplate.objects.get(kind=TemplateKind.UPDATE, is_default=True)
    new = MessageTemplateFactory(kind=TemplateKind.UPDATE)
    message_template_make_default(template=new)
    old.refresh_from_db()
    new.refresh_from_db()
    assert (old.is_default, new.is_default) == (False, True)
    assert MessageTemplate.objects.filter(kind=TemplateKind.UPDATE, is_default=True).count() == 1


def test_preview_uses_the_incident_and_the_sample_for_the_rest(incident):
    template = MessageTemplateFactory(
        subject="{{ incident.reference }}", body="{{ maintenance.title }} / {{ incident.title }}"
    )
    rendered = template_preview(template, incident=incident)
    assert rendered.subject == incident.reference
    assert rendered.text == "Database upgrade / Checkout <script>alert(1)</script>"
    assert template_preview(template).subject == "INC-1000"


# --- the admin ----------------------------------------------------------------------------


def add_url() -> str:
    return reverse("admin:incidents_messagetemplate_add")


def form_errors(response) -> dict:
    return response.context["adminform"].form.errors


@pytest.mark.parametrize(
    ("subject", "body", "field"),
    [
        ("{% endif %}", "fine", "subject"),
        ("fine", "{% for x in %}", "body"),
        ("fine", "{{ incident.title|bogus }}", "body"),
        ("two\nlines", "fine", "subject"),
    ],
)
def test_admin_refuses_a_broken_template_naming_the_field(admin_client, subject, body, field):
    before = MessageTemplate.objects.count()
    response = admin_client.post(
        add_url(), {"name": "Broken", "kind": "update", "subject": subject, "body": body}
    )
    assert response.status_code == 200
    errors = form_errors(response)
    assert list(errors) == [field]
    assert MessageTemplate.objects.count() == before


def test_admin_saves_a_valid_template_and_refuses_a_second_default(admin_client):
    response = admin_client.post(
        add_url(),
        {
            "name": "Short update",
            "kind": "update",
            "subject": "{{ incident.reference }}",
            "body": "{{ update.body }}",
        },
    )
    assert response.status_code == 302
    assert MessageTemplate.objects.filter(name="Short update", is_default=False).exists()
    response = admin_client.post(
        add_url(),
        {
            "name": "Another",
            "kind": "update",
            "subject": "x",
            "body": "y",
            "is_default": "on",
        },
    )
    assert "is already the default" in form_errors(response)["is_default"][0]


def test_admin_make_default_action(admin_client):
    new = MessageTemplateFactory(kind=TemplateKind.RESOLUTION, name="Terse resolution")
    response = admin_client.post(
        reverse("admin:incidents_messagetemplate_changelist"),
        {"action": "make_default", "_selected_action": [new.pk]},
        follow=True,
    )
    assert (
        "is now the default resolution notice"
        in [str(m) for m in get_messages(response.wsgi_request)][0]
    )
    assert MessageTemplate.objects.get(kind=TemplateKind.RESOLUTION, is_default=True) == new


def test_preview_shows_subject_text_and_html_in_a_sandboxed_frame(admin_client, incident):
    template = MessageTemplate.objects.get(kind=TemplateKind.INITIAL, is_default=True)
    url = reverse("admin:incidents_messagetemplate_preview", args=[template.pk])
    change = admin_client.get(reverse("admin:incidents_messagetemplate_change", args=[template.pk]))
    assert url.encode() in change.content

    response = admin_client.get(url, {"incident": incident.reference.lower()})
    assert response.status_code == 200
    page = response.content.decode()
    assert "<script>alert(1)</script>" not in page
    assert f"{incident.reference}: Checkout &lt;script&gt;alert(1)&lt;/script&gt;" in page
    frame = re.search(r'<iframe id="preview-html" sandbox="" [^>]*srcdoc="([^"]*)"', page)
    assert frame, "the HTML part is in a sandboxed iframe"
    srcdoc = html.unescape(frame.group(1))  # what the frame's document holds
    assert "Payments &lt;b&gt;fail&lt;/b&gt;." in srcdoc  # escaped inside the frame too
    assert "<b>" not in srcdoc


def test_preview_of_an_unknown_incident_says_so_and_shows_the_sample(admin_client):
    template = MessageTemplate.objects.get(kind=TemplateKind.UPDATE, is_default=True)
    url = reverse("admin:incidents_messagetemplate_preview", args=[template.pk])
    response = admin_client.get(url, {"incident": "INC-99999"})
    page = response.content.decode()
    assert "There is no incident INC-99999" in page
    assert "INC-1000" in page


def test_preview_of_a_template_that_cannot_render_shows_the_error(admin_client):
    # Saved past the form (as an old row could be): the preview shows the error.
    broken = MessageTemplate.objects.create(
        kind="update", name="Old", subject="ok", body="{% if %}"
    )
    url = reverse("admin:incidents_messagetemplate_preview", args=[broken.pk])
    page = admin_client.get(url).content.decode()
    assert "This template cannot render" in page
    assert 'id="preview-html"' not in page


def test_viewers_see_templates_but_cannot_change_them(client):
    from .factories import UserFactory

    client.force_login(UserFactory(username="vic", groups=["Viewers"]))
    template = MessageTemplate.objects.filter(is_default=True).first()
    assert client.get(reverse("admin:incidents_messagetemplate_changelist")).status_code == 200
    preview = reverse("admin:incidents_messagetemplate_preview", args=[template.pk])
    assert client.get(preview).status_code == 200
    response = client.post(
        reverse("admin:incidents_messagetemplate_change", args=[template.pk]),
        {"name": "x", "kind": "update", "subject": "x", "body": "y"},
    )
    assert response.status_code == 403


def test_permission_groups_include_communications():
    groups = {
        g.name: set(g.permissions.values_list("codename", flat=True)) for g in Group.objects.all()
    }
    for name in ("Viewers", "Responders", "Incident managers"):
        assert {"view_statusupdate", "view_messagetemplate", "view_maintenancewindow"} <= groups[
            name
        ]
    assert "add_statusupdate" in groups["Responders"]
    assert "add_statusupdate" not in groups["Viewers"]
    assert {
        "change_messagetemplate",
        "add_subscriber",
        "add_customernotice",
        "change_maintenancewindow",
        "view_noticedelivery",
    } <= groups["Incident managers"]
    assert "view_subscriber" not in groups["Responders"]
    assert not any("change_statusupdate" in perms for perms in groups.values())


def test_defaults_module_matches_the_migration():
    from incidents.defaults import GROUPS

    for name, by_app in GROUPS.items():
        granted = set(
            Group.objects.get(name=name)
            .permissions.filter(content_type__app_label="incidents")
            .values_list("codename", flat=True)
        )
        assert set(by_app["incidents"]) <= granted, name


# --- audiences and escaping (review fixes) ----------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "body", "field", "problem"),
    [
        ("{{ incident.title|safe }}", "ok", "subject", "|safe filter is not allowed"),
        ("ok", "{{ incident.title|default:'x'|safe }}", "body", "|safe filter"),
        ("ok", "{% for s in incident.services|safeseq %}{{ s }}{% endfor %}", "body", "safeseq"),
        ("ok", "{% with t=incident.title|safe %}{{ t }}{% endwith %}", "body", "|safe"),
        ("ok", "{% if incident.title|safe %}x{% endif %}", "body", "|safe"),
        ("ok", "{% autoescape off %}{{ incident.title }}{% endautoescape %}", "body", "autoesc"),
        ("ok", "{% load %}{{ incident.title }}", "body", "{% load %} is not allowed"),
    ],
)
def test_template_validate_refuses_switching_escaping_off(subject, body, field, problem):
    with pytest.raises(InvalidInput, match=re.escape(problem)) as refused:
        template_validate(subject=subject, body=body)
    assert refused.value.field == field


def test_a_stored_template_that_switches_escaping_off_cannot_render(incident):
    # Saved past the admin's validation (an old row): refused when rendered, too.
    raw = MessageTemplateFactory(subject="x", body="{{ incident.customer_impact|safe }}")
    with pytest.raises(InvalidInput) as refused:
        render_message(kind=TemplateKind.UPDATE, template=raw, incident=incident)
    assert refused.value.field == "body"
    # Escaping switched on explicitly changes nothing and is allowed.
    template_validate(
        subject="x", body="{% autoescape on %}{{ incident.title }}{% endautoescape %}"
    )


def test_customers_get_no_responder_field_whatever_the_kind(incident):
    from incidents.comms.templates import CUSTOMERS, RESPONDERS

    private = ServiceFactory(name="Ledger", slug="ledger", is_public=False)
    incident.services.add(private)
    template = MessageTemplateFactory(
        kind=TemplateKind.INITIAL,
        subject="[{{ incident.severity }}] {{ incident.reference }}: {{ incident.title }}",
        body="{{ incident.status }} / {{ incident.services_list }} / {{ incident.severity_level }}",
    )
    for_customers = render_message(
        kind=TemplateKind.INITIAL, template=template, incident=incident, audience=CUSTOMERS
    )
    # Nobody declared it (actor=None): customers get its public title, as on the status page.
    assert for_customers.subject == "[] : Incident affecting Checkout & Pay"
    assert for_customers.text == "Investigating / Checkout & Pay /"  # public stage, no Ledger
    for_responders = render_message(
        kind=TemplateKind.INITIAL, template=template, incident=incident, audience=RESPONDERS
    )
    assert for_responders.subject.startswith(f"[Sev1] {incident.reference}: ")
    assert for_responders.text == "Triggered / Checkout & Pay, Ledger / 1"


def test_a_template_for_customers_may_not_name_responder_fields():
    from incidents.comms.templates import CUSTOMERS

    with pytest.raises(InvalidInput, match="uses incident.severity, which customers") as refused:
        template_validate(subject="ok", body="{{ incident.severity }}", audience=CUSTOMERS)
    assert refused.value.field == "body"
    with pytest.raises(InvalidInput) as refused:
        template_validate(
            subject="{{ x|default:incident.reference }}", body="ok", audience=CUSTOMERS
        )
    assert refused.value.field == "subject"
    for kind in (TemplateKind.CUSTOMER_NOTICE, TemplateKind.MAINTENANCE):
        template_validate(subject=BUILT_IN[kind][0], body=BUILT_IN[kind][1], audience=CUSTOMERS)
    leaky = MessageTemplateFactory(
        kind=TemplateKind.CUSTOMER_NOTICE, subject="{{ incident.reference }}"
    )
    with pytest.raises(InvalidInput):
        message_template_make_default(template=leaky)
    leaky.refresh_from_db()
    assert not leaky.is_default


def test_preview_of_a_customer_template_shows_what_customers_get(incident):
    template = MessageTemplateFactory(
        kind=TemplateKind.CUSTOMER_NOTICE,
        subject="Notice{{ incident.reference }}",
        body="{{ incident.severity }}{{ incident.title }}",
    )
    assert template_preview(template).subject == "Notice"
    rendered = template_preview(template, incident=incident)
    assert (rendered.subject, rendered.text) == ("Notice", "Incident affecting Checkout & Pay")
