"""The incident admin's own views: user autocomplete, transitions with a message, refusals."""

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from incidents import services
from incidents.models import EventKind, IncidentStatus, TimelineEvent

from .factories import SeverityFactory, UserFactory, declare

pytestmark = pytest.mark.django_db
S = IncidentStatus


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def test_user_autocomplete_lists_active_usernames_only_to_responders(client):
    responder = UserFactory(username="rita", groups=["Responders"])
    UserFactory(username="ritchie")
    UserFactory(username="rita-old", is_active=False)
    UserFactory(username="zed")
    url = reverse("admin:incidents_incident_user_autocomplete")

    client.force_login(responder)
    data = client.get(url, {"term": "rit"}).json()
    assert [r["text"] for r in data["results"]] == ["rita", "ritchie"]
    assert data["pagination"] == {"more": False}
    # ... and responders do not get the user directory itself.
    assert client.get(reverse("admin:auth_user_changelist")).status_code == 403

    client.force_login(UserFactory(username="vic", groups=["Viewers"]))
    assert client.get(url, {"term": "rit"}).status_code == 403


def test_transition_form_records_the_message_and_resolution(admin_client):
    incident = declare()
    url = reverse("admin:incidents_incident_transition_form", args=[incident.pk])
    admin_client.post(url, {"to": "mitigating", "message": "Failing over to the replica"})
    admin_client.post(url, {"to": "resolved", "message": "Replica promoted"})
    events = incident.timeline.exclude(kind=EventKind.DECLARED).order_by("pk")
    assert [(e.kind, e.value, e.message) for e in events] == [
        (EventKind.STATUS_CHANGED, "mitigating", "Failing over to the replica"),
        (EventKind.RESOLVED, "resolved", "Replica promoted"),
    ]


def test_transition_to_the_current_status_says_already_not_done(admin_client):
    incident = declare()
    response = admin_client.post(
        reverse("admin:incidents_incident_transition", args=[incident.pk, "triggered"]),
        follow=True,
    )
    assert f"{incident.reference} is already triggered." in messages_of(response)
    assert incident.timeline.count() == 1


def test_bulk_actions_report_incidents_already_in_the_state(admin_client):
    acked, fresh = declare(title="a"), declare(title="b")
    services.incident_acknowledge(incident=acked, actor=None)
    response = admin_client.post(
        reverse("admin:incidents_incident_changelist"),
        {"action": "acknowledge", "_selected_action": [acked.pk, fresh.pk]},
        follow=True,
    )
    notes = messages_of(response)
    assert f"{fresh.reference} acknowledged." in notes
    assert f"{acked.reference} already acknowledged: unchanged." in notes


@pytest.mark.parametrize("view", ["transition_form", "note", "assign_role"])
def test_custom_views_answer_404_for_an_unknown_or_malformed_id(admin_client, view):
    for object_id in ("999999", "abc"):
        url = reverse(f"admin:incidents_incident_{view}", args=[object_id])
        assert admin_client.post(url, {"to": "acknowledged", "body": "x"}).status_code == 404


def test_editing_an_incident_closed_meanwhile_saves_nothing(
    admin_client,
):
    incident = declare(title="Old")
    change_url = reverse("admin:incidents_incident_change", args=[incident.pk])
    form = {
        "title": "New",
        "summary": "",
        "impact": "none",
        "customer_impact": "",
        "timeline-TOTAL_FORMS": "0",
        "timeline-INITIAL_FORMS": "0",
    }
    # The form was opened while open; the incident closes before it is submitted.
    services.incident_resolve(incident=incident, actor=None)
    services.incident_close(incident=incident, actor=None)
    admin_client.post(change_url, form, follow=True)
    incident.refresh_from_db()
    assert incident.title == "Old"  # a closed incident's fields are read-only
    assert not incident.timeline.filter(kind=EventKind.EDITED).exists()


def test_timeline_keeps_the_actor_name_and_protects_the_user():
    user = UserFactory(username="ann")
    incident = declare(actor=user, severity=SeverityFactory(level=2))
    event = incident.timeline.get()
    assert event.actor_display == "ann"
    with pytest.raises(Exception, match="protected"):
        user.delete()
    with pytest.raises(TypeError, match="append-only"):
        event.delete()
    with pytest.raises(TypeError, match="append-only"):
        TimelineEvent.objects.filter(pk=event.pk).delete()
    assert TimelineEvent.objects.filter(pk=event.pk).exists()
