"""Demo data for `make run`: built through the services, so timelines are real.

Idempotent: configuration is matched by natural keys, and a demo incident is created only if
no incident with its title exists yet.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TextIO

from django.apps import apps as django_apps
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.utils import timezone

from escalation.models import Team

from . import services
from .comms.maintenance import maintenance_schedule
from .comms.updates import status_update_post
from .defaults import ensure_groups, ensure_roles
from .models import (
    AlertRoute,
    Impact,
    Incident,
    IncidentStatus,
    Integration,
    IntegrationKind,
    MaintenanceWindow,
    Role,
    Runbook,
    Service,
    Severity,
)

S = IncidentStatus
DEMO_ADMIN = "admin"
DEMO_PASSWORD_ENV = "DEMO_ADMIN_PASSWORD"  # noqa: S105 - the variable name
# The embedded demo's login, printed by `make run`; never used in production.
DEFAULT_DEMO_PASSWORD = "incident-demo"  # noqa: S105

# Targets from the Ultimate Marketing playbook (seed 003): response 15 min / 30 min / 2 h /
# 8 h, resolution 4 h / 8 h / 24 h / 72 h, updates every 30 min / 1 h / 4 h / daily;
# post-mortem meetings within 24-48 h for P1/P2 and within a week for P3/P4.
SEVERITIES = [
    dict(
        level=1,
        name="Sev1",
        description="Critical outage affecting all users.",
        examples="Complete API outage\nDatabase unavailable\nAll content generation failing",
        ack_target=timedelta(minutes=15),
        resolve_target=timedelta(hours=4),
        update_interval=timedelta(minutes=30),
        postmortem_required=True,
        postmortem_due_after=timedelta(hours=48),
        notify_customers=True,
    ),
    dict(
        level=2,
        name="Sev2",
        description="Partial outage of key functionality.",
        examples="Specific API endpoints unavailable\nMajor performance degradation",
        ack_target=timedelta(minutes=30),
        resolve_target=timedelta(hours=8),
        update_interval=timedelta(hours=1),
        postmortem_required=True,
        postmortem_due_after=timedelta(hours=48),
        notify_customers=True,
    ),
    dict(
        level=3,
        name="Sev3",
        description="Minor impact on a few users or a non-critical feature.",
        examples="Non-critical feature unavailable\nIntermittent errors",
        ack_target=timedelta(hours=2),
        resolve_target=timedelta(hours=24),
        update_interval=timedelta(hours=4),
        postmortem_required=False,
        postmortem_due_after=timedelta(days=7),
        notify_customers=False,
    ),
    dict(
        level=4,
        name="Sev4",
        description="No immediate user impact; needs attention.",
        examples="System warnings\nError budget consumption increase",
        ack_target=timedelta(hours=8),
        resolve_target=timedelta(hours=72),
        update_interval=timedelta(days=1),
        postmortem_required=False,
        postmortem_due_after=timedelta(days=7),
        notify_customers=False,
    ),
]

SERVICES = [
    ("api", "API", "Public REST API"),
    ("web", "Web app", "Customer-facing web application"),
    ("payments", "Payments", "Payment processing"),
    ("auth", "Authentication", "Login and token issuing"),
    ("database", "Database", "Primary PostgreSQL cluster"),
]

PEOPLE = [
    ("alice", "Alice", "Responders"),
    ("bob", "Bob", "Responders"),
    ("carol", "Carol", "Incident managers"),
    ("victor", "Victor", "Viewers"),
]


# The Pivotal Flow runbooks (seed 004): code, title, severity level, scope; the steps are
# our own summary. Its "Medium-High" for RB-03 is taken as Sev2. Reviewed monthly.
RUNBOOKS = [
    (
        "RB-01",
        "Backend service down",
        1,
        "The backend is unreachable or failing its health checks.",
        """1. **Confirm** the outage: health endpoint, `up` metric, container state.
2. Check the host: CPU, memory, disk, network.
3. Check dependencies: database, cache, upstream APIs.
4. Read the last logs before the failure; note any deploy in the last hour.
5. Restart the service (or roll back the deploy) and watch the health check.
6. Watch error rate and latency for 15 minutes before calling it resolved.

