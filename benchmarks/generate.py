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
        severities=list(Severity.objects.filter(level__in=SEVERITY_WEIGHTS).order_by("level")),
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


# --- escalation (benchmarks/bench_escalation.py) ---------------------------------------------
#
# Two policies that page three people, each with one email contact method:
# - "short steps", on its own severity: step 1 at 10 s pages one person, step 2 at 20 s
#   pages two, while the incident is unacknowledged. Its severity's acknowledge target is
#   15 s, so the ticks also record a breach per incident while the pages go out.
# - "tick": step 1 at once pages one person (unacknowledged); step 2 after 24 h pages the
#   lead (unresolved). Open incidents generated for the tick benchmark are between the two
#   steps, or, `due` of them, declared a moment ago with step 1 due now.

ESCALATION_PEOPLE = (
    ("Bench Primary", "primary@bench.example.com"),
    ("Bench Secondary", "secondary@bench.example.com"),
    ("Bench Lead", "lead@bench.example.com"),
)
SHORT_POLICY = "Benchmark: short steps"
SHORT_STEPS = ((timedelta(seconds=10), (0,)), (timedelta(seconds=20), (1, 2)))
SHORT_SEVERITY = dict(
    level=90,
    name="Bench paging",
    description="Benchmark severity: escalation steps after 10 s and 20 s.",
    ack_target=timedelta(seconds=15),
    resolve_target=timedelta(hours=1),
    update_interval=timedelta(minutes=15),
)
TICK_POLICY = "Benchmark: page at once, the lead after 24 h"
# A deadline of a generated open incident that would fall due within this long is moved this
# much later: no new breach and no escalation step falls due while the tick is measured.
OPEN_HORIZON = timedelta(hours=1)


@dataclass
class EscalationFixtures:
    people: list  # escalation.models.Person, each with one email contact method
    severity: Severity  # SHORT_SEVERITY, whose policy is SHORT_POLICY
    tick_policy: object  # escalation.models.EscalationPolicy


@dataclass
class OpenGrowth:
    open_before: int
    open_after: int
    total_after: int
    due: int
    seconds: float
    analyze_seconds: float

    @property
    def added(self) -> int:
        return self.open_after - self.open_before


def _policy(name: str, steps, people) -> object:
    from escalation.models import EscalationPolicy, EscalationStep, StepTarget, TargetKind

    policy, made = EscalationPolicy.objects.get_or_create(name=name, defaults={"repeat": 0})
    if made:
        for position, (delay, condition, indexes) in enumerate(steps):
            step = EscalationStep.objects.create(
                policy=policy, position=position, delay=delay, condition=condition
            )
            StepTarget.objects.bulk_create(
                StepTarget(step=step, kind=TargetKind.PERSON, person=people[i]) for i in indexes
            )
    return policy


def ensure_escalation_fixtures() -> EscalationFixtures:
    """The people, the two benchmark policies and the short-steps severity (idempotent)."""
    from escalation.models import ContactKind, ContactMethod, Person, StepCondition

    people = []
    for name, address in ESCALATION_PEOPLE:
        person, made = Person.objects.get_or_create(name=name, defaults={"time_zone": "UTC"})
        if made:
            ContactMethod.objects.create(
                person=person, kind=ContactKind.EMAIL, address=address, position=0
            )
        people.append(person)
    unack, unresolved = StepCondition.UNACKNOWLEDGED, StepCondition.UNRESOLVED
    short = _policy(
        SHORT_POLICY, [(delay, unack, indexes) for delay, indexes in SHORT_STEPS], people
    )
    tick = _policy(
        TICK_POLICY, [(timedelta(0), unack, (0,)), (timedelta(hours=24), unresolved, (2,))], people
    )
    severity, _ = Severity.objects.get_or_create(
        level=SHORT_SEVERITY["level"], defaults={**SHORT_SEVERITY, "escalation_policy": short}
    )
    return EscalationFixtures(people=people, severity=severity, tick_policy=tick)


def _due_now(incident: Incident, events: list[dict], rng: random.Random, now: datetime, plan):
    """Make a freshly built open incident one declared a moment ago, its first step due."""
    from escalation.planning import step_due_at

    created = now - timedelta(seconds=rng.uniform(0.5, 5))
    for name in STAMP_FIELDS.values():
        setattr(incident, name, None)
    incident.status = S.TRIGGERED
    incident.is_drill = False  # a drill pages only people who opted in: keep the work fixed
    incident.detected_at = incident.created_at = incident.updated_at = created
    deadlines = compute_deadlines(incident.severity, created, created, status=S.TRIGGERED)
    for name, value in deadlines.as_fields().items():
        setattr(incident, name, value)
    incident.escalation_plan = plan
    incident.escalation_started_at = created
    incident.escalation_step = incident.escalation_round = 0
    incident.next_escalation_at = step_due_at(plan, created, 0, 0)
    events[:] = [dict(events[0], at=created)]  # declared, nothing since


