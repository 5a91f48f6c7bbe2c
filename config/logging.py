"""Logging filters."""

from __future__ import annotations

import logging
import re

# An integration token in a webhook path: /api/v1/integrations/<token>/alertmanager/.
TOKEN_IN_PATH = re.compile(r"(/integrations/)(?!alertmanager/|generic/|heartbeat/)[^/\s]+(/)")


class RedactTokens(logging.Filter):
    """Webhook tokens are secrets; Django's request logger writes the path of every 4xx and
    5xx answer, token included. Replace the token before any handler sees the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = TOKEN_IN_PATH.sub(r"\1<token>\2", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True
