from __future__ import annotations

from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone

from escalation.models import Team
from incidents import services
from incidents.defaults import ROLES
from incidents.models import Role, Service, Severity


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ["username"]
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    is_staff = True
    password = factory.PostGenerationMethodCall("set_password", "pw")

    @factory.post_generation
    def groups(self, create, extracted, **kwargs):
        if create and extracted:
            self.groups.add(*[Group.objects.get(name=name) for name in extracted])
        if create:
            self.save()


class TeamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Team
        django_get_or_create = ["slug"]

    name = factory.Sequence(lambda n: f"Team {n}")
    slug = factory.Sequence(lambda n: f"team-{n}")


class ServiceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Service
        django_get_or_create = ["slug"]

    name = factory.Sequence(lambda n: f"Service {n}")
    slug = factory.Sequence(lambda n: f"service-{n}")


# Sev1..Sev4 targets of the Ultimate Marketing playbook (seed 003), the demo's severities.
SEVERITY_TARGETS = {
    1: (timedelta(minutes=15), timedelta(hours=4), timedelta(minutes=30)),
    2: (timedelta(minutes=30), timedelta(hours=8), timedelta(hours=1)),
    3: (timedelta(hours=2), timedelta(hours=24), timedelta(hours=4)),
    4: (timedelta(hours=8), timedelta(hours=72), timedelta(days=1)),
}


class SeverityFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Severity
        django_get_or_create = ["level"]

    level = 1
    name = factory.LazyAttribute(lambda s: f"Sev{s.level}")
    ack_target = factory.LazyAttribute(
        lambda s: SEVERITY_TARGETS.get(s.level, SEVERITY_TARGETS[4])[0]
    )
    resolve_target = factory.LazyAttribute(
        lambda s: SEVERITY_TARGETS.get(s.level, SEVERITY_TARGETS[4])[1]
    )
    update_interval = factory.LazyAttribute(
        lambda s: SEVERITY_TARGETS.get(s.level, SEVERITY_TARGETS[4])[2]
    )
    postmortem_required = factory.LazyAttribute(lambda s: s.level <= 2)
    postmortem_due_after = timedelta(hours=48)


def role(slug: str = "incident-commander") -> Role:
    """A built-in role; recreated when a transactional test flushed the migration's rows."""
    for row_slug, name, order, description, responsibilities in ROLES:
        if row_slug == slug:
            return Role.objects.get_or_create(
                slug=slug,
                defaults={
                    "name": name,
                    "sort_order": order,
                    "description": description,
                    "responsibilities": responsibilities,
                },
            )[0]
    return Role.objects.get_or_create(slug=slug, defaults={"name": slug.title()})[0]


def declare(*, severity: Severity | None = None, actor=None, now=None, **kwargs):
    """Declare an incident through the service, as every real caller does."""
    return services.incident_declare(
        title=kwargs.pop("title", "Checkout is down"),
        severity=severity or SeverityFactory(level=1),
        actor=actor,
        now=now or timezone.now(),
        **kwargs,
    )


def integration(*, name: str | None = None, kind: str = "alertmanager", **fields):
    """An integration made through the service; returns (integration, token)."""
    from incidents.ingestion.services import integration_create

    integration.counter += 1
    return integration_create(name=name or f"source-{integration.counter}", kind=kind, **fields)


integration.counter = 0


class RunbookFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = "incidents.Runbook"
        django_get_or_create = ["code"]

    code = factory.Sequence(lambda n: f"RB-{n:02d}")
    title = factory.Sequence(lambda n: f"Runbook {n}")
    steps = "1. Check the service.\n2. Restart it."


class AlertRouteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = "incidents.AlertRoute"

    alert_name = "BackendServiceDown"
    runbook = factory.SubFactory(RunbookFactory)


def alertmanager_body(*alerts: dict, group_key: str = '{}:{alertname="X"}', status="firing"):
    """An Alertmanager v4 webhook body; each alert dict may give labels, status, fingerprint."""
    items = []
    for n, alert in enumerate(alerts):
        labels = {"alertname": "X", **alert.get("labels", {})}
        items.append(
            {
                "status": alert.get("status", status),
                "labels": labels,
                "annotations": alert.get("annotations", {"summary": f"{labels['alertname']}"}),
                "startsAt": alert.get("startsAt", "2026-01-01T00:00:00Z"),
                "endsAt": alert.get("endsAt", "0001-01-01T00:00:00Z"),
                "generatorURL": "http://prometheus.example/graph",
                "fingerprint": alert.get("fingerprint", f"fp{n}"),
            }
        )
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "tracker",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example",
        "alerts": items,
    }


# --- status page and maintenance (issue 6, helper C) ----------------------------------------


class StatusUpdateFactory(factory.django.DjangoModelFactory):
    """A status update row made directly (the status page only reads them); tests of the
    posting rules go through `incidents.comms.updates.status_update_post`."""

    class Meta:
        model = "incidents.StatusUpdate"

    body = factory.Sequence(lambda n: f"Update {n}")
    public = True
    stage = "investigating"
    posted_at = factory.LazyFunction(timezone.now)


class MaintenanceWindowFactory(factory.django.DjangoModelFactory):
    """A window row made directly, for reads; scheduling rules are tested through
    `incidents.comms.maintenance.maintenance_schedule`. `services=[...]` sets its services."""

    class Meta:
        model = "incidents.MaintenanceWindow"
        skip_postgeneration_save = True

    title = factory.Sequence(lambda n: f"Maintenance {n}")
    starts_at = factory.LazyFunction(lambda: timezone.now() + timedelta(days=1))
    ends_at = factory.LazyAttribute(lambda w: w.starts_at + timedelta(hours=2))
    created_at = factory.LazyFunction(timezone.now)

    @factory.post_generation
    def services(self, create, extracted, **kwargs):
        if create and extracted:
            self.services.set(extracted)


# --- customer notices (issue 6) -------------------------------------------------------------


class SubscriberFactory(factory.django.DjangoModelFactory):
    """A confirmed subscriber; `services=[...]` to follow some, `confirmed_at=None` for one
    who never confirmed."""

    class Meta:
        model = "incidents.Subscriber"
        django_get_or_create = ["email"]
        skip_postgeneration_save = True

    email = factory.Sequence(lambda n: f"customer{n}@example.org")
    confirmed_at = factory.LazyFunction(timezone.now)
    unsubscribe_token = factory.Sequence(lambda n: f"unsubscribe-token-{n:06d}")

    @factory.post_generation
    def services(self, create, extracted, **kwargs):
        if create and extracted:
            self.services.add(*extracted)


# --- status updates and templates (issue 6, helper A) ---------------------------------------


class MessageTemplateFactory(factory.django.DjangoModelFactory):
    """A message template row; `kind` one of TemplateKind, not the default unless said."""

    class Meta:
        model = "incidents.MessageTemplate"

    kind = "update"
    name = factory.Sequence(lambda n: f"Template {n}")
    subject = "[{{ incident.severity }}] {{ incident.reference }}"
    body = "{{ update.stage }}: {{ update.body }}"
    is_default = False


def assign(incident, slug: str, user):
    """Give `user` the role `slug` on the incident, through the service."""
    return services.incident_assign_role(incident=incident, role=role(slug), user=user, actor=None)
