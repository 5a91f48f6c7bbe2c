"""Benchmarks 5 and 6: alert ingestion over HTTP, against gunicorn, a Celery worker and
PostgreSQL.

The alert webhooks are asynchronous: a request is authenticated, its body validated
completely and stored as received (one INSERT into the delivery queue), and answered 202; a
Celery worker (`incidents.apply_alert_deliveries`, on a beat every ALERT_APPLY_SECONDS)
applies the stored deliveries, oldest first per integration. So both benchmarks report two
rates: accepted (answered 202, durable) and applied (alerts and incidents visible).

5. Sustained Alertmanager webhooks. gunicorn serves the tracker (config.wsgi, with the
   settings of benchmarks/noop_settings.py: the product's, plus the baseline views of
   benchmarks/noop_urls.py) from a database of its own, copied from the freshly migrated
   benchmark database; a real Celery worker (concurrency 2) and beat run as the Procfile
   runs them, with ALERT_APPLY_SECONDS=1, for the whole run. `wrk` (Debian's package;
   installed with apt-get when missing) sends Alertmanager webhook v4 bodies of 5 alerts
   each, built by a Lua script that also checks every status (202; 200 for the no-op):
   every alert of a request has a new fingerprint, except that every tenth request repeats
   an earlier one (a sender's retry: counted, nothing new stored); alerts fall in 100
   groups (Alertmanager's groupKey), so most join an incident that is already open. The
   same script, same bodies, is pointed at the no-op endpoint of the same server and at
   the raw intake floor. Blocks: warm-ups, wait until the worker has applied everything,
   no-op, webhook, wait until the backlog is applied (timed), intake, no-op; so the
   worker's catching up never overlaps a reference block. gunicorn runs on CPU 1; wrk, the
   worker and beat on CPU 0 (sched_setaffinity, taskset), so the web server has its core
   to itself in every block, as web servers do in production, where workers run on other
   cores or machines; PostgreSQL (a system service) is not pinned and serves both sides,
   so applying still competes with the web server's database work. After the
   webhook block the apply side is read from the database (accepted, applied, backlog,
   time to drain, received-to-applied latency) and the result checked (every delivery
   applied, alerts stored = new fingerprints, repeats counted, no incident opened).
   Target: webhook requests/s at least 0.5 times no-op requests/s, with no errors.

6. Alert storm: 10,000 alerts in 20 groups, as 400 Alertmanager bodies of 25 alerts, the
   groups interleaved, sent over 8 keep-alive connections at once by a Python client (on
   CPU 0), then the worker left to apply them. Target: every request answered 202, then,
   once applied, 10,000 alerts stored and exactly 20 open incidents.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from django.db import connection
from django.db.models import Count, Max, Sum
from django.utils import timezone

from . import generate, using_database
from .bench_escalation import (
    HOST,
    ROOT,
    Broker,
    Child,
    _celery_broker,
    _database_url,
    _free_port,
    _start_redis,
)

RATIO_TARGET = 0.5
ALERTS_PER_REQUEST = 5
GROUPS = 100
REPEAT_EVERY = 10  # every tenth request repeats an earlier one
WEBHOOK = "alertmanager"
SERVER_CPU = 1
CLIENT_CPU = 0
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 4
WORKER_CONCURRENCY = 2
APPLY_SECONDS = 1.0  # ALERT_APPLY_SECONDS of the worker's beat
DRAIN_TIMEOUT = 900.0  # seconds the worker may take to apply a backlog before it is a failure
POLL_SECONDS = 0.5
# PostgreSQL's application_name of each side's connections, to tell their CPU apart.
WEB_APP = "bench-web"
WORKER_APP = "bench-worker"

LUA = r"""
-- Alertmanager webhook v4 bodies, 5 alerts each. wrk ... -- <tag> <groups> <repeat every>
-- <startsAt> <expected status>. Fingerprints are <tag>-<thread>-<request>-<k>: new on
-- every request, except that every <repeat every>-th request repeats an earlier request's
-- alerts. Answers with another status than expected are counted.
local counter = 1
local threads = {}
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local tag, groups, every, starts, expect = "run", 100, 10, "2026-01-01T00:00:00Z", 200
local n = 0
unexpected = 0

function init(args)
  tag = args[1] or tag
  groups = tonumber(args[2] or groups)
  every = tonumber(args[3] or every)
  starts = args[4] or starts
  expect = tonumber(args[5] or expect)
end

local alert = '{"status":"firing","labels":{"alertname":"%s","severity":"warning",'
  .. '"instance":"host-%d:9100","job":"node","team":"platform"},'
  .. '"annotations":{"summary":"%s on host-%d","description":"Benchmark alert %s."},'
  .. '"startsAt":"%s","endsAt":"0001-01-01T00:00:00Z",'
  .. '"generatorURL":"http://prometheus.example/graph?g0.expr=up","fingerprint":"%s"}'
local envelope = '{"version":"4","groupKey":"{}:{alertname=\\"%s\\"}","truncatedAlerts":0,'
  .. '"status":"firing","receiver":"tracker","groupLabels":{"alertname":"%s"},'
  .. '"commonLabels":{"alertname":"%s","severity":"warning"},"commonAnnotations":{},'
  .. '"externalURL":"http://alertmanager.example","alerts":[%s]}'
local headers = {["Content-Type"] = "application/json"}

function request()
  n = n + 1
  local base = n
  if every > 0 and n > every and n % every == 0 then
    base = n - every + 1
  end
  -- Requests numbered like repeats never use their own number, so the group is chosen by
  -- the rank among the numbers that are used: every group is reached.
  local slot = base
  if every > 0 then
    slot = base - math.floor(base / every)
  end
  local name = "BenchAlert" .. ((slot * 7 + tid * 13) % groups)
  local alerts = {}
  for k = 1, 5 do
    local fp = string.format("%s-%d-%d-%d", tag, tid, base, k)
    alerts[k] = string.format(alert, name, k, name, k, fp, starts, fp)
  end
  local body = string.format(envelope, name, name, name, table.concat(alerts, ","))
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  if status ~= expect then
    unexpected = unexpected + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("unexpected") or 0)
  end
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d "
      .. "timeout=%d unexpected=%d p50=%d p95=%d p99=%d max=%d mean=%.1f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, bad, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end
