"""Benchmarks 5 and 6: alert ingestion over HTTP, against gunicorn and PostgreSQL.

5. Sustained Alertmanager webhooks. gunicorn serves the tracker (config.wsgi, with the
   settings of benchmarks/noop_settings.py: the product's, plus a `POST /bench/noop` view
   that reads the body and answers 200 JSON) from a database of its own, copied from the
   freshly migrated benchmark database. `wrk` (Debian's package; installed with apt-get
   when missing) sends Alertmanager webhook v4 bodies of 5 alerts each, built by a Lua
   script: every alert of a request has a new fingerprint, except that every tenth request
   repeats an earlier one (a sender's retry: counted, nothing new stored); alerts fall in
   100 groups (Alertmanager's groupKey), so most join an incident that is already open.
   The same script, same bodies, is then pointed at the no-op endpoint of the same server:
   no-op, webhook, no-op, each block after a warm-up, so a drift of the machine's speed
   shows in both no-op blocks. wrk runs on CPU 0 and gunicorn on CPU 1 (sched_setaffinity;
   PostgreSQL, a system service, is not pinned). Target: webhook requests/s at least 0.5
   times no-op requests/s, with no errors.

6. Alert storm: 10,000 alerts in 20 groups, as 400 Alertmanager bodies of 25 alerts, the
   groups interleaved, sent over 8 keep-alive connections at once by a Python client (on
   CPU 0), so that several requests of one group always race to open its incident. Target:
   every request answered 200, 10,000 alerts stored, exactly 20 open incidents.
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
from django.db.models import Count, Sum

from . import generate, using_database
from .bench_escalation import HOST, ROOT, Broker, Child, _database_url, _free_port, _start_redis

RATIO_TARGET = 0.5
ALERTS_PER_REQUEST = 5
GROUPS = 100
REPEAT_EVERY = 10  # every tenth request repeats an earlier one
WEBHOOK = "alertmanager"
SERVER_CPU = 1
CLIENT_CPU = 0
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 4

LUA = r"""
-- Alertmanager webhook v4 bodies, 5 alerts each. wrk ... -- <tag> <groups> <repeat every>
-- <startsAt>. Fingerprints are <tag>-<thread>-<request>-<k>: new on every request, except
-- that every <repeat every>-th request repeats an earlier request's alerts.
local counter = 1
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local tag, groups, every, starts = "run", 100, 10, "2026-01-01T00:00:00Z"
local n = 0

function init(args)
  tag = args[1] or tag
  groups = tonumber(args[2] or groups)
  every = tonumber(args[3] or every)
  starts = args[4] or starts
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
  local name = "BenchAlert" .. ((base * 7 + tid * 13) % groups)
  local alerts = {}
  for k = 1, 5 do
    local fp = string.format("%s-%d-%d-%d", tag, tid, base, k)
    alerts[k] = string.format(alert, name, k, name, k, fp, starts, fp)
  end
  local body = string.format(envelope, name, name, name, table.concat(alerts, ","))
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d "
      .. "timeout=%d p50=%d p95=%d p99=%d max=%d mean=%.1f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99),
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


class Server:
    """gunicorn on CPU 1, serving the current database with a private Redis."""

    def __init__(self, workdir: Path, broker: Broker) -> None:
        self.port = _free_port()
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE="benchmarks.noop_settings",
            DATABASE_URL=_database_url(),
            CELERY_BROKER_URL=broker.url,
            REDIS_URL=broker.url,
            DJANGO_DEBUG="false",
            STATIC_MANIFEST="false",
            DJANGO_ALLOWED_HOSTS=f"{HOST},localhost",
            DJANGO_LOG_LEVEL="WARNING",
            VAR_DIR=str(workdir / "var"),
            PYTHONUNBUFFERED="1",
        )
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
        pid = self.child.process.pid
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


