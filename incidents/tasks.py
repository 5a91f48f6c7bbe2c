"""Celery tasks: thin wrappers that call a service."""

from __future__ import annotations

from celery import shared_task

from .exceptions import RetryLater
from .ingestion import intake
from .ingestion import services as ingestion


@shared_task(name="incidents.check_heartbeats", ignore_result=True)
def check_heartbeats() -> int:
    """Beat, every HEARTBEAT_CHECK_SECONDS: open an incident for each integration whose
    heartbeat is overdue (idempotent: each missed heartbeat is claimed once)."""
    return ingestion.heartbeats_check()


@shared_task(name="incidents.apply_alert_deliveries", ignore_result=True)
def apply_alert_deliveries() -> int:
    """Beat, every ALERT_APPLY_SECONDS: apply accepted alert deliveries, oldest first per
    integration (safe in several workers at once; see incidents/ingestion/intake.py)."""
    return intake.deliveries_apply().applied


# --- status updates: reminders and the chat webhook (incidents/comms/updates.py) -------------


def _retrying(task, call, **kwargs):
    """Run a task's service call; on a temporary failure (RetryLater), retry the task with
    `_backoff`."""
    try:
        return call(**kwargs)
    except RetryLater as error:
        raise task.retry(exc=error, countdown=_backoff(task.request.retries)) from error


def _backoff(retries: int) -> int:
    """Seconds before retry number `retries` + 1: 30 s, 1, 2, 4, 8 min."""
    return min(30 * 2**retries, 600)


@shared_task(
    name="incidents.send_update_reminder",
    bind=True,
    ignore_result=True,
    acks_late=True,
    max_retries=5,
    soft_time_limit=60,
    time_limit=90,
)
def send_update_reminder(self, incident_id: int, due_at: str) -> str:
    """Remind the incident's Communications Lead of the overdue update due at `due_at`
    (idempotent: sent at most once per incident and due time); retried with backoff."""
    from .comms import updates

    return _retrying(self, updates.update_reminder_send, incident_id=incident_id, due_at=due_at)


@shared_task(name="incidents.requeue_update_reminders", ignore_result=True)
def requeue_update_reminders() -> int:
    """Beat, every minute: queue again reminders whose queueing was lost (see
    `updates.update_reminders_requeue`)."""
    from .comms import updates

    return len(updates.update_reminders_requeue())


@shared_task(
    name="incidents.post_chat_message",
    bind=True,
    ignore_result=True,
    acks_late=True,
    max_retries=5,
    soft_time_limit=60,
    time_limit=90,
)
def post_chat_message(self, incident_id: int, kind: str, update_id: int | None = None) -> str:
    """Post an incident's chat message (initial, update, resolution) to its team's
    webhook; temporary failures are retried with backoff."""
    from .comms import updates

    return _retrying(
        self, updates.chat_post, incident_id=incident_id, kind=kind, update_id=update_id
    )


# --- customer notices (incidents.comms.notices) ---------------------------------------------


@shared_task(
    name="incidents.send_subscriber_confirmation",
    bind=True,
    ignore_result=True,
    acks_late=True,
    max_retries=4,
    soft_time_limit=60,
    time_limit=90,
)
def send_subscriber_confirmation(self, subscriber_id: int) -> bool:
    """Send a subscriber's confirmation email (double opt-in); retried with backoff on a
    temporary mail failure. A duplicate is harmless: either link confirms."""
    from .comms import notices

    return _retrying(self, notices.subscriber_send_confirmation, subscriber_id=subscriber_id)


@shared_task(
    name="incidents.send_subscription_change",
    bind=True,
    ignore_result=True,
    acks_late=True,
    max_retries=4,
    soft_time_limit=60,
    time_limit=90,
)
def send_subscription_change(
    self, subscriber_id: int, service_ids: list[int], all_services: bool
) -> bool:
    """Mail an active subscriber the link confirming the services it asked to add; retried
    with backoff on a temporary mail failure. A duplicate is harmless: the change is
    idempotent."""
    from .comms import notices

    return _retrying(
        self,
        notices.subscriber_send_change,
        subscriber_id=subscriber_id,
        service_ids=service_ids,
        all_services=all_services,
    )


@shared_task(
    name="incidents.deliver_notice_batch",
    ignore_result=True,
    acks_late=True,
    soft_time_limit=100,
    time_limit=120,
)
def deliver_notice_batch(notice_id: int, mode: str = "first") -> dict:
    """Send one batch of a notice's pending deliveries over one SMTP connection
    (idempotent: only pending rows are claimed, so a redelivered task mails nobody twice)."""
    from .comms import notices

    return notices.notice_deliver_batch(notice_id=notice_id, mode=mode).as_dict()


@shared_task(name="incidents.notices_sweep", ignore_result=True)
def notices_sweep() -> dict:
    """Beat: stuck sends become unknown, lost batches are queued again, finished notices
    are closed (idempotent)."""
    from .comms import notices

    return notices.notices_sweep()


@shared_task(name="incidents.prune_alert_deliveries", ignore_result=True)
def prune_alert_deliveries() -> int:
    """Beat, hourly: delete applied alert deliveries past ALERT_DELIVERY_RETENTION."""
    return intake.deliveries_prune()
