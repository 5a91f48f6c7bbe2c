"""Suite-wide checks and fixtures.

With CI=true the run fails at once when PostgreSQL or Redis is missing: nothing that needs
them may be skipped there.
"""

from __future__ import annotations

import os

import pytest
import redis
from django.conf import settings

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def redis_problem(url: str) -> str | None:
    if not url:
        return "REDIS_URL is not set"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        return f"Redis at {url} does not answer: {error}"
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    if not IN_CI:
        return
    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine:
        pytest.exit(f"CI=true needs PostgreSQL (DATABASE_URL); got {engine}", returncode=3)
    problem = redis_problem(settings.REDIS_URL)
    if problem:
        pytest.exit(f"CI=true needs Redis: {problem}", returncode=3)


@pytest.fixture
def redis_url() -> str:
    """A reachable Redis. Fails (never skips) when there is none."""
    problem = redis_problem(settings.REDIS_URL)
    if problem:
        pytest.fail(problem)
    return settings.REDIS_URL