"""
BENCH_LINE = re.compile(r"^BENCH (.*)$", re.MULTILINE)


# --- databases ------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(template: str, suffix: str) -> Iterator[str]:
    """A new database copied from `template` (the freshly migrated benchmark database, kept
    empty for this), dropped on the way out. The template must have no open sessions."""
    quote = connection.ops.quote_name
    name = f"{template}_{suffix}"
    if not name.startswith("bench_"):  # Only ever create (and later drop) our own.
        raise RuntimeError(f"Not a benchmark database: {name!r}.")
    connection.close()
    with connection._nodb_cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {quote(name)}")
        cursor.execute(f"CREATE DATABASE {quote(name)} TEMPLATE {quote(template)}")
    try:
        yield name
    finally:
        connection.close()
        with connection._nodb_cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {quote(name)}")


# --- processes ------------------------------------------------------------------------------


def _pin(cpu: int):
    """A preexec_fn that pins the child to one CPU (when the machine has more than one)."""
    cpus = os.sched_getaffinity(0)

    def pin() -> None:
        if len(cpus) > 1 and cpu in cpus:
            os.sched_setaffinity(0, {cpu})

    return pin


def ensure_wrk() -> str:
    """The path of `wrk`; installs Debian's package first when it is missing (as root)."""
    if shutil.which("wrk"):
        return shutil.which("wrk")
    print(
        "  wrk (the HTTP load generator) is not installed: installing Debian's package "
        "(apt-get install -y wrk)...",
        flush=True,
    )
    apt = shutil.which("apt-get")
    if os.geteuid() == 0 and apt:
        install = [apt, "install", "-y", "-q", "wrk"]
        if subprocess.run(install, check=False, capture_output=True).returncode != 0:  # noqa: S603
            subprocess.run([apt, "update", "-q"], check=False, capture_output=True)  # noqa: S603
            subprocess.run(install, check=False, capture_output=True)  # noqa: S603
    if not shutil.which("wrk"):
        raise RuntimeError(
            "wrk is needed for the ingestion benchmark and could not be installed: run "
            "`apt-get install wrk` as root, then run the benchmark again."
        )
    return shutil.which("wrk")


def _env(broker: Broker, workdir: Path, *, application: str, settings_module: str) -> dict:
    """The environment of the web server and of the worker and beat: the same database (its
    connections named `application` in pg_stat_activity) and the same private Redis."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE=settings_module,
        DATABASE_URL=f"{_database_url()}?application_name={application}",
        CELERY_BROKER_URL=broker.url,
        REDIS_URL=broker.url,
        DJANGO_DEBUG="false",
        STATIC_MANIFEST="false",
        DJANGO_ALLOWED_HOSTS=f"{HOST},localhost",
        ALERT_APPLY_SECONDS=f"{APPLY_SECONDS:g}",
        VAR_DIR=str(workdir / "var"),
        PYTHONUNBUFFERED="1",
    )
    return env


class Server:
    """gunicorn on CPU 1, serving the current database with a private Redis."""

    def __init__(self, workdir: Path, broker: Broker) -> None:
        self.port = _free_port()
        env = _env(broker, workdir, application=WEB_APP, settings_module="benchmarks.noop_settings")
        env["DJANGO_LOG_LEVEL"] = "WARNING"
        self.argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "config.wsgi",
            f"--bind={HOST}:{self.port}",
            f"--workers={GUNICORN_WORKERS}",
            "--worker-class=gthread",
            f"--threads={GUNICORN_THREADS}",
            "--keep-alive=30",
            "--log-level=warning",
        ]
        self.child = Child("gunicorn", self.argv, env, workdir / "gunicorn.log")

    @property
    def config(self) -> str:
        return (
            f"gunicorn {GUNICORN_WORKERS} workers x {GUNICORN_THREADS} threads (gthread, "
            f"keep-alive 30 s), pinned to CPU {SERVER_CPU}"
        )

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def start(self) -> Server:
        child = self.child
        with open(child.log_path, "ab") as log:
            child.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                child.argv,
                cwd=ROOT,
                env=child.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pin(SERVER_CPU),  # noqa: PLW1509 - no threads started yet
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{child.log()[-3000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = _post(HOST, self.port, "/bench/noop", b"{}")
                if status == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn did not answer within 60 s:\n{child.log()[-3000:]}")

    def stop(self) -> None:
        self.child.stop(grace=10)

    def cpu_seconds(self) -> float:
        """User + system CPU of the gunicorn processes (master and workers) so far."""
        return _tree_cpu(self.child)


def _pinned(cpu: int) -> list[str]:
    """An argv prefix that runs a command, and every process it forks, on one CPU."""
    taskset = shutil.which("taskset")
    if taskset is None or len(os.sched_getaffinity(0)) < 2:
        return []
    return [taskset, "--cpu-list", str(cpu)]


class Applier:
    """The Celery worker (concurrency 2) and beat, as the Procfile runs them: they apply
    the accepted deliveries (`incidents.apply_alert_deliveries` every ALERT_APPLY_SECONDS)
    and run the rest of the beat schedule. They run on the load generator's CPU, so the
    web server keeps CPU 1 to itself in every block, as in production, where workers run
    beside the web servers, not on their cores."""

    def __init__(self, workdir: Path, broker: Broker) -> None:
        env = _env(broker, workdir, application=WORKER_APP, settings_module="config.settings")
        celery = [*_pinned(CLIENT_CPU), sys.executable, "-m", "celery", "-A", "config"]
        self.worker = Child(
            "worker",
            [
                *celery,
                "worker",
                "--loglevel=INFO",
                f"--concurrency={WORKER_CONCURRENCY}",
                "-n",
                "bench-ingest@%h",
            ],
            env,
            workdir / "worker.log",
        )
        beat = [*celery, "beat", "--loglevel=INFO", "--schedule", str(workdir / "beat")]
        self.beat = Child("beat", [*beat, "--pidfile="], env, workdir / "beat.log")

    @property
    def config(self) -> str:
        return (
            f"Celery worker (concurrency {WORKER_CONCURRENCY}) and beat "
            f"(`ALERT_APPLY_SECONDS={APPLY_SECONDS:g}`), pinned to CPU {CLIENT_CPU} with the "
            "load generator"
        )

    def start(self) -> Applier:
        self.worker.start()
        self.beat.start()
        self.worker.wait_for_log(" ready.", timeout=60)
        self.beat.wait_for_log("beat: Starting", timeout=60)
        return self

    def alive(self) -> None:
        for child in (self.worker, self.beat):
            if child.process is None or child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited:\n{child.log()[-3000:]}")

    def stop(self) -> None:
        self.beat.stop(grace=5)
        self.worker.stop(grace=10)

    def cpu_seconds(self) -> float:
        """User + system CPU of the worker (main process and pool) and beat so far."""
        return _tree_cpu(self.worker) + _tree_cpu(self.beat)


def _tree_cpu(child: Child) -> float:
    pid = child.process.pid
    return sum(_cpu(p) for p in [pid, *_children(pid)])


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class Meter:
    """CPU seconds of the PostgreSQL backends of each side (web, worker) connected to the
    database (the server runs on this machine; /proc is readable as root, else 0), read
    whenever `sample` is called: every POLL_SECONDS while wrk runs or a backlog drains.
    Every backend's last reading is kept, so one that ends between readings (connections
    are recycled after CONN_MAX_AGE) loses at most one interval's CPU."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.seen: dict[str, dict[int, float]] = {WEB_APP: {}, WORKER_APP: {}}

    def sample(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT application_name, pid FROM pg_stat_activity "
                "WHERE datname = %s AND application_name IN (%s, %s)",
                [self.database, WEB_APP, WORKER_APP],
            )
            rows = cursor.fetchall()
        for application, pid in rows:
            seen = self.seen[application]
            seen[pid] = max(seen.get(pid, 0.0), _cpu(pid))

    def reading(self, application: str) -> dict[int, float]:
        self.sample()
        return dict(self.seen[application])


