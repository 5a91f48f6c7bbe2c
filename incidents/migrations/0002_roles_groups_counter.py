"""Built-in roles, the incident counter and the permission groups, as they were at this
migration (frozen here: a migration must not depend on code that changes later)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

ROLES = [
    (
        "incident-commander",
        "Incident Commander",
        10,
        "Owns the incident: coordinates, decides, and manages escalation and stakeholders.",
        "Assess severity and mobilise the response\n"
        "Coordinate teams and keep communication clear\n"
        "Make go/no-go calls on resolution attempts\n"
        "Decide when to escalate",
    ),
    (
        "technical-lead",
        "Technical Lead",
        20,
        "Leads diagnosis and the technical fix.",
        "Lead the investigation\n"
        "Coordinate the fix across engineering teams\n"
        "Give the commander technical updates\n"
        "Confirm the fix holds",
    ),
    (
        "communications-lead",
        "Communications Lead",
        30,
        "Keeps stakeholders and customers informed.",
        "Write customer notices\n"
        "Keep the status page current\n"
        "Brief customer support\n"
        "Send stakeholder updates on the cadence",
    ),
    (
        "scribe",
        "Scribe",
        40,
        "Keeps the timeline: decisions, actions and findings as they happen.",
        "Record events and decisions with times\n"
        "Capture hypotheses and their results\n"
        "Collect material for the post-mortem",
    ),
]

GROUPS = {
    "Incident managers": {
        "auth": ["view_user"],
        "escalation": ["view_team", "add_team", "change_team"],
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
        ],
    },
    "Responders": {
        "auth": ["view_user"],
        "escalation": ["view_team"],
        "incidents": [
            "view_incident",
            "add_incident",
            "change_incident",
            "view_timelineevent",
            "view_service",
            "view_severity",
            "view_role",
            "view_roleassignment",
        ],
    },
    "Viewers": {
        "escalation": ["view_team"],
        "incidents": [
            "view_incident",
            "view_timelineevent",
            "view_service",
            "view_severity",
            "view_role",
            "view_roleassignment",
        ],
    },
}


def forwards(apps, schema_editor):
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
    apps.get_model("incidents", "Counter").objects.get_or_create(name="incident")
    # Permissions are normally created after migrate; they are needed now.
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
            group.permissions.add(
                *Permission.objects.filter(
                    content_type__app_label=app_label, codename__in=codenames
                )
            )


class Migration(migrations.Migration):
    dependencies = [
        ("incidents", "0001_initial"),
        ("escalation", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
