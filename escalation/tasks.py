"""Celery tasks: thin wrappers that take ids and call a service."""

from __future__ import annotations

from celery import shared_task

from . import services


@shared_task(name="escalation.engine_tick", ignore_result=True)
def engine_tick() -> dict:
    """Beat, every ENGINE_TICK_SECONDS: one pass of the engine (idempotent)."""
    report = services.engine_tick()
    return {"pages_created": report.pages_created, "queued": len(report.queued)}


@shared_task(
    name="escalation.deliver_page",
    ignore_result=True,
    acks_late=True,
    soft_time_limit=60,
    time_limit=90,
)
def deliver_page(page_id: int) -> str:
    """Deliver one page (idempotent: a page that is not pending is left alone)."""
    return services.page_deliver(page_id=page_id)


@shared_task(name="escalation.audit_escalations", ignore_result=True)
def audit_escalations() -> int:
    """Beat: report escalations overdue by more than ESCALATION_OVERDUE_AFTER."""
    return services.audit_escalations()


@shared_task(name="escalation.notify_handoffs", ignore_result=True)
def notify_handoffs() -> int:
    """Beat, every minute: tell incoming on-call people before their shift (once each)."""
    return services.notify_handoffs()


@shared_task(name="escalation.weekly_summaries", ignore_result=True)
def weekly_summaries() -> int:
    """Beat, weekly: each team's on-call summary (once per team and ISO week)."""
    return services.send_weekly_summaries()