def _backend_cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU the backends used between two readings of a Meter."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _post(host: str, port: int, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _drain(
    integration_id: int, applier: Applier, *, timeout: float, meter: Meter | None = None
) -> bool:
    """Wait until the integration has no pending delivery; False after `timeout` s."""
    from incidents.models import AlertDelivery, DeliveryStatus

    pending = AlertDelivery.objects.filter(
        integration_id=integration_id, status=DeliveryStatus.PENDING
    )
    deadline = time.monotonic() + timeout
    while pending.exists():
        applier.alive()
        if meter is not None:
            meter.sample()
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def _seconds(start: datetime, end: datetime | None) -> float | None:
    return None if end is None else max(0.0, (end - start).total_seconds())


# --- 5. sustained ---------------------------------------------------------------------------


@dataclass
class Block:
    """One wrk run against one endpoint."""

    endpoint: str
    seconds: float
    requests: int
    errors: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    server_cpu: float  # gunicorn CPU seconds during the block
    database_cpu: float  # CPU seconds of the PostgreSQL backends serving gunicorn
    started: datetime | None = None
    stopped: datetime | None = None

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def server_ms_per_request(self) -> float:
        return self.server_cpu * 1000 / max(1, self.requests)

    @property
    def database_ms_per_request(self) -> float:
        return self.database_cpu * 1000 / max(1, self.requests)


@dataclass
class Applying:
    """The worker's side of the webhook block, read from the database."""

    deliveries: int  # stored by the webhook block (every request the server answered 202)
    alerts: int  # alerts in them
    applied_in_block: int  # of them, applied while wrk was sending
    backlog: int  # pending when wrk stopped
    block_seconds: float
    drained: bool  # the backlog was applied within the timeout
    drain_seconds: float | None  # wrk stopped -> the last delivery applied
    until_applied_seconds: float | None  # block start -> the last delivery applied
    latencies_s: list[float]  # received_at -> applied_at, per delivery
    worker_cpu: float  # worker and beat CPU seconds, block and drain
    worker_database_cpu: float  # their PostgreSQL backends' CPU seconds, block and drain
    timeout: float = DRAIN_TIMEOUT

    @property
    def under_load_per_second(self) -> float:
        return self.applied_in_block / self.block_seconds

    @property
    def drain_per_second(self) -> float | None:
        left = self.deliveries - self.applied_in_block
        if not self.drained or not self.drain_seconds or left <= 0:
            return None
        return left / self.drain_seconds

    @property
    def overall_per_second(self) -> float | None:
        if not self.drained or not self.until_applied_seconds:
            return None
        return self.deliveries / self.until_applied_seconds

    @property
    def overall_alerts_per_second(self) -> float | None:
        if not self.drained or not self.until_applied_seconds:
            return None
        return self.alerts / self.until_applied_seconds

    @property
    def worker_ms_per_delivery(self) -> float:
        return self.worker_cpu * 1000 / max(1, self.deliveries)

    @property
    def worker_database_ms_per_delivery(self) -> float:
        return self.worker_database_cpu * 1000 / max(1, self.deliveries)


@dataclass
class Checks:
    """What the webhook block's deliveries left in the database once applied."""

    statuses: dict[str, int]  # the block's deliveries by status
    alerts_sent: int  # alerts in the stored bodies
    fingerprints_sent: int  # distinct fingerprints among them
    alerts_stored: int
    repeats_counted: int  # deliveries counted on existing rows (sum of counts - rows)
    unattached: int  # stored alerts without an incident
    incidents_opened: int  # from the first timed block to the end of the drain
    open_incidents: int  # open incidents of the integration's groups

    @property
    def repeats_sent(self) -> int:
        return self.alerts_sent - self.fingerprints_sent

    def rows(self) -> list[tuple[str, str, str, bool]]:
        """(check, expected, found, ok)."""
        done = self.statuses.get("done", 0)
        total = sum(self.statuses.values())
        found = ", ".join(f"{k} {v:,}" for k, v in sorted(self.statuses.items())) or "none"
        return [
            ("deliveries applied", f"done {total:,}", found, done == total > 0),
            (
                "alerts stored (new fingerprints sent)",
                f"{self.fingerprints_sent:,}",
                f"{self.alerts_stored:,}",
                self.alerts_stored == self.fingerprints_sent,
            ),
            (
                "repeats counted on existing rows",
                f"{self.repeats_sent:,}",
                f"{self.repeats_counted:,}",
                self.repeats_counted == self.repeats_sent,
            ),
            ("stored alerts without an incident", "0", f"{self.unattached:,}", not self.unattached),
            ("incidents opened", "0", f"{self.incidents_opened}", self.incidents_opened == 0),
            (
                "open incidents of the groups (opened in the warm-up)",
                f"{GROUPS}",
                f"{self.open_incidents}",
                self.open_incidents == GROUPS,
            ),
        ]

    @property
    def passed(self) -> bool:
        return all(ok for *_, ok in self.rows())


