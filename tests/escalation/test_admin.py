"""Escalation configuration in the admin: invalid configuration is refused with a clear error
and nothing saved; rotations show who is on call now and next without per-row queries."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
import time_machine
from django.template.loader import render_to_string
from django.urls import reverse

from escalation.models import (
    ContactMethod,
    EscalationStep,
    Override,
    Person,
    Rotation,
    RotationMember,
    StepTarget,
    TargetKind,
)
from escalation.selectors import oncall_now_all_teams
from tests.escalation.factories import (
    OverrideFactory,
    PersonFactory,
    PolicyFactory,
    RotationFactory,
    rotation_with,
    step,
)
from tests.incidents.factories import TeamFactory, UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)


@pytest.fixture
def admin_client(client):
    client.force_login(UserFactory(is_superuser=True))
    return client


def formset(prefix: str, rows: list[dict], *, initial: int = 0) -> dict:
    """POST data of an inline formset, as the admin page sends it."""
    data = {
        f"{prefix}-TOTAL_FORMS": str(len(rows)),
        f"{prefix}-INITIAL_FORMS": str(initial),
        f"{prefix}-MIN_NUM_FORMS": "0",
        f"{prefix}-MAX_NUM_FORMS": "1000",
    }
    for index, row in enumerate(rows):
        data.update({f"{prefix}-{index}-{key}": value for key, value in row.items()})
    return data


def rotation_data(team, *, members: list[dict], overrides: list[dict] = ()) -> dict:
    return {
        "team": str(team.pk),
        "name": "Primary",
        "time_zone": "Europe/Berlin",
        "start_date": "2026-03-02",
        "handoff_time": "09:00",
        "shift_length": "7 00:00:00",
        "handoff_notice": "01:00:00",
        **formset("members", members),
        **formset("overrides", list(overrides)),
    }


# --- rotations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "members",
    [
        [],
        [{"position": "", "person": ""}],  # the blank row the page shows
    ],
)
def test_rotation_without_participants_is_refused_and_nothing_saved(admin_client, members):
    team = TeamFactory()

    response = admin_client.post(
        reverse("admin:escalation_rotation_add"), rotation_data(team, members=members)
    )

    assert response.status_code == 200
    assert "A rotation needs at least one participant." in response.text
    assert not Rotation.objects.exists()


def test_rotation_whose_only_participant_is_deleted_is_refused(admin_client):
    rotation = rotation_with([PersonFactory()], name="Primary")
    member = rotation.members.get()
    data = rotation_data(rotation.team, members=[])
    data.update(
        formset(
            "members",
            [
                {
                    "id": str(member.pk),
                    "rotation": str(rotation.pk),
                    "position": "0",
                    "person": str(member.person_id),
                    "DELETE": "on",
                }
            ],
            initial=1,
        )
    )

    response = admin_client.post(
        reverse("admin:escalation_rotation_change", args=[rotation.pk]), data
    )

    assert response.status_code == 200
    assert "A rotation needs at least one participant." in response.text
    assert RotationMember.objects.filter(pk=member.pk).exists()


def test_rotation_with_a_participant_is_saved(admin_client):
    team, person = TeamFactory(), PersonFactory()

    response = admin_client.post(
        reverse("admin:escalation_rotation_add"),
        rotation_data(team, members=[{"position": "0", "person": str(person.pk)}]),
    )

    assert response.status_code == 302
    rotation = Rotation.objects.get()
    assert [m.person for m in rotation.members.all()] == [person]


def test_rotation_with_an_override_ending_before_it_starts_is_refused(admin_client):
    team, person = TeamFactory(), PersonFactory()
    data = rotation_data(
        team,
        members=[{"position": "0", "person": str(person.pk)}],
        overrides=[
            {
                "person": str(person.pk),
                "starts_at_0": "2026-03-05",
                "starts_at_1": "12:00:00",
                "ends_at_0": "2026-03-05",
                "ends_at_1": "08:00:00",
            }
        ],
    )

    response = admin_client.post(reverse("admin:escalation_rotation_add"), data)

    assert response.status_code == 200
    assert "An override must end after it starts." in response.text
    assert not Rotation.objects.exists()
    assert not Override.objects.exists()


def test_rotation_with_duplicate_positions_is_refused(admin_client):
    team, ada, bo = TeamFactory(), PersonFactory(), PersonFactory()
    data = rotation_data(
        team,
        members=[
            {"position": "0", "person": str(ada.pk)},
            {"position": "0", "person": str(bo.pk)},
        ],
    )

    response = admin_client.post(reverse("admin:escalation_rotation_add"), data)

    assert response.status_code == 200
    assert not Rotation.objects.exists()


@pytest.mark.parametrize(
    ("starts", "ends"),
    [("12:00:00", "08:00:00"), ("12:00:00", "12:00:00")],
)
def test_override_ending_before_or_as_it_starts_is_refused(admin_client, starts, ends):
    rotation = rotation_with([PersonFactory()])
    person = PersonFactory()

    response = admin_client.post(
        reverse("admin:escalation_override_add"),
        {
            "rotation": str(rotation.pk),
            "person": str(person.pk),
            "starts_at_0": "2026-03-05",
            "starts_at_1": starts,
            "ends_at_0": "2026-03-05",
            "ends_at_1": ends,
            "reason": "swap",
        },
    )

    assert response.status_code == 200
    assert "An override must end after it starts." in response.text
    assert not Override.objects.exists()


def test_override_is_saved(admin_client):
    rotation = rotation_with([PersonFactory()])
    person = PersonFactory()

    response = admin_client.post(
        reverse("admin:escalation_override_add"),
        {
            "rotation": str(rotation.pk),
            "person": str(person.pk),
            "starts_at_0": "2026-03-05",
            "starts_at_1": "08:00:00",
            "ends_at_0": "2026-03-05",
            "ends_at_1": "12:00:00",
        },
    )

    assert response.status_code == 302
    assert Override.objects.get().person == person


def make_rotations(count: int) -> None:
    people = [PersonFactory() for _ in range(3)]
    for _ in range(count):
        rotation = rotation_with(people, time_zone="America/New_York", start_date=date(2026, 3, 2))
        OverrideFactory(
            rotation=rotation,
            person=people[2],
            starts_at=NOW - timedelta(hours=1),
            ends_at=NOW + timedelta(hours=1),
        )


@pytest.mark.parametrize("count", [2, 20])
def test_rotation_changelist_shows_oncall_and_next_shift_in_constant_queries(
    admin_client, count, django_assert_num_queries
):
    make_rotations(count)

    # session, user, teams for the filter, two counts, rotations, members, overrides
    with time_machine.travel(NOW, tick=False), django_assert_num_queries(8):
        response = admin_client.get(reverse("admin:escalation_rotation_changelist"))

    assert response.status_code == 200
    text = response.text
    # Person 2 covers an override until 08:00 New York time; person 0's shift resumes then.
    assert text.count("(override)") == count
    assert text.count("Wed 04 Mar 2026 08:00 EST") == 2 * count


def test_rotation_change_page_shows_upcoming_shifts_and_the_calendar_link(admin_client):
    ada, bo = PersonFactory(name="Ada"), PersonFactory(name="Bo")
    rotation = rotation_with([ada, bo], time_zone="Europe/Berlin", start_date=date(2026, 3, 2))

    with time_machine.travel(NOW, tick=False):
        response = admin_client.get(reverse("admin:escalation_rotation_change", args=[rotation.pk]))

    assert response.status_code == 200
    text = response.text
    assert "Ada until Mon 09 Mar 2026 09:00 CET" in text
    assert "Bo from Mon 09 Mar 2026 09:00 CET" in text
    assert "Mon 30 Mar 2026 09:00 CEST" in text  # upcoming shifts, over the DST change
    assert f"/api/v1/rotations/{rotation.pk}/calendar.ics" in text


# --- people ----------------------------------------------------------------------------------


def person_data(contacts: list[dict]) -> dict:
    return {
        "name": "Dana",
        "time_zone": "Europe/Berlin",
        "backup_after": "00:10:00",
        "is_active": "on",
        **formset("contact_methods", contacts),
    }


@pytest.mark.parametrize(
    ("kind", "address", "error"),
    [
        ("email", "not-an-address", "is not an email address."),
        ("webhook", "ftp://example.com/hook", "is not an http(s) URL."),
        ("slack_webhook", "hooks.example.com", "is not an http(s) URL."),
    ],
)
def test_contact_method_with_an_invalid_address_is_refused(admin_client, kind, address, error):
    response = admin_client.post(
        reverse("admin:escalation_person_add"),
        person_data([{"position": "0", "kind": kind, "address": address, "label": ""}]),
    )

    assert response.status_code == 200
    assert error in response.text
    assert not Person.objects.exists()
    assert not ContactMethod.objects.exists()


def test_person_with_primary_and_backup_contacts_is_saved(admin_client):
    response = admin_client.post(
        reverse("admin:escalation_person_add"),
        person_data(
            [
                {"position": "1", "kind": "sms_webhook", "address": "https://sms.example.com/x"},
                {"position": "0", "kind": "email", "address": "dana@example.com"},
            ]
        ),
    )

    assert response.status_code == 302
    person = Person.objects.get()
    assert [m.kind for m in person.contact_methods.order_by("position")] == [
        "email",
        "sms_webhook",
    ]


def test_person_page_lists_contact_methods_by_position(admin_client):
    person = PersonFactory()
    ContactMethod.objects.create(
        person=person, kind="webhook", address="https://b.example/", position=1
    )
    ContactMethod.objects.create(person=person, kind="email", address="a@example.com", position=0)

    response = admin_client.get(reverse("admin:escalation_person_change", args=[person.pk]))

    text = response.text
    assert text.index("a@example.com") < text.index("https://b.example/")


# --- escalation policies and steps -----------------------------------------------------------


def step_data(policy, targets: list[dict]) -> dict:
    return {
        "policy": str(policy.pk),
        "position": "0",
        "delay": "00:15:00",
        "condition": "unacknowledged",
        "calendar": "",
        **formset("targets", targets),
    }


@pytest.mark.parametrize("targets", [[], [{"kind": "", "rotation": "", "person": "", "team": ""}]])
def test_step_without_a_target_is_refused_and_nothing_saved(admin_client, targets):
    policy = PolicyFactory()

    response = admin_client.post(
        reverse("admin:escalation_escalationstep_add"), step_data(policy, targets)
    )

    assert response.status_code == 200
    assert "A step needs at least one target." in response.text
    assert not EscalationStep.objects.exists()


def test_step_target_missing_what_its_kind_needs_is_refused(admin_client):
    policy, team = PolicyFactory(), TeamFactory()

    response = admin_client.post(
        reverse("admin:escalation_escalationstep_add"),
        step_data(policy, [{"kind": "oncall", "rotation": "", "person": "", "team": str(team.pk)}]),
    )

    assert response.status_code == 200
    assert "needs a rotation." in response.text
    assert not EscalationStep.objects.exists()
    assert not StepTarget.objects.exists()


def test_step_with_targets_is_saved(admin_client):
    policy, rotation = PolicyFactory(), rotation_with([PersonFactory()])

    response = admin_client.post(
        reverse("admin:escalation_escalationstep_add"),
        step_data(policy, [{"kind": "oncall", "rotation": str(rotation.pk)}]),
    )

    assert response.status_code == 302
    saved = EscalationStep.objects.get()
    assert [(t.kind, t.rotation) for t in saved.targets.all()] == [(TargetKind.ONCALL, rotation)]


def test_policy_page_lists_steps_with_targets_and_adds_steps_on_the_step_page(admin_client):
    policy, person = PolicyFactory(), PersonFactory(name="Executive")
    rotation = rotation_with([PersonFactory()], name="Primary")
    step(policy, 0, timedelta(0), (TargetKind.ONCALL, rotation))
    step(policy, 1, timedelta(minutes=15), (TargetKind.PERSON, person))

    response = admin_client.get(
        reverse("admin:escalation_escalationpolicy_change", args=[policy.pk])
    )

    assert response.status_code == 200
    text = response.text
    assert "Rotation: who is on call: " in text
    assert "A person: Executive" in text
    assert f"{reverse('admin:escalation_escalationstep_add')}?policy={policy.pk}" in text
    # No blank step rows here: a step is created with its targets on its own page.
    assert "steps-__prefix__" not in text


def test_step_add_page_takes_the_policy_from_the_link(admin_client):
    policy = PolicyFactory(name="Sev1 paging")

    response = admin_client.get(
        reverse("admin:escalation_escalationstep_add"), {"policy": policy.pk}
    )

    assert response.status_code == 200
    assert "Sev1 paging" in response.text


# --- teams and the rest ----------------------------------------------------------------------


def test_team_autocomplete_still_serves_the_incident_form(admin_client):
    TeamFactory(name="Payments", slug="payments")
    TeamFactory(name="Search", slug="search")

    response = admin_client.get(
        reverse("admin:autocomplete"),
        {"app_label": "incidents", "model_name": "incident", "field_name": "team", "term": "pay"},
    )

    assert response.status_code == 200
    assert [r["text"] for r in response.json()["results"]] == ["Payments"]


def test_team_page_shows_who_is_on_call(admin_client):
    team = TeamFactory(name="Payments")
    rotation_with([PersonFactory(name="Ada")], team=team, name="Primary")

    with time_machine.travel(NOW, tick=False):
        response = admin_client.get(reverse("admin:escalation_team_change", args=[team.pk]))

    assert "Primary: Ada until" in response.text


@pytest.mark.parametrize(
    "model",
    [
        "team",
        "person",
        "rotation",
        "override",
        "businesscalendar",
        "escalationpolicy",
        "escalationstep",
    ],
)
def test_changelists_and_add_pages_open(admin_client, model):
    policy = PolicyFactory()
    rotation = rotation_with([PersonFactory()])
    step(policy, 0, timedelta(0), (TargetKind.ONCALL, rotation))
    OverrideFactory(
        rotation=rotation,
        person=PersonFactory(),
        starts_at=NOW,
        ends_at=NOW + timedelta(hours=2),
    )
    RotationFactory()  # a rotation without members shows nobody

    assert admin_client.get(reverse(f"admin:escalation_{model}_changelist")).status_code == 200
    assert admin_client.get(reverse(f"admin:escalation_{model}_add")).status_code == 200


def test_policy_page_edits_existing_steps(admin_client):
    policy = PolicyFactory(name="Sev1 paging")
    rotation = rotation_with([PersonFactory()])
    first = step(policy, 0, timedelta(0), (TargetKind.ONCALL, rotation))

    response = admin_client.post(
        reverse("admin:escalation_escalationpolicy_change", args=[policy.pk]),
        {
            "name": "Sev1 paging",
            "description": "",
            "repeat": "1",
            "repeat_after": "00:30:00",
            **formset(
                "steps",
                [
                    {
                        "id": str(first.pk),
                        "policy": str(policy.pk),
                        "position": "0",
                        "delay": "00:05:00",
                        "condition": "unacknowledged",
                        "calendar": "",
                    }
                ],
                initial=1,
            ),
        },
    )

    assert response.status_code == 302
    first.refresh_from_db()
    assert first.delay == timedelta(minutes=5)
    assert first.targets.count() == 1


def test_oncall_now_panel_lists_every_team_for_the_admin_index(people_for_panel):
    html = render_to_string(
        "escalation/admin/oncall_now.html", {"oncall_teams": oncall_now_all_teams(NOW)}
    )

    assert "Payments" in html
    assert "Ada" in html
    assert "<em>(override)</em>" in html
    assert "Search" in html
    assert "No rotation." in html


@pytest.fixture
def people_for_panel():
    team = TeamFactory(name="Payments")
    ada, bo = PersonFactory(name="Ada"), PersonFactory(name="Bo")
    rotation_with([ada], team=team, name="Primary")
    backup = rotation_with([ada], team=team, name="Backup")
    OverrideFactory(
        rotation=backup,
        person=bo,
        starts_at=NOW - timedelta(hours=1),
        ends_at=NOW + timedelta(days=1),
    )
    TeamFactory(name="Search")
