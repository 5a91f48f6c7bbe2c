"""Run a real Prometheus Alertmanager (Debian's `prometheus-alertmanager`) for tests.

    with AlertmanagerProcess(tmp_path, webhook_url=url) as am:
        am.post_alerts([{"labels": {"alertname": "X"}}])
        am.alerts()        # what Alertmanager holds, with its fingerprints

Without the binary, `require_binary()` skips the test, except with CI=true, where it fails:
the end-to-end check may not silently disappear there.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.escalation.processes import HOST, Child, free_port, wait_until

BINARY = "/usr/bin/prometheus-alertmanager"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

CONFIG = """\
route:
  receiver: tracker
  group_by: ['alertname']
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: tracker
    webhook_configs:
      - url: {url}
        send_resolved: true
        max_alerts: 0
"""


def require_binary() -> str:
    """The Alertmanager binary; skip (fail with CI=true) when it is not installed."""
    path = BINARY if os.access(BINARY, os.X_OK) else shutil.which("prometheus-alertmanager")
    if path:
        return path
    message = f"Alertmanager ({BINARY}) not found"
    if IN_CI:
        pytest.fail(f"CI=true needs a real Alertmanager for the end-to-end test: {message}.")
    pytest.skip(f"{message}; install with `apt-get install prometheus-alertmanager`")
    raise AssertionError("unreachable")  # pytest.skip raises


class AlertmanagerProcess:
    """One Alertmanager, clustering off, state in a temporary directory, sending every
    group to `webhook_url` one second after it changes."""

    def __init__(self, workdir: Path, *, webhook_url: str, binary: str | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        config = workdir / "alertmanager.yml"
        config.write_text(CONFIG.format(url=json.dumps(webhook_url)))
        storage = workdir / "alertmanager-data"
        storage.mkdir(exist_ok=True)
        argv = [
            binary or require_binary(),
            f"--config.file={config}",
            f"--storage.path={storage}",
            f"--web.listen-address={HOST}:{self.port}",
            "--cluster.listen-address=",
            "--log.level=debug",
        ]
        self.child = Child("alertmanager", argv, dict(os.environ), workdir / "alertmanager.log")

    def __enter__(self) -> AlertmanagerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, *, timeout: float = 30.0) -> None:
        self.child.start()
        wait_until(self.ready, timeout=timeout, what="Alertmanager /-/ready")

    def stop(self) -> None:
        self.child.stop()

    def log(self) -> str:
        return self.child.log()

    def ready(self) -> bool:
        if not self.child.alive:
            raise AssertionError(f"Alertmanager exited:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:  # noqa: S310
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only
            f"{self.url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method=method,
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            raw = response.read()
        return json.loads(raw) if raw else None

    def post_alerts(self, alerts: list[dict]) -> None:
        """POST /api/v2/alerts: fire (no endsAt, or one ahead) or resolve (endsAt past)."""
        self._call("POST", "/api/v2/alerts", alerts)

    def alerts(self) -> list[dict]:
        """GET /api/v2/alerts: the alerts Alertmanager holds, with its fingerprints."""
        return self._call("GET", "/api/v2/alerts?active=true&silenced=true&inhibited=true")