@dataclass
class Sustained:
    server: str
    applier: str
    connections: int
    seconds: float
    warmup: float
    noop: list[Block]
    webhook: Block
    intake: Block
    applying: Applying
    checks: Checks
    warmup_drain_seconds: float
    body_bytes: int
    request_queries: list[str] = field(default_factory=list)
    apply_queries: list[str] = field(default_factory=list)

    @property
    def noop_per_second(self) -> float:
        return statistics.mean(block.per_second for block in self.noop)

    @property
    def ratio(self) -> float:
        return self.webhook.per_second / self.noop_per_second

    @property
    def alerts_per_second(self) -> float:
        """Alerts accepted per second (answered 202) during the webhook block."""
        return self.webhook.per_second * ALERTS_PER_REQUEST

    @property
    def intake_ratio(self) -> float:
        """The raw floor of an asynchronous webhook (one raw INSERT) / the no-op."""
        return self.intake.per_second / self.noop_per_second

    @property
    def passed(self) -> bool:
        return self.ratio >= RATIO_TARGET and self.webhook.error_count == 0

    @property
    def correct(self) -> bool:
        return self.applying.drained and self.checks.passed


def _wrk(
    wrk: str,
    script: Path,
    url: str,
    *,
    tag: str,
    seconds: float,
    connections: int,
    server: Server,
    meter: Meter,
    endpoint: str,
    expect: int,
) -> Block:
    starts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout=10s", "-s"]
    argv += [str(script), url, "--", tag, str(GROUPS), str(REPEAT_EVERY), starts, str(expect)]
    cpu_before, db_before = server.cpu_seconds(), meter.reading(WEB_APP)
    started = timezone.now()
    process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_pin(CLIENT_CPU),  # noqa: PLW1509
    )
    deadline = time.monotonic() + seconds + 60
    while process.poll() is None and time.monotonic() < deadline:
        meter.sample()
        time.sleep(POLL_SECONDS)
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    stopped = timezone.now()
    cpu_after, db_after = server.cpu_seconds(), meter.reading(WEB_APP)
    result = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    match = BENCH_LINE.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    values = dict(item.split("=", 1) for item in match.group(1).split())
    errors = {k: int(values[k]) for k in ("connect", "read", "write", "timeout")}
    # wrk counts statuses >= 400; the script counts every status other than `expect`.
    errors[f"not {expect}"] = max(int(values["status"]), int(values["unexpected"]))
    return Block(
        endpoint=endpoint,
        seconds=int(values["duration_us"]) / 1e6,
        requests=int(values["requests"]),
        errors=errors,
        p50_ms=int(values["p50"]) / 1000,
        p95_ms=int(values["p95"]) / 1000,
        p99_ms=int(values["p99"]) / 1000,
        max_ms=int(values["max"]) / 1000,
        server_cpu=cpu_after - cpu_before,
        database_cpu=_backend_cpu_between(db_before, db_after),
        started=started,
        stopped=stopped,
    )


def run_sustained(
    *,
    server: Server,
    applier: Applier,
    wrk: str,
    workdir: Path,
    database: str,
    token: str,
    reference_token: str,
    seconds: float,
    connections: int,
    warmup: float,
    drain_timeout: float,
) -> Sustained:
    from incidents.models import (
        OPEN_STATUSES,
        Alert,
        AlertDelivery,
        AlertGroup,
        DeliveryStatus,
        Incident,
        Integration,
    )

    script = workdir / "alertmanager.lua"
    script.write_text(LUA)
    webhook_url = server.url(f"/api/v1/integrations/{token}/{WEBHOOK}/")
    noop_url = server.url("/bench/noop")
    intake_url = server.url(f"/bench/intake/{reference_token}/")
    integration = Integration.objects.get(name="bench sustained")
    meter = Meter(database)

    def block(url: str, tag: str, length: float, endpoint: str, expect: int) -> Block:
        return _wrk(
            wrk,
            script,
            url,
            tag=tag,
            seconds=length,
            connections=connections,
            server=server,
            meter=meter,
            endpoint=endpoint,
            expect=expect,
        )

    def drain(what: str) -> bool:
        print(f"  waiting for the worker to apply {what}...", flush=True)
        return _drain(integration.pk, applier, timeout=drain_timeout, meter=meter)

    # Warm-ups: every worker thread connects to PostgreSQL; the groups' incidents open once
    # the worker has applied the warm-up's deliveries.
    block(webhook_url, "warm", warmup, "webhook", 202)
    block(noop_url, "warm-noop", warmup, "no-op", 200)
    clock = time.monotonic()
    if not drain("the warm-up"):
        raise RuntimeError(f"the worker did not apply the warm-up within {drain_timeout:g} s")
    warmup_drain = time.monotonic() - clock
    first = AlertDelivery.objects.aggregate(last=Max("pk"))["last"] or 0
    incidents_before = Incident.objects.count()
    half = seconds / 2
    print(
        f"  timing: no-op {half:g} s, webhook {seconds:g} s, drain, intake {half:g} s, "
        f"no-op {half:g} s",
        flush=True,
    )
    noop_first = block(noop_url, "noop-1", half, "no-op", 200)
    worker_before = applier.cpu_seconds(), meter.reading(WORKER_APP)
    webhook = block(webhook_url, "run", seconds, "webhook", 202)
    mine = AlertDelivery.objects.filter(integration=integration, pk__gt=first)
    backlog = mine.filter(status=DeliveryStatus.PENDING).count()
    applied_in_block = mine.filter(
        status=DeliveryStatus.DONE, applied_at__gte=webhook.started, applied_at__lte=webhook.stopped
    ).count()
    drained = drain(f"the backlog of {backlog:,} deliveries")
    worker_after = applier.cpu_seconds(), meter.reading(WORKER_APP)
    rows = list(mine.values_list("status", "received_at", "applied_at", "alerts"))
    last_applied = max((r[2] for r in rows if r[2] is not None), default=None)
    applying = Applying(
        deliveries=len(rows),
        alerts=sum(r[3] for r in rows),
        applied_in_block=applied_in_block,
        backlog=backlog,
        block_seconds=webhook.seconds,
        drained=drained,
        drain_seconds=_seconds(webhook.stopped, last_applied) if drained else None,
        until_applied_seconds=_seconds(webhook.started, last_applied) if drained else None,
        latencies_s=[
            (r[2] - r[1]).total_seconds() for r in rows if r[0] == DeliveryStatus.DONE and r[2]
        ],
        worker_cpu=worker_after[0] - worker_before[0],
        worker_database_cpu=_backend_cpu_between(worker_before[1], worker_after[1]),
        timeout=drain_timeout,
    )
    fingerprints: set[str] = set()
    for body in mine.values_list("body", flat=True).iterator(chunk_size=2000):
        fingerprints.update(a["fingerprint"] for a in json.loads(body)["alerts"])
    timed = Alert.objects.filter(integration=integration, fingerprint__startswith="run-")
    counts = timed.aggregate(rows=Count("pk"), deliveries=Sum("count"))
    group_incidents = AlertGroup.objects.filter(integration=integration).values("incident_id")
    checks = Checks(
        statuses=dict(Counter(r[0] for r in rows)),
        alerts_sent=applying.alerts,
        fingerprints_sent=len(fingerprints),
        alerts_stored=counts["rows"],
        repeats_counted=(counts["deliveries"] or 0) - counts["rows"],
        unattached=timed.filter(incident__isnull=True).count(),
        incidents_opened=Incident.objects.count() - incidents_before,
        open_incidents=Incident.objects.filter(
            pk__in=group_incidents, status__in=OPEN_STATUSES
        ).count(),
    )
    # The references run once the worker is idle again (or given up on), so its catching up
    # does not slow them.
    block(intake_url, "warm-intake", warmup / 2, "intake", 202)
    intake = block(intake_url, "intake", half, "intake", 202)
    noop_last = block(noop_url, "noop-2", half, "no-op", 200)
    return Sustained(
        server=server.config,
        applier=applier.config,
        connections=connections,
        seconds=seconds,
        warmup=warmup,
        noop=[noop_first, noop_last],
        webhook=webhook,
        intake=intake,
        applying=applying,
        checks=checks,
        warmup_drain_seconds=warmup_drain,
        body_bytes=len(_sample_body()),
    )


