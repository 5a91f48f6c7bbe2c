from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.urls import reverse

from incidents.models import (
    OPEN_STATUSES,
    EventKind,
    Incident,
    IncidentStatus,
    Service,
    Severity,
    TimelineEvent,
)

from .factories import SeverityFactory, declare

pytestmark = pytest.mark.django_db


def test_load_demo_twice_creates_everything_once_and_prints_the_login():
    out = StringIO()
    call_command("load_demo", "--admin-url", "http://127.0.0.1:8000/admin/", stdout=out)
    counts = (Incident.objects.count(), TimelineEvent.objects.count(), Service.objects.count())
    call_command("load_demo", stdout=StringIO())

    assert (Incident.objects.count(), TimelineEvent.objects.count(), Service.objects.count()) == (
        counts
    )
    assert counts[0] == 12
    assert "Admin:  http://127.0.0.1:8000/admin/" in out.getvalue()
    assert "Login:  admin / incident-demo" in out.getvalue()
    assert get_user_model().objects.get(username="admin").check_password("incident-demo")
    assert list(Severity.objects.values_list("name", flat=True)) == ["Sev1", "Sev2", "Sev3", "Sev4"]


def test_demo_incidents_cover_every_status_with_real_timelines():
    call_command("load_demo", stdout=StringIO())
    statuses = set(Incident.objects.values_list("status", flat=True))
    assert statuses >= {
        IncidentStatus.TRIGGERED,
        IncidentStatus.INVESTIGATING,
        IncidentStatus.MITIGATING,
        IncidentStatus.MONITORING,
        IncidentStatus.RESOLVED,
        IncidentStatus.CLOSED,
    }
    for incident in Incident.objects.all():
        kinds = list(incident.timeline.values_list("kind", flat=True))
        assert kinds[0] == EventKind.DECLARED
        moves = incident.timeline.exclude(
            kind__in=[
                EventKind.DECLARED,
                EventKind.NOTE,
                EventKind.ROLE_ASSIGNED,
                EventKind.STATUS_UPDATE,
            ]
        ).order_by("pk")
        # The timeline replays to the stored status.
        assert (moves.last().value if moves else IncidentStatus.TRIGGERED) == incident.status
    reopened = Incident.objects.get(title="API error rate 8% after deploy")
    assert reopened.reopened_count == 1
    assert reopened.status in OPEN_STATUSES
    assert Incident.objects.filter(is_drill=True).count() == 1


def test_date_drill_down_offers_the_months_in_range_without_scanning(admin_client):
    severity = SeverityFactory(level=3)
    for month in (1, 3):
        declare(severity=severity, now=datetime(2026, month, 10, 12, tzinfo=UTC))
    declare(severity=severity, now=datetime(2025, 12, 30, 12, tzinfo=UTC))
    url = reverse("admin:incidents_incident_changelist")

    html = admin_client.get(url).content.decode()
    assert "created_at__year=2025" in html
    assert "created_at__year=2026" in html

    html = admin_client.get(url + "?created_at__year=2026").content.decode()
    assert "January 2026" in html
    assert "February 2026" in html  # in range, though empty
    assert "March 2026" in html
    assert "April 2026" not in html

    html = admin_client.get(url + "?created_at__year=2026&created_at__month=3").content.decode()
    assert "March 10" in html
    assert "March 11" not in html

    # An impossible date is refused the admin's usual way (?e=1), not with a 500.
    response = admin_client.get(url + "?created_at__year=2026&created_at__month=13")
    assert response.status_code == 302
    assert response.url.endswith("?e=1")


def test_deadline_rows_are_visible_to_the_breached_filter_after_time_passes(client, admin_user):
    declared = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    url = reverse("admin:incidents_incident_changelist")
    with time_machine.travel(declared, tick=False) as clock:
        client.force_login(admin_user)
        incident = declare()  # Sev1: acknowledge within 15 minutes
        html = client.get(url).content.decode()
        assert "acknowledge: 15m left" in html

        clock.shift(timedelta(minutes=14, seconds=59))
        assert incident.reference not in client.get(url + "?breached=yes").content.decode()
        html = client.get(url + "?breached=no").content.decode()
        assert incident.reference in html
        assert "acknowledge: 1s left" in html

        clock.shift(timedelta(seconds=1))  # exactly due: breached from now on
        assert incident.reference in client.get(url + "?breached=yes").content.decode()

        clock.shift(timedelta(minutes=5))
        html = client.get(url + "?breached=yes").content.decode()
        assert incident.reference in html
        assert "acknowledge: breached by 5m" in html
        assert incident.reference not in client.get(url + "?breached=no").content.decode()
