"""Fixtures shared by the incidents tests: the real SMTP and HTTP servers of the escalation
tests (tests/escalation/conftest.py), offered here under the same names."""

from tests.escalation.conftest import (  # noqa: F401 - fixtures
    allow_private_webhooks,
    http_server,
    smtp_server,
)