def _statements(token: str, broker_url: str) -> tuple[list[str], list[str]]:
    """In process, with the test client, while no worker runs: the statements of (a) one
    webhook request of 5 new alerts whose integration this process has cached and (b)
    applying that delivery (its group's incident already open) with `deliveries_apply`."""
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from incidents.ingestion import intake

    client = Client()
    path = f"/api/v1/integrations/{token}/{WEBHOOK}/"

    def post(body: bytes) -> None:
        response = client.post(path, body, content_type="application/json")
        if response.status_code != 202:
            raise RuntimeError(f"webhook answered {response.status_code}: {response.content[:300]}")

    with _celery_broker(broker_url):
        # A first request caches the integration; the worker's part of it is applied here.
        post(_sample_body().replace(b"run-1-12345-", b"captured-warm-"))
        intake.deliveries_apply()
        with CaptureQueriesContext(connection) as request:
            post(_sample_body().replace(b"run-1-12345-", b"captured-"))
        with CaptureQueriesContext(connection) as applying:
            report = intake.deliveries_apply()
    if report.applied != 1:
        raise RuntimeError(f"applying the captured delivery: {report}")
    return (
        [q["sql"] for q in request.captured_queries],
        [q["sql"] for q in applying.captured_queries],
    )


def _short(sql: str, limit: int = 110) -> str:
    sql = " ".join(sql.split()).replace("`", "'").replace("|", "\\|")
    return sql if len(sql) <= limit else sql[: limit - 3] + "..."


def _sample_body() -> bytes:
    """A body the size of those the Lua script sends (for the report)."""
    alerts = [
        {
            "status": "firing",
            "labels": {
                "alertname": "BenchAlert42",
                "severity": "warning",
                "instance": f"host-{k}:9100",
                "job": "node",
                "team": "platform",
            },
            "annotations": {
                "summary": f"BenchAlert42 on host-{k}",
                "description": "Benchmark alert run-1-12345-1.",
            },
            "startsAt": "2026-01-01T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example/graph?g0.expr=up",
            "fingerprint": f"run-1-12345-{k}",
        }
        for k in range(1, 6)
    ]
    return _envelope("BenchAlert42", alerts)


def _envelope(name: str, alerts: list[dict]) -> bytes:
    return json.dumps(
        {
            "version": "4",
            "groupKey": f'{{}}:{{alertname="{name}"}}',
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "tracker",
            "groupLabels": {"alertname": name},
            "commonLabels": {"alertname": name},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.example",
            "alerts": alerts,
        },
        separators=(",", ":"),
    ).encode()


# --- 6. storm -------------------------------------------------------------------------------


@dataclass
class Storm:
    alerts: int
    groups: int
    per_request: int
    connections: int
    bodies: int
    seconds: float  # first request sent -> last answer
    statuses: dict[int, int]
    latencies_ms: list[float]
    drained: bool
    applied_seconds: float | None  # first request sent -> last delivery applied
    deliveries: dict[str, int]  # the storm's deliveries by status
    alerts_stored: int
    open_incidents: int
    incidents_opened: int
    timeout: float = DRAIN_TIMEOUT
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def alerts_per_second(self) -> float:
        """Accepted."""
        return self.alerts / self.seconds

    @property
    def applied_alerts_per_second(self) -> float | None:
        if not self.drained or not self.applied_seconds:
            return None
        return self.alerts_stored / self.applied_seconds

    @property
    def passed(self) -> bool:
        return (
            self.statuses == {202: self.bodies}
            and self.drained
            and self.deliveries == {"done": self.bodies}
            and self.alerts_stored == self.alerts
            and self.open_incidents == self.groups
            and self.incidents_opened == self.groups
            and not self.errors
        )


def _storm_bodies(alerts: int, groups: int, per_request: int) -> list[bytes]:
    """The groups' alerts in bodies of `per_request`, interleaved: the first body of every
    group, then the second of every group, ... so that concurrent requests of one group
    race to open its incident."""
    per_group = alerts // groups
    starts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    by_group = []
    for g in range(groups):
        name = f"StormAlert{g}"
        items = [
            {
                "status": "firing",
                "labels": {
                    "alertname": name,
                    "severity": "critical",
                    "instance": f"host-{i}:9100",
                    "job": "node",
                },
                "annotations": {"summary": f"{name} on host-{i}"},
                "startsAt": starts,
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.example/graph",
                "fingerprint": f"storm-{g}-{i}",
            }
            for i in range(per_group)
        ]
        by_group.append(
            [_envelope(name, items[i : i + per_request]) for i in range(0, per_group, per_request)]
        )
    bodies = []
    for round_ in range(max(len(b) for b in by_group)):
        bodies += [b[round_] for b in by_group if round_ < len(b)]
    return bodies


