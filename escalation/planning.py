"""Escalation plans: a policy copied onto an incident, and when each of its steps falls due.

A plan is plain JSON stored on the incident (`Incident.escalation_plan`), so editing the
policy later does not change incidents already running:

    {"version": 1, "policy_id": 3, "policy": "Sev1 paging", "repeat": 1,
     "repeat_after_seconds": 1800,
     "steps": [{"delay_seconds": 0, "condition": "unacknowledged", "calendar_id": null,
                "targets": [{"kind": "oncall", "rotation_id": 1}, ...]}, ...]}

Step i of round r falls due at  start + r * round_length + delay_i,  where round_length is
the last step's delay plus `repeat_after`. A step limited to business hours waits for the
next business moment of its calendar.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from .models import BusinessCalendar, EscalationPolicy

Plan = dict[str, Any]


def policy_snapshot(policy: EscalationPolicy | None, *, version: int = 1) -> Plan:
    """The policy as JSON, steps in order with their targets. An empty plan for None."""
    if policy is None:
        return {
            "version": version,
            "policy_id": None,
            "policy": "",
            "repeat": 0,
            "repeat_after_seconds": 0,
            "steps": [],
        }
    steps = policy.steps.prefetch_related("targets").order_by("position", "pk")
    return {
        "version": version,
        "policy_id": policy.pk,
        "policy": policy.name,
        "repeat": policy.repeat,
        "repeat_after_seconds": int(policy.repeat_after.total_seconds()),
        "steps": [
            {
                "delay_seconds": int(step.delay.total_seconds()),
                "condition": step.condition,
                "calendar_id": step.calendar_id,
                "targets": [
                    {
                        "kind": target.kind,
                        "rotation_id": target.rotation_id,
                        "person_id": target.person_id,
                        "team_id": target.team_id,
                    }
                    for target in step.targets.all()
                ],
            }
            for step in steps
        ],
    }


def round_length(plan: Plan) -> timedelta:
    steps = plan.get("steps") or []
    if not steps:
        return timedelta(0)
    last = max(step["delay_seconds"] for step in steps)
    return timedelta(seconds=last + plan.get("repeat_after_seconds", 0))


def step_due_at(
    plan: Plan,
    started_at: datetime,
    step_index: int,
    round_: int,
    *,
    calendars: dict[int, BusinessCalendar] | None = None,
) -> datetime | None:
    """When step `step_index` of round `round_` falls due; None past the plan's end."""
    steps = plan.get("steps") or []
    if step_index >= len(steps) or round_ > plan.get("repeat", 0):
        return None
    step = steps[step_index]
    due = started_at + round_ * round_length(plan) + timedelta(seconds=step["delay_seconds"])
    calendar_id = step.get("calendar_id")
    if calendar_id:
        calendar = (calendars or {}).get(calendar_id) or BusinessCalendar.objects.filter(
            pk=calendar_id
        ).first()
        if calendar is not None:
            from .business_hours import next_business_start

            due = next_business_start(calendar, due)
    return due


def next_position(plan: Plan, step_index: int, round_: int) -> tuple[int, int] | None:
    """The (step, round) after this one, or None when the plan is spent."""
    steps = plan.get("steps") or []
    if step_index + 1 < len(steps):
        return step_index + 1, round_
    if round_ < plan.get("repeat", 0) and steps:
        return 0, round_ + 1
    return None


def schedule(plan: Plan, started_at: datetime) -> list[tuple[int, int, datetime]]:
    """Every (step, round, due time) of a plan in order: what `simulate_escalation` prints."""
    out: list[tuple[int, int, datetime]] = []
    position: tuple[int, int] | None = (0, 0) if plan.get("steps") else None
    while position is not None:
        due = step_due_at(plan, started_at, *position)
        if due is None:
            break
        out.append((position[0], position[1], due))
        position = next_position(plan, *position)
    return out
