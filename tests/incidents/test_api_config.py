"""The configuration endpoints of the incidents app: severities (read; staff change targets
and cadence), services, runbooks, alert routes and integrations."""

from __future__ import annotations

from datetime import timedelta

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from incidents.models import Severity
from tests.incidents.factories import (
    AlertRouteFactory,
    RunbookFactory,
    ServiceFactory,
    SeverityFactory,
    TeamFactory,
    UserFactory,
    integration,
)

pytestmark = pytest.mark.django_db


def client_for(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def viewer():
    return client_for(UserFactory(username="vera", is_staff=False, groups=["Viewers"]))


@pytest.fixture
def staff():
    return client_for(UserFactory(username="sam", is_staff=True))


@pytest.fixture
def severities():
    return [SeverityFactory(level=level) for level in (1, 2, 3, 4)]


# --- Severities -----------------------------------------------------------------------------


def test_severities_list_in_level_order(viewer, severities):
    response = viewer.get("/api/v1/severities/")
    assert response.status_code == 200
    results = response.json()["results"]
    assert [s["level"] for s in results] == [1, 2, 3, 4]
    sev1 = results[0]
    assert sev1["name"] == "Sev1"
    assert sev1["ack_target"] == "P0DT00H15M00S"
    assert sev1["resolve_target"] == "P0DT04H00M00S"
    assert sev1["update_interval"] == "P0DT00H30M00S"
    assert sev1["postmortem_required"] is True
    assert sev1["postmortem_due_after"] == "P2DT00H00M00S"


def test_severity_detail_by_level(viewer, severities):
    response = viewer.get("/api/v1/severities/3/")
    assert response.status_code == 200
    assert response.json()["name"] == "Sev3"
    assert viewer.get("/api/v1/severities/9/").status_code == 404
    assert viewer.get("/api/v1/severities/high/").status_code == 404


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("PT10M", timedelta(minutes=10)),
        ("P1DT2H", timedelta(days=1, hours=2)),
        ("00:10:00", timedelta(minutes=10)),
        ("1 02:00:00", timedelta(days=1, hours=2)),
    ],
)
def test_staff_change_targets_in_iso_or_drf_durations(staff, severities, value, expected):
    response = staff.patch("/api/v1/severities/1/", {"ack_target": value}, format="json")
    assert response.status_code == 200, response.json()
    assert Severity.objects.get(level=1).ack_target == expected


def test_staff_change_cadence_and_post_mortem(staff, severities):
    response = staff.patch(
        "/api/v1/severities/2/",
        {
            "update_interval": "PT45M",
            "postmortem_required": False,
            "postmortem_due_after": None,
            "notify_customers": True,
        },
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert response.json()["update_interval"] == "P0DT00H45M00S"
    sev2 = Severity.objects.get(level=2)
    assert (sev2.postmortem_required, sev2.postmortem_due_after) == (False, None)
    assert sev2.notify_customers is True
    # Fields not given are left alone.
    assert sev2.ack_target == timedelta(minutes=30)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ack_target": "soon"}, "ack_target"),
        ({"ack_target": "-00:05:00"}, "ack_target"),
        ({"ack_target": "0"}, "ack_target"),
        ({"resolve_target": "P99999999999D"}, "resolve_target"),
        ({"resolve_target": "P20000D"}, "resolve_target"),
        ({"update_interval": None}, "update_interval"),
        ({"postmortem_due_after": None}, "postmortem_due_after"),
        ({"postmortem_required": "perhaps"}, "postmortem_required"),
    ],
)
def test_bad_targets_are_a_400_naming_the_field(staff, severities, body, field):
    before = Severity.objects.get(level=1)
    response = staff.patch("/api/v1/severities/1/", body, format="json")
    assert response.status_code == 400
    assert field in response.json(), response.json()
    after = Severity.objects.get(level=1)
    assert (after.ack_target, after.resolve_target, after.postmortem_due_after) == (
        before.ack_target,
        before.resolve_target,
        before.postmortem_due_after,
    )


def test_only_staff_change_severities(viewer, severities):
    responder = client_for(UserFactory(is_staff=False, groups=["Incident managers"]))
    for client in (viewer, responder):
        response = client.patch("/api/v1/severities/1/", {"ack_target": "PT1M"}, format="json")
        assert response.status_code == 403
        assert response.json()["code"] == "staff_only"
    assert Severity.objects.get(level=1).ack_target == timedelta(minutes=15)


