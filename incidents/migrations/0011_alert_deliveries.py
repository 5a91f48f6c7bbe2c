"""Accepted webhook requests, stored as received and applied by a worker. Incident
managers (who configure integrations) may view them and re-queue failed ones. The grants
are a frozen copy of incidents.defaults."""

import django.db.models.deletion
import django.utils.timezone
from django.contrib.auth.management import create_permissions
from django.db import migrations, models

GRANTS = {"Incident managers": ["view_alertdelivery", "change_alertdelivery"]}


def grant(apps, schema_editor):
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
        if group is not None:
            perms = Permission.objects.filter(
                content_type__app_label="incidents", codename__in=codenames
            )
            group.permissions.add(*perms)


class Migration(migrations.Migration):
    dependencies = [
        ("incidents", "0010_alert_permissions"),
    ]

    operations = [
        migrations.CreateModel(
            name="AlertDelivery",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("received_at", models.DateTimeField(default=django.utils.timezone.now)),
                ("body", models.TextField()),
                (
                    "status",
                    models.CharField(
                        choices=[("pending", "Pending"), ("done", "Applied"), ("failed", "Failed")],
                        default="pending",
                        max_length=10,
                    ),
                ),
                ("attempts", models.PositiveSmallIntegerField(default=0)),
                ("error", models.TextField(blank=True)),
                ("applied_at", models.DateTimeField(blank=True, null=True)),
                ("alerts", models.PositiveIntegerField(default=0, help_text="Alerts in the body.")),
                (
                    "incidents",
                    models.JSONField(blank=True, default=list, help_text="References touched."),
                ),
                (
                    "integration",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="deliveries",
                        to="incidents.integration",
                    ),
                ),
            ],
            options={
                "verbose_name_plural": "alert deliveries",
                "ordering": ["-pk"],
                "indexes": [
                    models.Index(
                        condition=models.Q(("status", "pending")),
                        fields=["integration", "id"],
                        name="alertdelivery_pending",
                    ),
                    models.Index(
                        condition=models.Q(("status", "failed")),
                        fields=["id"],
                        name="alertdelivery_failed",
                    ),
                    models.Index(
                        condition=models.Q(("status", "done")),
                        fields=["received_at"],
                        name="alertdelivery_done",
                    ),
                ],
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("status__in", ["pending", "done", "failed"])),
                        name="alertdelivery_status_valid",
                    )
                ],
            },
        ),
        migrations.RunPython(grant, migrations.RunPython.noop),
    ]
