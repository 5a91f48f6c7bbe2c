"""Benchmark 8: one customer notice to 1,000 and to 10,000 subscribers, sent by a real Celery
worker through a real SMTP server.

A private redis-server and an SMTP sink (aiosmtpd, in a thread of this process, counting
what it accepts per recipient) are started; for each size a fresh Celery worker
(concurrency 2, as the Procfile runs it) is started against the benchmark database. The
subscribers (confirmed, following one public service of their own per size) are written
with bulk_create. A notice about a maintenance window of that service is composed with
`notice_compose` and sent with `notice_send` here, which writes the delivery rows and queues
the batch tasks on commit; the worker then claims and sends them. Measured:

- `notice_send`: seconds to write the delivery rows and queue the tasks;
- the worker: seconds from the commit until the notice is `sent` (every delivery done),
  and messages per second over that span;
- memory: the peak resident set (VmHWM in /proc/<pid>/status) of each worker process, read
  just before the worker stops, and of the pool processes right after start-up (idle).

Target: the pool's peak at 10,000 subscribers at most 1.2 times its peak at 1,000 (memory
stays flat as the subscriber count grows: rows are claimed and sent in batches).
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import connection
from django.utils import timezone

from incidents.comms import notices
from incidents.models import (
    CustomerNotice,
    MaintenanceWindow,
    NoticeDelivery,
    NoticeStatus,
    Service,
    Subscriber,
    TemplateKind,
)

from .bench_escalation import (
    Broker,
    Child,
    MailSink,
    _celery_broker,
    _child_env,
    _start_redis,
    _wait_until,
)

TARGET_RATIO = 1.2
CONCURRENCY = 2
DONE_TIMEOUT = 900.0


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (the prefork pool of a worker)."""
    found: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(proc.name))
    return sorted(found)


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Memory:
    """VmHWM (peak resident set), KiB, of the worker's main process and each pool process."""

    main: int
    pool: list[int]

    @property
    def pool_peak(self) -> int:
        return max(self.pool, default=0)

    @classmethod
    def read(cls, worker_pid: int) -> Memory:
        return cls(
            _status_kib(worker_pid, "VmHWM"),
            [_status_kib(pid, "VmHWM") for pid in _children(worker_pid)],
        )


@dataclass
class Run:
    subscribers: int
    send_seconds: float  # notice_send: delivery rows written, tasks queued
    worker_seconds: float  # from the commit until the notice is sent
    received: int
    duplicates: int
    statuses: dict[str, int]
    idle: Memory
    peak: Memory
    batches: int
    startup_seconds: float

    @property
    def per_second(self) -> float:
        return self.received / self.worker_seconds if self.worker_seconds else 0.0


