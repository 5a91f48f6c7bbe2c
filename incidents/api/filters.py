"""Query-string filters of the incident and alert lists (django-filter).

Every filter names its column and lookup. An unknown slug, level, reference or a malformed
value is a 400 naming the parameter, never an empty list that hides a typo.
"""

from __future__ import annotations

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django.db.models import Q

from escalation.models import Team

from ..models import (
    OPEN_STATUSES,
    Alert,
    AlertStatus,
    Incident,
    IncidentStatus,
    Integration,
    Service,
    Severity,
)

# Longer searches are refused rather than scanned for.
MAX_SEARCH_LENGTH = 200


class StrictBooleanField(forms.NullBooleanField):
    """true/false (or 1/0); anything else is an error rather than "no filter"."""

    VALUES = {"true": True, "1": True, "false": False, "0": False}

    def to_python(self, value):
        if value in (None, ""):
            return None
        if isinstance(value, bool):
            return value
        try:
            return self.VALUES[str(value).strip().lower()]
        except KeyError:
            raise ValidationError("Give true or false.", code="invalid") from None

    def validate(self, value):
        pass


class BooleanFilter(django_filters.BooleanFilter):
    field_class = StrictBooleanField

    def __init__(self, *args, **kwargs):
        # The default select widget turns an unknown value into "no filter" before the field
        # sees it.
        kwargs.setdefault("widget", forms.TextInput)
        super().__init__(*args, **kwargs)


class IncidentFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(
        field_name="status",
        lookup_expr="exact",
        choices=IncidentStatus.choices,
        # One row per incident either way; DISTINCT would make PostgreSQL sort every
        # matching row before it can take a page.
        distinct=False,
        help_text="One or more statuses: ?status=triggered&status=acknowledged.",
    )
    severity = django_filters.ModelChoiceFilter(
        field_name="severity",
        lookup_expr="exact",
        to_field_name="level",
        queryset=Severity.objects.all(),
        help_text="A severity level, e.g. 1.",
    )
    service = django_filters.ModelChoiceFilter(
        field_name="services",
        lookup_expr="exact",
        to_field_name="slug",
        queryset=Service.objects.all(),
        help_text="A service slug: incidents affecting it.",
    )
    team = django_filters.ModelChoiceFilter(
        field_name="team",
        lookup_expr="exact",
        to_field_name="slug",
        queryset=Team.objects.all(),
        help_text="A team slug.",
    )
    created_after = django_filters.IsoDateTimeFilter(
        field_name="created_at",
        lookup_expr="gte",
        help_text="Declared at or after this ISO 8601 time.",
    )
    created_before = django_filters.IsoDateTimeFilter(
        field_name="created_at",
        lookup_expr="lt",
        help_text="Declared before this ISO 8601 time.",
    )
    is_drill = BooleanFilter(
        field_name="is_drill", lookup_expr="exact", help_text="true: drills only; false: real."
    )
    open = BooleanFilter(
        method="filter_open",
        help_text="true: triggered up to monitoring; false: resolved or closed.",
    )
    q = django_filters.CharFilter(
        method="filter_search",
        max_length=MAX_SEARCH_LENGTH,
        help_text="Words in the title (case-insensitive), or an exact reference (INC-12).",
    )

    class Meta:
        model = Incident
        fields: list[str] = []

    def filter_open(self, queryset, name, value):
        if value is None:
            return queryset
        condition = Q(status__in=OPEN_STATUSES)
        return queryset.filter(condition) if value else queryset.exclude(condition)

    def filter_search(self, queryset, name, value):
        value = value.strip()
        if not value:
            return queryset
        return queryset.filter(Q(title__icontains=value) | Q(reference__iexact=value))


class AlertFilter(django_filters.FilterSet):
    integration = django_filters.ModelChoiceFilter(
        field_name="integration",
        lookup_expr="exact",
        queryset=Integration.objects.all(),
        help_text="An integration id.",
    )
    status = django_filters.ChoiceFilter(
        field_name="status", lookup_expr="exact", choices=AlertStatus.choices
    )
    incident = django_filters.ModelChoiceFilter(
        field_name="incident",
        lookup_expr="exact",
        to_field_name="reference",
        queryset=Incident.objects.all(),
        help_text="An incident reference, e.g. INC-12.",
    )
    fingerprint = django_filters.CharFilter(
        field_name="fingerprint", lookup_expr="exact", max_length=255
    )

    class Meta:
        model = Alert
        fields: list[str] = []
