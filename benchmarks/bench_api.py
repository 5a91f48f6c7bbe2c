"""Benchmark 7: the incidents list of the REST API at 10,000 and at 1,000,000 incidents.

In a database of its own (copied from the freshly migrated benchmark database), the table
is grown with `generate.grow_to` to the small size, copied, and grown to the large size;
`GET /api/v1/incidents/` (cursor pagination, newest first) and the same list filtered by
status are then measured on both, as bench_admin measures the admin pages: through
`django.test.Client` as a logged-in superuser (`force_login`, session authentication),
DEBUG off, warm-ups, one request under `CaptureQueriesContext` for the query count, then
timed requests in blocks alternating between the sizes.

Targets: the same number of queries at both sizes, and median(large) / median(small) at
most 1.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db import connection
from django.test import Client

from incidents.selectors import incidents_open

from . import generate, using_database
from .bench_admin import SQL_REPEATS, TARGET_RATIO, Comparison, _ms, _short, compare
from .bench_ingest import fresh_database

URL = "/api/v1/incidents/"


@dataclass(frozen=True)
class Endpoint:
    key: str
    title: str
    url: str
    # Occurs once per incident in the JSON answer.
    row_marker: str = '"reference":'


ENDPOINTS = (
    Endpoint("list", "Incidents, newest first", URL),
    Endpoint("triggered", "Incidents, status=triggered (open, few)", f"{URL}?status=triggered"),
    Endpoint("closed", "Incidents, status=closed (most of the table)", f"{URL}?status=closed"),
)


@dataclass
class ApiResult:
    small_size: int
    large_size: int
    warmups: int
    requests: int
    rounds: int
    comparisons: list[Comparison]
    growth: list[generate.Growth]
    open_counts: tuple[int, int]
    notes: list[str] = field(default_factory=list)

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
        per_block = max(1, self.requests // self.rounds)
        lines = [
            "## 7. REST API: the incidents list at scale",
            "",
            f"`GET {URL}` (cursor pagination, newest first, 50 a page) and the same list "
            f"filtered by status, at {small} and at {large} incidents, in a database of its own "
            "grown by `generate.grow_to` (the small table is kept as a copy before it grows, "
            "so both sizes are measured side by side). Requests go through "
            "`django.test.Client` as a superuser logged in with `force_login` (session "
            "authentication), `Accept: application/json`, DEBUG off. Per list and size: "
            f"{self.warmups} warm-up requests and one under `CaptureQueriesContext` for the "
            f"query count; then {per_block * self.rounds} timed requests per size in "
            f"{self.rounds} blocks alternating between the sizes, each block reconnecting "
            "and making 2 warm-up requests first. The median is reported. Targets: the same "
            f"query count at both sizes and median({large}) / median({small}) at most "
            f"{TARGET_RATIO}.",
            "",
            f"| request | rows | queries at {small} | queries at {large} | median at {small} "
            f"| median at {large} | ratio | same query count | ratio <= {TARGET_RATIO} |",
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
            f"Open incidents: {self.open_counts[0]:,} of {small} and {self.open_counts[1]:,} of "
            f"{large} (the generator keeps today's open workload fixed and grows the finished "
            "history).",
            "",
            "Data generation (bulk_create, then VACUUM ANALYZE): "
            + "; ".join(
                f"{g.before:,} -> {g.after:,} incidents ({g.timeline_events:,} timeline "
                f"events) in {g.seconds:.1f} s, VACUUM ANALYZE {g.analyze_seconds:.1f} s"
                for g in self.growth
            )
            + ".",
            "",
            f"Queries of each request (each SELECT re-run alone, median of {SQL_REPEATS}):",
            "",
        ]
        for c in self.comparisons:
            lines += [
                f"- {c.page.title}: SQL {c.small.sql_ms:.1f} ms of {c.small.median_ms:.1f} ms "
                f"at {small}, {c.large.sql_ms:.1f} ms of {c.large.median_ms:.1f} ms at "
                f"{large}. {c.attribution()}",
                "",
                f"  | # | query | ms at {small} | ms at {large} |",
                "  | ---: | --- | ---: | ---: |",
            ]
            lines += [
                f"  | {index} | `{_short(q.sql)}` | {_ms(s.ms if s else None)} | {_ms(q.ms)} |"
                for index, s, q in c.pairs()
            ]
            lines.append("")
            for index, sql, plan in c.explains:
                lines += [
                    f"  Query {index} grows between the sizes. EXPLAIN (ANALYZE, BUFFERS) at "
                    f"{large}:",
                    "",
                    "  ```sql",
                    *(f"  {line}" for line in sql.splitlines()),
                    "  ```",
                    "",
                    "  ```",
                    *(f"  {line}" for line in plan.splitlines()),
                    "  ```",
                    "",
                ]
        lines += self.notes
        return "\n".join(lines).rstrip() + "\n"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def run(
    *,
    template: str,
    small: int = 10_000,
    large: int = 1_000_000,
    warmups: int = 3,
    requests: int = 30,
    rounds: int = 15,
) -> ApiResult:
    with fresh_database(template, "api") as database, using_database(database):
        growth = [generate.grow_to(small)]
        open_counts = [incidents_open().count()]
        client = Client(HTTP_ACCEPT="application/json")
        # Logged in before the copy, so the session exists in both databases.
        client.force_login(generate.ensure_fixtures().admin)
        with fresh_database(database, f"{small}") as small_database:
            print(f"  kept {small:,} incidents as {small_database}; growing to {large:,}")
            growth.append(generate.grow_to(large))
            print(
                f"  grown in {growth[-1].seconds / 60:.1f} min (VACUUM ANALYZE "
                f"{growth[-1].analyze_seconds:.0f} s); measuring both sizes in alternation",
                flush=True,
            )
            open_counts.append(incidents_open().count())
            databases = ((small, small_database), (large, connection.settings_dict["NAME"]))
            comparisons = [
                compare(
                    client,
                    endpoint,
                    databases,
                    warmups=warmups,
                    requests=requests,
                    rounds=rounds,
                )
                for endpoint in ENDPOINTS
            ]
    return ApiResult(
        small, large, warmups, requests, rounds, comparisons, growth, tuple(open_counts)
    )
