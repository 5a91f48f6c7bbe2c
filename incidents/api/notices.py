"""Customer notices in the API, read-only (docs/notices.md, docs/api.md).

- `GET /api/v1/notices/` (`?incident=<reference>`, `?status=`): notices, newest first, each
  with its deliveries counted by state. Any authenticated user.
- `GET /api/v1/notices/<id>/`: one notice.
- `GET /api/v1/notices/<id>/deliveries/`: one row per recipient. These carry customers'
  email addresses: users with `incidents.view_noticedelivery` (and superusers) only, the
  admin's rule too. Being staff is not enough: every admin user, Viewers included, is staff.

Notices are composed and sent in the admin.
"""

from __future__ import annotations

import django_filters
from django.db.models import Count
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import BasePermission
from rest_framework.response import Response

from config.api import CursorPagination

from ..comms.notices import may_see_addresses
from ..models import CustomerNotice, DeliveryState, Incident, NoticeDelivery, NoticeStatus
from .permissions import refusal


class NoticeFilter(django_filters.FilterSet):
    incident = django_filters.ModelChoiceFilter(
        field_name="incident",
        lookup_expr="exact",
        to_field_name="reference",
        queryset=Incident.objects.all(),
        help_text="An incident reference, e.g. INC-12: the notices about it.",
    )
    status = django_filters.ChoiceFilter(
        field_name="status", lookup_expr="exact", choices=NoticeStatus.choices
    )

    class Meta:
        model = CustomerNotice
        fields: list[str] = []


class DeliveryCountsSerializer(serializers.Serializer):
    pending = serializers.IntegerField()
    sending = serializers.IntegerField()
    sent = serializers.IntegerField()
    failed = serializers.IntegerField()
    unknown = serializers.IntegerField()


class NoticeSerializer(serializers.ModelSerializer):
    incident = serializers.SlugRelatedField(slug_field="reference", read_only=True)
    services = serializers.SlugRelatedField(slug_field="slug", many=True, read_only=True)
    deliveries = serializers.SerializerMethodField()

    class Meta:
        model = CustomerNotice
        fields = [
            "id",
            "kind",
            "incident",
            "maintenance",
            "subject",
            "status",
            "services",
            "recipients",
            "deliveries",
            "created_at",
            "send_requested_at",
            "sent_at",
        ]
        read_only_fields = fields

    @extend_schema_field(DeliveryCountsSerializer)
    def get_deliveries(self, notice: CustomerNotice) -> dict[str, int]:
        counts = self.context.get("delivery_counts", {}).get(notice.pk, {})
        return {state: counts.get(state, 0) for state in DeliveryState.values}


class DeliverySerializer(serializers.ModelSerializer):
    sent_at = serializers.SerializerMethodField(
        help_text="When the mail server accepted the message; null unless sent (the column "
        "holds other times in other states)."
    )

    class Meta:
        model = NoticeDelivery
        fields = ["id", "email", "status", "attempts", "error", "sent_at", "message_id"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.DATETIME)
    def get_sent_at(self, delivery: NoticeDelivery):
        # While sending, the column holds when the attempt started, and while pending after
        # a failed attempt when the next one is due: neither is a sending time.
        if delivery.status != DeliveryState.SENT or delivery.sent_at is None:
            return None
        return serializers.DateTimeField().to_representation(delivery.sent_at)


class CanViewDeliveries(BasePermission):
    message = refusal(
        "Deliveries list customers' addresses: users with incidents.view_noticedelivery only.",
        "missing_permission",
    )

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        if view.action != "deliveries":
            return True
        return may_see_addresses(user)


class NoticePagination(CursorPagination):
    ordering = "-pk"


class DeliveryPagination(CursorPagination):
    ordering = "pk"


@extend_schema(tags=["customer notices"])
class NoticeViewSet(viewsets.ReadOnlyModelViewSet):
    """Customer notices, newest first, with their deliveries counted by state."""

    serializer_class = NoticeSerializer
    permission_classes = [CanViewDeliveries]
    pagination_class = NoticePagination
    filterset_class = NoticeFilter
    lookup_value_regex = r"[0-9]{1,18}"

    def get_queryset(self):
        return CustomerNotice.objects.select_related("incident").prefetch_related("services")

    def filter_queryset(self, queryset):
        # The deliveries action lists rows of one notice: the list's filters do not apply.
        return super().filter_queryset(queryset) if self.action == "list" else queryset

    def _with_counts(self, notices: list[CustomerNotice]) -> dict:
        """The deliveries of these notices counted by state: one query for the page."""
        counts: dict[int, dict[str, int]] = {}
        rows = (
            NoticeDelivery.objects.filter(notice_id__in=[n.pk for n in notices])
            .order_by()
            .values_list("notice_id", "status")
            .annotate(n=Count("pk"))
        )
        for notice_id, status, n in rows:
            counts.setdefault(notice_id, {})[status] = n
        return {**self.get_serializer_context(), "delivery_counts": counts}

    def list(self, request, *args, **kwargs):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        serializer = NoticeSerializer(page, many=True, context=self._with_counts(page))
        return self.get_paginated_response(serializer.data)

    def retrieve(self, request, *args, **kwargs):
        notice = self.get_object()
        serializer = NoticeSerializer(notice, context=self._with_counts([notice]))
        return Response(serializer.data)

    @extend_schema(
        summary="A notice's deliveries, one per recipient (needs view_noticedelivery)",
        responses={
            200: DeliverySerializer(many=True),
            403: OpenApiResponse(OpenApiTypes.OBJECT, description="Not allowed; says why."),
            404: OpenApiResponse(OpenApiTypes.OBJECT, description="No such notice."),
        },
        filters=False,
    )
    @action(detail=True, methods=["get"], pagination_class=DeliveryPagination)
    def deliveries(self, request, pk=None):
        notice = self.get_object()
        rows = NoticeDelivery.objects.filter(notice_id=notice.pk).only(
            "pk", "email", "status", "attempts", "error", "sent_at", "message_id"
        )
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(DeliverySerializer(page, many=True).data)