def run_storm(
    *,
    server: Server,
    applier: Applier,
    token: str,
    alerts: int,
    groups: int,
    per_request: int,
    connections: int,
    drain_timeout: float,
) -> Storm:
    from incidents.models import (
        OPEN_STATUSES,
        Alert,
        AlertDelivery,
        AlertGroup,
        Incident,
        Integration,
    )

    bodies = _storm_bodies(alerts, groups, per_request)
    path = f"/api/v1/integrations/{token}/{WEBHOOK}/"
    queue = list(enumerate(bodies))
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    integration = Integration.objects.get(name="bench storm")
    before = Incident.objects.count()

    def worker(slot: int) -> None:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
        try:
            while True:
                try:
                    _, body = queue.pop(0)
                except IndexError:
                    return
                started = time.perf_counter()
                try:
                    conn.request("POST", path, body, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    answer = response.read()
                except (OSError, http.client.HTTPException) as error:
                    errors.append(f"connection {slot}: {error!r}")
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
                    continue
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)
                    statuses[response.status] += 1
                if response.status != 202 and len(errors) < 5:
                    errors.append(f"{response.status}: {answer[:300]!r}")
        finally:
            conn.close()

    affinity = os.sched_getaffinity(0)
    if len(affinity) > 1 and CLIENT_CPU in affinity:
        os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        started_at = timezone.now()
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=connections) as pool:
            list(pool.map(worker, range(connections)))
        seconds = time.perf_counter() - started
    finally:
        os.sched_setaffinity(0, affinity)
    print(f"  storm accepted in {seconds:.1f} s; waiting for the worker to apply it", flush=True)
    drained = _drain(integration.pk, applier, timeout=drain_timeout)
    deliveries = AlertDelivery.objects.filter(integration=integration)
    last_applied = deliveries.aggregate(last=Max("applied_at"))["last"]
    incident_ids = AlertGroup.objects.filter(integration=integration).values("incident_id")
    return Storm(
        alerts=alerts,
        groups=groups,
        per_request=per_request,
        connections=connections,
        bodies=len(bodies),
        seconds=seconds,
        statuses=dict(statuses),
        latencies_ms=latencies,
        drained=drained,
        applied_seconds=_seconds(started_at, last_applied) if drained else None,
        deliveries=dict(Counter(deliveries.values_list("status", flat=True))),
        alerts_stored=Alert.objects.filter(integration=integration).count(),
        open_incidents=Incident.objects.filter(
            pk__in=incident_ids, status__in=OPEN_STATUSES
        ).count(),
        incidents_opened=Incident.objects.count() - before,
        timeout=drain_timeout,
        errors=errors,
    )


# --- both -----------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(1, -(-len(ordered) * q // 100)) - 1]


def _rate(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:,.0f}{unit}"


