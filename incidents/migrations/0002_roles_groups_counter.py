from django.db import migrations

from incidents.defaults import ensure_groups, ensure_roles


def forwards(apps, schema_editor):
    ensure_roles(apps)
    apps.get_model("incidents", "Counter").objects.get_or_create(name="incident")
    ensure_groups(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("incidents", "0001_initial"),
        ("escalation", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
