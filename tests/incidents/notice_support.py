"""Helpers of the customer-notice tests: an SMTP server that drops the connection once a
message's data arrived and one that runs a hook on each message (`smtp_server_at` runs
either like the `smtp_server` fixture of tests/escalation/conftest.py, which
tests/incidents/conftest.py offers), and readers for what a server received.
`smtp_server` is re-exported for modules that import it here."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from email.message import EmailMessage

from tests.escalation.conftest import (  # noqa: F401 - smtp_server is re-exported
    SMTPServer,
    smtp_server,
    smtp_server_at,
)


class DroppingSMTPServer(SMTPServer):
    """Receives each message's data, records it, then drops the connection without
    answering: the sender cannot know whether the message was delivered."""

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        await super().handle_DATA(server, session, envelope)
        server.transport.abort()
        return "250 never sent: the connection is gone"


class HookedSMTPServer(SMTPServer):
    """Records each message, then runs `on_message(count)` (count: messages so far) in a
    thread of its own with its own database connection, before answering: the sender's
    next step sees whatever the hook wrote. Needs a test with committed data
    (`django_db(transaction=True)`)."""

    def __init__(self, on_message: Callable[[int], None]) -> None:
        super().__init__()
        self.on_message = on_message

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        reply = await super().handle_DATA(server, session, envelope)
        count = len(self.envelopes)
        # The ORM refuses to run inside the event loop: a plain thread runs the hook.
        await asyncio.get_running_loop().run_in_executor(None, self._run_hook, count)
        return reply

    def _run_hook(self, count: int) -> None:
        from django.db import connection

        try:
            self.on_message(count)
        finally:
            connection.close()


def parts(message: EmailMessage) -> tuple[str, str]:
    """The plain-text and the HTML part of a received message."""
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None, "a plain-text part expected"
    assert html is not None, "an HTML part expected"
    return text.get_content(), html.get_content()


def link(message: EmailMessage, path: str) -> str:
    """The path of the first link to `path` (e.g. "/status/confirm/") in the text part."""
    text = message.get_body(preferencelist=("plain",)).get_content()
    match = re.search(rf"https?://[^/\s]+({re.escape(path)}[^\s]+)", text)
    assert match, f"no {path} link in:\n{text}"
    return match.group(1)
