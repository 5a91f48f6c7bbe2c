"""The alert webhooks: Alertmanager, Events v2, generic JSON, heartbeats.

Each view authenticates the integration by its token (in the path, or `Authorization:
Bearer`), throttles, bounds the body, parses and validates it completely, and stores it as
received (`intake.accept`: one committed INSERT) before answering 202; a worker applies it
within about a second (incidents/ingestion/intake.py). Answers: 2xx only for what was
stored; 400 (naming the field) for input that will never be valid, with nothing stored;
404 for an unknown token; 413 for a body over the limit; 429 past the integration's rate
limit; 503 when the database cannot be reached, so the sender retries. Heartbeats are
applied at once (they are rare and tiny).
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError
from django.http import JsonResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.views import APIView

from incidents.exceptions import InvalidInput
from incidents.ingestion import intake, payloads, services
from incidents.models import Integration, IntegrationKind

logger = logging.getLogger(__name__)


class Refused(Exception):
    def __init__(self, status: int, detail: str, code: str, field: str = "") -> None:
        self.status, self.detail, self.code, self.field = status, detail, code, field
        super().__init__(detail)


def _bearer(request) -> str:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _read_body(request) -> bytes:
    limit = settings.ALERT_MAX_BODY_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise Refused(413, f"The body is {declared} bytes; at most {limit}.", "too_large")
    body = getattr(request, "_request", request).read(limit + 1)
    if len(body) > limit:
        raise Refused(413, f"The body is over {limit} bytes.", "too_large")
    return body


def _error_body(error: Refused) -> dict:
    body = {"detail": error.detail, "code": error.code}
    if error.field:
        body["field"] = error.field
    return body


RESPONSES = {
    400: OpenApiResponse(OpenApiTypes.OBJECT, description="Invalid; names the field."),
    404: OpenApiResponse(OpenApiTypes.OBJECT, description="Unknown or inactive token."),
    413: OpenApiResponse(OpenApiTypes.OBJECT, description="Body too large."),
    429: OpenApiResponse(OpenApiTypes.OBJECT, description="Rate limit passed."),
    503: OpenApiResponse(OpenApiTypes.OBJECT, description="Not stored; retry."),
}


class WebhookView(APIView):
    """Shared flow; subclasses say which kind they accept and how to parse.

    An APIView for the schema (drf-spectacular reads the class), but requests skip DRF's
    dispatch: no request wrapping, authentication classes, content negotiation or response
    rendering, which a webhook does not use (it authenticates by its own token, reads raw
    bytes and always answers JSON). Senders drop alerts on a 4xx, so no Accept header can
    earn a 406 either. That is a third of the request's CPU on the hot path."""

    def dispatch(self, request, *args, **kwargs):
        self.args, self.kwargs, self.request = args, kwargs, request
        method = request.method.lower()
        handler = getattr(self, method, None) if method in self.http_method_names else None
        if handler is None or method == "options":
            response = JsonResponse({"detail": f"Method {request.method} not allowed."}, status=405)
            response["Allow"] = ", ".join(m for m in self.allowed_methods if m != "OPTIONS")
            return response
        return handler(request, *args, **kwargs)

    authentication_classes: list = []
    permission_classes = [AllowAny]
    kind: str | None = ""
    success_status = 202

    def parse(self, data) -> payloads.Delivery:
        raise NotImplementedError

    def stored_body(self, body: bytes, data, delivery: payloads.Delivery) -> str:
        """What is stored for the worker: the body as received."""
        return body.decode()

    def error_body(self, error: Refused) -> dict:
        return _error_body(error)

    def error_response(self, error: Refused) -> JsonResponse:
        response = JsonResponse(self.error_body(error), status=error.status)
        if error.status in (429, 503):
            response["Retry-After"] = "60" if error.status == 429 else "30"
        return response

    def success_response(self, result: dict, token_key: str) -> JsonResponse:
        return JsonResponse(result, status=self.success_status)

    token_in_body = False
    # Alert webhooks keep the integrations they authenticate for a few seconds per process
    # (services.cached_integration); heartbeats, which write to the row, read it afresh.
    cached = True

    def authenticate(self, token: str) -> Integration:
        if not token:
            raise Refused(403, "No token: put it in the URL or Authorization: Bearer.", "auth")
        if self.cached:
            integration = services.cached_integration(token, kind=self.kind)
        else:
            integration = services.integration_by_token(token, kind=self.kind)
        if integration is None:
            raise Refused(404, "Unknown integration key.", "unknown_key")
        if not services.throttle_allows(integration):
            services.count_rejected(integration)
            raise Refused(
                429, f"More than {integration.rate_limit} requests this minute.", "throttled"
            )
        return integration

    def handle(self, request, token: str) -> dict:
        integration: Integration | None = None
        if not self.token_in_body:
            # Unknown tokens are refused before the body is even read.
            integration = self.authenticate(token or _bearer(request))
        try:
            body = _read_body(request)
            data = payloads.parse_json(body)
            if integration is None:
                key = token or _bearer(request)
                if not key and isinstance(data, dict) and isinstance(data.get("routing_key"), str):
                    key = data["routing_key"]
                if not key:
                    raise payloads.PayloadError("routing_key", "is required.")
                integration = self.authenticate(key)
            delivery = self.parse(data)
        except payloads.PayloadError as error:
            if integration is not None:
                services.count_rejected(integration)
            raise Refused(400, str(error), "invalid", error.path) from error
        except Refused as error:
            if integration is not None and error.status == 413:
                services.count_rejected(integration)
            raise
        delivery_id = intake.accept(
            integration=integration,
            body=self.stored_body(body, data, delivery),
            alerts=len(delivery.alerts),
        )
        return {"status": "accepted", "delivery": delivery_id, "alerts": len(delivery.alerts)}

    def post(self, request, token: str = ""):
        try:
            result = self.handle(request, token)
        except Refused as error:
            return self.error_response(error)
        except InvalidInput as error:
            return self.error_response(Refused(400, str(error), "invalid", error.field))
        except (OperationalError, InterfaceError):
            logger.warning("alert not stored: database unavailable", exc_info=True)
            return self.error_response(
                Refused(503, "Not stored: the database cannot be reached; retry.", "unavailable")
            )
        except IntegrityError:
            # Lost the race with concurrent deliveries of the same alerts more often than
            # the service retries: nothing wrong with the input, so the sender retries.
            logger.warning("alert not stored: repeated conflicts", exc_info=True)
            return self.error_response(
                Refused(503, "Not stored: concurrent deliveries conflicted; retry.", "conflict")
            )
        except services.NotConfigured as error:
            logger.error("alert not stored: %s", error)
            return self.error_response(
                Refused(503, f"Not stored: {error} Retry later.", "not_configured")
            )
        return self.success_response(result, token)


