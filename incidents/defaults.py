"""Built-in rows every installation starts with: the four roles of the playbooks and the
permission groups, as they are now. `load_demo` (and tests) call these; the migrations keep
frozen copies of what they created."""

from __future__ import annotations

from django.apps.registry import Apps
from django.contrib.auth.management import create_permissions

ROLES = [
    (
        "incident-commander",
        "Incident Commander",
        10,
        "Owns the incident: coordinates, decides, and manages escalation and stakeholders.",
        "Assess severity and mobilise the response\nCoordinate teams and keep communication "
        "clear\nMake go/no-go calls on resolution attempts\nDecide when to escalate",
    ),
    (
        "technical-lead",
        "Technical Lead",
        20,
        "Leads diagnosis and the technical fix.",
        "Lead the investigation\nCoordinate the fix across engineering teams\n"
        "Give the commander technical updates\nConfirm the fix holds",
    ),
    (
        "communications-lead",
        "Communications Lead",
        30,
        "Keeps stakeholders and customers informed.",
        "Write customer notices\nKeep the status page current\nBrief customer support\n"
        "Send stakeholder updates on the cadence",
    ),
    (
        "scribe",
        "Scribe",
        40,
        "Keeps the timeline: decisions, actions and findings as they happen.",
        "Record events and decisions with times\nCapture hypotheses and their results\n"
        "Collect material for the post-mortem",
    ),
]

# Group name -> {app_label: [model permission codenames]}.
ESCALATION_VIEW = [
    "view_team",
    "view_person",
    "view_contactmethod",
    "view_rotation",
    "view_rotationmember",
    "view_override",
    "view_businesscalendar",
    "view_escalationpolicy",
    "view_escalationstep",
    "view_steptarget",
    "view_page",
    "view_pageattempt",
]
ESCALATION_MANAGE = [
    f"{verb}_{model}"
    for verb in ("add", "change", "delete")
    for model in (
        "person",
        "contactmethod",
        "rotation",
        "rotationmember",
        "override",
        "businesscalendar",
        "escalationpolicy",
        "escalationstep",
        "steptarget",
    )
]

ALERTS_VIEW = ["view_alert", "view_runbook", "view_alertroute"]
ALERTS_MANAGE = [
    "view_integration",
    "add_integration",
    "change_integration",
    "add_runbook",
    "change_runbook",
    "add_alertroute",
    "change_alertroute",
    "delete_alertroute",
    "view_alertdelivery",
    "change_alertdelivery",
]

# Communications (issue 6): everyone reads updates, templates, windows and notices;
# responders post status updates; managers run templates, subscribers, notices, windows.
COMMS_VIEW = [
    "view_statusupdate",
    "view_messagetemplate",
    "view_maintenancewindow",
    "view_customernotice",
]
COMMS_MANAGE = [
    "add_messagetemplate",
    "change_messagetemplate",
    "delete_messagetemplate",
    "view_subscriber",
    "add_subscriber",
    "change_subscriber",
    "delete_subscriber",
    "add_customernotice",
    "change_customernotice",
    "add_maintenancewindow",
    "change_maintenancewindow",
    "delete_maintenancewindow",
    "view_noticedelivery",
]

GROUPS: dict[str, dict[str, list[str]]] = {
    "Viewers": {
        "incidents": [
            "view_incident",
            "view_timelineevent",
            "view_service",
            "view_severity",
            "view_role",
            "view_roleassignment",
            *ALERTS_VIEW,
            *COMMS_VIEW,
        ],
        "escalation": ESCALATION_VIEW,
    },
    "Responders": {
        "incidents": [
            "view_incident",
            "add_incident",
            "change_incident",
            "view_timelineevent",
            "view_service",
            "view_severity",
            "view_role",
            "view_roleassignment",
            *ALERTS_VIEW,
            *COMMS_VIEW,
            "add_statusupdate",
        ],
        "escalation": [*ESCALATION_VIEW, "add_override", "change_override", "delete_override"],
    },
    "Incident managers": {
        "incidents": [
            "view_incident",
            "add_incident",
            "change_incident",
            "view_timelineevent",
            "view_service",
            "add_service",
            "change_service",
            "view_severity",
            "change_severity",
            "view_role",
            "add_role",
            "change_role",
            "view_roleassignment",
            *ALERTS_VIEW,
            *ALERTS_MANAGE,
            *COMMS_VIEW,
            "add_statusupdate",
            *COMMS_MANAGE,
        ],
        "escalation": [*ESCALATION_VIEW, *ESCALATION_MANAGE, "add_team", "change_team"],
    },
}


def ensure_roles(apps: Apps) -> None:
    Role = apps.get_model("incidents", "Role")
    for slug, name, order, description, responsibilities in ROLES:
        Role.objects.get_or_create(
            slug=slug,
            defaults={
                "name": name,
                "sort_order": order,
                "description": description,
                "responsibilities": responsibilities,
            },
        )


def ensure_groups(apps: Apps) -> None:
    """Create the groups and give them at least these permissions (extras an admin added stay)."""
    # Permissions are normally created after migrate; make sure they exist now. Historical
    # app configs have no models module, which create_permissions insists on.
    for config in apps.get_app_configs():
        original = getattr(config, "models_module", None)
        config.models_module = original or True
        try:
            create_permissions(config, apps=apps, verbosity=0)
        finally:
            config.models_module = original
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, by_app in GROUPS.items():
        group, _ = Group.objects.get_or_create(name=name)
        for app_label, codenames in by_app.items():
            perms = Permission.objects.filter(
                content_type__app_label=app_label, codename__in=codenames
            )
            missing = set(codenames) - set(perms.values_list("codename", flat=True))
            if missing:
                raise LookupError(f"group {name}: unknown permissions {sorted(missing)}")
            group.permissions.add(*perms)


def ensure_templates(apps: Apps) -> None:
    """One default message template per kind, from the built-in texts, where a kind has
    none (templates an admin edited stay as they are)."""
    from incidents.comms.templates import BUILT_IN
    from incidents.models import TemplateKind

    MessageTemplate = apps.get_model("incidents", "MessageTemplate")
    for kind, (subject, body) in BUILT_IN.items():
        if MessageTemplate.objects.filter(kind=kind, is_default=True).exists():
            continue
        MessageTemplate.objects.get_or_create(
            name=f"{TemplateKind(kind).label} (built-in)",
            defaults={"kind": kind, "subject": subject, "body": body, "is_default": True},
        )
