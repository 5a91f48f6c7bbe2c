"""The admin of alert ingestion: integrations and their tokens, alerts, runbooks, routes, and
the incident page's runbook, alerts and merge action."""

from __future__ import annotations

import json
import re
from datetime import date, timedelta

import pytest
import time_machine
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from incidents import services
from incidents.admin_alerts import IntegrationForm
from incidents.ingestion import payloads
from incidents.ingestion.services import (
    alerts_ingest,
    integration_by_token,
    integration_rotate_token,
    token_hash,
)
from incidents.models import (
    Alert,
    AlertDelivery,
    AlertRoute,
    AlertStatus,
    EventKind,
    Incident,
    IncidentStatus,
    Integration,
    Runbook,
)

from .factories import (
    AlertRouteFactory,
    RunbookFactory,
    ServiceFactory,
    SeverityFactory,
    TeamFactory,
    UserFactory,
    alertmanager_body,
    declare,
    integration,
)

pytestmark = pytest.mark.django_db
S = IncidentStatus
INCIDENTS = "admin:incidents_incident_changelist"


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def count_queries(client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries)


def shown_tokens(response) -> list[str]:
    return re.findall(r'<code class="token">([^<]+)</code>', response.content.decode())


@pytest.fixture
def severities():
    return {level: SeverityFactory(level=level) for level in (1, 2, 3, 4)}


@pytest.fixture
def manager(client):
    user = UserFactory(username="mona", groups=["Incident managers"])
    client.force_login(user)
    return user


def fire(source: Integration, *alerts: dict, group_key: str = "g"):
    """Deliver an Alertmanager body through the ingestion service, as the webhook does."""
    delivery = payloads.parse_alertmanager(alertmanager_body(*alerts, group_key=group_key))
    return alerts_ingest(integration=source, delivery=delivery)


# --- changelists: same queries at two sizes --------------------------------------------------


def make_integrations(count: int) -> None:
    for _ in range(count):
        integration(heartbeat_interval=timedelta(minutes=5))


def make_alerts(count: int) -> None:
    source, _ = integration()
    incidents = [declare(title=f"Incident {n}") for n in range(3)]
    now = timezone.now()
    Alert.objects.bulk_create(
        Alert(
            integration=source,
            incident=incidents[n % 3] if n % 4 else None,
            fingerprint=f"fp-{source.pk}-{n}",
            group_key="g",
            status=AlertStatus.FIRING if n % 2 else AlertStatus.RESOLVED,
            name=f"Alert {n}",
            first_received_at=now,
            last_received_at=now,
        )
        for n in range(count)
    )


def make_runbooks(count: int) -> None:
    severity = SeverityFactory(level=2)
    for n in range(count):
        RunbookFactory(severity=severity, last_reviewed_at=date(2026, 1, 1) if n % 2 else None)


def make_routes(count: int) -> None:
    severity, service, team = SeverityFactory(level=3), ServiceFactory(), TeamFactory()
    source, _ = integration()
    for n in range(count):
        AlertRouteFactory(
            alert_name=f"Alert{n}*",
            position=n,
            match_labels={"env": "prod"},
            severity=severity,
            service=service,
            team=team,
            integration=source if n % 2 else None,
        )


@pytest.mark.parametrize(
    ("changelist", "make", "query"),
    [
        ("integration", make_integrations, ""),
        ("integration", make_integrations, "?q=source"),
        ("alert", make_alerts, ""),
        ("alert", make_alerts, "?status__exact=firing&q=Alert"),
        ("runbook", make_runbooks, ""),
        ("runbook", make_runbooks, "?review=overdue"),
        ("alertroute", make_routes, ""),
    ],
)
def test_changelists_run_the_same_queries_at_two_sizes(admin_client, changelist, make, query):
    url = reverse(f"admin:incidents_{changelist}_changelist") + query
    make(4)
    small = count_queries(admin_client, url)
    make(60)
    large = count_queries(admin_client, url)
    assert large == small
    assert small <= 8