def _backends(database: str) -> dict[int, float]:
    """CPU seconds used so far by each PostgreSQL backend connected to `database` (the
    server runs on this machine; /proc is readable as root, else this reads 0)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [database],
        )
        return {pid: _cpu(pid) for (pid,) in cursor.fetchall()}


def _backend_cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU the backends used between two readings; a backend that ended meanwhile (the
    server's connections are recycled after CONN_MAX_AGE) is not counted after its last
    reading, so this slightly undercounts."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _post(host: str, port: int, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


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
    database_cpu: float  # PostgreSQL backends' CPU seconds during the block

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
class Sustained:
    server: str
    connections: int
    seconds: float
    noop: list[Block]
    webhook: Block
    store: Block
    intake: Block
    alerts_stored: int
    alerts_received: int
    duplicates: int
    incidents_opened: int
    body_bytes: int
    queries: list[str] = field(default_factory=list)

    @property
    def noop_per_second(self) -> float:
        return statistics.mean(block.per_second for block in self.noop)

    @property
    def ratio(self) -> float:
        return self.webhook.per_second / self.noop_per_second

    @property
    def alerts_per_second(self) -> float:
        return self.webhook.per_second * ALERTS_PER_REQUEST

    @property
    def store_ratio(self) -> float:
        """The floor of a durable webhook (one SELECT, one INSERT) / the no-op."""
        return self.store.per_second / self.noop_per_second

    @property
    def intake_ratio(self) -> float:
        """The premise of an asynchronous intake (one raw INSERT) / the no-op."""
        return self.intake.per_second / self.noop_per_second

    @property
    def passed(self) -> bool:
        return self.ratio >= RATIO_TARGET and self.webhook.error_count == 0


def _wrk(
    wrk: str,
    script: Path,
    url: str,
    *,
    tag: str,
    seconds: float,
    connections: int,
    server: Server,
    database: str,
    endpoint: str,
) -> Block:
    starts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout=10s", "-s"]
    argv += [str(script), url, "--", tag, str(GROUPS), str(REPEAT_EVERY), starts]
    cpu_before, db_before = server.cpu_seconds(), _backends(database)
    result = subprocess.run(  # noqa: S603 - our own argv, no shell
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + 60,
        preexec_fn=_pin(CLIENT_CPU),  # noqa: PLW1509
    )
    cpu_after, db_after = server.cpu_seconds(), _backends(database)
    match = BENCH_LINE.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    values = dict(item.split("=", 1) for item in match.group(1).split())
    return Block(
        endpoint=endpoint,
        seconds=int(values["duration_us"]) / 1e6,
        requests=int(values["requests"]),
        errors={k: int(values[k]) for k in ("connect", "read", "write", "status", "timeout")},
        p50_ms=int(values["p50"]) / 1000,
        p95_ms=int(values["p95"]) / 1000,
        p99_ms=int(values["p99"]) / 1000,
        max_ms=int(values["max"]) / 1000,
        server_cpu=cpu_after - cpu_before,
        database_cpu=_backend_cpu_between(db_before, db_after),
    )


def run_sustained(
    *,
    server: Server,
    wrk: str,
    workdir: Path,
    database: str,
    token: str,
    seconds: float,
    connections: int,
    warmup: float,
) -> Sustained:
    from incidents.models import Alert, Incident, Integration

    script = workdir / "alertmanager.lua"
    script.write_text(LUA)
    webhook_url = server.url(f"/api/v1/integrations/{token}/{WEBHOOK}/")
    noop_url = server.url("/bench/noop")
    store_url = server.url(f"/bench/store/{token}/")
    intake_url = server.url(f"/bench/intake/{token}/")

    def block(url: str, tag: str, length: float, endpoint: str) -> Block:
        return _wrk(
            wrk,
            script,
            url,
            tag=tag,
            seconds=length,
            connections=connections,
            server=server,
            database=database,
            endpoint=endpoint,
        )

    # Warm-ups: every worker thread connects to PostgreSQL, the groups' incidents open.
    block(webhook_url, "warm", warmup, "webhook")
    block(noop_url, "warm-noop", warmup, "no-op")
    block(store_url, "warm-store", warmup / 2, "store")
    block(intake_url, "warm-intake", warmup / 2, "intake")
    integration = Integration.objects.get(name="bench sustained")
    before = (integration.alerts_received, Alert.objects.count(), Incident.objects.count())
    half = seconds / 2
    print(
        f"  timing: no-op {half:g} s, webhook {seconds:g} s, store {half:g} s, "
        f"intake {half:g} s, no-op {half:g} s"
    )
    noop_first = block(noop_url, "noop-1", half, "no-op")
    webhook = block(webhook_url, "run", seconds, "webhook")
    integration.refresh_from_db()
    stored = Alert.objects.count() - before[1]
    store = block(store_url, "store", half, "store")
    intake = block(intake_url, "intake", half, "intake")
    noop_last = block(noop_url, "noop-2", half, "no-op")
    received = integration.alerts_received - before[0]
    timed = Alert.objects.filter(integration=integration, fingerprint__startswith="run-")
    counts = timed.aggregate(rows=Count("pk"), deliveries=Sum("count"))
    duplicates = (counts["deliveries"] or 0) - counts["rows"]
    queries = _webhook_queries(token)
    return Sustained(
        queries=queries,
        server=server.config,
        connections=connections,
        seconds=seconds,
        noop=[noop_first, noop_last],
        webhook=webhook,
        store=store,
        intake=intake,
        alerts_stored=stored,
        alerts_received=received,
        duplicates=duplicates,
        incidents_opened=Incident.objects.count() - before[2],
        body_bytes=len(_sample_body()),
    )


def _webhook_queries(token: str) -> list[str]:
    """The statements of one webhook request (5 new alerts, group already open), in process."""
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    body = _sample_body().replace(b"run-1-12345-", b"captured-")
    client = Client()
    with CaptureQueriesContext(connection) as captured:
        response = client.post(
            f"/api/v1/integrations/{token}/{WEBHOOK}/", body, content_type="application/json"
        )
    if response.status_code != 200:
        raise RuntimeError(f"webhook answered {response.status_code}: {response.content[:300]}")
    return [q["sql"] for q in captured.captured_queries]


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
    seconds: float
    statuses: dict[int, int]
    latencies_ms: list[float]
    alerts_stored: int
    open_incidents: int
    incidents_opened: int
    sustained_alerts_per_second: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def alerts_per_second(self) -> float:
        return self.alerts / self.seconds

    @property
    def ratio(self) -> float:
        """Alerts per second in the storm / in the sustained run (informational)."""
        if not self.sustained_alerts_per_second:
            return float("nan")
        return self.alerts_per_second / self.sustained_alerts_per_second

    @property
    def passed(self) -> bool:
        return (
            self.statuses == {200: self.requests}
            and self.alerts_stored == self.alerts
            and self.open_incidents == self.groups
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
    *, server: Server, token: str, alerts: int, groups: int, per_request: int, connections: int
) -> Storm:
    from incidents.models import OPEN_STATUSES, Alert, AlertGroup, Incident, Integration

    bodies = _storm_bodies(alerts, groups, per_request)
    path = f"/api/v1/integrations/{token}/{WEBHOOK}/"
    queue = list(enumerate(bodies))
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
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
                if response.status != 200 and len(errors) < 5:
                    errors.append(f"{response.status}: {answer[:300]!r}")
        finally:
            conn.close()

    affinity = os.sched_getaffinity(0)
    if len(affinity) > 1 and CLIENT_CPU in affinity:
        os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=connections) as pool:
            list(pool.map(worker, range(connections)))
        seconds = time.perf_counter() - started
    finally:
        os.sched_setaffinity(0, affinity)
    integration = Integration.objects.get(name="bench storm")
    incident_ids = AlertGroup.objects.filter(integration=integration).values("incident_id")
    return Storm(
        alerts=alerts,
        groups=groups,
        per_request=per_request,
        connections=connections,
        seconds=seconds,
        statuses=dict(statuses),
        latencies_ms=latencies,
        alerts_stored=Alert.objects.filter(integration=integration).count(),
        open_incidents=Incident.objects.filter(
            pk__in=incident_ids, status__in=OPEN_STATUSES
        ).count(),
        incidents_opened=Incident.objects.count() - before,
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


@dataclass
class IngestResult:
    sustained: Sustained
    storm: Storm
    server_log_tail: str = ""

    def summary(self) -> list[str]:
        s, storm = self.sustained, self.storm
        w = s.webhook
        return [
            f"sustained: {s.alerts_per_second:,.0f} alerts/s ({w.per_second:,.1f} req/s), "
            f"p50 {w.p50_ms:.1f} / p95 {w.p95_ms:.1f} / p99 {w.p99_ms:.1f} ms, "
            f"{w.error_count} errors; no-op {s.noop_per_second:,.0f} req/s; ratio "
            f"{s.ratio:.2f} (target >= {RATIO_TARGET}): " + ("PASS" if s.passed else "FAIL"),
            f"references: store (ORM, one transaction) {s.store_ratio:.2f}, raw intake "
            f"{s.intake_ratio:.2f} of the no-op",
            f"storm: {storm.alerts:,} alerts in {storm.seconds:.1f} s "
            f"({storm.alerts_per_second:,.0f} alerts/s), {storm.open_incidents} open incidents "
            f"(target {storm.groups}), statuses {storm.statuses}: "
            + ("PASS" if storm.passed else "FAIL"),
        ]

    def markdown(self) -> str:
        return _sustained_markdown(self.sustained) + "\n" + _storm_markdown(self.storm)


def _sustained_markdown(s: Sustained) -> str:
    w = s.webhook
    lines = [
        "## 5. Alert ingestion: sustained Alertmanager webhooks (gunicorn, PostgreSQL)",
        "",
        f"{s.server}, serving the tracker (`config.wsgi`; settings `benchmarks.noop_settings` "
        "= the product's plus two baseline views) from a database of its own, copied from the "
        "freshly migrated benchmark database, with a private `redis-server` as broker and "
        f"cache. The load generator is `wrk` (1 thread, {s.connections} keep-alive "
        f"connections) pinned to CPU {CLIENT_CPU}; PostgreSQL (a system service) is not "
        "pinned. A Lua script builds Alertmanager webhook v4 bodies of "
        f"{ALERTS_PER_REQUEST} alerts ({s.body_bytes:,} bytes): new fingerprints on every "
        f"request except every {REPEAT_EVERY}th, which repeats an earlier request (a "
        f"retry: counted, nothing stored), in {GROUPS} groups (`groupKey`), so most alerts "
        "join an open incident, as during a real incident. The integration has no rate "
        "limit. The same script, same bodies, goes to `POST /bench/noop` on the same "
        "server (reads the body, answers 200 JSON, no database): the baseline. A second "
        "reference, `POST /bench/store/<token>/`, is the floor of any webhook that commits "
        "a delivery before it answers: one indexed read of the integration by its token's "
        "hash, the JSON parsed, the body stored as one row in one transaction, 202. After a "
        f"warm-up of each, the blocks run no-op {s.seconds / 2:g} s, webhook {s.seconds:g} s, "
        f"store {s.seconds / 2:g} s, intake {s.seconds / 2:g} s, no-op {s.seconds / 2:g} s; "
        "the baseline is the mean of "
        "the two no-op blocks. "
        "Latencies are wrk's (from its histogram); CPU is read from /proc for the gunicorn "
        "processes and the PostgreSQL backends serving them, per request.",
        "",
        "| endpoint | requests | req/s | alerts/s | p50 | p95 | p99 | max | errors "
        "| gunicorn CPU / req | PostgreSQL CPU / req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for block in (s.noop[0], w, s.store, s.intake, s.noop[1]):
        alerts = (
            f"{block.per_second * ALERTS_PER_REQUEST:,.0f}" if block.endpoint == "webhook" else ""
        )
        errors = ", ".join(f"{k} {v}" for k, v in block.errors.items() if v) or "0"
        lines.append(
            f"| {block.endpoint} | {block.requests:,} | {block.per_second:,.1f} | {alerts} "
            f"| {block.p50_ms:.1f} ms | {block.p95_ms:.1f} ms | {block.p99_ms:.1f} ms "
            f"| {block.max_ms:.0f} ms | {errors} | {block.server_ms_per_request:.2f} ms "
            f"| {block.database_ms_per_request:.2f} ms |"
        )
    lines += [
        "",
        "| webhook req/s / no-op req/s | target | result |",
        "| ---: | ---: | --- |",
        f"| {s.ratio:.2f} ({w.per_second:,.1f} / {s.noop_per_second:,.1f}) | >= {RATIO_TARGET} "
        f"| {_verdict(s.passed)} |",
        "",
        f"For reference, the durable-write floor: store req/s / no-op req/s = "
        f"{s.store_ratio:.2f} ({s.store.per_second:,.1f} / {s.noop_per_second:,.1f}); webhook "
        f"/ store = {w.per_second / s.store.per_second:.2f}. The premise of an asynchronous "
        f"intake (`POST /bench/intake/<token>/`: the token's integration kept per process, "
        f"the JSON parsed, one raw autocommitted INSERT, 202): intake req/s / no-op req/s = "
        f"{s.intake_ratio:.2f} ({s.intake.per_second:,.1f} / {s.noop_per_second:,.1f}).",
        "",
        f"Checked in the database after the webhook block: {s.alerts_received:,} alerts "
        f"received by the integration during the timed blocks ({w.requests:,} answered "
        f"requests x {ALERTS_PER_REQUEST} = {w.requests * ALERTS_PER_REQUEST:,}; requests "
        f"in flight when wrk stopped count on the server only), {s.alerts_stored:,} alert "
        f"rows stored, {s.duplicates:,} repeated deliveries counted on existing rows, "
        f"{s.incidents_opened} incidents opened (the groups opened theirs in the warm-up).",
        "",
        f"Statements of one webhook request of 5 new alerts joining an open incident "
        f"(captured in process with the test client, same database): {len(s.queries)}.",
        "",
    ]
    lines += [f"{i}. `{_short(sql)}`" for i, sql in enumerate(s.queries, start=1)]
    if not s.passed:
        noop_cpu = statistics.mean(b.server_ms_per_request for b in s.noop)
        statements = [q for q in s.queries if q not in ("BEGIN", "COMMIT")]
        per_statement = (w.server_ms_per_request - noop_cpu) / max(1, len(statements))
        lines += [
            "",
            f"**FAIL**. Where the time goes: gunicorn runs on one CPU, so its CPU per "
            f"request bounds the rate. A webhook request costs {w.server_ms_per_request:.2f} "
            f"ms of gunicorn CPU against {noop_cpu:.2f} ms for the no-op: about "
            f"{per_statement:.2f} ms of Python (Django ORM and psycopg) for each of its "
            f"{len(statements)} statements, plus {w.database_ms_per_request:.2f} ms of "
            "PostgreSQL CPU. Even one ORM transaction (the store reference) costs "
            f"{s.store.server_ms_per_request:.2f} ms and reaches {s.store_ratio:.2f} of the "
            "no-op's rate, so no synchronous path through the ORM can reach the target. "
            f"The raw intake costs {s.intake.server_ms_per_request:.2f} ms and reaches "
            f"{s.intake_ratio:.2f}: storing the raw delivery with one INSERT, answering 202 "
            "and applying it in a worker is the design that meets the target.",
        ]
    return "\n".join(lines) + "\n"


def _storm_markdown(storm: Storm) -> str:
    lat = storm.latencies_ms
    lines = [
        "## 6. Alert storm: 10,000 alerts in 20 groups at once",
        "",
        f"The same server. {storm.alerts:,} alerts in {storm.groups} groups "
        f"({storm.alerts // storm.groups} per group, fingerprints all new), as "
        f"{storm.requests} Alertmanager bodies of {storm.per_request} alerts (severity "
        "critical), the groups interleaved (the first body of every group, then the "
        f"second, ...), sent by {storm.connections} threads of a Python client over "
        f"{storm.connections} keep-alive connections at once (pinned to CPU {CLIENT_CPU}), "
        "so the first bodies of a group race to open its incident on different "
        "connections. The database's constraint (one open alert group per key) decides the "
        "race; the loser replays and joins the winner's incident. Targets: every request "
        f"answered 200, {storm.alerts:,} alerts stored, exactly {storm.groups} open "
        "incidents. The ratio to the sustained run's alerts/s is for information (larger "
        "bodies, new groups).",
        "",
        "| alerts | requests | seconds | alerts/s | ratio to sustained | request p50 | p99 "
        "| statuses | alerts stored | open incidents | result |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
        f"| {storm.alerts:,} | {storm.requests} | {storm.seconds:.1f} "
        f"| {storm.alerts_per_second:,.0f} | {storm.ratio:.2f} "
        f"| {statistics.median(lat) if lat else float('nan'):.0f} ms "
        f"| {_percentile(lat, 99):.0f} ms "
        f"| {', '.join(f'{k}: {v}' for k, v in sorted(storm.statuses.items()))} "
        f"| {storm.alerts_stored:,} | {storm.open_incidents} (target {storm.groups}) "
        f"| {_verdict(storm.passed)} |",
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
) -> IngestResult:
    """Both benchmarks in a database copied from `template`, against one gunicorn."""
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
        broker = _start_redis(workdir)
        server = Server(workdir, broker)
        try:
            server.start()
            print(f"  {server.config} up on port {server.port}", flush=True)
            sustained = run_sustained(
                server=server,
                wrk=wrk,
                workdir=workdir,
                database=database,
                token=sustained_token,
                seconds=seconds,
                connections=connections,
                warmup=warmup,
            )
            print(f"  storm: {storm_alerts:,} alerts in {storm_groups} groups", flush=True)
            storm = run_storm(
                server=server,
                token=storm_token,
                alerts=storm_alerts,
                groups=storm_groups,
                per_request=storm_per_request,
                connections=storm_connections,
            )
            storm.sustained_alerts_per_second = sustained.alerts_per_second
        finally:
            server.stop()
            broker.child.stop(grace=5)
            connection.close()
        return IngestResult(sustained, storm, server.child.log()[-2000:])
