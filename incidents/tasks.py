"""Celery tasks: thin wrappers that call a service."""

from __future__ import annotations

from celery import shared_task

from .ingestion import services as ingestion


@shared_task(name="incidents.check_heartbeats", ignore_result=True)
def check_heartbeats() -> int:
    """Beat, every HEARTBEAT_CHECK_SECONDS: open an incident for each integration whose
    heartbeat is overdue (idempotent: each missed heartbeat is claimed once)."""
    return ingestion.heartbeats_check()
