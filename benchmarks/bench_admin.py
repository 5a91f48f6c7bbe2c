"""Benchmark 2: the admin pages responders live in, at 1,000 and at 100,000 incidents.

The table is grown to the small size, copied as a second database, and grown to the large
size; each page is then measured on both databases. Pages are rendered through
`django.test.Client` as a logged-in superuser with DEBUG off: warm-ups, one request under
`CaptureQueriesContext` for the query count, then the timed requests (without capture, which
has its own cost), taken in blocks that alternate between the two sizes. Every captured
SELECT is run again on its own to attribute time to SQL, and the queries that grow between
the sizes get an EXPLAIN ANALYZE in the report.

Targets: the same number of queries at both sizes, and median(large) / median(small) at
most 1.5.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field

from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from incidents.selectors import incidents_open

from . import database_snapshot, generate, using_database

TARGET_RATIO = 1.5
SQL_REPEATS = 5
# A query "grows" when it takes this much longer at the large size, and this many times.
GROWTH_MS = 0.5
GROWTH_FACTOR = 2.0
MAX_EXPLAINS = 3
# Untimed requests after each reconnect: the new server process warms its catalog caches.
BLOCK_WARMUPS = 2


@dataclass(frozen=True)
class Page:
    key: str
    title: str
    url_name: str
    query_string: str = ""
    # A pattern that occurs once per incident row the page shows.
    row_marker: str = 'name="_selected_action"'

    @property
    def url(self) -> str:
        return reverse(self.url_name) + self.query_string


PAGES = (
    Page("changelist", "Incident changelist", "admin:incidents_incident_changelist"),
    Page(
        "changelist-open",
        "Incident changelist, open only",
        "admin:incidents_incident_changelist",
        "?open=yes",
    ),
    Page("dashboard", "Dashboard (admin index)", "admin:index", row_marker='class="incident-row"'),
)


@dataclass
class Query:
    sql: str
    ms: float | None  # median of SQL_REPEATS runs on a plain cursor; None if not a SELECT


@dataclass
class Measurement:
    page: Page
    size: int
    rows: int
    queries: list[Query]
    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def sql_ms(self) -> float:
        return sum(q.ms or 0.0 for q in self.queries)


@dataclass
class Comparison:
    page: Page
    small: Measurement
    large: Measurement
    explains: list[tuple[int, str, str]] = field(default_factory=list)  # (index, sql, plan)

    @property
    def ratio(self) -> float:
        return self.large.median_ms / self.small.median_ms

    @property
    def same_count(self) -> bool:
        return len(self.small.queries) == len(self.large.queries)

    @property
    def ratio_ok(self) -> bool:
        return self.ratio <= TARGET_RATIO

    def attribution(self) -> str:
        """Split the growth of the median between SQL and the rest (Python, templates)."""
        sql = self.large.sql_ms - self.small.sql_ms
        rest = (self.large.median_ms - self.large.sql_ms) - (
            self.small.median_ms - self.small.sql_ms
        )
        growing = ", ".join(f"#{index}" for index, _, _ in self.growing()) or "none"
        text = (
            f"The median grew by {self.large.median_ms - self.small.median_ms:+.1f} ms: "
            f"SQL {sql:+.1f} ms (queries that grow: {growing}), everything else "
            f"{rest:+.1f} ms."
        )
        if self.small.rows and self.large.rows and self.small.rows != self.large.rows:
            before = (self.small.median_ms - self.small.sql_ms) / self.small.rows
            after = (self.large.median_ms - self.large.sql_ms) / self.large.rows
            text += (
                f" The page shows {self.small.rows} rows at {self.small.size:,} and "
                f"{self.large.rows} at {self.large.size:,}: non-SQL time per row shown is "
                f"{before:.2f} ms and {after:.2f} ms."
            )
        return text

    def pairs(self) -> list[tuple[int, Query | None, Query]]:
        """Large-size queries with their small-size counterpart (same shape, in order)."""
        remaining = list(enumerate(self.small.queries))
        paired = []
        for index, query in enumerate(self.large.queries, start=1):
            match = next((r for r in remaining if _shape(r[1].sql) == _shape(query.sql)), None)
            if match is not None:
                remaining.remove(match)
            paired.append((index, match[1] if match else None, query))
        return paired

    def growing(self) -> list[tuple[int, Query | None, Query]]:
        found = []
        for index, small, large in self.pairs():
            if large.ms is None:
                continue
            before = small.ms if small and small.ms is not None else 0.0
            if large.ms - before >= GROWTH_MS and large.ms >= GROWTH_FACTOR * max(before, 0.01):
                found.append((index, small, large))
        return sorted(found, key=lambda p: -(p[2].ms or 0.0))


@dataclass
class AdminResult:
    small_size: int
    large_size: int
    warmups: int
    requests: int
    rounds: int
    comparisons: list[Comparison]
    growth: list[generate.Growth]
    open_counts: tuple[int, int]

    @property
    def passed(self) -> bool:
        return all(c.same_count and c.ratio_ok for c in self.comparisons)

    def summary(self) -> list[str]:
        return [
            f"{c.page.title}: {len(c.small.queries)} -> {len(c.large.queries)} queries, "
            f"{c.small.median_ms:.1f} -> {c.large.median_ms:.1f} ms, ratio {c.ratio:.2f} "
            f"[queries {_verdict(c.same_count)}, ratio {_verdict(c.ratio_ok)}]"
            for c in self.comparisons
        ]

    def markdown(self) -> str:
        small, large = f"{self.small_size:,}", f"{self.large_size:,}"
        lines = [
            "## 2. Admin at scale",
            "",
            f"Pages rendered by `django.test.Client` as a logged-in superuser, DEBUG off, at "
            f"{small} and at {large} incidents (the small table is kept as a copy of the "
            "database before it grows, so both sizes are measured side by side). Per page and "
            f"size: {self.warmups} warm-up requests and one request under "
            "`CaptureQueriesContext` for the query count; then "
            f"{max(1, self.requests // self.rounds) * self.rounds} timed requests per size in "
            f"{self.rounds} blocks alternating between the sizes, each block reconnecting and "
            f"making {BLOCK_WARMUPS} warm-up requests first. The median is reported. Targets: "
            f"the same query count at both sizes and median({large}) / median({small}) at "
            f"most {TARGET_RATIO}.",
            "",
            f"| page | rows shown | queries at {small} | queries at {large} "
            f"| median at {small} | median at {large} | ratio | same query count "
            f"| ratio <= {TARGET_RATIO} |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        lines += [
            f"| {c.page.title} (`{c.page.url}`) | {c.small.rows} / {c.large.rows} "
            f"| {len(c.small.queries)} | {len(c.large.queries)} "
            f"| {c.small.median_ms:.1f} ms | {c.large.median_ms:.1f} ms | {c.ratio:.2f} "
            f"| {_verdict(c.same_count)} | {_verdict(c.ratio_ok)} |"
            for c in self.comparisons
        ]
        lines += [
            "",
            f"Open incidents: {self.open_counts[0]:,} of {small} and {self.open_counts[1]:,} "
            f"of {large}: the generator keeps the open workload fixed (a busy week's worth, "
            "more than a page holds) and grows only the finished history, because a longer "
            "history does not mean more incidents open today.",
            "",
            "Data generation (bulk_create, then VACUUM ANALYZE):",
            "",
        ]
        lines += [
            f"- {g.before:,} -> {g.after:,} incidents ({g.timeline_events:,} timeline events) "
            f"in {g.seconds:.1f} s, VACUUM ANALYZE {g.analyze_seconds:.1f} s"
            for g in self.growth
            if g.added
        ]
        lines += ["", "### Where the time goes", ""]
        for c in self.comparisons:
            lines += self._page_detail(c)
        return "\n".join(lines) + "\n"

    def _page_detail(self, c: Comparison) -> list[str]:
        small, large = f"{self.small_size:,}", f"{self.large_size:,}"
        lines = [
            f"#### {c.page.title}",
            "",
            f"SQL time (each SELECT re-run alone, median of {SQL_REPEATS}): "
            f"{c.small.sql_ms:.1f} ms of {c.small.median_ms:.1f} ms at {small}, "
            f"{c.large.sql_ms:.1f} ms of {c.large.median_ms:.1f} ms at {large}.",
            "",
            c.attribution(),
            "",
            f"| # | query | ms at {small} | ms at {large} |",
            "| ---: | --- | ---: | ---: |",
        ]
        for index, s, q in c.pairs():
            lines.append(
                f"| {index} | `{_short(q.sql)}` | {_ms(s.ms if s else None)} | {_ms(q.ms)} |"
            )
        extra = len(c.small.queries) - sum(1 for _, s, _ in c.pairs() if s)
        if extra:
            lines.append(f"| | {extra} more at {small} only | | |")
        lines.append("")
        for index, sql, plan in c.explains:
            lines += [
                f"Query {index} grows between the sizes. EXPLAIN (ANALYZE, BUFFERS) at {large}:",
                "",
                "```sql",
                sql,
                "```",
                "",
                "```",
                plan,
                "```",
                "",
            ]
        return lines


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _short(sql: str, limit: int = 120) -> str:
    sql = " ".join(sql.split()).replace("`", "'").replace("|", "\\|")
    return sql if len(sql) <= limit else sql[: limit - 3] + "..."


def _shape(sql: str) -> str:
    """The SQL with its literals blanked, to pair the same query across data sizes."""
    sql = re.sub(r"'[^']*'", "?", sql)
    sql = re.sub(r"\b\d+(\.\d+)?\b", "?", sql)
    sql = re.sub(r"\?(, \?)+", "?", sql)
    # The changelist drops LIMIT when everything fits on one page.
    return re.sub(r" LIMIT \?( OFFSET \?)?$", "", sql)


def _is_select(sql: str) -> bool:
    return sql.lstrip().upper().startswith(("SELECT", "WITH"))


def _time_sql(sql: str) -> float | None:
    if not _is_select(sql):
        return None
    runs = []
    with connection.cursor() as cursor:
        for _ in range(SQL_REPEATS):
            started = time.perf_counter()
            cursor.execute(sql)
            cursor.fetchall()
            runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs)


def explain(sql: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
        return "\n".join(row[0] for row in cursor.fetchall())


def _get(client: Client, page: Page):
    response = client.get(page.url)
    if response.status_code != 200:
        raise RuntimeError(f"{page.url} answered {response.status_code}")
    return response


def _timed(client: Client, page: Page) -> float:
    started = time.perf_counter()
    _get(client, page)
    return (time.perf_counter() - started) * 1000


def capture(client: Client, page: Page, size: int, *, warmups: int) -> Measurement:
    """The page's queries (each also timed alone) and its rows, on the current database."""
    for _ in range(warmups):
        _get(client, page)
    with CaptureQueriesContext(connection) as captured:
        response = _get(client, page)
    # Copied now: `captured_queries` reads the connection's log, which the next request clears.
    sqls = [q["sql"] for q in captured.captured_queries]
    rows = response.content.decode().count(page.row_marker)
    queries = [Query(sql, _time_sql(sql)) for sql in sqls]
    return Measurement(page, size, rows, queries, [])


