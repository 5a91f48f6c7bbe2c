"""Maintenance windows: the reads every part of the product shares (status page, engine,
ingestion). Services that create, cancel and announce windows join this module."""

from __future__ import annotations

from datetime import datetime

from django.db.models import QuerySet

from incidents.models import Incident, MaintenanceWindow


def windows_active(*, now: datetime) -> QuerySet[MaintenanceWindow]:
    """Windows running at `now` (started, not ended, not cancelled)."""
    return MaintenanceWindow.objects.filter(
        starts_at__lte=now, ends_at__gt=now, cancelled_at__isnull=True
    )


def service_ids_in_maintenance(*, now: datetime) -> set[int]:
    return set(
        windows_active(now=now).values_list("services__id", flat=True).exclude(services__id=None)
    )


def incident_window(incident: Incident, *, now: datetime) -> MaintenanceWindow | None:
    """The running window that covers one of the incident's services, if any: while it runs
    the incident pages nobody."""
    return (
        windows_active(now=now)
        .filter(services__incidents=incident)
        .order_by("starts_at", "pk")
        .first()
    )
