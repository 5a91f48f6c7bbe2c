"""Real processes for reliability tests: a private redis-server, Celery workers and beats.

Every child runs in its own session (its own process group), so stopping it also stops the
processes it forked (the prefork pool). Each writes its output to a log file; the tail is
printed at teardown, which pytest shows when a test fails. Every wait is bounded.

    with ProcessGroup(tmp_path) as procs:
        redis = procs.redis()
        env = child_env(broker_url=redis.url, **smtp_server.env())
        worker = procs.worker("w1", env)
        procs.beat("b1", env)
        worker.kill()                        # SIGKILL to the worker and its pool
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.2
) -> T:
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def database_url() -> str:
    """The URL of the database this test process uses (the pytest test database)."""
    db = connection.settings_dict
    return (
        f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or HOST}:{db['PORT'] or 5432}"
        f"/{db['NAME']}"
    )


def child_env(*, broker_url: str, **extra: str) -> dict[str, str]:
    """Environment for a child that runs config.settings against the test database."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        DJANGO_SECRET_KEY=env.get("DJANGO_SECRET_KEY") or "reliability-test-key",
        DJANGO_SETTINGS_MODULE="config.settings",
        CELERY_BROKER_URL=broker_url,
        REDIS_URL=broker_url,
        ENGINE_TICK_SECONDS="1",
        # No alert deliveries here unless a test says so (extra): the applying task would
        # add a second task a second to every worker these tests start and stop.
        ALERT_APPLY_SECONDS="3600",
        SITE_URL="http://testserver.invalid",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Child:
    """One child process in its own process group, its output in `log_path`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> Child:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, *, timeout: float) -> None:
        def seen() -> bool:
            if not self.alive:
                raise AssertionError(f"{self.name} exited early:\n{self.log()[-3000:]}")
            return text in self.log()

        wait_until(seen, timeout=timeout, what=f"{text!r} in the log of {self.name}")

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the child and everything in its process group, at once."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def stop(self, *, grace: float = 5.0) -> None:
        """SIGTERM the child, wait up to `grace` seconds, then SIGKILL its whole group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        self.kill()  # also reaps pool children left behind in the group


class RedisServer(Child):
    """A private redis-server on a fixed port: it can be stopped and started again there.
    No persistence: a restart comes back empty, as a lost broker would."""

    def __init__(self, port: int, log_path: Path) -> None:
        argv = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        super().__init__(f"redis:{port}", argv, dict(os.environ), log_path)
        self.port = port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def ping(self) -> bool:
        """One PING, no retries (redis-py retries with backoff, which slows every poll)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, *, timeout: float = 10.0) -> RedisServer:
        super().start()
        wait_until(self.ping, timeout=timeout, what=f"redis-server on port {self.port}")
        return self

    def stop(self, *, grace: float = 5.0) -> None:
        super().stop(grace=grace)
        wait_until(lambda: not self.ping(), timeout=grace, what="redis-server to stop")


def wait_ready(child: Child, *, timeout: float = 30.0) -> None:
    """Wait until a Celery worker is ready for tasks, or a beat has started."""
    is_beat = "beat" in child.argv
    child.wait_for_log("beat: Starting" if is_beat else " ready.", timeout=timeout)


class ProcessGroup:
    """Starts children and stops all of them (newest first) on exit, printing log tails."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def _log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def redis(self, port: int | None = None) -> RedisServer:
        server = RedisServer(port or free_port(), self._log_path("redis"))
        self.children.append(server)
        return server.start()

    def celery(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(
            name, [sys.executable, "-m", "celery", "-A", "config", *argv], env, self._log_path(name)
        )
        self.children.append(child)
        return child.start()

    def worker(
        self, name: str, env: dict[str, str], *, wait: bool = True, timeout: float = 30.0
    ) -> Child:
        """A Celery worker `name@host`, returned once it says it is ready (unless not
        `wait`: then call `wait_ready`)."""
        child = self.celery(
            name,
            [
                "worker",
                "--loglevel=INFO",
                "--concurrency=2",
                "-n",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            env,
        )
        if wait:
            wait_ready(child, timeout=timeout)
        return child

    def beat(
        self, name: str, env: dict[str, str], *, wait: bool = True, timeout: float = 30.0
    ) -> Child:
        """A Celery beat with its own schedule file, returned once it has started (unless
        not `wait`: then call `wait_ready`)."""
        child = self.celery(
            name,
            [
                "beat",
                "--loglevel=INFO",
                "--schedule",
                str(self.log_dir / f"{name}-schedule"),
                "--pidfile=",
            ],
            env,
        )
        if wait:
            wait_ready(child, timeout=timeout)
        return child

    def stop_all(self, *, grace: float = 5.0) -> None:
        """SIGTERM every child at once, wait up to `grace` seconds in all, then SIGKILL the
        process groups. Celery children go first (they hold database connections), the
        broker last."""
        celery = [child for child in self.children if not isinstance(child, RedisServer)]
        for child in celery:
            if child.alive:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + grace
        for child in celery:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
            child.kill()
        for child in self.children:
            if isinstance(child, RedisServer):
                child.stop(grace=grace)
        for child in self.children:
            tail = child.log()[-4000:]
            print(f"\n----- {child.name} (last lines) -----\n{tail}")  # noqa: T201
