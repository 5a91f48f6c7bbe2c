"""The demo's alerting: the Pivotal Flow runbooks and routes, and an Alertmanager
integration whose token is printed only by the run that creates it."""

import json
import re
from io import StringIO
from urllib.parse import urlsplit

import pytest
from django.urls import reverse

from incidents.demo import ALERT_ROUTES, DEMO_INTEGRATION, load_demo
from incidents.ingestion import intake
from incidents.ingestion.services import integration_by_token
from incidents.models import AlertRoute, Incident, Integration, Runbook

from .factories import alertmanager_body

pytestmark = pytest.mark.django_db


def test_demo_runbooks_and_routes_follow_the_pivotal_flow_mapping():
    load_demo(out=StringIO())

    assert list(Runbook.objects.values_list("code", "title", "severity__level")) == [
        ("RB-01", "Backend service down", 1),
        ("RB-02", "Database issues", 2),
        ("RB-03", "Cache issues", 2),
    ]
    routes = {
        r.alert_name: (r.runbook.code, r.severity.name)
        for r in AlertRoute.objects.select_related("runbook", "severity")
    }
    assert routes == {
        "BackendServiceDown": ("RB-01", "Sev1"),
        "HighErrorRate": ("RB-01", "Sev3"),
        "SlowRequests": ("RB-01", "Sev3"),
        "DatabaseSlowQueries": ("RB-02", "Sev3"),
        "DatabaseHighConnections": ("RB-02", "Sev3"),
        "DatabaseConnectionFailure": ("RB-02", "Sev1"),
        "RedisHighEvictions": ("RB-03", "Sev3"),
        "RedisConnectionFailure": ("RB-03", "Sev1"),
        "CacheLowHitRate": ("RB-03", "Sev3"),
        "RedisHighMemoryUsage": ("RB-03", "Sev3"),
    }
    assert len(ALERT_ROUTES) == 10
    assert all(r.steps.strip() for r in Runbook.objects.all())


def test_demo_integration_token_is_printed_once_and_routes_alerts(client):
    first, second = StringIO(), StringIO()
    counts = load_demo(out=first)
    again = load_demo(out=second)

    assert counts["integrations"] == 1
    assert again == dict.fromkeys(again, 0)
    [url] = re.findall(r"http\S+/alertmanager/", first.getvalue())
    assert second.getvalue() == ""
    token = url.split("/integrations/", 1)[1].split("/", 1)[0]
    assert integration_by_token(token) == Integration.objects.get(name=DEMO_INTEGRATION)

    response = client.post(
        urlsplit(url).path,
        data=json.dumps(alertmanager_body({"labels": {"alertname": "RedisConnectionFailure"}})),
        content_type="application/json",
    )
    assert response.status_code == 202
    assert intake.deliveries_apply().applied == 1
    incident = Incident.objects.get(alerts__name="RedisConnectionFailure")
    assert (incident.runbook.code, incident.severity.level) == ("RB-03", 1)
    assert reverse("webhook-alertmanager", args=[token]) in url
