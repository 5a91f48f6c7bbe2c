"""Benchmark 1: how many incidents per second the write path declares and acknowledges.

`incident_declare` and `incident_acknowledge` are called one after another in this one
process, each call its own transaction and commit, as a web request or a webhook would.
Each is set against a baseline measured in the same run, interleaved with it in rounds so
drift on the machine hits both alike:

- declare vs. a bare insert: one `Incident.objects.create` with the same values (deadlines
  included) in its own transaction, without the counter, the services or the timeline;
- acknowledge vs. a bare update: one `Incident.objects.filter(pk=...).update(...)` of the
  same columns in its own transaction, without the row lock, the re-check or the timeline.

The baselines are the least a durable single-incident write can cost here (one statement,
one commit), so the ratio is the price of the write path's guarantees: a gap-free number,
the lock, the compare-and-set and the timeline event in the same transaction.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from incidents import services
from incidents.deadlines import compute_deadlines
from incidents.models import Incident, IncidentStatus

from . import generate

S = IncidentStatus
TITLE = "Benchmark: checkout error rate above 5%"
# Baseline rows take numbers far above any real one and are deleted at the end.
BASELINE_FIRST_NUMBER = 2_000_000_000
BASELINE_PREFIX = "BASE-"


@dataclass
class Series:
    """Per-call wall times, in seconds, of one operation."""

    name: str
    seconds: list[float] = field(default_factory=list)

    def time(self, call: Callable[[], object]) -> None:
        started = time.perf_counter()
        call()
        self.seconds.append(time.perf_counter() - started)

    @property
    def per_second(self) -> float:
        return len(self.seconds) / sum(self.seconds)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p95_ms(self) -> float:
        return statistics.quantiles(self.seconds, n=20)[-1] * 1000


@dataclass
class Pair:
    operation: Series
    baseline: Series
    queries: list[str]
    baseline_queries: list[str]

    @property
    def ratio(self) -> float:
        """How many times longer one service call takes than one baseline call."""
        return self.baseline.per_second / self.operation.per_second


@dataclass
class ServicesResult:
    declare: Pair
    acknowledge: Pair
    table_size: int
    calls: int
    rounds: int

    def summary(self) -> list[str]:
        return [
            f"{pair.operation.name}: {pair.operation.per_second:,.0f}/s "
            f"(baseline {pair.baseline.per_second:,.0f}/s, {pair.ratio:.1f}x the cost)"
            for pair in (self.declare, self.acknowledge)
        ]

    def markdown(self) -> str:
        lines = [
            "## 1. Services throughput (PostgreSQL)",
            "",
            f"{self.calls} calls of each operation, one process, each call its own "
            f"transaction and commit, run in {self.rounds} rounds interleaved with its "
            f"baseline, on a table of {self.table_size:,} incidents. Per-call times are "
            "wall-clock times around the Python call.",
            "",
            "| operation | per second | median | p95 | queries per call |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for pair in (self.declare, self.acknowledge):
            for series, queries in (
                (pair.operation, pair.queries),
                (pair.baseline, pair.baseline_queries),
            ):
                lines.append(
                    f"| {series.name} | {series.per_second:,.0f} | {series.median_ms:.2f} ms "
                    f"| {series.p95_ms:.2f} ms | {len(queries)} |"
                )
        lines += [
            "",
            "| ratio | value |",
            "| --- | ---: |",
        ]
        for pair in (self.declare, self.acknowledge):
            lines.append(
                f"| {pair.operation.name} / {pair.baseline.name}, time per call "
                f"| {pair.ratio:.2f}x |"
            )
            lines.append(
                f"| {pair.operation.name} / {pair.baseline.name}, calls per second "
                f"| {1 / pair.ratio:.2f} |"
            )
        lines += [
            "",
            "The baselines are one statement in one transaction with the same column values: "
            "the least a durable write of one incident costs on this machine. The ratio is the "
            "price of what the services add (the counter row lock, the M2M rows, the row lock "
            "and compare-and-set, the timeline event).",
            "",
            "Statements of one call, as captured (transaction control included):",
            "",
        ]
        for pair in (self.declare, self.acknowledge):
            lines.append(f"- `{pair.operation.name}`:")
            lines += [f"  {i}. `{_short(sql)}`" for i, sql in enumerate(pair.queries, start=1)]
        return "\n".join(lines) + "\n"


def _short(sql: str, limit: int = 110) -> str:
    sql = " ".join(sql.split()).replace("`", "'")
    return sql if len(sql) <= limit else sql[: limit - 3] + "..."


def _capture(call: Callable[[], object]) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        call()
    return [q["sql"] for q in captured.captured_queries]


def _checkpoint() -> None:
    """Flush the bulk load's dirty pages now, so the checkpointer does not write them out
    during the timing (commits wait on the same disk). Needs superuser or pg_checkpoint;
    skipped without."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("CHECKPOINT")
    except DatabaseError:
        pass


