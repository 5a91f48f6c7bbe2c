"""`make bench`: run every benchmark in a fresh database and write docs/benchmarks.md.

    .venv/bin/python -m benchmarks [--small 1000] [--large 100000] [--calls 500] ...
    .venv/bin/python -m benchmarks ingest api      # only these; the other sections are kept

The defaults are the documented run; smaller sizes are for trying changes quickly (the
report then says which options were used). Naming benchmarks (services, admin, escalation,
ingest, api, notices) runs only those and replaces only their sections of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from . import bench_database, database_snapshot, is_postgresql, setup

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
COMMAND = "make bench"
# The benchmarks by name, in the order they run and the order of their report sections.
NAMES = ("admin", "services", "escalation", "ingest", "api", "notices")
REPORT_ORDER = ("services", "admin", "escalation", "ingest", "api", "notices")


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "only", nargs="*", metavar="BENCHMARK", help=f"run only these ({', '.join(NAMES)})"
    )
    parser.add_argument("--small", type=int, default=1_000, help="incidents, first size")
    parser.add_argument("--large", type=int, default=100_000, help="incidents, second size")
    parser.add_argument("--warmups", type=int, default=3, help="warm-up requests per page")
    parser.add_argument("--requests", type=int, default=15, help="timed requests per page")
    parser.add_argument("--rounds", type=int, default=15, help="alternating blocks per page")
    parser.add_argument("--calls", type=int, default=500, help="service calls per operation")
    parser.add_argument(
        "--lateness-incidents", type=int, default=200, help="incidents, lateness benchmark"
    )
    parser.add_argument(
        "--lateness-timeout", type=float, default=90.0, help="seconds the lateness run may take"
    )
    parser.add_argument("--tick-small", type=int, default=1_000, help="open incidents, tick")
    parser.add_argument("--tick-large", type=int, default=100_000, help="open incidents, tick")
    parser.add_argument("--tick-due", type=int, default=100, help="due incidents per tick")
    parser.add_argument("--tick-rounds", type=int, default=6, help="alternating tick blocks")
    parser.add_argument(
        "--ingest-seconds", type=float, default=30.0, help="seconds of the timed webhook block"
    )
    parser.add_argument(
        "--ingest-connections", type=int, default=8, help="wrk connections, ingestion"
    )
    parser.add_argument("--storm-alerts", type=int, default=10_000, help="alerts, storm")
    parser.add_argument("--storm-groups", type=int, default=20, help="groups, storm")
    parser.add_argument("--api-small", type=int, default=10_000, help="incidents, API first")
    parser.add_argument(
        "--api-large", type=int, default=1_000_000, help="incidents, API second size"
    )
    parser.add_argument("--api-requests", type=int, default=30, help="timed requests, API")
    parser.add_argument("--notices-small", type=int, default=1_000, help="subscribers, first")
    parser.add_argument("--notices-large", type=int, default=10_000, help="subscribers, second")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the markdown report")
    options = parser.parse_args(argv)
    unknown = [name for name in options.only if name not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(NAMES)}")
    return options


def _non_defaults(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(args)


def render(*, machine, results, started: datetime, seconds: float, extra_args: str) -> str:
    command = COMMAND if not extra_args else f".venv/bin/python -m benchmarks {extra_args}"
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC; the whole run took "
        f"{seconds / 60:.1f} min. Do not edit by hand: run `{COMMAND}` again. PostgreSQL must "
        "be reachable at `DATABASE_URL` (`make bench` defaults it to "
        "`postgres://postgres:postgres@127.0.0.1:5432/incidents`; only the server is used).",
        "",
        "The run creates its own database, `bench_incidents`, migrates it, fills it with "
        "`benchmarks/generate.py` and drops it at the end: the developer's data is never "
        "touched. DEBUG is off; static files use the plain (non-manifest) storage because no "
        "`collectstatic` runs. The ingestion and API benchmarks work in copies of the freshly "
        "migrated database, dropped likewise. Other load on the machine during the run shows "
        "in the figures.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {label} | {value} |" for label, value in machine),
        "",
    ]
    lines += [result.markdown() for result in results]
    return "\n".join(lines).rstrip() + "\n"


NOTE = re.compile(
    r"^(?:Sections )?[Rr]e-measured by (?P<run>.*?): (?P<names>[a-z, ]+?)"
    r"(?:; the others are from the run named above)?\.$"
)


def merge(previous: str, fresh: str, *, run: str, names: list[str]) -> str:
    """The previous report with the `## N.` sections that `fresh` has (replaced, or added in
    number order) and a note that `run` re-measured `names`, after the first paragraph. An
    older note loses the names measured again; one left with none is dropped."""

    def split(text: str) -> tuple[str, dict[int, str]]:
        parts = re.split(r"(?m)^(?=## \d+\. )", text)
        numbered = {int(re.match(r"## (\d+)\.", part).group(1)): part for part in parts[1:]}
        return parts[0], numbered

    head, old = split(previous)
    _, new = split(fresh)
    old.update(new)
    paragraphs = []
    for paragraph in head.rstrip().split("\n\n"):
        match = NOTE.match(paragraph)
        if match:
            kept = [n for n in match["names"].split(", ") if n not in names]
            if not kept:
                continue
            paragraph = f"Re-measured by {match['run']}: {', '.join(kept)}."
        paragraphs.append(paragraph)
    paragraphs.insert(2, f"Re-measured by {run}: {', '.join(names)}.")
    body = "".join(part.rstrip() + "\n\n" for _, part in sorted(old.items()))
    return "\n\n".join(paragraphs) + "\n\n" + body.rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    options = _options(argv)
    setup()
    if not is_postgresql():
        print(
            "The benchmarks need PostgreSQL: run `make bench`, or set DATABASE_URL to a "
            "postgres:// URL (only its server is used; a separate database is created).",
            file=sys.stderr,
        )
        return 2

    from . import bench_admin, bench_escalation, bench_services, machine

    selected = [name for name in NAMES if not options.only or name in options.only]
    started = datetime.now(UTC)
    clock = time.perf_counter()
    # Order matters: the admin benchmark needs the small table first; the services benchmark
    # then writes to the large one, as production would; the escalation benchmarks come after
    # them (they add open incidents by the hundred thousand, which the others must not see).
    # Ingestion and the API work in databases of their own, copied from the freshly migrated
    # one (kept as a template before anything else runs).
    modules = {
        "admin": lambda _: bench_admin.run(
            small=options.small,
            large=options.large,
            warmups=options.warmups,
            requests=options.requests,
            rounds=options.rounds,
        ),
        "services": lambda _: bench_services.run(calls=options.calls),
        "escalation": lambda _: bench_escalation.run(
            incidents=options.lateness_incidents,
            timeout=options.lateness_timeout,
            small=options.tick_small,
            large=options.tick_large,
            due=options.tick_due,
            rounds=options.tick_rounds,
        ),
        "ingest": lambda template: _ingest().run(
            template=template,
            seconds=options.ingest_seconds,
            connections=options.ingest_connections,
            storm_alerts=options.storm_alerts,
            storm_groups=options.storm_groups,
        ),
        "notices": lambda _: _notices().run(
            small=options.notices_small, large=options.notices_large
        ),
        "api": lambda template: _api().run(
            template=template,
            small=options.api_small,
            large=options.api_large,
            requests=options.api_requests,
        ),
    }
    results: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        name = stack.enter_context(bench_database())
        print(f"Benchmark database {name} created and migrated.", flush=True)
        template = None
        if {"ingest", "api"} & set(selected):
            template = stack.enter_context(database_snapshot("template"))
        facts = machine.describe()
        for key in selected:
            print(f"Running {key}...", flush=True)
            result = modules[key](template)
            for line in result.summary():
                print(f"  {line}", flush=True)
            results[key] = result
    seconds = time.perf_counter() - clock
    extra_args = _non_defaults(argv)
    report = render(
        machine=facts,
        # Numbered as in the issues: services, the admin, the escalation engine, ingestion,
        # the API, customer notices.
        results=[results[key] for key in REPORT_ORDER if key in results],
        started=started,
        seconds=seconds,
        extra_args=extra_args,
    )
    options.output.parent.mkdir(parents=True, exist_ok=True)
    if options.only and options.output.exists():
        # Only the sections of the benchmarks named are replaced; the others, and the
        # machine table, stay as the earlier run wrote them.
        run = (
            f"`.venv/bin/python -m benchmarks {extra_args}` on {started:%Y-%m-%d %H:%M} UTC "
            f"({seconds / 60:.1f} min), sections of"
        )
        report = merge(options.output.read_text(), report, run=run, names=selected)
    options.output.write_text(report)
    print(f"Wrote {options.output} ({seconds / 60:.1f} min).")
    return 0


def _ingest():
    from . import bench_ingest

    return bench_ingest


def _api():
    from . import bench_api

    return bench_api


def _notices():
    from . import bench_notices

    return bench_notices


if __name__ == "__main__":
    sys.exit(main())
