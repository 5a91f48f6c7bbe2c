"""Alerts, runbooks and routes join the permission groups: everyone reads them; incident
managers configure integrations, runbooks and routes. A frozen copy of incidents.defaults."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

VIEW = ["view_alert", "view_runbook", "view_alertroute"]
MANAGE = [
    "view_integration",
    "add_integration",
    "change_integration",
    "add_runbook",
    "change_runbook",
    "add_alertroute",
    "change_alertroute",
    "delete_alertroute",
]
GRANTS = {"Viewers": VIEW, "Responders": VIEW, "Incident managers": VIEW + MANAGE}


def forwards(apps, schema_editor):
    config = apps.get_app_config("incidents")
    original = getattr(config, "models_module", None)
    config.models_module = original or True
    try:
        create_permissions(config, apps=apps, verbosity=0)
    finally:
        config.models_module = original
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, codenames in GRANTS.items():
        group = Group.objects.filter(name=name).first()
        if group is None:
            continue
        perms = Permission.objects.filter(content_type__app_label="incidents", codename__in=codenames)
        group.permissions.add(*perms)


class Migration(migrations.Migration):
    dependencies = [("incidents", "0009_alert_ingestion")]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
