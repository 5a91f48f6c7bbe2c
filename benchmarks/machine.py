"""What the figures were measured on: they mean little without the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import django
from django.db import connection


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def _show(setting: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW {setting}")
        return cursor.fetchone()[0]


def describe() -> list[tuple[str, str]]:
    """(label, value) pairs: hardware, Python, Django and the PostgreSQL server."""
    facts = [
        ("CPUs", str(os.cpu_count())),
        ("CPU model", _cpu_model()),
        ("Memory", _memory()),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("Django", django.get_version()),
    ]
    if connection.vendor == "postgresql":
        facts += [
            ("PostgreSQL server", _show("server_version")),
            (
                "PostgreSQL settings",
                ", ".join(
                    f"{name}={_show(name)}"
                    for name in ("shared_buffers", "work_mem", "synchronous_commit", "fsync")
                ),
            ),
        ]
    else:
        facts.append(("Database", connection.vendor))
    return facts