Escalate to the team lead after 30 minutes without a cause.""",
    ),
    (
        "RB-02",
        "Database issues",
        2,
        "Slow queries, exhausted connections or a database that refuses connections.",
        """1. Check that the database accepts connections from the application hosts.
2. Compare active connections with the pool size; look for idle-in-transaction sessions.
3. List the slowest running queries; cancel a runaway one if it blocks others.
4. Check locks, replication lag and disk space.
5. Add the missing index or refresh statistics once the pressure is off.

Escalate to the DevOps lead after an hour, or at once if data may be lost.""",
    ),
    (
        "RB-03",
        "Cache issues",
        2,
        "Redis unavailable, memory pressure, evictions or a falling hit rate.",
        """1. `PING` the cache from an application host.
2. Check memory use against `maxmemory` and the eviction rate.
3. Check the hit rate: a sudden drop often follows a deploy that changed keys.
4. Free memory (expire stale keys) or scale the cache; restart only as a last resort.
5. Confirm the hit rate and latency recover.""",
    ),
]
# Its alert-to-runbook mapping; Critical alerts open Sev1 incidents, Warnings Sev3.
CRITICAL, WARNING = 1, 3
ALERT_ROUTES = [
    ("BackendServiceDown", "RB-01", CRITICAL),
    ("HighErrorRate", "RB-01", WARNING),
    ("SlowRequests", "RB-01", WARNING),
    ("DatabaseSlowQueries", "RB-02", WARNING),
    ("DatabaseHighConnections", "RB-02", WARNING),
    ("DatabaseConnectionFailure", "RB-02", CRITICAL),
    ("RedisHighEvictions", "RB-03", WARNING),
    ("RedisConnectionFailure", "RB-03", CRITICAL),
    ("CacheLowHitRate", "RB-03", WARNING),
    ("RedisHighMemoryUsage", "RB-03", WARNING),
]
DEMO_INTEGRATION = "Prometheus (demo)"


@dataclass
class DemoIncident:
    title: str
    level: int
    services: tuple[str, ...]
    age: timedelta
    path: tuple[tuple[str, timedelta], ...]  # (status, minutes after detection)
    impact: str = Impact.NONE
    commander: str | None = None
    notes: tuple[str, ...] = ()
    is_drill: bool = False
    # What the status page says, a few minutes after detection (empty: nothing public).
    public_update: str = ""


M = timedelta(minutes=1)
INCIDENTS = [
    DemoIncident(
        "Checkout returns 502 for all users", 1, ("payments", "api"), 9 * M, (), Impact.MAJOR_OUTAGE
    ),
    DemoIncident(
        "Login latency above 2 s",
        2,
        ("auth",),
        50 * M,
        ((S.ACKNOWLEDGED, 12 * M), (S.INVESTIGATING, 20 * M)),
        Impact.DEGRADED,
        "alice",
        ("Token cache hit rate fell to 40% after the 14:00 deploy.",),
        public_update="Signing in is slower than usual. We are investigating.",
    ),
    DemoIncident(
        "Primary database replica lag 15 min",
        1,
        ("database",),
        3 * 60 * M,
        ((S.ACKNOWLEDGED, 5 * M), (S.INVESTIGATING, 9 * M), (S.MITIGATING, 70 * M)),
        Impact.PARTIAL_OUTAGE,
        "carol",
        ("Replica disk IOPS saturated; failing reads over to the primary.",),
        public_update="Some pages may show data that is a few minutes old.",
    ),
    DemoIncident(
        "Search results missing images",
        3,
        ("web",),
        5 * 60 * M,
        ((S.ACKNOWLEDGED, 40 * M), (S.MONITORING, 3 * 60 * M)),
        Impact.DEGRADED,
        "bob",
    ),
    DemoIncident(
        "Nightly export job failing",
        4,
        ("api",),
        26 * 60 * M,
        (),
    ),
    DemoIncident("Webhooks delayed by 10 minutes", 3, ("api",), 30 * 60 * M, ()),
    DemoIncident(
        "Payment provider timeouts",
        1,
        ("payments",),
        3 * 24 * 60 * M,
        (
            (S.ACKNOWLEDGED, 4 * M),
            (S.INVESTIGATING, 6 * M),
            (S.MITIGATING, 45 * M),
            (S.MONITORING, 95 * M),
            (S.RESOLVED, 140 * M),
        ),
        Impact.MAJOR_OUTAGE,
        "carol",
        ("Provider confirmed a regional outage on their side.",),
        public_update="Card payments are failing. We are working with our payment provider.",
    ),
    DemoIncident(
        "Password reset emails not sent",
        2,
        ("auth",),
        5 * 24 * 60 * M,
        ((S.ACKNOWLEDGED, 45 * M), (S.INVESTIGATING, 60 * M), (S.RESOLVED, 10 * 60 * M)),
        Impact.PARTIAL_OUTAGE,
        "alice",
    ),
    DemoIncident(
        "Dashboard charts render blank",
        3,
        ("web",),
        8 * 24 * 60 * M,
        ((S.ACKNOWLEDGED, 30 * M), (S.RESOLVED, 5 * 60 * M), (S.CLOSED, 2 * 24 * 60 * M)),
        Impact.DEGRADED,
        "bob",
    ),
    DemoIncident(
        "Disk usage warning on log hosts",
        4,
        ("database",),
        12 * 24 * 60 * M,
        ((S.ACKNOWLEDGED, 3 * 60 * M), (S.RESOLVED, 20 * 60 * M), (S.CLOSED, 3 * 24 * 60 * M)),
    ),
    DemoIncident(
        "API error rate 8% after deploy",
        2,
        ("api", "web"),
        2 * 24 * 60 * M,
        (
            (S.ACKNOWLEDGED, 8 * M),
            (S.RESOLVED, 50 * M),
            (S.INVESTIGATING, 80 * M),
            (S.MITIGATING, 100 * M),
        ),
        Impact.PARTIAL_OUTAGE,
        "alice",
        ("Rollback did not hold: errors returned after 30 minutes.",),
    ),
    DemoIncident(
        "Tabletop: region failover",
        1,
        ("api", "database"),
        20 * 24 * 60 * M,
        (
            (S.ACKNOWLEDGED, 3 * M),
            (S.MITIGATING, 30 * M),
            (S.RESOLVED, 60 * M),
            (S.CLOSED, 2 * 60 * M),
        ),
        Impact.NONE,
        "carol",
        is_drill=True,
    ),
]


def demo_password() -> str:
    return os.environ.get(DEMO_PASSWORD_ENV) or DEFAULT_DEMO_PASSWORD


@transaction.atomic
def load_demo(*, now: datetime | None = None, out: TextIO | None = None) -> dict[str, int]:
    """Create the demo configuration, users and incidents that do not exist yet.

    The demo Alertmanager integration's token is written to `out` (default: standard
    output) only in the run that creates the integration: it is not stored, so later runs
    cannot print it (rotate it in the admin for a new one)."""
    now = now or timezone.now()
    ensure_roles(django_apps)
    ensure_groups(django_apps)
    created = {
        "severities": 0,
        "services": 0,
        "users": 0,
        "incidents": 0,
        "runbooks": 0,
        "alert routes": 0,
        "integrations": 0,
        "maintenance windows": 0,
    }

    for values in SEVERITIES:
        _, made = Severity.objects.get_or_create(level=values["level"], defaults=values)
        created["severities"] += made
    severities = {s.level: s for s in Severity.objects.all()}

    User = get_user_model()
    admin_user, made = User.objects.get_or_create(
        username=DEMO_ADMIN,
        defaults={"is_staff": True, "is_superuser": True, "email": "admin@example.com"},
    )
    if made:
        admin_user.set_password(demo_password())
        admin_user.save(update_fields=["password"])
        created["users"] += 1
    people = {DEMO_ADMIN: admin_user}
    for username, first_name, group in PEOPLE:
        user, made = User.objects.get_or_create(
            username=username,
            defaults={
                "first_name": first_name,
                "is_staff": True,
                "email": f"{username}@example.com",
            },
        )
        if made:
            user.set_password(demo_password())
            user.save(update_fields=["password"])
            user.groups.add(Group.objects.get(name=group))
            created["users"] += 1
        people[username] = user

    team, _ = Team.objects.get_or_create(slug="platform", defaults={"name": "Platform"})
    team.members.add(*people.values())

    _load_escalation(team, people, severities, now)

    for slug, name, description in SERVICES:
        _, made = Service.objects.get_or_create(
            slug=slug, defaults={"name": name, "description": description, "team": team}
        )
        created["services"] += made
    service_map = {s.slug: s for s in Service.objects.all()}

    _load_alerting(team, severities, created, out or sys.stdout)

    commander = Role.objects.get(slug="incident-commander")
    existing = set(
        Incident.objects.filter(title__in=[d.title for d in INCIDENTS]).values_list(
            "title", flat=True
        )
    )
    for demo in sorted(INCIDENTS, key=lambda d: -d.age):
        if demo.title in existing:
            continue
        detected = now - demo.age
        incident = services.incident_declare(
            title=demo.title,
            severity=severities[demo.level],
            actor=admin_user,
            services=[service_map[s] for s in demo.services],
            team=team,
            impact=demo.impact,
            is_drill=demo.is_drill,
            detected_at=detected,
            now=detected,
            summary=f"Demo incident: {demo.title.lower()}.",
        )
        holder = people.get(demo.commander) if demo.commander else None
        for status, offset in demo.path:
            at = detected + offset
            if holder and status != S.ACKNOWLEDGED and not incident.role_assignments.exists():
                services.incident_assign_role(
                    incident=incident, role=commander, user=holder, actor=holder, now=at
                )
            if status == S.INVESTIGATING and incident.status == S.RESOLVED:
                services.incident_reopen(
                    incident=incident, actor=holder, reason="The fix did not hold.", now=at
                )
            else:
                services.incident_transition(
                    incident=incident, to=status, actor=holder or admin_user, now=at
                )
        for index, note in enumerate(demo.notes, start=1):
            services.incident_add_note(
                incident=incident,
                body=note,
                actor=holder or admin_user,
                now=min(now, detected + demo.age * index / 4),
            )
        if demo.public_update:
            status_update_post(
                incident=incident,
                body=demo.public_update,
                public=True,
                actor=holder or admin_user,
                now=min(now, detected + 3 * M),
            )
        created["incidents"] += 1
    _load_maintenance(service_map, admin_user, created, now)
    return created


DEMO_MAINTENANCE = "Database upgrade to PostgreSQL 17"


def _load_maintenance(service_map, actor, created: dict[str, int], now: datetime) -> None:
    """One maintenance window two days ahead, shown on the status page (not announced: the
    demo has no subscribers)."""
    if MaintenanceWindow.objects.filter(title=DEMO_MAINTENANCE).exists():
        return
    starts = (now + timedelta(days=2)).replace(hour=2, minute=0, second=0, microsecond=0)
    maintenance_schedule(
        title=DEMO_MAINTENANCE,
        description="The database is upgraded; the API may answer slowly for a few minutes.",
        service_ids=[service_map["database"].pk, service_map["api"].pk],
        starts_at=starts,
        ends_at=starts + timedelta(hours=1),
        actor=actor,
        now=now,
    )
    created["maintenance windows"] = created.get("maintenance windows", 0) + 1


def _load_alerting(team, severities, created: dict[str, int], out: TextIO) -> None:
    """The Pivotal Flow runbooks and alert routes, and an Alertmanager integration."""
    from .admin_alerts import integration_endpoints
    from .ingestion.services import integration_create

    runbooks = {}
    for code, title, level, scope, steps in RUNBOOKS:
        runbooks[code], made = Runbook.objects.get_or_create(
            code=code,
            defaults={
                "title": title,
                "severity": severities.get(level),
                "scope": scope,
                "steps": steps,
                "review_interval": timedelta(days=30),
            },
        )
        created["runbooks"] += made
    for position, (alert_name, code, level) in enumerate(ALERT_ROUTES, start=1):
        _, made = AlertRoute.objects.get_or_create(
            alert_name=alert_name,
            integration=None,
            defaults={
                "position": position * 10,
                "runbook": runbooks[code],
                "severity": severities.get(level),
            },
        )
        created["alert routes"] += made
    if Integration.objects.filter(name=DEMO_INTEGRATION).exists():
        return
    integration, token = integration_create(
        name=DEMO_INTEGRATION, kind=IntegrationKind.ALERTMANAGER, default_team=team
    )
    created["integrations"] += 1
    url = integration_endpoints(integration, token).webhook_url
    out.write(
        f"\n  Alertmanager webhook for {DEMO_INTEGRATION} (the token is shown only now):\n"
        f"    {url}\n\n"
    )


def _load_escalation(team, people, severities, now) -> None:
    """People with email contact methods, a weekly rotation, and the paging policies: on call
    at once, next in line after 15 min (30 min for Sev2), the CTO after 30 min while Sev1 is
    unresolved (the management matrix of the Alchemorsel and multi-service playbooks)."""
    from escalation.models import (
        ContactKind,
        ContactMethod,
        EscalationPolicy,
        EscalationStep,
        Person,
        Rotation,
        RotationMember,
        StepCondition,
        StepTarget,
        TargetKind,
    )

    persons = {}
    for username in ("alice", "bob", "carol"):
        user = people[username]
        person, _ = Person.objects.get_or_create(
            user=user, defaults={"name": user.first_name or username}
        )
        ContactMethod.objects.get_or_create(
            person=person,
            position=0,
            defaults={"kind": ContactKind.EMAIL, "address": f"{username}@example.com"},
        )
        persons[username] = person
    cto, _ = Person.objects.get_or_create(name="CTO (demo)", user=None)
    ContactMethod.objects.get_or_create(
        person=cto, position=0, defaults={"kind": ContactKind.EMAIL, "address": "cto@example.com"}
    )

    monday = (now - timedelta(days=now.weekday() + 28)).date()
    rotation, made = Rotation.objects.get_or_create(
        team=team,
        name="Platform primary",
        defaults={
            "time_zone": "UTC",
            "shift_length": timedelta(days=7),
            "handoff_time": "09:00",
            "start_date": monday,
        },
    )
    if made:
        for position, username in enumerate(("alice", "bob", "carol")):
            RotationMember.objects.create(
                rotation=rotation, person=persons[username], position=position
            )

    def policy(name, steps, repeat=0):
        found, made = EscalationPolicy.objects.get_or_create(name=name, defaults={"repeat": repeat})
        if made:
            for position, (minutes, condition, kind, target) in enumerate(steps):
                step = EscalationStep.objects.create(
                    policy=found,
                    position=position,
                    delay=timedelta(minutes=minutes),
                    condition=condition,
                )
                field = (
                    "rotation" if kind in (TargetKind.ONCALL, TargetKind.NEXT_IN_LINE) else "person"
                )
                StepTarget.objects.create(step=step, kind=kind, **{field: target})
        return found

    unacked, unresolved = StepCondition.UNACKNOWLEDGED, StepCondition.UNRESOLVED
    sev1 = policy(
        "Sev1: page, then management",
        [
            (0, unacked, TargetKind.ONCALL, rotation),
            (15, unacked, TargetKind.NEXT_IN_LINE, rotation),
            (30, unresolved, TargetKind.PERSON, cto),
        ],
        repeat=1,
    )
    sev2 = policy(
        "Sev2: page on call",
        [
            (0, unacked, TargetKind.ONCALL, rotation),
            (30, unacked, TargetKind.NEXT_IN_LINE, rotation),
        ],
    )
    for level, chosen in ((1, sev1), (2, sev2)):
        severity = severities[level]
        if severity.escalation_policy_id is None:
            severity.escalation_policy = chosen
            severity.save(update_fields=["escalation_policy"])
