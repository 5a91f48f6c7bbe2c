"""Benchmarks 3 and 4: is the escalation engine on time, and what does one tick cost as the
number of open incidents grows?

3. Lateness, with real processes. A private redis-server, a Celery worker (concurrency 2)
   and a Celery beat run as child processes against the benchmark database, started as
   `make run`'s Procfile starts them, with ENGINE_TICK_SECONDS as configured (5 s by
   default). Pages go by email to a real SMTP server (aiosmtpd) in this process. Incidents
   are declared here through `incident_declare`, spread over several tick intervals so that
   their steps fall due at every phase of the tick, under a severity whose policy pages one
   person 10 s after the start and two more at 20 s. For every page, lateness is
   `sent_at - due_at` read back from the database (`sent_at` is stamped once the SMTP server
   has accepted the message). Target: p99 within one tick interval plus 1 s.

4. Tick cost, in this process. `escalation.services.engine_tick` is called directly (no
   worker or beat running) with `due` incidents whose first step is due, among 1,000 and
   among 100,000 open incidents; the deliveries it queues really go to the private Redis.
   The open incidents that are not due are between two steps of their plan, the next one
   hours away. Between calls the due incidents are put back as they were (escalation
   fields restored, the pages and `escalated` timeline events the call created deleted with
   plain SQL: the timeline refuses ORM deletes). The small database is kept as a copy while
   the original grows, and the two sizes are timed in alternating blocks. Targets: the same
   query count at both sizes and median(large) / median(small) at most 1.5.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis as redis_client
from aiosmtpd.controller import Controller
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from escalation import services as engine
from escalation.models import Page, PageStatus
from escalation.services import BREACHES
from incidents import services as incident_services
from incidents.models import OPEN_STATUSES, EventKind, Incident, TimelineEvent

from . import database_snapshot, generate, using_database

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LATENESS_SLACK = 1.0  # seconds allowed on top of one tick interval
TARGET_RATIO = 1.5
SQL_REPEATS = 5
GROWTH_MS = 0.5
GROWTH_FACTOR = 2.0
MAX_EXPLAINS = 3
# The steps engine_tick runs, in order: module attributes, so they can be wrapped and timed.
PHASES = (
    "record_breaches",
    "escalate_due",
    "pages_try_backup",
    "pages_recover_stuck",
    "schedule_deliveries",
)
TERMINAL = {PageStatus.SENT, PageStatus.FAILED, PageStatus.CANCELLED, PageStatus.UNKNOWN}


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q % of values at or below."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def _short(sql: str, limit: int = 110) -> str:
    sql = " ".join(sql.split()).replace("`", "'")
    return sql if len(sql) <= limit else sql[: limit - 3] + "..."


# --- child processes ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_until(predicate: Callable[[], Any], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


class Child:
    """A child process in its own process group (stopping it stops what it forked, such as
    the worker's pool), its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> Child:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, *, timeout: float) -> None:
        def seen() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-3000:]}")
            return text in self.log()

        _wait_until(seen, timeout=timeout, what=f"{text!r} in the log of {self.name}")

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM, up to `grace` seconds to finish, then SIGKILL to the whole group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # pool children left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


@dataclass
class Broker:
    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> redis_client.Redis:
        return redis_client.Redis(host=HOST, port=self.port, socket_timeout=2)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis_client.RedisError:
            return False


def _start_redis(workdir: Path) -> Broker:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir)]
    broker = Broker(Child("redis", argv, dict(os.environ), workdir / "redis.log").start(), port)
    _wait_until(broker.ping, timeout=10, what=f"redis-server on port {port}")
    return broker


class _FreePortController(Controller):
    """aiosmtpd's controller on port 0: the port is read from the bound socket before the
    controller's start-up probe connects to it."""

    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class MailSink:
    """A real SMTP server in a thread of this process; counts the messages it accepts."""

    def __init__(self) -> None:
        self.received = 0
        self.recipients: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._controller = _FreePortController(self, hostname=HOST, port=0)
        self.port = 0

    def start(self) -> MailSink:
        # aiosmtpd logs every SMTP command at INFO; the benchmark's output is not the place.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        self._controller.start()
        self.port = self._controller.port
        return self

    def stop(self) -> None:
        self._controller.stop()

    def env(self) -> dict[str, str]:
        return {
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": HOST,
            "EMAIL_PORT": str(self.port),
            "EMAIL_USE_TLS": "false",
            "EMAIL_HOST_USER": "",
            "EMAIL_HOST_PASSWORD": "",
        }

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd hook
        with self._lock:
            self.received += 1
            self.recipients.update(envelope.rcpt_tos)
        return "250 Message accepted for delivery"