def compare(
    client: Client,
    page: Page,
    databases: tuple[tuple[int, str], tuple[int, str]],
    *,
    warmups: int,
    requests: int,
    rounds: int,
) -> Comparison:
    """Measure one page on the small and the large database, timed in alternating blocks.

    Each block reconnects, makes BLOCK_WARMUPS untimed requests, then `requests // rounds`
    timed ones; the sizes take turns going first. Alternation matters on a shared virtual
    machine, whose speed drifts by tens of percent over seconds: timing the sizes minutes
    apart would measure the drift as much as the table.
    """
    measurements = []
    for size, name in databases:
        with using_database(name):
            measurements.append(capture(client, page, size, warmups=warmups))
    per_block = max(1, requests // rounds)
    for block in range(rounds):
        order = list(zip(databases, measurements, strict=True))
        for (_, name), measurement in order if block % 2 == 0 else reversed(order):
            with using_database(name):
                for _ in range(BLOCK_WARMUPS):
                    _get(client, page)
                measurement.times_ms += [_timed(client, page) for _ in range(per_block)]
    comparison = Comparison(page, *measurements)
    with using_database(databases[1][1]):
        comparison.explains = [
            (index, q.sql, explain(q.sql)) for index, _, q in comparison.growing()[:MAX_EXPLAINS]
        ]
    return comparison


def run(
    *,
    small: int = 1_000,
    large: int = 100_000,
    warmups: int = 3,
    requests: int = 15,
    rounds: int = 15,
) -> AdminResult:
    """Grow the table to `small`, keep a copy of that database, grow to `large`, then
    measure every page on both, alternating between them."""
    growth = [generate.grow_to(small)]
    open_counts = [incidents_open().count()]
    client = Client()
    # Logged in before the copy, so the session exists in both databases.
    client.force_login(generate.ensure_fixtures().admin)
    with database_snapshot(f"{small}") as small_database:
        print(f"  kept {small:,} incidents as {small_database}; growing to {large:,}", flush=True)
        growth.append(generate.grow_to(large))
        open_counts.append(incidents_open().count())
        databases = ((small, small_database), (large, connection.settings_dict["NAME"]))
        print("  measuring both sizes in alternation", flush=True)
        comparisons = [
            compare(client, page, databases, warmups=warmups, requests=requests, rounds=rounds)
            for page in PAGES
        ]
    return AdminResult(
        small,
        large,
        warmups,
        requests,
        rounds,
        comparisons,
        growth,
        (open_counts[0], open_counts[1]),
    )
