"""`make bench`: run every benchmark in a fresh database and write docs/benchmarks.md.

    .venv/bin/python -m benchmarks [--small 1000] [--large 100000] [--calls 500] ...

The defaults are the documented run; smaller sizes are for trying changes quickly (the
report then says which options were used).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from . import bench_database, is_postgresql, setup

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
COMMAND = "make bench"


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
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
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the markdown report")
    return parser.parse_args(argv)


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
        "`collectstatic` runs. Other load on the machine during the run shows in the figures.",
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

    started = datetime.now(UTC)
    clock = time.perf_counter()
    # Order matters: the admin benchmark needs the small table first; the services benchmark
    # then writes to the large one, as production would; the escalation benchmarks come last
    # (they add open incidents by the hundred thousand, which the others must not see).
    modules = [
        (
            "admin at scale",
            lambda: bench_admin.run(
                small=options.small,
                large=options.large,
                warmups=options.warmups,
                requests=options.requests,
                rounds=options.rounds,
            ),
        ),
        ("services throughput", lambda: bench_services.run(calls=options.calls)),
        (
            "escalation engine",
            lambda: bench_escalation.run(
                incidents=options.lateness_incidents,
                timeout=options.lateness_timeout,
                small=options.tick_small,
                large=options.tick_large,
                due=options.tick_due,
                rounds=options.tick_rounds,
            ),
        ),
    ]
    results: dict[str, object] = {}
    with bench_database() as name:
        print(f"Benchmark database {name} created and migrated.", flush=True)
        facts = machine.describe()
        for title, run in modules:
            print(f"Running {title}...", flush=True)
            result = run()
            for line in result.summary():
                print(f"  {line}", flush=True)
            results[title] = result
    seconds = time.perf_counter() - clock
    report = render(
        machine=facts,
        # Numbered as in the issues: services, the admin, then the escalation engine.
        results=[
            results["services throughput"],
            results["admin at scale"],
            results["escalation engine"],
        ],
        started=started,
        seconds=seconds,
        extra_args=_non_defaults(argv),
    )
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(report)
    print(f"Wrote {options.output} ({seconds / 60:.1f} min).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