@pytest.mark.parametrize("model", ["integration", "alert", "runbook", "alertroute"])
def test_add_and_change_pages_render(admin_client, severities, model):
    source, _ = integration(heartbeat_interval=timedelta(minutes=5))
    fire(source, {"labels": {"alertname": "X"}})
    objects = {
        "integration": source,
        "alert": Alert.objects.get(),
        "runbook": RunbookFactory(),
        "alertroute": AlertRouteFactory(match_labels={"env": "prod"}),
    }
    change = admin_client.get(reverse(f"admin:incidents_{model}_change", args=[objects[model].pk]))
    assert change.status_code == 200
    add = admin_client.get(reverse(f"admin:incidents_{model}_add"))
    assert add.status_code == (403 if model == "alert" else 200)


# --- integrations: the token shown once --------------------------------------------------------


def add_form(**overrides) -> dict:
    data = {
        "name": "Prometheus",
        "kind": "alertmanager",
        "is_active": "on",
        "severity_label": "severity",
        "severity_map": '{"critical": 1, "warning": 3}',
        "grouping_keys": '["alertname", "cluster"]',
        "auto_resolve": "on",
        "rate_limit": "600",
        "heartbeat_interval": "",
    }
    data.update(overrides)
    return data


def test_adding_an_integration_shows_the_token_once_and_stores_only_its_hash(
    client, manager, severities, settings
):
    settings.SITE_URL = "https://tracker.example.com"
    response = client.post(
        reverse("admin:incidents_integration_add"), add_form(heartbeat_interval="00:10:00")
    )

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    [token] = shown_tokens(response)
    html = response.content.decode()
    assert f"https://tracker.example.com/api/v1/integrations/{token}/alertmanager/" in html
    assert f"https://tracker.example.com/api/v1/integrations/{token}/heartbeat/" in html
    created = Integration.objects.get(name="Prometheus")
    assert created.token_hash == token_hash(token)
    assert created.token_prefix == token[:8]
    assert token not in json.dumps(list(Integration.objects.values()), default=str)
    assert integration_by_token(token) == created
    assert created.severity_map == {"critical": 1, "warning": 3}
    assert created.grouping_keys == ["alertname", "cluster"]
    assert created.heartbeat_due_at is not None
    # Not in a message (cookie or session) and not on any later page.
    assert not [m for m in messages_of(response) if token in m]
    for url in (
        reverse("admin:incidents_integration_change", args=[created.pk]),
        reverse("admin:incidents_integration_changelist"),
    ):
        later = client.get(url).content.decode()
        assert token not in later
        assert f"{token[:8]}…" in later
    assert (
        "token_hash"
        not in client.get(
            reverse("admin:incidents_integration_change", args=[created.pk])
        ).content.decode()
    )


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("severity_map", '{"critical": 9}', "there is no severity level 9"),
        ("severity_map", '{"critical": "1"}', "must be a level number"),
        ("severity_map", '{"critical": true}', "must be a level number"),
        ("severity_map", '["critical"]', "Enter an object"),
        ("severity_map", "{critical: 1}", "Enter a valid JSON"),
        ("grouping_keys", '"alertname"', "Enter a list of label names"),
        ("grouping_keys", '["alertname", 3]', "must be a label name"),
        ("grouping_keys", '["alertname", "alertname"]', "listed twice"),
        ("kind", "nagios", "Select a valid choice"),
        ("name", "Taken", "already exists"),
    ],
)
def test_add_form_refuses_bad_configuration_with_a_clear_error(
    client, manager, severities, field, value, problem
):
    integration(name="Taken")
    response = client.post(reverse("admin:incidents_integration_add"), add_form(**{field: value}))

    assert response.status_code == 200
    assert problem in response.content.decode()
    assert not shown_tokens(response)
    assert list(Integration.objects.values_list("name", flat=True)) == ["Taken"]


def post_alert(client, token: str):
    return client.post(
        reverse("webhook-alertmanager", args=[token]),
        data=json.dumps(alertmanager_body({"labels": {"alertname": "BackendServiceDown"}})),
        content_type="application/json",
    )


