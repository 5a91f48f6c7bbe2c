"""GET /healthz: liveness and dependencies, for load balancers and monitors."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from kombu import Connection

logger = logging.getLogger(__name__)


def database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError:
        logger.warning("healthz: the database did not answer", exc_info=True)
        return False
    return True


def broker_ok() -> bool:
    """Connect to the broker once, briefly. Down delays work but loses nothing (DESIGN.md)."""
    try:
        with Connection(
            settings.CELERY_BROKER_URL,
            connect_timeout=settings.HEALTHZ_BROKER_TIMEOUT,
            transport_options=settings.CELERY_BROKER_TRANSPORT_OPTIONS,
        ) as conn:
            conn.ensure_connection(max_retries=1, timeout=settings.HEALTHZ_BROKER_TIMEOUT)
    except Exception:  # noqa: BLE001 - any failure to connect means "down"
        logger.warning("healthz: the broker did not answer", exc_info=True)
        return False
    return True


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    database = database_ok()
    body: dict = {
        "database": "ok" if database else "down",
        "broker": "ok" if broker_ok() else "down",
    }
    if database:
        from escalation.services import escalations_overdue

        # The auditor's figure: escalations more than ESCALATION_OVERDUE_AFTER late.
        body["escalations_overdue"] = escalations_overdue().count()
    return JsonResponse(body, status=200 if database else 503)