def _between_steps(incident: Incident, rng: random.Random, now: datetime, plan, person):
    """Escalation state of an open incident whose first step paged `person` and whose next
    step is hours away; deadlines already missed are recorded as breached (what the engine
    does), and those that would fall due within OPEN_HORIZON are moved OPEN_HORIZON later.
    Returns the step-1 page (unsaved)."""
    from escalation.models import Page, PageStatus
    from escalation.planning import step_due_at
    from escalation.services import BREACHES

    started = incident.created_at
    incident.escalation_plan = plan
    incident.escalation_started_at = started
    incident.escalation_step, incident.escalation_round = 1, 0
    incident.next_escalation_at = step_due_at(plan, started, 1, 0)
    assert incident.next_escalation_at > now + OPEN_HORIZON
    for due_field, stamp, _, _ in BREACHES:
        due = getattr(incident, due_field)
        if due is None:
            continue
        if due <= now:
            setattr(incident, stamp, min(due + timedelta(seconds=rng.uniform(0, 5)), now))
        elif due <= now + OPEN_HORIZON:
            setattr(incident, due_field, due + OPEN_HORIZON)
    paged = started + timedelta(seconds=rng.uniform(0, 5))
    sent = paged + timedelta(seconds=rng.uniform(0.05, 1))
    return Page(
        plan_version=plan["version"],
        step_index=0,
        round=0,
        person=person,
        status=PageStatus.SENT,
        attempts=1,
        channel="email",
        due_at=started,
        created_at=paged,
        next_attempt_at=paged,
        enqueued_at=paged,
        claimed_at=paged,
        sent_at=sent,
    )


def grow_open_to(
    total_open: int, *, policy, due: int = 0, now: datetime | None = None, seed: int = 2025
) -> OpenGrowth:
    """Add open incidents (as `grow_to` builds them: status mix, services, timeline) until
    `total_open` are open, each escalating under `policy` (ensure_escalation_fixtures'
    tick policy). The first `due` of them (added even if enough are open already) were
    declared a moment ago and have step 1 due; the others are between step 1 (paged, one
    sent page each) and step 2. Ends with VACUUM ANALYZE, like `grow_to`."""
    from escalation.models import Page
    from escalation.planning import policy_snapshot

    now = now or timezone.now()
    fixtures = ensure_fixtures()
    # Only the demo severities: the benchmark's own (SHORT_SEVERITY) has no weight here.
    fixtures.severities = [s for s in fixtures.severities if s.level in SEVERITY_WEIGHTS]
    plan = policy_snapshot(policy)
    person = policy.steps.order_by("position").first().targets.get().person
    open_before = Incident.objects.filter(status__in=OPEN_STATUSES).count()
    count = max(total_open - open_before, due)
    started = time.perf_counter()
    first = _highest_number() + 1
    rng = random.Random(seed * 1_000_003 + first)
    through = Incident.services.through
    for batch_start in range(first, first + count, BATCH):
        numbers = range(batch_start, min(batch_start + BATCH, first + count))
        built, pages = [], []
        for number in numbers:
            incident, service_ids, events, commander = _build(
                rng, fixtures, number, HISTORY_SIZE, now, open_=True
            )
            if number - first < due:
                _due_now(incident, events, rng, now, plan)
                commander = None
                pages.append(None)
            else:
                pages.append(_between_steps(incident, rng, now, plan, person))
            built.append((incident, service_ids, events, commander))
        with transaction.atomic():
            incidents = Incident.objects.bulk_create([b[0] for b in built], batch_size=1_000)
            links, events, assignments = [], [], []
            for incident, (_, service_ids, event_fields, commander), page in zip(
                incidents, built, pages, strict=True
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
                if page is not None:
                    page.incident_id = incident.pk
            through.objects.bulk_create(links, batch_size=5_000)
            TimelineEvent.objects.bulk_create(events, batch_size=5_000)
            RoleAssignment.objects.bulk_create(assignments, batch_size=5_000)
            Page.objects.bulk_create([p for p in pages if p is not None], batch_size=5_000)
            _set_counter(numbers[-1])
    seconds = time.perf_counter() - started
    analyze_seconds = vacuum_analyze_escalation()
    return OpenGrowth(
        open_before=open_before,
        open_after=Incident.objects.filter(status__in=OPEN_STATUSES).count(),
        total_after=Incident.objects.count(),
        due=due,
        seconds=seconds,
        analyze_seconds=analyze_seconds,
    )


def vacuum_analyze_escalation() -> float:
    """`vacuum_analyze` plus the page tables; returns the seconds it took."""
    if connection.vendor != "postgresql":
        return 0.0
    from escalation.models import Page, PageAttempt

    started = time.perf_counter()
    vacuum_analyze()
    with connection.cursor() as cursor:
        for model in (Page, PageAttempt):
            cursor.execute(f"VACUUM (ANALYZE) {connection.ops.quote_name(model._meta.db_table)}")
    return time.perf_counter() - started
