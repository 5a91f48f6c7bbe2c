"""Benchmarks of the foundation: `make bench` runs them and writes docs/benchmarks.md.

Every run works in its own fresh PostgreSQL database (`bench_incidents`), created and
migrated like a test database and dropped at the end: the developer's data is never read
or written. `setup()` must run before anything imports a model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

BENCH_DATABASE_NAME = "bench_incidents"


def setup() -> None:
    """Configure the environment for production-like measurements, then set Django up.

    DEBUG is forced off (DEBUG records every query and renders differently). The manifest
    static storage is switched off because a benchmark run has no `collectstatic` output;
    the admin pages would otherwise fail on their first `{% static %}` tag.
    """
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["DJANGO_DEBUG"] = "false"
    os.environ["STATIC_MANIFEST"] = "false"
    # Read by config.settings: the name create_test_db() gives the benchmark database.
    os.environ["TEST_DATABASE_NAME"] = BENCH_DATABASE_NAME

    import django
    from django.conf import settings

    django.setup()
    database = settings.DATABASES["default"]
    database.setdefault("TEST", {})["NAME"] = BENCH_DATABASE_NAME
    if "testserver" not in settings.ALLOWED_HOSTS:
        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]


def is_postgresql() -> bool:
    from django.db import connection

    return connection.vendor == "postgresql"


@contextmanager
def bench_database() -> Iterator[str]:
    """Create and migrate a fresh benchmark database; drop it on the way out, even on error.

    Yields the name of the database in use. The connection's NAME points at it meanwhile,
    so every query of the run goes there and never to the developer's database.
    """
    from django.db import connection

    original_name = connection.settings_dict["NAME"]
    name = connection.creation.create_test_db(
        verbosity=0, autoclobber=True, serialize=False, keepdb=False
    )
    if name == original_name:  # Paranoia: never benchmark in (and then drop) real data.
        raise RuntimeError(f"The benchmark database would be {name!r}, the real one.")
    try:
        yield name
    finally:
        connection.creation.destroy_test_db(original_name, verbosity=0, keepdb=False)


@contextmanager
def using_database(name: str) -> Iterator[None]:
    """Point the default connection at database `name` (reconnecting), then back."""
    from django.db import connection

    previous = connection.settings_dict["NAME"]
    connection.close()
    connection.settings_dict["NAME"] = name
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict["NAME"] = previous


@contextmanager
def database_snapshot(suffix: str) -> Iterator[str]:
    """Copy the benchmark database as it is now (CREATE DATABASE ... TEMPLATE, PostgreSQL),
    yield the copy's name, and drop the copy on the way out.

    Lets a benchmark keep the small table while the original grows, so the two sizes can be
    measured in alternation and share whatever else the machine is doing at the time.
    """
    from django.db import connection

    source = connection.settings_dict["NAME"]
    if source != BENCH_DATABASE_NAME:  # Only ever copy (and later drop) our own database.
        raise RuntimeError(f"Not the benchmark database: {source!r}.")
    name = f"{source}_{suffix}"
    quote = connection.ops.quote_name
    connection.close()  # A template must have no other sessions.
    with connection._nodb_cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {quote(name)}")
        cursor.execute(f"CREATE DATABASE {quote(name)} TEMPLATE {quote(source)}")
    try:
        yield name
    finally:
        connection.close()
        with connection._nodb_cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {quote(name)}")