def _database_url() -> str:
    """The URL of the database this process is using now (the benchmark database)."""
    db = connection.settings_dict
    user, password = quote(db["USER"] or "", safe=""), quote(db["PASSWORD"] or "", safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    return f"postgres://{auth}{db['HOST'] or HOST}:{db['PORT'] or 5432}/{db['NAME']}"


def _child_env(broker: Broker, workdir: Path, tick: float, extra: dict[str, str]) -> dict:
    env = dict(os.environ)  # DJANGO_SECRET_KEY, DJANGO_DEBUG=false, ... as this process
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DATABASE_URL=_database_url(),
        CELERY_BROKER_URL=broker.url,
        REDIS_URL=broker.url,
        ENGINE_TICK_SECONDS=f"{tick:g}",
        # The beat schedule file (and static root) go to the run's temporary directory.
        VAR_DIR=str(workdir / "var"),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@contextlib.contextmanager
def _celery_broker(url: str) -> Iterator[None]:
    """Point this process's Celery app at `url`, then back (pools closed both times)."""
    from config.celery import app

    previous = app.conf.broker_url
    app.close()
    app.conf.broker_url = url
    try:
        yield
    finally:
        app.close()
        app.conf.broker_url = previous


def _catch_up() -> int:
    """Record every breach already due (what the engine would have done long ago), so the
    measurements start from the engine's steady state. Returns how many were recorded."""
    total = 0
    while recorded := engine.record_breaches():
        total += recorded
    return total


# --- 3. lateness ----------------------------------------------------------------------------

TICK_RUNTIME = re.compile(r"Task escalation\.engine_tick\[[^\]]+\] succeeded in ([0-9.e-]+)s")
DELIVER_RUNTIME = re.compile(r"Task escalation\.deliver_page\[[^\]]+\] succeeded in ([0-9.e-]+)s")
BEAT_SENT = "Sending due task escalation-engine-tick"
DISCARDED = "Discarding revoked task: escalation.engine_tick"


@dataclass
class Spread:
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            return cls(math.nan, math.nan, math.nan)
        return cls(statistics.median(values), _percentile(values, 99), max(values))


@dataclass
class Lateness:
    tick_seconds: float
    incidents: int
    spread_seconds: float
    timeout: float
    expected: int
    statuses: dict[str, int]
    lateness: list[float]  # sent_at - due_at, seconds, one per sent page
    tick_wait: list[float]  # created_at - due_at: until the tick that created the page
    queue_wait: list[float]  # claimed_at - created_at: queued until a worker claimed it
    send: list[float]  # sent_at - claimed_at: composing, SMTP, recording the outcome
    mails: int
    finished_after: float | None  # from the first declaration to the last page out
    tick_runtimes: list[float]
    deliver_runtimes: list[float]
    ticks_sent: int
    ticks_discarded: int
    breaches: int
    startup_seconds: float
    # The tick that created the most pages: how many, and how long after it started the
    # last of them was sent (what the worker's throughput adds to lateness).
    busiest_tick_pages: int = 0
    busiest_tick_drained: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.lateness)

    @property
    def target(self) -> float:
        return self.tick_seconds + LATENESS_SLACK

    @property
    def total(self) -> Spread:
        return Spread.of(self.lateness)

    @property
    def complete(self) -> bool:
        return self.sent == self.expected

    @property
    def passed(self) -> bool:
        return self.complete and self.total.p99 <= self.target