def test_rotating_from_the_change_page_invalidates_the_old_token(client, manager, severities):
    source, old = integration(name="Prometheus")
    url = reverse("admin:incidents_integration_rotate_token", args=[source.pk])
    change = client.get(reverse("admin:incidents_integration_change", args=[source.pk]))
    assert url in change.content.decode()

    confirmation = client.get(url)  # asks first; changes nothing
    assert "The old token stops working at once" in confirmation.content.decode()
    assert integration_by_token(old) == source

    response = client.post(url)
    [new] = shown_tokens(response)
    assert new != old
    assert "no-store" in response["Cache-Control"]
    source.refresh_from_db()
    assert source.token_hash == token_hash(new)
    assert post_alert(client, old).status_code == 404
    assert post_alert(client, new).status_code == 202
    assert AlertDelivery.objects.filter(integration=source).count() == 1


def test_bulk_rotation_confirms_then_shows_each_new_token_once(client, manager, severities):
    first, first_old = integration(name="A")
    second, second_old = integration(name="B", kind="generic")
    changelist = reverse("admin:incidents_integration_changelist")
    selected = {"action": "rotate_tokens", "_selected_action": [first.pk, second.pk]}

    confirmation = client.post(changelist, selected)
    assert confirmation.status_code == 200
    assert not shown_tokens(confirmation)
    assert integration_by_token(first_old) == first

    response = client.post(changelist, {**selected, "post": "yes"})
    tokens = shown_tokens(response)
    assert len(tokens) == 2
    assert {integration_by_token(t) for t in tokens} == {first, second}
    assert integration_by_token(first_old) is None
    assert integration_by_token(second_old) is None
    assert f"/api/v1/integrations/{tokens[1]}/generic/" in response.content.decode()


def test_saving_the_change_form_keeps_a_token_rotated_meanwhile(
    client, manager, severities, monkeypatch
):
    """The form writes only what it changed: a rotation and deliveries that land between the
    admin's read of the row and its write are kept, not overwritten with what it read."""
    source, old = integration(name="Prometheus")
    rotated: list[str] = []
    validate = IntegrationForm.clean

    def clean_while_a_rotation_lands(form):
        if not rotated:
            rotated.append(integration_rotate_token(integration=Integration.objects.get()))
            Integration.objects.update(alerts_received=41)
        return validate(form)

    monkeypatch.setattr(IntegrationForm, "clean", clean_while_a_rotation_lands)
    response = client.post(
        reverse("admin:incidents_integration_change", args=[source.pk]),
        add_form(name="Prometheus prod", rate_limit="100"),
    )

    assert response.status_code == 302
    source.refresh_from_db()
    assert (source.name, source.rate_limit, source.kind) == ("Prometheus prod", 100, "alertmanager")
    assert source.token_hash == token_hash(rotated[0])
    assert integration_by_token(old) is None
    assert source.alerts_received == 41


def test_integrations_are_hidden_from_responders(client):
    source, _ = integration()
    client.force_login(UserFactory(username="rita", groups=["Responders"]))
    assert client.get(reverse("admin:incidents_integration_changelist")).status_code == 403
    url = reverse("admin:incidents_integration_rotate_token", args=[source.pk])
    assert client.post(url).status_code == 403


# --- alerts: read-only ------------------------------------------------------------------------


def test_alerts_are_read_only_and_link_their_incident(client, severities):
    source, _ = integration()
    result = fire(source, {"labels": {"alertname": "DiskFull"}})
    alert = Alert.objects.get()
    incident = Incident.objects.get(reference=next(iter(result.opened)))
    client.force_login(UserFactory(username="vic", groups=["Viewers"]))

    html = client.get(reverse("admin:incidents_alert_changelist")).content.decode()
    assert reverse("admin:incidents_incident_change", args=[incident.pk]) in html
    assert "DiskFull" in html
    detail = client.get(reverse("admin:incidents_alert_change", args=[alert.pk]))
    assert detail.status_code == 200
    assert 'name="_save"' not in detail.content.decode()

    client.force_login(UserFactory(username="root", is_superuser=True))
    assert client.get(reverse("admin:incidents_alert_add")).status_code == 403
    assert client.post(reverse("admin:incidents_alert_delete", args=[alert.pk])).status_code == 403
    client.post(
        reverse("admin:incidents_alert_change", args=[alert.pk]), {"name": "changed", "count": 9}
    )
    alert.refresh_from_db()
    assert (alert.name, alert.count) == ("DiskFull", 1)


