"""Real servers for delivery tests: an SMTP server and an HTTP server that record what they
receive. Both listen on 127.0.0.1 on a free port, run in a thread of the test process, and
stop at teardown.

    def test_email(smtp_server):          # Django's EMAIL_* now point at it
        ...send...
        [message] = smtp_server.messages  # email.message.EmailMessage

    def test_webhook(http_server, allow_private_webhooks):
        http_server.respond_with(503)
        ...post to http_server.url("/hook")...
        [request] = http_server.requests  # .method .path .headers .body .json

Processes started by a test (Celery workers) do not see the `settings` fixture: give them
`smtp_server.env()` and `http_server.env()` as environment variables.
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from requests.structures import CaseInsensitiveDict

HOST = "127.0.0.1"


def _wait(condition: threading.Condition, ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    with condition:
        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            condition.wait(remaining)


# --- SMTP -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage


class _FreePortController(Controller):
    """aiosmtpd's controller, bound to port 0: the port is read back from the bound socket
    before the controller's start-up probe connects to it (no find-a-port race)."""

    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SMTPServer:
    """A real SMTP server. `messages` holds each received message parsed as an
    `email.message.EmailMessage` (policy=default); `envelopes` adds MAIL FROM and RCPT TO."""

    def __init__(self, host: str = HOST) -> None:
        self.host = host
        self.port = 0
        self.envelopes: list[Envelope] = []
        self._reply: str | None = None
        self._condition = threading.Condition()
        self._controller = _FreePortController(self, hostname=host, port=0)

    @property
    def messages(self) -> list[EmailMessage]:
        with self._condition:
            return [envelope.message for envelope in self.envelopes]

    def start(self) -> SMTPServer:
        self._controller.start()
        self.port = self._controller.port
        return self

    def stop(self) -> None:
        self._controller.stop()

    def reject_with(self, reply: str | None) -> None:
        """Answer DATA with this SMTP reply from now on (e.g. "550 5.1.1 No such user",
        "451 4.3.0 Try again later"); None accepts again. Rejected mail is not recorded."""
        self._reply = reply

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        """Block until at least `count` messages arrived (for senders in other threads or
        processes); returns the messages."""
        _wait(self._condition, lambda: len(self.envelopes) >= count, timeout, f"{count} mails")
        return self.messages

    def clear(self) -> None:
        with self._condition:
            self.envelopes.clear()

    def env(self) -> dict[str, str]:
        """Environment variables that point config.settings of another process here."""
        return {
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": self.host,
            "EMAIL_PORT": str(self.port),
            "EMAIL_USE_TLS": "false",
            "EMAIL_HOST_USER": "",
            "EMAIL_HOST_PASSWORD": "",
        }

    # aiosmtpd handler hook
    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        if self._reply:
            return self._reply
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        with self._condition:
            self.envelopes.append(
                Envelope(envelope.mail_from, tuple(envelope.rcpt_tos), message)  # type: ignore[arg-type]
            )
            self._condition.notify_all()
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server(settings) -> Iterator[SMTPServer]:
    """A real SMTP server on 127.0.0.1, with Django's SMTP backend pointed at it."""
    yield from smtp_server_at(SMTPServer(), settings)


def smtp_server_at(server: SMTPServer, settings) -> Iterator[SMTPServer]:
    """Start `server`, point Django's SMTP settings at it, stop it afterwards: the body of
    an `smtp_server`-like fixture for a server class of one's own."""
    server.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = server.host
    settings.EMAIL_PORT = server.port
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_USE_SSL = False
    settings.EMAIL_HOST_USER = ""
    settings.EMAIL_HOST_PASSWORD = ""
    settings.EMAIL_TIMEOUT = 5
    try:
        yield server
    finally:
        server.stop()


# --- HTTP -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: CaseInsensitiveDict
    body: bytes
    json: Any = None  # the parsed body when it is JSON, else None


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def _response(status: int, body: Any, headers: dict[str, str] | None, delay: float) -> Response:
    headers = dict(headers or {})
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
    return Response(status=status, body=body or b"", headers=headers, delay=delay)


class HTTPServer:
    """A real HTTP server that records each request and answers as told.

    By default it answers 200 with an empty body. `respond_with(...)` changes the answer
    for every later request; `respond_once(...)` queues answers used first, in order."""

    def __init__(self, host: str = HOST) -> None:
        self.host = host
        self.requests: list[RecordedRequest] = []
        self._default = Response()
        self._queue: deque[Response] = deque()
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def start(self) -> HTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping on a delay
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def respond_with(
        self,
        status: int = 200,
        *,
        body: bytes | str | dict | list = b"",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer every later request so: `status`, `body` (a dict or list is sent as JSON),
        `headers` (e.g. {"Location": ...}), after sleeping `delay` seconds."""
        self._default = _response(status, body, headers, delay)

    def respond_once(
        self,
        status: int = 200,
        *,
        body: bytes | str | dict | list = b"",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer the next request (after earlier queued ones) so, then fall back."""
        with self._condition:
            self._queue.append(_response(status, body, headers, delay))

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until at least `count` requests arrived; returns them."""
        _wait(self._condition, lambda: len(self.requests) >= count, timeout, f"{count} requests")
        with self._condition:
            return list(self.requests)

    def clear(self) -> None:
        with self._condition:
            self.requests.clear()

    def env(self) -> dict[str, str]:
        """Environment for another process that must be allowed to post here."""
        return {"WEBHOOK_ALLOW_PRIVATE": "true"}

    def _record(self, request: RecordedRequest) -> Response:
        with self._condition:
            self.requests.append(request)
            self._condition.notify_all()
            return self._queue.popleft() if self._queue else self._default

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    parsed = json.loads(body) if body else None
                except ValueError:
                    parsed = None
                answer = recorder._record(
                    RecordedRequest(
                        method=self.command,
                        path=self.path,
                        headers=CaseInsensitiveDict(self.headers.items()),
                        body=body,
                        json=parsed,
                    )
                )
                if answer.delay and recorder._stopping.wait(answer.delay):
                    return
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(answer.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler


@pytest.fixture
def http_server() -> Iterator[HTTPServer]:
    """A real HTTP server on 127.0.0.1 that records requests. It is a loopback address:
    senders that refuse private targets need `allow_private_webhooks` too."""
    server = HTTPServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def allow_private_webhooks(settings) -> None:
    """Let webhooks reach loopback and private addresses (the local test servers)."""
    settings.WEBHOOK_ALLOW_PRIVATE = True
