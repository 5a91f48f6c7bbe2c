"""Project-wide API plumbing: the one place domain errors become HTTP answers, and the
default pagination.

Every error body has the same shape: `{"detail": "<what is wrong>", "code": "<kind>"}`, plus
`"field": "<name>"` when one field is at fault, or DRF's usual `{field: [reasons]}` for a
serializer's validation errors.
"""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, IntegrityError, InterfaceError, OperationalError
from rest_framework import pagination, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from incidents.exceptions import ConcurrentChange, DomainError, InvalidInput, InvalidTransition

logger = logging.getLogger(__name__)


class PageNumberPagination(pagination.PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 200


class CursorPagination(pagination.CursorPagination):
    """For the big, growing tables (incidents, alerts): the cost of a page does not depend
    on how deep it is, and rows added meanwhile do not shift pages."""

    page_size_query_param = "page_size"
    max_page_size = 200
    ordering = "-pk"


def _body(detail: str, code: str, field: str | None = None) -> dict:
    body = {"detail": detail, "code": code}
    if field:
        body["field"] = field
    return body


def exception_handler(exc, context):
    """DRF's handler, plus: InvalidInput -> 400 naming the field, InvalidTransition -> 409,
    ConcurrentChange -> 409, other domain errors -> 400, Django's ValidationError -> 400,
    a value the database refuses (DataError) -> 400,
    an integrity conflict -> 409, an unreachable database -> 503 (senders retry)."""
    if isinstance(exc, InvalidInput):
        return Response(_body(str(exc), "invalid", exc.field), status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, InvalidTransition):
        return Response(_body(str(exc), "invalid_transition"), status=status.HTTP_409_CONFLICT)
    if isinstance(exc, ConcurrentChange):
        return Response(_body(str(exc), "concurrent_change"), status=status.HTTP_409_CONFLICT)
    if isinstance(exc, DomainError):
        return Response(_body(str(exc), "refused"), status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, DjangoValidationError):
        if hasattr(exc, "error_dict"):
            detail = {field: [str(m) for m in msgs] for field, msgs in exc.message_dict.items()}
        else:
            detail = {"detail": " ".join(exc.messages), "code": "invalid"}
        return Response(detail, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, DjangoPermissionDenied):
        return Response(
            _body(str(exc) or "You may not do this.", "permission_denied"),
            status=status.HTTP_403_FORBIDDEN,
        )
    if isinstance(exc, DataError):
        # A value the database cannot hold (a NUL character, a number out of range) that
        # slipped past a field's validation: the request is at fault, not the server.
        logger.info("data error answered with 400: %s", exc)
        return Response(
            _body("A value in the request cannot be stored or searched for.", "invalid"),
            status=status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, IntegrityError):
        logger.info("integrity conflict answered with 409: %s", exc)
        return Response(
            _body("This conflicts with existing data; reload and retry.", "conflict"),
            status=status.HTTP_409_CONFLICT,
        )
    if isinstance(exc, OperationalError | InterfaceError):
        logger.warning("database unavailable: %s", exc)
        response = Response(
            _body("The database cannot be reached; retry later.", "unavailable"),
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
        response["Retry-After"] = "30"
        return response
    return drf_exception_handler(exc, context)