TOKEN_PARAM = OpenApiParameter(
    "token", OpenApiTypes.STR, OpenApiParameter.PATH, description="The integration's token."
)


class AlertmanagerWebhook(WebhookView):
    """Prometheus Alertmanager webhook, version 4."""

    kind = IntegrationKind.ALERTMANAGER

    def parse(self, data):
        return payloads.parse_alertmanager(data)

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses={202: OpenApiTypes.OBJECT, **RESPONSES},
        parameters=[TOKEN_PARAM],
        summary="Alertmanager webhook (v4)",
        auth=[],
    )
    def post(self, request, token: str = ""):
        return super().post(request, token)


class GenericWebhook(WebhookView):
    """The tracker's own JSON format (docs/alerts.md)."""

    kind = IntegrationKind.GENERIC

    def parse(self, data):
        return payloads.parse_generic(data)

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses={202: OpenApiTypes.OBJECT, **RESPONSES},
        parameters=[TOKEN_PARAM],
        summary="Generic JSON alert webhook",
        auth=[],
    )
    def post(self, request, token: str = ""):
        return super().post(request, token)


class EventsV2Enqueue(WebhookView):
    """PagerDuty Events API v2 shape: `routing_key` is the integration token. Answers as
    that API does: 202 with the dedup key, 400 with `status`, `message` and `errors`."""

    kind = IntegrationKind.EVENTS_V2
    success_status = 202
    token_in_body = True

    dedup_key = ""

    def parse(self, data):
        delivery = payloads.parse_events_v2(data)[1]
        self.dedup_key = delivery.alerts[0].fingerprint
        return delivery

    def stored_body(self, body, data, delivery):
        return intake.stored_events_v2_body(data, self.dedup_key)

    def error_body(self, error: Refused) -> dict:
        status = "invalid event" if error.status == 400 else error.code
        message = "Event object is invalid" if error.status == 400 else error.detail
        body = {"status": status, "message": message, "errors": [error.detail]}
        if error.field:
            body["field"] = error.field
        return body

    def success_response(self, result, token_key):
        return JsonResponse(
            {"status": "success", "message": "Event processed", "dedup_key": self.dedup_key},
            status=202,
        )

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses={202: OpenApiTypes.OBJECT, **RESPONSES},
        summary="Events v2 enqueue (PagerDuty-style)",
        auth=[],
    )
    def post(self, request, token: str = ""):
        return super().post(request, token)


class HeartbeatView(WebhookView):
    """`POST` (or `GET`, for the simplest cron jobs) `/api/v1/integrations/<token>/heartbeat/`.

    Any kind of integration may send heartbeats, when it has a heartbeat interval."""

    kind = None  # any kind
    cached = False
    success_status = 200

    def handle(self, request, token: str) -> services.IngestResult:
        token = token or _bearer(request)
        if not token:
            # No body to carry a token: an absent one is as unknown as a wrong one.
            raise Refused(404, "Unknown integration key.", "unknown_key")
        return services.heartbeat_ping(integration=self.authenticate(token))

    def success_response(self, result: services.IngestResult, token_key: str) -> JsonResponse:
        return JsonResponse({"status": "ok", **result.as_dict()})

    @extend_schema(request=None, responses={200: OpenApiTypes.OBJECT, **RESPONSES}, auth=[])
    def post(self, request, token: str = ""):
        return super().post(request, token)

    @extend_schema(request=None, responses={200: OpenApiTypes.OBJECT, **RESPONSES}, auth=[])
    def get(self, request, token: str = ""):
        return super().post(request, token)
