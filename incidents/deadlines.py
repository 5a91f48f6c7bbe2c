"""Deadline arithmetic, in one place.

`compute_deadlines` turns a severity's targets into the stored `*_due_at` columns. All of it
goes through `due_at`, the single point where a severity's business-hours calendar
(`escalation.business_hours`) applies: "respond within 2 h" becomes "2 business hours"
there and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from escalation.business_hours import add_business_time

from .models import OPEN_STATUSES, IncidentStatus

if TYPE_CHECKING:
    from .models import Incident, Severity


def due_at(severity: Severity, start: datetime, target: timedelta) -> datetime:
    """The moment a target of `severity` that starts at `start` falls due.

    Every deadline goes through here. Without a calendar, `target` is wall-clock time. With
    one, it is business time: `add_business_time(severity.calendar, start, target)`, so a
    start outside business hours waits for the next opening. Reading `severity.calendar`
    costs one query per severity instance unless the caller loaded it
    (`select_related("severity__calendar")`); the instance caches it afterwards.
    """
    if severity.calendar_id is None:
        return start + target
    return add_business_time(severity.calendar, start, target)


@dataclass(frozen=True)
class Deadlines:
    ack_due_at: datetime | None
    resolve_due_at: datetime | None
    next_update_due_at: datetime | None

    def as_fields(self) -> dict[str, datetime | None]:
        return {
            "ack_due_at": self.ack_due_at,
            "resolve_due_at": self.resolve_due_at,
            "next_update_due_at": self.next_update_due_at,
        }


def compute_deadlines(
    severity: Severity,
    start: datetime,
    now: datetime,
    *,
    status: str,
    update_base: datetime | None = None,
) -> Deadlines:
    """The pending deadlines of an incident detected at `start`, as of `now`.

    Acknowledge and resolve targets run from detection, so a changed severity re-bases them
    on the same start (a raised severity can be breached at once: that is the point). The
    update cadence runs from `update_base` (the latest status update or (re)opening), `now`
    by default. A deadline that no longer applies is None.
    """
    is_open = status in OPEN_STATUSES
    return Deadlines(
        ack_due_at=(
            due_at(severity, start, severity.ack_target)
            if status == IncidentStatus.TRIGGERED
            else None
        ),
        resolve_due_at=due_at(severity, start, severity.resolve_target) if is_open else None,
        next_update_due_at=(
            due_at(severity, update_base or now, severity.update_interval) if is_open else None
        ),
    )


@dataclass(frozen=True)
class TargetState:
    """How one target stands: pending (time left), breached (overdue), met or missed."""

    name: str
    target: timedelta
    due_at: datetime
    done_at: datetime | None
    now: datetime

    @property
    def state(self) -> str:
        if self.done_at is None:
            return "pending" if self.now < self.due_at else "breached"
        return "met" if self.done_at <= self.due_at else "missed"

    @property
    def delta(self) -> timedelta:
        """Time left (pending), overdue (breached), or the margin (met) / overrun (missed)."""
        reference = self.done_at or self.now
        return abs(self.due_at - reference)

    @property
    def is_breach(self) -> bool:
        return self.state in {"breached", "missed"}


def target_states(incident: Incident, now: datetime) -> list[TargetState]:
    """Acknowledge and resolve targets of an incident (its severity must be loaded)."""
    severity = incident.severity
    start = incident.detected_at
    ack_done = incident.acknowledged_at
    if ack_done is None and incident.status not in OPEN_STATUSES:
        # Resolved without an acknowledgement (an auto-resolved alert): the ack target
        # stopped mattering when the incident resolved.
        ack_done = incident.resolved_at
    return [
        TargetState(
            "acknowledge",
            severity.ack_target,
            due_at(severity, start, severity.ack_target),
            ack_done,
            now,
        ),
        TargetState(
            "resolve",
            severity.resolve_target,
            due_at(severity, start, severity.resolve_target),
            incident.resolved_at,
            now,
        ),
    ]
