"""Fast, realistic incident history for the benchmarks, written with `bulk_create`.

The mix: a fixed OPEN_COUNT incidents open (triggered, acknowledged, investigating,
mitigating, monitoring), detected in the last hours, whatever the table size: open incidents
are today's workload, and a longer history does not add to it. The rest are resolved or
closed; severities Sev1-Sev4 with the demo targets; one to
three services each through the many-to-many table; an Incident Commander on most
acknowledged incidents; one timeline event per status change. Incident n is detected
about `SPACING * (history - n)` before now, so references are in time order and the
newest incidents are the ones whose later steps have not happened yet. Stamps, status and
the stored deadlines agree with each other (deadlines come from `compute_deadlines`), and
the `incident` counter ends at the highest number, so a later `incident_declare` goes on
with the next reference.

`grow_to(1_000)` then `grow_to(100_000)` adds the 99,000 missing incidents; on PostgreSQL
each growth ends with VACUUM ANALYZE (what autovacuum would have done to a table that grew
over two years), so plans are those of a settled table.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from escalation.models import Team
from incidents.deadlines import compute_deadlines
from incidents.demo import SERVICES, SEVERITIES
from incidents.models import (
    OPEN_STATUSES,
    Counter,
    EventKind,
    Impact,
    Incident,
    IncidentStatus,
    Role,
    RoleAssignment,
    Service,
    Severity,
    TimelineEvent,
)
from incidents.selectors import COMMANDER_SLUG

S = IncidentStatus
BENCH_ADMIN = "bench-admin"
# The history the timeline is laid out for: 100,000 incidents, one every 10 minutes on
# average, is about two years.
HISTORY_SIZE = 100_000
SPACING = timedelta(minutes=10)
BATCH = 5_000
# Enough to fill a changelist page (50) at both sizes, as a busy on-call week would.
OPEN_COUNT = 60
FINISHED_BEFORE = timedelta(days=15)  # history ends before the open incidents begin
SEVERITY_WEIGHTS = {1: 4, 2: 14, 3: 38, 4: 44}
OPEN_MIX = [
    (S.TRIGGERED, 30),
    (S.ACKNOWLEDGED, 20),
    (S.INVESTIGATING, 20),
    (S.MITIGATING, 15),
    (S.MONITORING, 15),
]
CLOSED_SHARE = 0.7  # of the finished ones; the rest wait in resolved for their follow-up
AUTO_RESOLVED_SHARE = 0.05  # alerts that cleared before anyone acknowledged them
COMMANDER_SHARE = 0.6
EXTRA_SERVICES = [
    ("search", "Search", "Full-text search"),
    ("email", "Email delivery", "Transactional email"),
    ("cdn", "CDN", "Static assets and images"),
    ("queue", "Job queue", "Background jobs"),
    ("billing", "Billing", "Invoices and plans"),
    ("mobile", "Mobile API", "API for the mobile apps"),
    ("analytics", "Analytics", "Reporting pipeline"),
]
TEAMS = [("platform", "Platform"), ("payments-team", "Payments"), ("growth", "Growth")]
RESPONDERS = [f"responder{i}" for i in range(1, 9)]
PROBLEMS = [
    "error rate above 5%",
    "p99 latency over 2 s",
    "returns 502 for some users",
    "queue backlog growing",
    "disk usage at 95%",
    "certificate expires in 24 h",
    "replica lag over 10 min",
    "timeouts from upstream provider",
    "elevated 4xx after deploy",
    "memory leak, pods restarting",
]
IMPACT_WEIGHTS = {
    Impact.NONE: 40,
    Impact.DEGRADED: 35,
    Impact.PARTIAL_OUTAGE: 18,
    Impact.MAJOR_OUTAGE: 7,
}
STAMP_FIELDS = {
    S.ACKNOWLEDGED: "acknowledged_at",
    S.INVESTIGATING: "investigating_at",
    S.MITIGATING: "mitigating_at",
    S.MONITORING: "monitoring_at",
    S.RESOLVED: "resolved_at",
    S.CLOSED: "closed_at",
}
EVENT_KINDS = {
    S.ACKNOWLEDGED: EventKind.ACKNOWLEDGED,
    S.RESOLVED: EventKind.RESOLVED,
    S.CLOSED: EventKind.CLOSED,
}


@dataclass
class Fixtures:
    severities: list[Severity]
    services: list[Service]
    teams: list[Team]
    responders: list
    admin: object
    commander: Role


@dataclass
class Growth:
    before: int
    after: int
    seconds: float
    timeline_events: int
    analyze_seconds: float

    @property
    def added(self) -> int:
        return self.after - self.before


def ensure_fixtures() -> Fixtures:
    """Severities (the demo's targets), services, teams, responders and a superuser."""
    for values in SEVERITIES:
        Severity.objects.get_or_create(level=values["level"], defaults=values)
    teams = [
        Team.objects.get_or_create(slug=slug, defaults={"name": name})[0] for slug, name in TEAMS
    ]
    for index, (slug, name, description) in enumerate([*SERVICES, *EXTRA_SERVICES]):
        Service.objects.get_or_create(
            slug=slug,
            defaults={"name": name, "description": description, "team": teams[index % 3]},
        )
    User = get_user_model()
    admin = User.objects.filter(username=BENCH_ADMIN).first()
    if admin is None:
        # No password: the benchmarks log in with force_login, so no hashing is measured.
        admin = User(username=BENCH_ADMIN, is_staff=True, is_superuser=True)
        admin.set_unusable_password()
        admin.save()
    responders = []
    for username in RESPONDERS:
        user, made = User.objects.get_or_create(username=username, defaults={"is_staff": True})
        if made:
            user.set_unusable_password()
            user.save(update_fields=["password"])
        responders.append(user)
    return Fixtures(
        severities=list(Severity.objects.order_by("level")),
        services=list(Service.objects.order_by("pk")),
        teams=teams,
        responders=responders,
        admin=admin,
        commander=Role.objects.get(slug=COMMANDER_SLUG),
    )


def _path(
    rng: random.Random, severity: Severity, detected: datetime, created: datetime, open_: bool
) -> list[tuple[str, datetime]]:
    """The status changes an incident goes through, with their times (before truncation)."""
    if open_:
        target = rng.choices([s for s, _ in OPEN_MIX], [w for _, w in OPEN_MIX])[0]
    else:
        target = S.CLOSED if rng.random() < CLOSED_SHARE else S.RESOLVED
    steps: list[tuple[str, datetime]] = []
    at = detected
    finished = target in {S.RESOLVED, S.CLOSED}
    if target == S.TRIGGERED or (finished and rng.random() < AUTO_RESOLVED_SHARE):
        working: list[str] = []
    else:
        # About three in ten miss the acknowledge target, one in four the resolve target.
        at = max(
            detected + severity.ack_target * rng.uniform(0.1, 1.4),
            created + timedelta(seconds=rng.uniform(10, 60)),
        )
        steps.append((S.ACKNOWLEDGED, at))
        order = [S.INVESTIGATING, S.MITIGATING, S.MONITORING]
        if finished:
            working = [s for s in order if rng.random() < 0.6]
        else:
            working = order[: order.index(target) + 1] if target in order else []
    for status in working:
        at += timedelta(minutes=rng.uniform(2, 60))
        steps.append((status, at))
    if finished:
        resolve_by = detected + severity.resolve_target * rng.uniform(0.1, 1.3)
        at = max(resolve_by, at + timedelta(minutes=1))
        steps.append((S.RESOLVED, at))
        if target == S.CLOSED:
            steps.append((S.CLOSED, at + timedelta(days=rng.uniform(1, 10))))
    return steps


def _build(
    rng: random.Random,
    fixtures: Fixtures,
    number: int,
    history: int,
    now: datetime,
    open_: bool = False,
) -> tuple[Incident, list[int], list[dict], dict | None]:
    """One incident, its service ids, its timeline (as field dicts) and its commander."""
    severity = rng.choices(
        fixtures.severities, [SEVERITY_WEIGHTS[s.level] for s in fixtures.severities]
    )[0]
    if open_:
        detected = now - timedelta(minutes=rng.uniform(2, 8 * 60))
    else:
        detected = now - FINISHED_BEFORE - SPACING * (history - number) - SPACING * rng.random()
    created = min(detected + timedelta(seconds=rng.uniform(5, 300)), now)
    # What has not happened yet by `now` is dropped: open incidents stop where they are.
    path = _path(rng, severity, detected, created, open_)
    steps = [(status, at) for status, at in path if at <= now]
    status = steps[-1][0] if steps else S.TRIGGERED
    services = rng.sample(fixtures.services, rng.choice((1, 1, 1, 2, 2, 3)))
    declarer = rng.choice(fixtures.responders) if rng.random() < 0.3 else None
    title = f"{services[0].name}: {rng.choice(PROBLEMS)}"
    fields = {STAMP_FIELDS[s]: at for s, at in steps}
    last = steps[-1][1] if steps else created
    deadlines = compute_deadlines(severity, detected, last, status=status, update_base=created)
    incident = Incident(
        number=number,
        reference=f"INC-{number}",
        title=title,
        summary=f"Generated for the benchmarks: {title.lower()}.",
        severity=severity,
        status=status,
        team=rng.choice(fixtures.teams),
        impact=rng.choices(list(IMPACT_WEIGHTS), list(IMPACT_WEIGHTS.values()))[0],
        is_drill=rng.random() < 0.01,
        false_positive=status not in OPEN_STATUSES and rng.random() < 0.03,
        declared_by=declarer,
        created_at=created,
        updated_at=max(created, last),
        detected_at=detected,
        **fields,
        **deadlines.as_fields(),
    )
    events = [
        dict(
            kind=EventKind.DECLARED,
            at=created,
            actor=declarer,
            actor_label="" if declarer else "alertmanager",
            value=severity.name,
            message=title,
        )
    ]
    previous = S.TRIGGERED
    responder = rng.choice(fixtures.responders)
    commander = None
    for step, at in steps:
        events.append(
            dict(
                kind=EVENT_KINDS.get(step, EventKind.STATUS_CHANGED),
                at=at,
                actor=responder,
                previous=previous,
                value=step,
            )
        )
        previous = step
        if step == S.ACKNOWLEDGED and rng.random() < COMMANDER_SHARE:
            since = at + timedelta(seconds=30)
            if since <= now:
                commander = dict(user=responder, since=since)
                events.append(
                    dict(
                        kind=EventKind.ROLE_ASSIGNED,
                        at=since,
                        actor=responder,
                        value=responder.username,
                        message=fixtures.commander.name,
                    )
                )
    return incident, [s.pk for s in services], events, commander


def _highest_number() -> int:
    highest = Incident.objects.aggregate(top=Max("number"))["top"] or 0
    counter = Counter.objects.filter(name="incident").values_list("value", flat=True).first()
    return max(highest, counter or 0)


def _set_counter(value: int) -> None:
    if not Counter.objects.filter(name="incident").update(value=value):
        Counter.objects.create(name="incident", value=value)


def vacuum_analyze() -> float:
    """VACUUM ANALYZE the incident tables (PostgreSQL only); returns the seconds it took."""
    if connection.vendor != "postgresql":
        return 0.0
    started = time.perf_counter()
    tables = [
        Incident._meta.db_table,
        Incident.services.through._meta.db_table,
        TimelineEvent._meta.db_table,
        RoleAssignment._meta.db_table,
        Counter._meta.db_table,
    ]
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"VACUUM (ANALYZE) {connection.ops.quote_name(table)}")
    return time.perf_counter() - started