def test_alert_search_by_fingerprint_and_filter_by_status(admin_client, severities):
    source, _ = integration()
    fire(
        source,
        {"labels": {"alertname": "DiskFull"}, "fingerprint": "abc123"},
        {"labels": {"alertname": "CpuHigh"}, "fingerprint": "def456"},
    )
    fire(
        source, {"labels": {"alertname": "CpuHigh"}, "fingerprint": "def456", "status": "resolved"}
    )
    url = reverse("admin:incidents_alert_changelist")

    html = admin_client.get(url, {"q": "abc123"}).content.decode()
    assert "DiskFull" in html
    assert "CpuHigh" not in html
    html = admin_client.get(url, {"status__exact": "resolved"}).content.decode()
    assert "CpuHigh" in html
    assert "DiskFull" not in html


# --- runbooks ---------------------------------------------------------------------------------


@time_machine.travel("2026-06-15 12:00:00+00:00", tick=False)
def test_runbook_review_filter_and_overdue_column(admin_client):
    interval = timedelta(days=30)
    RunbookFactory(code="RB-NEVER", last_reviewed_at=None)
    RunbookFactory(code="RB-LATE", last_reviewed_at=date(2026, 5, 15), review_interval=interval)
    RunbookFactory(code="RB-TODAY", last_reviewed_at=date(2026, 5, 16), review_interval=interval)
    RunbookFactory(code="RB-FRESH", last_reviewed_at=date(2026, 6, 1), review_interval=interval)
    url = reverse("admin:incidents_runbook_changelist")

    def listed(query: str) -> set[str]:
        html = admin_client.get(url + query).content.decode()
        return {code for code in re.findall(r"RB-[A-Z]+", html)}

    assert listed("?review=overdue") == {"RB-LATE"}
    assert listed("?review=ok") == {"RB-TODAY", "RB-FRESH"}
    assert listed("?review=never") == {"RB-NEVER"}
    # The model's predicate agrees with the database's filter.
    assert {r.code for r in Runbook.objects.all() if r.review_overdue()} == {"RB-LATE", "RB-NEVER"}
    html = admin_client.get(url).content.decode()
    assert "2026-06-15" in html  # RB-TODAY's review is due today
    assert "never reviewed" in html


def test_runbook_page_renders_steps_without_active_content(admin_client):
    runbook = RunbookFactory(
        steps="1. **Restart** it\n2. <script>alert(1)</script>\n3. [x](javascript:alert(1))"
        '\n\n<img src=x onerror="alert(2)">'
    )
    html = admin_client.get(reverse("admin:incidents_runbook_change", args=[runbook.pk])).content
    preview = html.decode().split('class="runbook-steps"', 1)[1].split("</div>", 1)[0]
    assert "<strong>Restart</strong>" in preview
    assert "<script" not in preview
    assert "<img" not in preview
    assert "javascript:" not in preview


# --- alert routes -----------------------------------------------------------------------------


def route_form(**overrides) -> dict:
    data = {
        "position": "10",
        "alert_name": "Database*",
        "match_labels": '{"env": "prod"}',
        "is_active": "on",
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('{"env": 1}', "must be text"),
        ('{"env": ["prod"]}', "must be text"),
        ('["env"]', "Enter an object"),
        ('{"": "x"}', "may not be blank"),
    ],
)
def test_route_labels_must_map_text_to_text(admin_client, value, problem):
    response = admin_client.post(
        reverse("admin:incidents_alertroute_add"), route_form(match_labels=value)
    )
    assert response.status_code == 200
    assert problem in response.content.decode()
    assert not AlertRoute.objects.exists()


