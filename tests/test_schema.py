"""The OpenAPI schema: it generates without warnings, and a schemathesis run over every
operation in it, as a superuser with a DRF token, gets no 5xx and only responses that
conform to the schema.

Each operation is its own test item, in its own database transaction (`db`), against
PostgreSQL in CI, with data present: severities, a team, services, incidents with and
without a team, an integration with alerts, a runbook and route, a rotation and a policy.
The run is bounded (a few examples per operation) so it stays a couple of minutes.

The schema is generated in-process (the same generator `/api/schema/` serves) and the
requests go through Django's WSGI handler, so they see the test's transaction.
"""

from __future__ import annotations

import json
from datetime import date, timedelta

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.management import call_command
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from escalation.models import TargetKind
from incidents import services
from incidents.ingestion import intake
from tests.escalation.factories import PersonFactory, PolicyFactory, rotation_with, step
from tests.incidents.factories import (
    AlertRouteFactory,
    RunbookFactory,
    ServiceFactory,
    SeverityFactory,
    TeamFactory,
    UserFactory,
    alertmanager_body,
    declare,
    integration,
    role,
)

# Examples per operation in the fuzzing phase; the examples and coverage phases add their
# own few.
MAX_EXAMPLES = 8


def test_schema_generates_without_warnings(tmp_path):
    """`manage.py spectacular --validate --fail-on-warn` exits 0."""
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    assert "/api/v1/incidents/{reference}/" in out.read_text()


@pytest.fixture
def api_data(db, client):
    """A little of everything, and a superuser's token."""
    policy = PolicyFactory(name="Sev1 chain")
    ann = PersonFactory(name="Ann")
    step(policy, 0, timedelta(0), (TargetKind.PERSON, ann))
    sev1 = SeverityFactory(level=1, escalation_policy=policy)
    for level in (2, 3, 4):
        SeverityFactory(level=level)
    team = TeamFactory(name="Payments", slug="payments")
    rotation_with([ann, PersonFactory(name="Bo")], team=team, start_date=date(2026, 1, 5))
    checkout = ServiceFactory(name="Checkout", slug="checkout", team=team)
    root = UserFactory(username="root", is_staff=True, is_superuser=True)
    team.members.add(root, UserFactory(username="ann", is_staff=False))
    role("incident-commander")
    first = declare(severity=sev1, team=team, services=[checkout], title="Payments failing")
    services.incident_add_note(incident=first, body="looking", actor=root)
    declare(severity=sev1, title="No team")
    resolved = declare(severity=sev1, title="Resolved")
    services.incident_resolve(incident=resolved, actor=root)
    runbook = RunbookFactory(code="RB-01", steps="1. Check **it**.\n<script>x</script>")
    source, token = integration(name="prom", kind="alertmanager")
    AlertRouteFactory(alert_name="X", runbook=runbook, severity=sev1, service=checkout)
    response = client.post(
        f"/api/v1/integrations/{token}/alertmanager/",
        alertmanager_body({"labels": {"alertname": "X"}}, {"labels": {"alertname": "Y"}}),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    intake.deliveries_apply()
    return Token.objects.create(user=root).key


@pytest.fixture
def token(api_data):
    """The superuser's token, for requests through Django's WSGI handler. That handler
    closes the database connection after each request made inside a transaction (as a
    test's is); like Django's test client, keep it open while the test runs."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield api_data
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def load_schema():
    document = SchemaGenerator().get_schema(request=None, public=True)
    loaded = schemathesis.openapi.from_dict(json.loads(OpenApiJsonRenderer().render(document)))
    loaded.app = WSGIHandler()  # requests go to Django in-process
    return loaded


schema = load_schema()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case, token):
    case.call_and_validate(
        headers={"Authorization": f"Token {token}"},
        checks=[not_a_server_error, response_schema_conformance],
    )