def _rate1(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _duration(value: float | None, timeout: float) -> str:
    return f"not within {timeout / 60:g} min" if value is None else f"{value:,.1f} s"


@dataclass
class IngestResult:
    sustained: Sustained
    storm: Storm
    server_log_tail: str = ""

    def summary(self) -> list[str]:
        s, storm, a = self.sustained, self.storm, self.sustained.applying
        w = s.webhook
        lat = a.latencies_s
        return [
            f"sustained: accepted {s.alerts_per_second:,.0f} alerts/s ({w.per_second:,.1f} "
            f"req/s), p50 {w.p50_ms:.1f} / p95 {w.p95_ms:.1f} / p99 {w.p99_ms:.1f} ms, "
            f"{w.error_count} errors; no-op {s.noop_per_second:,.0f} req/s; ratio "
            f"{s.ratio:.2f} (target >= {RATIO_TARGET}): " + ("PASS" if s.passed else "FAIL"),
            f"applied: {a.under_load_per_second:,.1f} deliveries/s under load, "
            f"{_rate(a.drain_per_second)} after; overall {_rate(a.overall_per_second)} "
            f"deliveries/s = {_rate(a.overall_alerts_per_second)} alerts/s; backlog "
            f"{a.backlog:,} drained in {_duration(a.drain_seconds, a.timeout)}; received->"
            f"applied p50 {_percentile(lat, 50):.1f} / p95 {_percentile(lat, 95):.1f} / p99 "
            f"{_percentile(lat, 99):.1f} s; checks " + ("PASS" if s.correct else "FAIL"),
            f"reference: raw intake {s.intake_ratio:.2f} of the no-op",
            f"storm: {storm.alerts:,} alerts accepted in {storm.seconds:.1f} s "
            f"({storm.alerts_per_second:,.0f} alerts/s), applied after "
            f"{_duration(storm.applied_seconds, storm.timeout)}, {storm.alerts_stored:,} stored, "
            f"{storm.open_incidents} open incidents (target {storm.groups}), statuses "
            f"{storm.statuses}: " + ("PASS" if storm.passed else "FAIL"),
        ]

    def markdown(self) -> str:
        return _sustained_markdown(self.sustained) + "\n" + _storm_markdown(self.storm)


def _block_rows(s: Sustained) -> list[str]:
    rows = []
    for block in (s.noop[0], s.webhook, s.intake, s.noop[1]):
        alerts = (
            f"{block.per_second * ALERTS_PER_REQUEST:,.0f}" if block.endpoint == "webhook" else ""
        )
        errors = ", ".join(f"{k} {v}" for k, v in block.errors.items() if v) or "0"
        rows.append(
            f"| {block.endpoint} | {block.requests:,} | {block.per_second:,.1f} | {alerts} "
            f"| {block.p50_ms:.1f} ms | {block.p95_ms:.1f} ms | {block.p99_ms:.1f} ms "
            f"| {block.max_ms:.0f} ms | {errors} | {block.server_ms_per_request:.2f} ms "
            f"| {block.database_ms_per_request:.2f} ms |"
        )
    return rows


def _sustained_markdown(s: Sustained) -> str:
    w, a, c = s.webhook, s.applying, s.checks
    half = s.seconds / 2
    lat = a.latencies_s
    lines = [
        "## 5. Alert ingestion: sustained Alertmanager webhooks (gunicorn, worker, PostgreSQL)",
        "",
        "The webhook is asynchronous. A request is authenticated (the integration is kept per "
        "web process for `INTEGRATION_CACHE_SECONDS`, 5 s), its body validated completely, "
        "stored as received with one INSERT into the delivery queue and answered 202 "
        '(`{"status": "accepted", "delivery": <id>, "alerts": <n>}`). A Celery worker, on a '
        "beat every `ALERT_APPLY_SECONDS`, applies the stored deliveries (deduplication, "
        "grouping, incidents, timeline), oldest first per integration, one process per "
        "integration at a time. Alerts per second therefore has two figures: *accepted* "
        "(answered 202, durable) and *applied* (visible as alerts and incidents).",
        "",
        f"{s.server}, serves the tracker (`config.wsgi`; settings `benchmarks.noop_settings` "
        "= the product's plus two baseline views) from a database of its own, copied from the "
        "freshly migrated benchmark database, with a private `redis-server` as broker and "
        f"cache. A real {s.applier}, run as the Procfile runs them with the same database "
        "and broker, apply the deliveries for the whole run. The web server keeps its core "
        "to itself in every block, as it would in production, where workers do not run on "
        "the web servers' cores; PostgreSQL (a system service, not pinned) serves both sides, "
        "so applying still competes with the webhook's database work. The load generator is "
        "`wrk` (1 thread, "
        f"{s.connections} keep-alive connections) pinned to CPU {CLIENT_CPU}. A Lua script "
        f"builds Alertmanager webhook v4 bodies of {ALERTS_PER_REQUEST} alerts "
        f"({s.body_bytes:,} bytes) and counts every answer other than 202 (200 for the "
        f"no-op) as an error: new fingerprints on every request except every "
        f"{REPEAT_EVERY}th, which repeats an earlier request (a retry: counted, nothing new "
        f"stored), in {GROUPS} groups (`groupKey`), so most alerts join an open incident, as "
        "during a real incident. The integration has no rate limit.",
        "",
        "The same script, same bodies, goes to two references on the same server: "
        "`POST /bench/noop` (reads the body, answers 200 JSON, no database), the baseline "
        "of the target; and `POST /bench/intake/<token>/`, the raw floor of an asynchronous "
        "webhook: the integration kept per process, the JSON parsed, the body stored with "
        "one raw autocommitted INSERT into the same delivery table (marked applied, so the "
        "worker leaves it alone), 202. The earlier `store` reference (one ORM transaction "
        "before answering) is gone: it measured the floor of a webhook that does its work "
        "before answering, the argument for going asynchronous; the webhook is now "
        "asynchronous, so the raw intake is the floor that matters.",
        "",
        f"Order: warm-ups (webhook {s.warmup:g} s, which opens the {GROUPS} groups' "
        f"incidents, and no-op {s.warmup:g} s); a wait until the worker has applied the "
        f"warm-up ({s.warmup_drain_seconds:.0f} s); no-op {half:g} s; webhook {s.seconds:g} "
        "s; a wait until the worker has applied the backlog (timed, below); intake (after a "
        f"warm-up) {half:g} s; no-op {half:g} s. The second no-op block and the intake block "
        "run only once the backlog is applied, so the worker's catching up does not slow "
        "them. The baseline is the mean of the two no-op blocks. Latencies are wrk's; CPU is "
        "read from /proc for the gunicorn processes and for the PostgreSQL backends of its "
        "connections (told apart from the worker's by `application_name`), per request.",
        "",
        "| endpoint | requests | req/s | alerts/s accepted | p50 | p95 | p99 | max | errors "
        "| gunicorn CPU / req | PostgreSQL CPU / req (web) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *_block_rows(s),
        "",
        "| webhook req/s / no-op req/s | target | result |",
        "| ---: | ---: | --- |",
        f"| {s.ratio:.2f} ({w.per_second:,.1f} / {s.noop_per_second:,.1f}) | >= {RATIO_TARGET} "
        f"| {_verdict(s.passed)} |",
        "",
        f"The raw floor: intake req/s / no-op req/s = {s.intake_ratio:.2f} "
        f"({s.intake.per_second:,.1f} / {s.noop_per_second:,.1f}); webhook / intake = "
        f"{w.per_second / s.intake.per_second:.2f}.",
        "",
        "The worker's side of the webhook block, read from the database "
        "(`incidents_alertdelivery`: `received_at` is stamped when the request stores the "
        "delivery, `applied_at` when the worker has applied it):",
        "",
        "| | deliveries | alerts | per second |",
        "| --- | ---: | ---: | ---: |",
        f"| accepted during the webhook block ({w.requests:,} answered 202; requests in "
        f"flight when wrk stopped count on the server only) | {a.deliveries:,} | "
        f"{a.alerts:,} | {a.deliveries / w.seconds:,.1f} |",
        f"| applied during the block (under load) | {a.applied_in_block:,} | | "
        f"{a.under_load_per_second:,.1f} |",
        f"| backlog (pending) when wrk stopped | {a.backlog:,} | | |",
        f"| applied after load stopped (the drain: "
        f"{_duration(a.drain_seconds, a.timeout)}) | "
        f"{a.deliveries - a.applied_in_block:,} | | "
        f"{_rate1(a.drain_per_second)} |",
        f"| applied overall (block start to the last applied: "
        f"{_duration(a.until_applied_seconds, a.timeout)}) | {a.deliveries:,} | {a.alerts:,} | "
        f"{_rate(a.overall_per_second, ' deliveries')}, "
        f"{_rate(a.overall_alerts_per_second, ' alerts')} |",
        "",
        "| received to applied | p50 | p95 | p99 | max | worker + beat CPU / delivery "
        "| PostgreSQL CPU / delivery (worker) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| the block's {len(lat):,} deliveries | {_percentile(lat, 50):.1f} s "
        f"| {_percentile(lat, 95):.1f} s | {_percentile(lat, 99):.1f} s "
        f"| {max(lat, default=float('nan')):.1f} s | {a.worker_ms_per_delivery:.2f} ms "
        f"| {a.worker_database_ms_per_delivery:.2f} ms |",
        "",
    ]
    accepted = a.deliveries / w.seconds
    if a.backlog and a.overall_per_second:
        lines += [
            f"Accepting ran at {accepted:,.1f} deliveries/s and applying at "
            f"{a.under_load_per_second:,.1f}/s under load ({a.drain_per_second or 0:,.1f}/s "
            "once the load stopped): a burst this size is absorbed, as a backlog applied "
            f"within {_duration(a.drain_seconds, a.timeout)}, but one integration sending "
            f"more than about {a.overall_per_second:,.0f} deliveries/s for long would grow "
            "its backlog without bound, and the received-to-applied latency with it.",
            "",
        ]
    lines += [
        "Checked in the database once the backlog was applied (the block's deliveries, the "
        "alerts their bodies carry, the incidents):",
        "",
        "| check | expected | found | result |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| {name} | {expected} | {found} | {_verdict(ok)} |"
            for name, expected, found, ok in c.rows()
        ),
        f"| backlog applied within {a.timeout / 60:g} min | yes | "
        f"{'yes' if a.drained else 'no'} | {_verdict(a.drained)} |",
        "",
        "Statements, captured in process with the test client (same database, no worker "
        f"running). (a) One webhook request of {ALERTS_PER_REQUEST} new alerts, its "
        f"integration already cached by the process: {len(s.request_queries)}.",
        "",
        *(f"{i}. `{_short(sql)}`" for i, sql in enumerate(s.request_queries, start=1)),
        "",
        "(b) Applying that delivery (its group's incident already open) with "
        f"`deliveries_apply`, lease included: {len(s.apply_queries)}.",
        "",
        *(f"{i}. `{_short(sql)}`" for i, sql in enumerate(s.apply_queries, start=1)),
    ]
    if not s.passed:
        noop_cpu = statistics.mean(b.server_ms_per_request for b in s.noop)
        lines += [
            "",
            f"**FAIL**. gunicorn runs on one CPU, so its CPU per request bounds the rate: a "
            f"webhook request costs {w.server_ms_per_request:.2f} ms of gunicorn CPU against "
            f"{noop_cpu:.2f} ms for the no-op and {s.intake.server_ms_per_request:.2f} ms for "
            f"the raw intake (which reaches {s.intake_ratio:.2f} of the no-op's rate). "
            + (
                f"Errors: {', '.join(f'{k} {v}' for k, v in w.errors.items() if v)}. "
                if w.error_count
                else ""
            )
            + "The worker shares the machine and took "
            f"{a.worker_cpu:.1f} s of CPU during the block and the drain: it was applying the "
            "backlog during the whole webhook block (on the load generator's CPU, and through "
            "PostgreSQL, which is not pinned), and was idle during the reference blocks.",
        ]
    lines += [
        "",
        "Applying is the capacity limit, whatever the ratio: one integration's deliveries are "
        "applied in order by one process at a time, at the applied rate above, so a sender "
        "that keeps up more than that for long builds a backlog that only drains when it "
        "slows down (the webhook stays fast and nothing is lost meanwhile; "
        "`incident_tracker_alert_deliveries_oldest_pending_seconds` shows the delay). The "
        "lever is fewer statements per delivery: applying consecutive deliveries of one "
        "group in one transaction, and marking a batch done with one statement.",
    ]
    return "\n".join(lines) + "\n"


