"""Responders and incident managers no longer need to read the user directory: the role
picker has its own autocomplete, limited to active usernames."""

from django.db import migrations


def forwards(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    view_user = Permission.objects.filter(content_type__app_label="auth", codename="view_user")
    for group in Group.objects.filter(name__in=["Responders", "Incident managers"]):
        group.permissions.remove(*view_user)


class Migration(migrations.Migration):
    dependencies = [("incidents", "0006_timeline_audit_integrity")]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