def test_routes_are_ordered_and_reordered_in_the_list(admin_client):
    runbook = RunbookFactory(code="RB-02")
    response = admin_client.post(
        reverse("admin:incidents_alertroute_add"), route_form(runbook=runbook.pk)
    )
    assert response.status_code == 302
    first = AlertRoute.objects.get()
    assert first.match_labels == {"env": "prod"}
    second = AlertRouteFactory(alert_name="BackendServiceDown", position=20)
    url = reverse("admin:incidents_alertroute_changelist")

    response = admin_client.post(
        url,
        {
            "form-TOTAL_FORMS": "2",
            "form-INITIAL_FORMS": "2",
            "form-0-id": first.pk,
            "form-0-position": "30",
            "form-1-id": second.pk,
            "form-1-position": "20",
            "_save": "Save",
        },
    )
    assert response.status_code == 302
    assert list(AlertRoute.objects.values_list("alert_name", flat=True)) == [
        "BackendServiceDown",
        "Database*",
    ]


# --- the incident page: runbook, alerts, merge ------------------------------------------------


def test_incident_page_links_its_runbook_and_lists_its_alerts(admin_client, severities):
    runbook = RunbookFactory(
        code="RB-01", title="Backend down", steps="1. **Check** health\n2. <script>x()</script>"
    )
    AlertRouteFactory(alert_name="BackendServiceDown", runbook=runbook, severity=severities[1])
    source, _ = integration(name="Prometheus")
    fire(
        source,
        {"labels": {"alertname": "BackendServiceDown"}, "fingerprint": "a"},
        {"labels": {"alertname": "BackendServiceDown", "pod": "2"}, "fingerprint": "b"},
    )
    incident = Incident.objects.get()
    assert incident.runbook == runbook

    html = admin_client.get(reverse("admin:incidents_incident_change", args=[incident.pk]))
    html = html.content.decode()
    panel = html.split('id="incident-runbook"', 1)[1].split('id="incident-alerts"', 1)[0]
    assert reverse("admin:incidents_runbook_change", args=[runbook.pk]) in panel
    assert "RB-01: Backend down" in panel
    assert "<strong>Check</strong>" in panel
    assert "<script>" not in panel
    alerts = html.split('id="incident-alerts"', 1)[1]
    assert alerts.count('class="alert-row"') == 2
    assert "Prometheus" in alerts


def merge(client, selected, target: str, reason: str = ""):
    return client.post(
        reverse(INCIDENTS),
        {
            "action": "merge_into",
            "_selected_action": [i.pk for i in selected],
            "post": "yes",
            "target": target,
            "reason": reason,
        },
        follow=True,
    )


def test_merge_action_asks_for_the_target_then_merges_with_a_pointer(client, severities):
    responder = UserFactory(username="rita", groups=["Responders"])
    client.force_login(responder)
    source_a, source_b, target = declare(title="a"), declare(title="b"), declare(title="t")
    alerting, _ = integration()
    fire(alerting, {"labels": {"alertname": "X"}})
    alert_incident = Incident.objects.get(alerts__isnull=False)

    page = client.post(
        reverse(INCIDENTS),
        {"action": "merge_into", "_selected_action": [source_a.pk, source_b.pk]},
    )
    assert page.status_code == 200
    assert 'name="target"' in page.content.decode()
    assert not Incident.objects.filter(merged_into__isnull=False).exists()

    response = merge(
        client, [source_a, source_b, alert_incident], target.reference.lower(), "one cause"
    )

    merged = sorted([source_a, source_b, alert_incident], key=lambda i: i.number)
    assert messages_of(response) == [
        f"{', '.join(i.reference for i in merged)} merged into {target.reference}."
    ]
    for incident in merged:
        incident.refresh_from_db()
        assert incident.status == S.CLOSED
        assert incident.merged_into == target
    assert Alert.objects.get().incident == target
    assert target.timeline.filter(kind=EventKind.MERGED).count() == 3
    assert source_a.timeline.get(kind=EventKind.MERGED).actor == responder

    page = client.get(reverse("admin:incidents_incident_change", args=[source_a.pk]))
    panel = page.content.decode().split('id="incident-merge"', 1)[1]
    assert reverse("admin:incidents_incident_change", args=[target.pk]) in panel
    assert target.reference in panel
    page = client.get(reverse("admin:incidents_incident_change", args=[target.pk]))
    assert source_b.reference in page.content.decode().split('id="incident-merge"', 1)[1]