def run(*, calls: int = 500, rounds: int = 5, warmup: int = 20) -> ServicesResult:
    """Declare `calls` incidents, then acknowledge them, each against its baseline."""
    fixtures = generate.ensure_fixtures()
    actor = fixtures.admin
    severities = fixtures.severities
    service_list = fixtures.services
    team = fixtures.teams[0]
    per_round = max(1, calls // rounds)
    baseline_numbers = iter(range(BASELINE_FIRST_NUMBER, BASELINE_FIRST_NUMBER + 10 * calls))

    def declare(i: int) -> Incident:
        return services.incident_declare(
            title=TITLE,
            severity=severities[i % len(severities)],
            services=[service_list[i % len(service_list)]],
            team=team,
            actor=actor,
        )

    def insert(i: int) -> Incident:
        now = timezone.now()
        severity = severities[i % len(severities)]
        number = next(baseline_numbers)
        with transaction.atomic():
            return Incident.objects.create(
                number=number,
                reference=f"{BASELINE_PREFIX}{number}",
                title=TITLE,
                severity=severity,
                team=team,
                declared_by=actor,
                created_at=now,
                updated_at=now,
                detected_at=now,
                **compute_deadlines(severity, now, now, status=S.TRIGGERED).as_fields(),
            )

    def acknowledge(pk: int) -> None:
        services.incident_acknowledge(incident=pk, actor=actor)

    def update(pk: int) -> None:
        now = timezone.now()
        with transaction.atomic():
            Incident.objects.filter(pk=pk).update(
                status=S.ACKNOWLEDGED, acknowledged_at=now, ack_due_at=None, updated_at=now
            )

    table_size = Incident.objects.count()
    _checkpoint()
    for i in range(warmup):
        acknowledge(declare(i).pk)
        update(insert(i).pk)

    declared, inserted = Series("incident_declare"), Series("baseline insert")
    acked, updated = Series("incident_acknowledge"), Series("baseline update")
    declared_pks: list[int] = []
    inserted_pks: list[int] = []
    for r in range(rounds):
        for i in range(r * per_round, (r + 1) * per_round):
            inserted.time(lambda i=i: inserted_pks.append(insert(i).pk))
        for i in range(r * per_round, (r + 1) * per_round):
            declared.time(lambda i=i: declared_pks.append(declare(i).pk))
    for r in range(rounds):
        for pk in inserted_pks[r * per_round : (r + 1) * per_round]:
            updated.time(lambda pk=pk: update(pk))
        for pk in declared_pks[r * per_round : (r + 1) * per_round]:
            acked.time(lambda pk=pk: acknowledge(pk))

    extra = declare(0)
    declare_queries = _capture(lambda: declare(1))
    ack_queries = _capture(lambda: acknowledge(extra.pk))
    extra_insert = insert(0)
    insert_queries = _capture(lambda: insert(1))
    update_queries = _capture(lambda: update(extra_insert.pk))

    assert Incident.objects.filter(pk__in=declared_pks, status=S.ACKNOWLEDGED).count() == len(
        declared_pks
    ), "every declared incident should now be acknowledged"
    Incident.objects.filter(reference__startswith=BASELINE_PREFIX).delete()
    return ServicesResult(
        declare=Pair(declared, inserted, declare_queries, insert_queries),
        acknowledge=Pair(acked, updated, ack_queries, update_queries),
        table_size=table_size,
        calls=per_round * rounds,
        rounds=rounds,
    )