def run_lateness(
    *, broker: Broker, workdir: Path, incidents: int, spread: float, timeout: float
) -> Lateness:
    fixtures = generate.ensure_fixtures()
    escalation = generate.ensure_escalation_fixtures()
    tick = float(settings.ENGINE_TICK_SECONDS)
    expected = incidents * sum(len(people) for _, people in generate.SHORT_STEPS)
    sink = MailSink().start()
    env = _child_env(broker, workdir, tick, sink.env())
    celery = [sys.executable, "-m", "celery", "-A", "config"]
    # As the Procfile runs them; the worker gets a name of its own, beat a schedule file in
    # the temporary directory and no pid file.
    worker = Child(
        "worker",
        [*celery, "worker", "--loglevel=INFO", "--concurrency=2", "-n", "bench@%h"],
        env,
        workdir / "worker.log",
    )
    beat_argv = [*celery, "beat", "--loglevel=INFO", "--schedule", str(workdir / "beat")]
    beat = Child("beat", [*beat_argv, "--pidfile="], env, workdir / "beat.log")
    ids: list[int] = []
    finished_after = None
    ok = False
    clock = time.monotonic()
    try:
        worker.start()
        beat.start()
        worker.wait_for_log(" ready.", timeout=60)
        beat.wait_for_log("beat: Starting", timeout=60)
        startup = time.monotonic() - clock
        print(f"  worker and beat up in {startup:.1f} s; declaring {incidents}", flush=True)
        started = time.monotonic()
        for i in range(incidents):
            pause = started + i * spread / incidents - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            incident = incident_services.incident_declare(
                title=f"Benchmark: lateness {i + 1}",
                severity=escalation.severity,
                services=[fixtures.services[i % len(fixtures.services)]],
                team=fixtures.teams[0],
                actor=None,
                actor_label="lateness benchmark",
            )
            ids.append(incident.pk)
        while time.monotonic() < started + timeout:
            counts = Counter(
                Page.objects.filter(incident_id__in=ids).values_list("status", flat=True)
            )
            if sum(counts[s] for s in TERMINAL) >= expected and sum(counts.values()) == sum(
                counts[s] for s in TERMINAL
            ):
                finished_after = time.monotonic() - started
                break
            time.sleep(0.5)
        ok = True
    finally:
        beat.stop()
        worker.stop()
        sink.stop()
        if not ok:
            for child in (worker, beat):
                print(f"----- {child.name} (last lines) -----\n{child.log()[-3000:]}")

    rows = list(
        Page.objects.filter(incident_id__in=ids).values_list(
            "status", "due_at", "created_at", "claimed_at", "sent_at"
        )
    )
    sent = [r for r in rows if r[0] == PageStatus.SENT]

    def seconds(pairs) -> list[float]:
        return [(b - a).total_seconds() for a, b in pairs]

    worker_log, beat_log = worker.log(), beat.log()
    breaches = Incident.objects.filter(pk__in=ids, ack_breached_at__isnull=False).count()
    # The incidents are resolved, as responders would: the tick benchmark that follows starts
    # with no escalation or deadline of theirs pending.
    for pk in ids:
        incident_services.incident_resolve(incident=pk, actor=fixtures.admin)
    return Lateness(
        tick_seconds=tick,
        incidents=incidents,
        spread_seconds=spread,
        timeout=timeout,
        expected=expected,
        statuses=dict(Counter(r[0] for r in rows)),
        lateness=seconds((r[1], r[4]) for r in sent),
        tick_wait=seconds((r[1], r[2]) for r in sent),
        queue_wait=seconds((r[2], r[3]) for r in sent),
        send=seconds((r[3], r[4]) for r in sent),
        mails=sink.received,
        finished_after=finished_after,
        tick_runtimes=[float(x) for x in TICK_RUNTIME.findall(worker_log)],
        deliver_runtimes=[float(x) for x in DELIVER_RUNTIME.findall(worker_log)],
        ticks_sent=beat_log.count(BEAT_SENT),
        ticks_discarded=worker_log.count(DISCARDED),
        breaches=breaches,
        startup_seconds=startup,
        **_busiest_tick(sent),
    )


def _busiest_tick(sent: list[tuple]) -> dict[str, Any]:
    """Pages sharing a `created_at` were created by one tick (it reads the clock once)."""
    by_tick: dict[datetime, list[datetime]] = {}
    for _, _, created, _, sent_at in sent:
        by_tick.setdefault(created, []).append(sent_at)
    if not by_tick:
        return {}
    created, sent_ats = max(by_tick.items(), key=lambda item: len(item[1]))
    return {
        "busiest_tick_pages": len(sent_ats),
        "busiest_tick_drained": (max(sent_ats) - created).total_seconds(),
    }


# --- 4. tick cost ---------------------------------------------------------------------------