@dataclass
class NoticesResult:
    runs: list[Run]
    batch_size: int
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        small, large = self.runs[0], self.runs[-1]
        return large.peak.pool_peak / small.peak.pool_peak if small.peak.pool_peak else 0.0

    @property
    def complete(self) -> bool:
        return all(
            r.received == r.subscribers
            and r.duplicates == 0
            and r.statuses.get("sent", 0) == r.subscribers
            for r in self.runs
        )

    @property
    def passed(self) -> bool:
        return self.complete and self.ratio <= TARGET_RATIO

    def summary(self) -> list[str]:
        lines = [
            f"{r.subscribers:,} subscribers: {r.per_second:.0f} messages/s "
            f"({r.worker_seconds:.1f} s), pool peak {r.peak.pool_peak / 1024:.1f} MiB "
            f"(idle {r.idle.pool_peak / 1024:.1f} MiB), {r.received:,} received, "
            f"{r.duplicates} duplicates"
            for r in self.runs
        ]
        lines.append(
            f"peak memory ratio {self.ratio:.2f} [{'PASS' if self.passed else 'FAIL'}, "
            f"target <= {TARGET_RATIO}]"
        )
        return lines

    def markdown(self) -> str:
        small, large = self.runs[0], self.runs[-1]
        lines = [
            f"## 8. Customer notices: one notice to {small.subscribers:,} and to "
            f"{large.subscribers:,} subscribers (Celery worker, SMTP)",
            "",
            "A private redis-server and an SMTP sink (aiosmtpd in a thread of the benchmark "
            "process, counting what it accepts per recipient) are started; for each size a "
            f"fresh Celery worker (`--concurrency={CONCURRENCY}`, as the Procfile runs it) "
            "works on the benchmark database. Confirmed subscribers of one public service are "
            "written with bulk_create; a notice about a maintenance window of that service is "
            "composed (`notice_compose`) and sent (`notice_send`: the delivery rows in "
            "batches, then the batch tasks queued on commit) by the benchmark process; the "
            "worker claims the rows in batches of "
            f"{self.batch_size} and sends each batch over one SMTP connection. Worker time runs "
            "from the commit until the notice is `sent` (every delivery recorded). Memory is "
            "VmHWM (the peak resident set) from `/proc/<pid>/status`: of the pool processes "
            "that run the tasks right after start-up (idle) and just before the worker stops "
            "(peak), and of the worker's main process. Target: the pool's peak at "
            f"{large.subscribers:,} at most {TARGET_RATIO} times its peak at "
            f"{small.subscribers:,}.",
            "",
            "| subscribers | notice_send | worker time | messages per second | received "
            "| duplicates | all sent | pool idle | pool peak | main process peak |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for r in self.runs:
            all_sent = r.statuses.get("sent", 0) == r.subscribers
            lines.append(
                f"| {r.subscribers:,} | {r.send_seconds:.2f} s | {r.worker_seconds:.1f} s "
                f"| {r.per_second:.0f} | {r.received:,} | {r.duplicates} "
                f"| {'yes' if all_sent else f'**no** {r.statuses}'} "
                f"| {r.idle.pool_peak / 1024:.1f} MiB | {r.peak.pool_peak / 1024:.1f} MiB "
                f"| {r.peak.main / 1024:.1f} MiB |"
            )
        verdict = "PASS" if self.passed else "**FAIL**"
        lines += [
            "",
            f"Peak memory of the pool, {large.subscribers:,} / {small.subscribers:,}: "
            f"**{self.ratio:.2f}** (target <= {TARGET_RATIO}): {verdict}. Each pool process's "
            "peak: "
            + "; ".join(
                f"{', '.join(f'{kib / 1024:.1f}' for kib in r.peak.pool)} MiB at {r.subscribers:,}"
                for r in self.runs
            )
            + ".",
            "",
            "Batch tasks queued by `notice_send`: "
            + ", ".join(f"{r.batches} at {r.subscribers:,}" for r in self.runs)
            + ". Worker start-up (until ready): "
            + ", ".join(f"{r.startup_seconds:.1f} s" for r in self.runs)
            + ".",
        ]
        lines += self.notes
        return "\n".join(lines).rstrip() + "\n"


def _subscribers(service: Service, count: int, tag: str) -> None:
    now = timezone.now()
    size = 2_000
    through = Subscriber.services.through
    for start in range(0, count, size):
        rows = Subscriber.objects.bulk_create(
            Subscriber(
                email=f"{tag}-{n}@bench.example",
                unsubscribe_token=f"bench-{tag}-{n}",
                confirmed_at=now,
                confirmation_sent_at=now,
                created_at=now,
            )
            for n in range(start, min(count, start + size))
        )
        through.objects.bulk_create(
            through(subscriber_id=row.pk, service_id=service.pk) for row in rows
        )


def _notice(service: Service, count: int) -> CustomerNotice:
    start = timezone.now() + timedelta(days=1)
    window = MaintenanceWindow.objects.create(
        title=f"Benchmark maintenance for {count:,} subscribers",
        description="Planned work; a short interruption is possible.",
        starts_at=start,
        ends_at=start + timedelta(hours=2),
    )
    window.services.set([service])
    return notices.notice_compose(kind=TemplateKind.MAINTENANCE, maintenance=window, actor=None)


def run_one(*, broker: Broker, sink: MailSink, workdir: Path, count: int) -> Run:
    tag = f"n{count}"
    service, _ = Service.objects.get_or_create(
        slug=f"bench-notices-{count}", defaults={"name": f"Bench notices {count}"}
    )
    _subscribers(service, count, tag)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    notice = _notice(service, count)
    env = _child_env(broker, workdir, float(settings.ENGINE_TICK_SECONDS), sink.env())
    worker = Child(
        f"worker-{count}",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "--loglevel=INFO",
            f"--concurrency={CONCURRENCY}",
            "-n",
            f"notices-{count}@%h",
        ],
        env,
        workdir / f"worker-{count}.log",
    )
    received_before = sink.received
    ok = False
    clock = time.monotonic()
    try:
        worker.start()
        worker.wait_for_log(" ready.", timeout=60)
        startup = time.monotonic() - clock
        pid = worker.process.pid
        _wait_until(lambda: len(_children(pid)) >= CONCURRENCY, timeout=30, what="pool")
        idle = Memory.read(pid)
        print(f"  worker up in {startup:.1f} s; sending to {count:,}", flush=True)
        with _celery_broker(broker.url):
            started = time.monotonic()
            sent_to = notices.notice_send(notice=notice, actor=None)
            committed = time.monotonic()
        batches = math.ceil(count / notices.setting("NOTICE_BATCH_SIZE"))

        def done() -> bool:
            status = CustomerNotice.objects.filter(pk=notice.pk).values_list("status", flat=True)
            return status[0] == NoticeStatus.SENT

        _wait_until(done, timeout=DONE_TIMEOUT, what=f"the notice to {count:,} sent")
        finished = time.monotonic()
        peak = Memory.read(pid)
        ok = True
    finally:
        worker.stop()
        if not ok:
            print(f"----- {worker.name} (last lines) -----\n{worker.log()[-3000:]}")
    statuses = Counter(
        NoticeDelivery.objects.filter(notice=notice).values_list("status", flat=True)
    )
    ours = {email: n for email, n in sink.recipients.items() if email.startswith(f"{tag}-")}
    assert sent_to == count, (sent_to, count)
    return Run(
        subscribers=count,
        send_seconds=committed - started,
        worker_seconds=finished - committed,
        received=sink.received - received_before,
        duplicates=sum(n - 1 for n in ours.values() if n > 1),
        statuses=dict(statuses),
        idle=idle,
        peak=peak,
        batches=batches,
        startup_seconds=startup,
    )


def run(*, small: int = 1_000, large: int = 10_000) -> NoticesResult:
    batch = notices.setting("NOTICE_BATCH_SIZE")
    with tempfile.TemporaryDirectory(prefix="bench-notices-") as tmp:
        workdir = Path(tmp)
        broker = _start_redis(workdir)
        sink = MailSink().start()
        try:
            runs = [
                run_one(broker=broker, sink=sink, workdir=workdir, count=count)
                for count in (small, large)
            ]
        finally:
            sink.stop()
            broker.child.stop(grace=5)
    result = NoticesResult(runs=runs, batch_size=batch)
    per_second = [r.per_second for r in runs]
    result.notes.append(
        "\nEach connection sends one message at a time and waits for the server's answer "
        f"({CONCURRENCY} pool processes, so at most {CONCURRENCY} connections at once); the "
        "sink, PostgreSQL, the worker and the benchmark process share the machine's CPUs. "
        f"Median of the two runs: {statistics.median(per_second):.0f} messages per second."
    )
    return result
