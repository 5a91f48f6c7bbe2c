"""Escalation permissions for the built-in groups (frozen here, as migrations must be)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

VIEW = [
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
GROUPS = {
    "Viewers": VIEW,
    # Responders arrange their own swaps and absences.
    "Responders": [*VIEW, "add_override", "change_override", "delete_override"],
    "Incident managers": [
        *VIEW,
        *(
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
        ),
    ],
}


def forwards(apps, schema_editor):
    for config in apps.get_app_configs():
        original = getattr(config, "models_module", None)
        config.models_module = original or True
        try:
            create_permissions(config, apps=apps, verbosity=0)
        finally:
            config.models_module = original
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, codenames in GROUPS.items():
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.add(
            *Permission.objects.filter(content_type__app_label="escalation", codename__in=codenames)
        )


class Migration(migrations.Migration):
    dependencies = [
        ("escalation", "0003_page_plan_version_repeat_after"),
        ("incidents", "0007_groups_without_user_directory"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