class Phases:
    """Wraps the steps `engine_tick` calls (module attributes of escalation.services) to time
    each, exclusive of the steps it calls itself (escalate_due calls schedule_deliveries),
    and to count its queries when a CaptureQueriesContext is active."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.queries: dict[str, int] = {}
        # Index in connection.queries_log -> the innermost step that ran it (under capture).
        self.owner: dict[int, str] = {}
        self._stack: list[list[float]] = []
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.queries = dict.fromkeys(PHASES, 0)
        self.owner = {}

    def _wrap(self, name: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._stack.append([0.0, 0])
            logged = len(connection.queries_log)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                queries = len(connection.queries_log) - logged
                inner_seconds, inner_queries = self._stack.pop()
                self.seconds[name] += elapsed - inner_seconds
                self.queries[name] += int(queries - inner_queries)
                for index in range(logged, logged + queries):
                    self.owner.setdefault(index, name)  # inner steps finished first
                if self._stack:
                    self._stack[-1][0] += elapsed
                    self._stack[-1][1] += queries

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[Phases]:
        originals = {name: getattr(engine, name) for name in PHASES}
        for name, function in originals.items():
            setattr(engine, name, self._wrap(name, function))
        try:
            yield self
        finally:
            for name, function in originals.items():
                setattr(engine, name, function)


@dataclass
class Tick:
    seconds: float
    phases: dict[str, float]
    pages_created: int
    breaches: int
    queued: int  # delivery messages that arrived in Redis


def _tick(phases: Phases, broker: Broker) -> Tick:
    client = broker.client()
    before = client.llen("celery")
    phases.reset()
    started = time.perf_counter()
    report = engine.engine_tick()
    seconds = time.perf_counter() - started
    queued = client.llen("celery") - before
    client.flushdb()  # nobody consumes them; keep the private Redis small
    return Tick(seconds, dict(phases.seconds), report.pages_created, report.breaches, queued)


def _reset(due_ids: list[int]) -> None:
    """Put the due incidents back as they were before a tick: step 1 due, no page."""
    quote_name = connection.ops.quote_name
    page, event = quote_name(Page._meta.db_table), quote_name(TimelineEvent._meta.db_table)
    incident = quote_name(Incident._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {page} WHERE incident_id = ANY(%s)", [due_ids])  # noqa: S608
        cursor.execute(
            f"DELETE FROM {event} WHERE incident_id = ANY(%s) AND kind = %s",  # noqa: S608
            [due_ids, EventKind.ESCALATED],
        )
        cursor.execute(
            f"UPDATE {incident} SET escalation_step = 0, escalation_round = 0, "  # noqa: S608
            "next_escalation_at = escalation_started_at WHERE id = ANY(%s)",
            [due_ids],
        )


def _vacuum() -> None:
    """Dead rows left by the resets, vacuumed away before each block (not timed)."""
    with connection.cursor() as cursor:
        for model in (Incident, Page, TimelineEvent):
            cursor.execute(f"VACUUM {connection.ops.quote_name(model._meta.db_table)}")


QUALIFIER = re.compile(r'"\w+"\.')  # the table before a column name
_LITERALS = (
    (re.compile(r'"s\d+_x\d+"'), '"s?"'),  # savepoint names
    (re.compile(r"'(?:[^']|'')*'"), "?"),
    (re.compile(r"\b\d+(?:\.\d+)?\b"), "?"),
    (re.compile(r"\(\?(?:, \?)*\)"), "(?)"),
)


def shape(sql: str) -> str:
    """The statement with its literals replaced by ?: statements differing only in values
    (the same query for another incident) have the same shape."""
    for pattern, replacement in _LITERALS:
        sql = pattern.sub(replacement, sql)
    return " ".join(sql.split())


@dataclass
class Capture:
    due: int
    sqls: list[str]
    phase_queries: dict[str, int]
    steps: list[str]  # the step of the tick that ran each statement

    @property
    def shapes(self) -> Counter[str]:
        return Counter(shape(sql) for sql in self.sqls)


@dataclass
class Sweep:
    """A statement whose count does not depend on the number due, timed alone."""

    shape: str
    sql: str
    step: str
    ms: float

    @property
    def label(self) -> str:
        """`table WHERE ...` of the statement (columns unqualified): what it selects on."""
        table = re.search(r' FROM ("[^"]+")', self.shape)
        where = self.shape.find(" WHERE ")
        if table is None or where < 0:
            return _short(self.shape, 150)
        end = self.shape.find(" ORDER BY ", where)
        condition = QUALIFIER.sub("", self.shape[where + 7 : end if end > 0 else None])
        return _short(f"{table[1]} WHERE {condition}", 150)


@dataclass
class Size:
    open: int
    total: int
    database: str
    growth: generate.OpenGrowth
    scanned: dict[str, int]  # due column -> rows with a due time already past (all recorded)
    full: Capture | None = None
    half: Capture | None = None
    ticks: list[Tick] = field(default_factory=list)
    sweeps: dict[str, Sweep] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(t.seconds for t in self.ticks) * 1000

    @property
    def range_ms(self) -> str:
        times = [t.seconds * 1000 for t in self.ticks]
        return f"{min(times):.0f} - {max(times):.0f} ms"

    def phase_ms(self, name: str) -> float:
        return statistics.median(t.phases[name] for t in self.ticks) * 1000


def _capture(phases: Phases, broker: Broker, due_ids: list[int], size: int) -> Capture:
    _reset(due_ids[:size])
    with CaptureQueriesContext(connection) as captured:
        phases.reset()
        tick = _tick(phases, broker)
    if tick.pages_created != size or tick.queued != size:
        raise RuntimeError(
            f"a tick with {size} due created {tick.pages_created} pages and queued "
            f"{tick.queued} deliveries"
        )
    sqls = [q["sql"] for q in captured.captured_queries]
    steps = [
        phases.owner.get(captured.initial_queries + i, "engine_tick") for i in range(len(sqls))
    ]
    return Capture(size, sqls, dict(phases.queries), steps)


def _time_sql(sql: str) -> float:
    timings = []
    with connection.cursor() as cursor:
        for _ in range(SQL_REPEATS):
            started = time.perf_counter()
            cursor.execute(sql)
            cursor.fetchall()
            timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def _explain(sql: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
        return "\n".join(row[0] for row in cursor.fetchall())


def _scanned() -> dict[str, int]:
    """Open incidents whose due column is already past: rows each breach sweep's index range
    holds although they were recorded long ago."""
    now = timezone.now()
    base = Incident.objects.filter(status__in=OPEN_STATUSES)
    return {due: base.filter(**{f"{due}__lte": now}).count() for due, _, _, _ in BREACHES}


@dataclass
class TickCost:
    small: Size
    large: Size
    due: int
    rounds: int
    per_block: int
    caught_up: int
    explains: list[tuple[str, str]]  # (statement label, plan)

    @property
    def ratio(self) -> float:
        return self.large.median_ms / self.small.median_ms

    @property
    def same_count(self) -> bool:
        return len(self.small.full.sqls) == len(self.large.full.sqls)

    @property
    def passed(self) -> bool:
        return self.same_count and self.ratio <= TARGET_RATIO

    @staticmethod
    def per_due_at(size: Size) -> float:
        """Statements per due incident: the difference between full and half captures."""
        full, half = size.full, size.half
        return (len(full.sqls) - len(half.sqls)) / (full.due - half.due)

    @property
    def per_due(self) -> float:
        return self.per_due_at(self.small)

    @property
    def fixed(self) -> float:
        return len(self.small.full.sqls) - self.per_due * self.due

    def per_due_shapes(self) -> list[tuple[str, float]]:
        """Statement shapes whose count grows with the number due, per due incident."""
        full, half = self.small.full.shapes, self.small.half.shapes
        span = self.small.full.due - self.small.half.due
        return [
            (text, (count - half.get(text, 0)) / span)
            for text, count in full.most_common()
            if count != half.get(text, 0)
        ]

    def growing(self) -> list[str]:
        return [
            text
            for text, sweep in self.large.sweeps.items()
            if text in self.small.sweeps
            and sweep.ms - self.small.sweeps[text].ms > GROWTH_MS
            and sweep.ms > GROWTH_FACTOR * self.small.sweeps[text].ms
        ]


def run_ticks(
    *, broker: Broker, small: int, large: int, due: int, rounds: int, per_block: int
) -> TickCost:
    escalation = generate.ensure_escalation_fixtures()
    policy = escalation.tick_policy
    caught_up = _catch_up()
    growth = generate.grow_open_to(small, policy=policy, due=due)
    due_ids = list(
        Incident.objects.filter(
            escalation_plan__policy_id=policy.pk,
            escalation_step=0,
            next_escalation_at__lte=timezone.now(),
        )
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    others = Incident.objects.filter(next_escalation_at__lte=timezone.now()).exclude(pk__in=due_ids)
    if len(due_ids) != due or others.exists():
        raise RuntimeError(f"{len(due_ids)} due incidents, {others.count()} others due too")
    small_size = Size(growth.open_after, growth.total_after, "", growth, _scanned())
    phases = Phases()
    with database_snapshot("ticks") as small_database:
        small_size.database = small_database
        print(f"  kept {growth.open_after:,} open as {small_database}; growing", flush=True)
        growth = generate.grow_open_to(large, policy=policy, due=0)
        caught_up += _catch_up()
        large_size = Size(
            growth.open_after,
            growth.total_after,
            connection.settings_dict["NAME"],
            growth,
            _scanned(),
        )
        sizes = (small_size, large_size)
        with _celery_broker(broker.url), phases.installed():
            for size in sizes:
                with using_database(size.database):
                    _tick(phases, broker)  # warm-up (connection, catalog caches, producer)
                    size.full = _capture(phases, broker, due_ids, due)
                    size.half = _capture(phases, broker, due_ids, due // 2)
                    _reset(due_ids)
            print("  timing both sizes in alternation", flush=True)
            for block in range(rounds):
                for size in sizes if block % 2 == 0 else reversed(sizes):
                    with using_database(size.database):
                        _vacuum()
                        _reset(due_ids)
                        _tick(phases, broker)  # warm-up after the reconnect
                        for _ in range(per_block):
                            _reset(due_ids)
                            size.ticks.append(_tick(phases, broker))
            for size in sizes:
                with using_database(size.database):
                    _reset(due_ids)
                    full_shapes = size.full.shapes
                    half_shapes = size.half.shapes
                    for sql, step in zip(size.full.sqls, size.full.steps, strict=True):
                        text = shape(sql)
                        if (
                            text.startswith("SELECT")
                            and full_shapes[text] == half_shapes.get(text)
                            and text not in size.sweeps
                        ):
                            size.sweeps[text] = Sweep(text, sql, step, _time_sql(sql))
    result = TickCost(small_size, large_size, due, rounds, per_block, caught_up, [])
    for size in sizes:
        for tick in size.ticks:
            if tick.pages_created != due or tick.queued != due or tick.breaches:
                raise RuntimeError(f"a timed tick did other work than the {due} due: {tick}")
    with using_database(large_size.database):
        _reset(due_ids)
        result.explains = [
            (large_size.sweeps[text].label, _explain(large_size.sweeps[text].sql))
            for text in result.growing()[:MAX_EXPLAINS]
        ]
    return result


# --- both -----------------------------------------------------------------------------------


@dataclass
class EscalationResult:
    lateness: Lateness
    ticks: TickCost

    def summary(self) -> list[str]:
        late, cost = self.lateness, self.ticks
        total = late.total
        return [
            f"lateness: {late.sent}/{late.expected} pages sent, p50 {total.p50:.2f} s, "
            f"p99 {total.p99:.2f} s, max {total.max:.2f} s (target p99 <= {late.target:g} s): "
            + ("PASS" if late.passed else "FAIL"),
            f"tick: {len(cost.small.full.sqls)} / {len(cost.large.full.sqls)} queries, median "
            f"{cost.small.median_ms:.0f} / {cost.large.median_ms:.0f} ms at "
            f"{cost.small.open:,} / {cost.large.open:,} open, ratio {cost.ratio:.2f}: "
            + ("PASS" if cost.passed else "FAIL"),
            f"tick: {cost.per_due:.0f} statements per due incident, {cost.fixed:.0f} fixed",
        ]

    def markdown(self) -> str:
        return _lateness_markdown(self.lateness) + "\n" + _ticks_markdown(self.ticks)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _lateness_markdown(late: Lateness) -> str:
    total = late.total
    steps = ", ".join(
        f"{len(people)} {'person' if len(people) == 1 else 'people'} at "
        f"{int(delay.total_seconds())} s"
        for delay, people in generate.SHORT_STEPS
    )
    lines = [
        "## 3. Escalation lateness (worker and beat, PostgreSQL, Redis)",
        "",
        f"A private `redis-server`, one Celery worker (`--concurrency=2`) and one Celery beat "
        f"as child processes, started as the Procfile starts them, against the benchmark "
        f"database; ENGINE_TICK_SECONDS={late.tick_seconds:g} (the default is 5). Pages go by "
        "email through Django's SMTP backend to a real SMTP server (aiosmtpd) in the benchmark "
        f"process. {late.incidents} incidents were declared through `incident_declare`, one "
        f"every {late.spread_seconds / late.incidents * 1000:.0f} ms over "
        f"{late.spread_seconds:g} s (so steps fall due at every phase of the tick), under a "
        f"severity whose policy pages {steps} while unacknowledged (each person has one email "
        f"contact method; the acknowledge target is "
        f"{generate.SHORT_SEVERITY['ack_target'].total_seconds():g} s, so the ticks also "
        f"record a breach per incident meanwhile): {late.expected} pages. The run waits up "
        f"to {late.timeout:g} s from the first declaration for every page to be sent, then "
        "stops beat and the worker. Per page, from the database: lateness = "
        "`sent_at - due_at` (`sent_at` is stamped after the SMTP server accepted the "
        "message). p99 is the nearest-rank percentile.",
        "",
        "| pages sent | p50 | p99 | max | target: p99 <= tick + 1 s | result |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {late.sent} / {late.expected} | {total.p50:.2f} s | {total.p99:.2f} s "
        f"| {total.max:.2f} s | {late.target:g} s | {_verdict(late.passed)} |",
        "",
        "Where the lateness comes from (each page's stamps; a page's `created_at` is the "
        "clock its tick read once, when it started):",
        "",
        "| part | p50 | p99 | max |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, values in (
        ("due -> the tick that paged starts (`created_at - due_at`)", late.tick_wait),
        (
            "tick start -> a worker claims the page (`claimed_at - created_at`: the rest of "
            "the tick, its commit, the queue)",
            late.queue_wait,
        ),
        ("claimed -> sent (`sent_at - claimed_at`: compose, SMTP, record)", late.send),
    ):
        spread = Spread.of(values)
        lines.append(f"| {label} | {spread.p50:.2f} s | {spread.p99:.2f} s | {spread.max:.2f} s |")
    ticks = Spread.of(late.tick_runtimes)
    deliveries = Spread.of(late.deliver_runtimes)
    finished = (
        f"all pages were out {late.finished_after:.1f} s after the first declaration"
        if late.finished_after is not None
        else f"NOT all pages were out after {late.timeout:g} s"
    )
    lines += [
        "",
        "- Pages by status: "
        + ", ".join(f"{status} {count}" for status, count in sorted(late.statuses.items()))
        + f"; messages received by the SMTP server: {late.mails}; {finished}.",
        f"- Beat sent {late.ticks_sent} engine ticks; the worker ran {len(late.tick_runtimes)} "
        f"(runtime p50 {ticks.p50 * 1000:.0f} ms, max {ticks.max * 1000:.0f} ms) and discarded "
        f"{late.ticks_discarded} as expired (a tick expires after one interval in the queue).",
        f"- Deliveries: {len(late.deliver_runtimes)} tasks, runtime p50 "
        f"{deliveries.p50 * 1000:.0f} ms, p99 {deliveries.p99 * 1000:.0f} ms. The busiest "
        f"tick created {late.busiest_tick_pages} pages; the last of them was sent "
        f"{late.busiest_tick_drained:.2f} s after that tick started. Pages are queued in "
        "the order they fell due, so those that waited longest for the tick go out first.",
        f"- Acknowledge breaches recorded on the benchmark incidents by the end: "
        f"{late.breaches} of {late.incidents}. Worker and beat took "
        f"{late.startup_seconds:.1f} s to start (not counted).",
    ]
    if not late.passed:
        lines += ["", _lateness_diagnosis(late)]
    return "\n".join(lines) + "\n"


def _lateness_diagnosis(late: Lateness) -> str:
    if not late.complete:
        return (
            f"**FAIL**: only {late.sent} of {late.expected} pages were sent within "
            f"{late.timeout:g} s (statuses above)."
        )
    parts = {
        "waiting for a tick": Spread.of(late.tick_wait).p99,
        "queued before a worker claimed it": Spread.of(late.queue_wait).p99,
        "sending": Spread.of(late.send).p99,
    }
    worst = max(parts, key=parts.get)
    return (
        f"**FAIL**: p99 {late.total.p99:.2f} s > {late.target:g} s. The largest part at p99 is "
        f"{worst} ({parts[worst]:.2f} s)."
    )


def _ticks_markdown(cost: TickCost) -> str:
    small, large = cost.small, cost.large
    lines = [
        "## 4. Engine tick cost as open incidents grow",
        "",
        f"One `escalation.services.engine_tick()` call in the benchmark process (no worker or "
        f"beat running), with {cost.due} incidents due (declared a moment ago, step 1 due: one "
        f"page each) among {small.open:,} open incidents, and among {large.open:,}. Deliveries "
        "are really queued: the Celery app points at the private Redis, and each tick's "
        f"{cost.due} messages are counted there. The open incidents that are not due are built "
        "like `grow_to`'s (status mix, services, timeline) and are between two steps of their "
        "plan (step 1 paged, one sent page each; step 2 in 16-24 h); deadlines they already "
        "missed are recorded as breached, as the engine would have, and any deadline that "
        "would fall due within the hour is moved an hour later, so no timed tick finds other "
        "work than the due incidents (checked: every timed tick created exactly "
        f"{cost.due} pages, queued {cost.due} messages and recorded no breach). The small "
        "database is kept as a copy while the original grows.",
        "",
        "Between ticks the due incidents are put back (escalation fields restored; their pages "
        "and `escalated` events deleted with SQL). Queries: one tick under "
        "`CaptureQueriesContext` per size (after a warm-up tick), and one with half as many "
        f"due to count statements per due incident. Time: {cost.rounds} blocks alternating "
        f"between the sizes, each reconnecting, vacuuming, running one warm-up tick, then "
        f"{cost.per_block} timed ticks; medians of {len(small.ticks)} ticks per size. Targets: "
        "the same query count at both sizes and median(large) / median(small) at most 1.5.",
        "",
        f"| open incidents (table) | due | queries | median | min - max | ratio "
        f"| same query count | ratio <= {TARGET_RATIO:g} |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        f"| {small.open:,} ({small.total:,}) | {cost.due} | {len(small.full.sqls)} "
        f"| {small.median_ms:.1f} ms | {small.range_ms} | | | |",
        f"| {large.open:,} ({large.total:,}) | {cost.due} | {len(large.full.sqls)} "
        f"| {large.median_ms:.1f} ms | {large.range_ms} | {cost.ratio:.2f} "
        f"| {_verdict(cost.same_count)} | {_verdict(cost.ratio <= TARGET_RATIO)} |",
        "",
        "Per step of the tick (time exclusive of the steps it calls: `escalate_due` calls "
        "`schedule_deliveries`, which queues the messages after its commit):",
        "",
        f"| step | queries at {small.open:,} | queries at {large.open:,} "
        f"| median at {small.open:,} | median at {large.open:,} |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| `{name}` | {small.full.phase_queries[name]} | {large.full.phase_queries[name]} "
        f"| {small.phase_ms(name):.1f} ms | {large.phase_ms(name):.1f} ms |"
        for name in PHASES
    ]
    grown = [
        (name, small.phase_ms(name), large.phase_ms(name))
        for name in PHASES
        if large.phase_ms(name) > TARGET_RATIO * small.phase_ms(name)
        and large.phase_ms(name) - small.phase_ms(name) > 5
    ]
    if grown:
        lines += [
            "",
            "**Steps that grow with the number of open incidents**: "
            + ", ".join(f"`{name}` {a:.1f} -> {b:.1f} ms ({b / a:.1f}x)" for name, a, b in grown)
            + ".",
        ]
        if any(name == "record_breaches" for name, _, _ in grown):
            lines[-1] += (
                " Each breach sweep selects `<due> <= now AND <breached> IS NULL` on an index "
                "of the due column alone, so it reads every open incident whose deadline has "
                "passed, including those whose breach was recorded long ago (the counts below; "
                "'Rows Removed by Filter' in the plans at the end)."
            )
    per_due = cost.per_due_shapes()
    lines += [
        "",
        f"**Queries grow with the number due (N+1 per due incident)**: {cost.per_due:g} "
        f"statements per due incident plus {cost.fixed:g} fixed ({len(small.full.sqls)} with "
        f"{cost.due} due, {len(small.half.sqls)} with {small.half.due} at {small.open:,} "
        f"open; {len(large.full.sqls)} and {len(large.half.sqls)} at {large.open:,}, so "
        f"{cost.per_due_at(large):g} per due incident there). Per due incident:",
        "",
    ]
    lines += [f"- {count:g} x `{_short(text)}`" for text, count in per_due]
    lines += [
        "",
        "Statements whose count does not depend on the number due (the sweeps), each run "
        f"again alone (median of {SQL_REPEATS}):",
        "",
        f"| step | statement | at {small.open:,} | at {large.open:,} |",
        "| --- | --- | ---: | ---: |",
    ]
    for text, sweep in small.sweeps.items():
        other = large.sweeps.get(text)
        lines.append(
            f"| `{sweep.step}` | `{sweep.label}` | {sweep.ms:.2f} ms "
            f"| {'-' if other is None else f'{other.ms:.2f} ms'} |"
        )
    lines += [
        "",
        "Open incidents whose due column is already past (their breach is recorded; each "
        "breach sweep's index range still holds them): "
        + "; ".join(
            f"`{due}` {small.scanned[due]:,} at {small.open:,}, {large.scanned[due]:,} at "
            f"{large.open:,}"
            for due in small.scanned
        )
        + ".",
        "",
        "Data generation (bulk_create, then VACUUM ANALYZE): "
        + "; ".join(
            f"{g.open_before:,} -> {g.open_after:,} open ({g.total_after:,} incidents) in "
            f"{g.seconds:.1f} s, VACUUM ANALYZE {g.analyze_seconds:.1f} s"
            for g in (small.growth, large.growth)
        )
        + f". Breaches already due when the benchmark started, recorded first: "
        f"{cost.caught_up}.",
    ]
    for label, plan in cost.explains:
        lines += ["", f"EXPLAIN (ANALYZE, BUFFERS) at {large.open:,} open: `{label}`", "", "```"]
        lines += [plan, "```"]
    return "\n".join(lines) + "\n"


def run(
    *,
    incidents: int = 200,
    spread: float = 20.0,
    timeout: float = 90.0,
    small: int = 1_000,
    large: int = 100_000,
    due: int = 100,
    rounds: int = 6,
    per_block: int = 2,
) -> EscalationResult:
    """Lateness with real processes, then the tick cost; the private Redis serves both and
    is stopped at the end, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="bench-escalation-") as tmp:
        workdir = Path(tmp)
        broker = _start_redis(workdir)
        try:
            caught_up = _catch_up()
            if caught_up:
                print(f"  recorded {caught_up} breaches already due first", flush=True)
            lateness = run_lateness(
                broker=broker, workdir=workdir, incidents=incidents, spread=spread, timeout=timeout
            )
            ticks = run_ticks(
                broker=broker,
                small=small,
                large=large,
                due=due,
                rounds=rounds,
                per_block=per_block,
            )
            ticks.caught_up += caught_up
        finally:
            broker.child.stop(grace=5)
    return EscalationResult(lateness, ticks)