def test_merge_action_reports_refusals_closed_and_self(admin_client, severities):
    target, open_one, closed = declare(title="t"), declare(title="o"), declare(title="c")
    services.incident_resolve(incident=closed, actor=None)
    services.incident_close(incident=closed, actor=None)

    response = merge(admin_client, [target, open_one, closed], target.reference)

    notes = messages_of(response)
    assert f"{target.reference} refused: target: an incident cannot be merged into itself." in (
        notes
    )
    assert any(n.startswith(f"{closed.reference} refused:") and "closed" in n for n in notes), notes
    assert f"{open_one.reference} merged into {target.reference}." in notes
    target.refresh_from_db()
    closed.refresh_from_db()
    assert target.status == S.TRIGGERED
    assert closed.merged_into is None

    again = merge(admin_client, [open_one], target.reference)
    assert f"{open_one.reference} already merged into {target.reference}: unchanged." in (
        messages_of(again)
    )


def test_merge_into_an_unknown_reference_changes_nothing(admin_client, severities):
    incident = declare()
    response = admin_client.post(
        reverse(INCIDENTS),
        {
            "action": "merge_into",
            "_selected_action": [incident.pk],
            "post": "yes",
            "target": "INC-99999",
        },
    )
    assert response.status_code == 200
    assert "There is no incident INC-99999." in response.content.decode()
    incident.refresh_from_db()
    assert incident.status == S.TRIGGERED


def test_viewers_cannot_merge(client, severities):
    first, second = declare(title="a"), declare(title="b")
    client.force_login(UserFactory(username="vic", groups=["Viewers"]))
    merge(client, [first], second.reference)
    first.refresh_from_db()
    assert first.merged_into is None


def test_failed_deliveries_can_be_queued_again_and_others_are_left_alone(client, manager):
    from incidents.ingestion import intake
    from incidents.models import DeliveryStatus

    source, _ = integration(name="A")
    body = json.dumps(alertmanager_body({"fingerprint": "x"}))
    failed = intake.accept(integration=source, body=body, alerts=1)
    pending = intake.accept(integration=source, body=body, alerts=1)
    AlertDelivery.objects.filter(pk=failed).update(status=DeliveryStatus.FAILED, error="boom")

    changelist = reverse("admin:incidents_alertdelivery_changelist")
    assert client.get(changelist).status_code == 200
    response = client.post(
        changelist, {"action": "requeue", "_selected_action": [failed, pending]}, follow=True
    )
    [message] = [str(m) for m in get_messages(response.wsgi_request)]
    assert (
        message
        == "1 queued again; they are applied within seconds. 1 not failed, left as they were."
    )
    assert AlertDelivery.objects.get(pk=failed).status == DeliveryStatus.PENDING
    assert AlertDelivery.objects.get(pk=pending).status == DeliveryStatus.PENDING
    # Read-only: the change page offers no save, and a posted form writes nothing back,
    # not even the status the page was loaded with.
    url = reverse("admin:incidents_alertdelivery_change", args=[failed])
    assert 'name="_save"' not in client.get(url).content.decode()
    AlertDelivery.objects.filter(pk=failed).update(status=DeliveryStatus.DONE)
    client.post(url, {})
    row = AlertDelivery.objects.get(pk=failed)
    assert (row.status, row.body) == (DeliveryStatus.DONE, body)


def test_viewers_cannot_see_alert_deliveries(client):
    client.force_login(UserFactory(username="vic", groups=["Viewers"]))
    response = client.get(reverse("admin:incidents_alertdelivery_changelist"))
    assert response.status_code == 403