def _storm_markdown(storm: Storm) -> str:
    lat = storm.latencies_ms
    lines = [
        "## 6. Alert storm: 10,000 alerts in 20 groups at once",
        "",
        f"The same server and worker. {storm.alerts:,} alerts in {storm.groups} groups "
        f"({storm.alerts // storm.groups} per group, fingerprints all new), as "
        f"{storm.bodies} Alertmanager bodies of {storm.per_request} alerts (severity "
        "critical), the groups interleaved (the first body of every group, then the "
        f"second, ...), sent by {storm.connections} threads of a Python client over "
        f"{storm.connections} keep-alive connections at once (pinned to CPU {CLIENT_CPU}). "
        "The requests only store their deliveries; the worker then applies them in the order "
        "they were stored, one process per integration, so the first bodies of a group no "
        "longer race each other to open its incident (the database's one-open-group-per-key "
        "constraint still guards it). The benchmark waits until every delivery is applied "
        f"(polling the database, up to {storm.timeout / 60:g} min). Time to accept: first "
        "request sent to last answer; time until applied: first request sent to the last "
        "delivery's `applied_at`. Targets: every request answered 202, then every delivery "
        f"applied, {storm.alerts:,} alerts stored, exactly {storm.groups} incidents opened "
        "and open.",
        "",
        "| alerts | requests | accepted in | alerts/s accepted | request p50 | p99 | statuses "
        "| applied after | alerts/s applied | deliveries | alerts stored | open incidents "
        "| result |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | --- |",
        f"| {storm.alerts:,} | {storm.requests} | {storm.seconds:.1f} s "
        f"| {storm.alerts_per_second:,.0f} "
        f"| {statistics.median(lat) if lat else float('nan'):.0f} ms "
        f"| {_percentile(lat, 99):.0f} ms "
        f"| {', '.join(f'{k}: {v}' for k, v in sorted(storm.statuses.items()))} "
        f"| {_duration(storm.applied_seconds, storm.timeout)} "
        f"| {_rate(storm.applied_alerts_per_second)} "
        f"| {', '.join(f'{k} {v}' for k, v in sorted(storm.deliveries.items()))} "
        f"| {storm.alerts_stored:,} | {storm.open_incidents} (target {storm.groups}; "
        f"opened {storm.incidents_opened}) | {_verdict(storm.passed)} |",
    ]
    if storm.errors:
        lines += ["", "Errors: " + "; ".join(f"`{e}`" for e in storm.errors[:5])]
    return "\n".join(lines) + "\n"


def run(
    *,
    template: str,
    seconds: float = 30.0,
    warmup: float = 5.0,
    connections: int = 8,
    storm_alerts: int = 10_000,
    storm_groups: int = 20,
    storm_per_request: int = 25,
    storm_connections: int = 8,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> IngestResult:
    """Both benchmarks in a database copied from `template`, against one gunicorn, with a
    Celery worker and beat applying the deliveries."""
    from incidents.ingestion.services import integration_create

    wrk = ensure_wrk()
    with (
        tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp,
        fresh_database(template, "ingest") as database,
        using_database(database),
    ):
        workdir = Path(tmp)
        generate.ensure_fixtures()
        _, sustained_token = integration_create(name="bench sustained", kind=WEBHOOK, rate_limit=0)
        _, storm_token = integration_create(name="bench storm", kind=WEBHOOK, rate_limit=0)
        _, reference_token = integration_create(name="bench reference", kind=WEBHOOK, rate_limit=0)
        broker = _start_redis(workdir)
        server = Server(workdir, broker)
        applier = Applier(workdir, broker)
        try:
            server.start()
            applier.start()
            print(f"  {server.config} up on port {server.port}; {applier.config}", flush=True)
            sustained = run_sustained(
                server=server,
                applier=applier,
                wrk=wrk,
                workdir=workdir,
                database=database,
                token=sustained_token,
                reference_token=reference_token,
                seconds=seconds,
                connections=connections,
                warmup=warmup,
                drain_timeout=drain_timeout,
            )
            print(f"  storm: {storm_alerts:,} alerts in {storm_groups} groups", flush=True)
            storm = run_storm(
                server=server,
                applier=applier,
                token=storm_token,
                alerts=storm_alerts,
                groups=storm_groups,
                per_request=storm_per_request,
                connections=storm_connections,
                drain_timeout=drain_timeout,
            )
            applier.stop()
            sustained.request_queries, sustained.apply_queries = _statements(
                sustained_token, broker.url
            )
        finally:
            applier.stop()
            server.stop()
            broker.child.stop(grace=5)
            connection.close()
        return IngestResult(sustained, storm, server.child.log()[-2000:])
