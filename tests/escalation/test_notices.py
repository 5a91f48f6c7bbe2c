from datetime import UTC, date, datetime, timedelta

import pytest

from escalation import services as engine
from escalation.models import OncallNotice
from tests.incidents.factories import TeamFactory, UserFactory

from .factories import ContactMethodFactory, PersonFactory, rotation_with

pytestmark = pytest.mark.django_db
# Rotation starts Monday 2026-11-02 09:00 UTC, weekly: Ann, then Ben from 2026-11-09 09:00.
HANDOFF = datetime(2026, 11, 9, 9, 0, tzinfo=UTC)


@pytest.fixture
def rotation():
    ann, ben = PersonFactory(name="Ann"), PersonFactory(name="Ben", time_zone="Europe/Berlin")
    ContactMethodFactory(person=ann, address="ann@example.com")
    ContactMethodFactory(person=ben, address="ben@example.com")
    return rotation_with(
        [ann, ben], start_date=date(2026, 11, 2), handoff_notice=timedelta(hours=1), name="Primary"
    )


def test_incoming_person_is_told_once_within_the_notice_window(smtp_server, rotation):
    assert engine.notify_handoffs(now=HANDOFF - timedelta(hours=2)) == 0
    assert engine.notify_handoffs(now=HANDOFF - timedelta(minutes=59)) == 1
    assert engine.notify_handoffs(now=HANDOFF - timedelta(minutes=58)) == 0
    (message,) = smtp_server.messages
    assert message["To"] == "ben@example.com"
    assert "from Mon 09 Nov 10:00 (Europe/Berlin)" in message["Subject"]
    assert "after Ann" in message.get_content()


def test_a_failed_notice_is_tried_again(smtp_server, rotation):
    smtp_server.reject_with("451 4.3.0 try later")
    assert engine.notify_handoffs(now=HANDOFF - timedelta(minutes=30)) == 0
    assert not OncallNotice.objects.exists()
    smtp_server.reject_with(None)
    assert engine.notify_handoffs(now=HANDOFF - timedelta(minutes=29)) == 1
    assert len(smtp_server.messages) == 1


def test_weekly_summary_goes_to_each_member_once_a_week(smtp_server, rotation):
    team = rotation.team
    team.members.add(
        UserFactory(username="u1", email="u1@example.com"),
        UserFactory(username="u2", email="u2@example.com"),
        UserFactory(username="gone", email="gone@example.com", is_active=False),
    )
    TeamFactory()  # a team without rotations gets nothing
    monday = datetime(2026, 11, 9, 8, 0, tzinfo=UTC)
    assert engine.send_weekly_summaries(now=monday) == 2
    assert engine.send_weekly_summaries(now=monday + timedelta(hours=3)) == 0
    assert sorted(m["To"] for m in smtp_server.messages) == ["u1@example.com", "u2@example.com"]
    body = smtp_server.messages[0].get_content()
    assert "- Primary: Ann until Mon 09 Nov 09:00 (UTC); then Ben" in body
    assert engine.send_weekly_summaries(now=monday + timedelta(days=7)) == 2