def grow_to(total: int, *, now: datetime | None = None, seed: int = 2024) -> Growth:
    """Add incidents until there are `total`. Deterministic for a given seed and start.

    Each batch of `BATCH` incidents is one transaction. Must not run inside an atomic block
    (VACUUM cannot).
    """
    now = now or timezone.now()
    fixtures = ensure_fixtures()
    before = Incident.objects.count()
    if before >= total:
        return Growth(before, before, 0.0, 0, 0.0)
    started = time.perf_counter()
    first = _highest_number() + 1
    last = first + (total - before) - 1
    history = max(HISTORY_SIZE, last)
    # The first table gets the open incidents; growing it adds finished history only.
    open_numbers = set(range(last - OPEN_COUNT + 1, last + 1)) if before == 0 else set()
    rng = random.Random(seed * 1_000_003 + first)
    through = Incident.services.through
    events_written = 0
    for batch_start in range(first, last + 1, BATCH):
        numbers = range(batch_start, min(batch_start + BATCH, last + 1))
        built = [_build(rng, fixtures, n, history, now, n in open_numbers) for n in numbers]
        with transaction.atomic():
            incidents = Incident.objects.bulk_create([b[0] for b in built], batch_size=1_000)
            links, events, assignments = [], [], []
            for incident, (_, service_ids, event_fields, commander) in zip(
                incidents, built, strict=True
            ):
                links += [through(incident_id=incident.pk, service_id=s) for s in service_ids]
                events += [TimelineEvent(incident_id=incident.pk, **f) for f in event_fields]
                if commander:
                    assignments.append(
                        RoleAssignment(
                            incident_id=incident.pk,
                            role=fixtures.commander,
                            assigned_by=commander["user"],
                            **commander,
                        )
                    )
            through.objects.bulk_create(links, batch_size=5_000)
            TimelineEvent.objects.bulk_create(events, batch_size=5_000)
            RoleAssignment.objects.bulk_create(assignments, batch_size=5_000)
            _set_counter(numbers[-1])
        events_written += len(events)
    seconds = time.perf_counter() - started
    analyze_seconds = vacuum_analyze()
    return Growth(before, Incident.objects.count(), seconds, events_written, analyze_seconds)