def test_severities_cannot_be_created_or_deleted(staff, severities):
    assert staff.post("/api/v1/severities/", {"level": 5}, format="json").status_code == 405
    assert staff.delete("/api/v1/severities/1/").status_code == 405
    assert staff.put("/api/v1/severities/1/", {}, format="json").status_code == 405


# --- Services, runbooks, routes -------------------------------------------------------------


def test_services_by_slug(viewer):
    team = TeamFactory(name="Payments", slug="payments")
    ServiceFactory(name="Checkout", slug="checkout", team=team, description="Pay")
    ServiceFactory(name="Admin", slug="admin", is_public=False)
    response = viewer.get("/api/v1/services/")
    assert [s["slug"] for s in response.json()["results"]] == ["admin", "checkout"]
    response = viewer.get("/api/v1/services/checkout/")
    assert response.json() == {
        "slug": "checkout",
        "name": "Checkout",
        "description": "Pay",
        "team": "payments",
        "is_public": True,
    }
    assert viewer.get("/api/v1/services/nope/").status_code == 404


def test_runbooks_by_code_with_safe_html(viewer, severities):
    RunbookFactory(
        code="RB-01",
        title="Backend down",
        severity=severities[0],
        steps="1. Check **health**\n2. <script>alert(1)</script>",
    )
    response = viewer.get("/api/v1/runbooks/RB-01/")
    assert response.status_code == 200
    data = response.json()
    assert data["severity"] == 1
    assert data["steps"].startswith("1. Check **health**")
    assert "<strong>health</strong>" in data["steps_html"]
    assert "<script>" not in data["steps_html"]
    assert data["review_interval"] == "P90DT00H00M00S"
    assert viewer.get("/api/v1/runbooks/RB-99/").status_code == 404


def test_alert_routes(viewer, severities):
    runbook = RunbookFactory(code="RB-02")
    service = ServiceFactory(slug="db")
    AlertRouteFactory(
        alert_name="Database*",
        match_labels={"env": "prod"},
        runbook=runbook,
        severity=severities[1],
        service=service,
        position=10,
    )
    response = viewer.get("/api/v1/alert-routes/")
    [route] = response.json()["results"]
    assert route["alert_name"] == "Database*"
    assert route["match_labels"] == {"env": "prod"}
    assert (route["runbook"], route["severity"], route["service"]) == ("RB-02", 2, "db")
    assert viewer.get(f"/api/v1/alert-routes/{route['id']}/").status_code == 200


@pytest.mark.parametrize("size", [2, 12])
@pytest.mark.parametrize(
    "path", ["/api/v1/services/", "/api/v1/runbooks/", "/api/v1/alert-routes/"]
)
def test_config_lists_make_a_fixed_number_of_queries(
    viewer, severities, path, size, django_assert_max_num_queries
):
    for n in range(size):
        RunbookFactory(code=f"RB-{n:02d}", severity=severities[n % 4])
        ServiceFactory(slug=f"svc-{n}", team=TeamFactory(slug=f"team-{n}"))
        AlertRouteFactory(alert_name=f"A{n}", severity=severities[n % 4], runbook=None)
    # token + user, the count, the page with everything joined.
    with django_assert_max_num_queries(3):
        response = viewer.get(path)
    assert len(response.json()["results"]) == size


# --- Integrations ---------------------------------------------------------------------------


@pytest.fixture
def prom(severities):
    source, _token = integration(name="prom", kind="alertmanager", default_severity=severities[2])
    return source


def test_integrations_show_the_prefix_never_the_hash(staff, prom):
    response = staff.get("/api/v1/integrations/")
    assert response.status_code == 200
    [data] = response.json()["results"]
    assert data["name"] == "prom"
    assert data["kind"] == "alertmanager"
    assert data["token_prefix"] == prom.token_prefix
    assert data["default_severity"] == 3
    assert "token_hash" not in data
    assert "token" not in data
    assert prom.token_hash not in response.content.decode()
    assert staff.get(f"/api/v1/integrations/{prom.pk}/").json()["id"] == prom.pk


def test_integrations_need_staff_or_the_view_permission(viewer, prom):
    response = viewer.get("/api/v1/integrations/")
    assert response.status_code == 403
    assert "view_integration" in response.json()["detail"]
    assert viewer.get(f"/api/v1/integrations/{prom.pk}/").status_code == 403
    manager = client_for(UserFactory(is_staff=False, groups=["Incident managers"]))
    assert manager.get("/api/v1/integrations/").status_code == 200


def test_an_unknown_integration_is_404(staff, prom):
    assert staff.get("/api/v1/integrations/999999/").status_code == 404
