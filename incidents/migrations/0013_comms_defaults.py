"""Communications join the permission groups, and each kind of message gets its default
template. Frozen copies of incidents.defaults (the grants) and of
incidents.comms.templates.BUILT_IN (the templates) as they were when this was written.

Viewers and responders read status updates, templates, maintenance windows and notices;
responders also post status updates; incident managers manage templates, subscribers,
notices and maintenance windows, and see each notice's deliveries."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

VIEW = [
    "view_statusupdate",
    "view_messagetemplate",
    "view_maintenancewindow",
    "view_customernotice",
]
MANAGE = [
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
GRANTS = {
    "Viewers": VIEW,
    "Responders": [*VIEW, "add_statusupdate"],
    "Incident managers": [*VIEW, "add_statusupdate", *MANAGE],
}

# (kind, name, subject, body): one default per kind.
TEMPLATES = [
    (
        "initial",
        "Initial alert (built-in)",
        "[{{ incident.severity }}] {{ incident.reference }}: {{ incident.title }}",
        "{{ incident.reference }} was declared at {{ incident.detected_at }}.\n\nSeverity: {{ incident.severity }}\nStatus: {{ incident.status }}\nServices: {{ incident.services_list|default:'none named yet' }}\nImpact: {{ incident.impact }}\n\n{{ incident.customer_impact }}",
    ),
    (
        "update",
        "Status update (built-in)",
        "[{{ incident.severity }}] Update on {{ incident.reference }}: {{ incident.title }}",
        "{{ update.stage }}: {{ update.body }}\n\nStatus: {{ incident.status }}\nImpact: {{ incident.impact }}",
    ),
    (
        "resolution",
        "Resolution notice (built-in)",
        "[Resolved] {{ incident.reference }}: {{ incident.title }}",
        "{{ incident.reference }} was resolved at {{ incident.resolved_at }}.\n\n{{ update.body }}",
    ),
    (
        "customer_notice",
        "Customer notice (built-in)",
        "{{ site_name }}: {{ incident.title }}",
        "{% if incident.is_resolved %}This issue is resolved.{% else %}We are working on an issue affecting {{ incident.services_list|default:'our services' }}.{% endif %}\n\n{{ update.body|default:incident.customer_impact }}\n\nCurrent status: {{ status_url }}",
    ),
    (
        "maintenance",
        "Maintenance announcement (built-in)",
        "{{ site_name }} maintenance: {{ maintenance.title }}",
        "Scheduled maintenance of {{ maintenance.services_list }} from {{ maintenance.starts_at }} to {{ maintenance.ends_at }}.\n\n{{ maintenance.description }}\n\nCurrent status: {{ status_url }}",
    ),
]


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


def default_templates(apps, schema_editor):
    MessageTemplate = apps.get_model("incidents", "MessageTemplate")
    for kind, name, subject, body in TEMPLATES:
        has_default = MessageTemplate.objects.filter(kind=kind, is_default=True).exists()
        MessageTemplate.objects.get_or_create(
            name=name,
            defaults={
                "kind": kind,
                "subject": subject,
                "body": body,
                "is_default": not has_default,
            },
        )


class Migration(migrations.Migration):
    dependencies = [("incidents", "0012_communications")]

    operations = [
        migrations.RunPython(grant, migrations.RunPython.noop),
        migrations.RunPython(default_templates, migrations.RunPython.noop),
    ]
