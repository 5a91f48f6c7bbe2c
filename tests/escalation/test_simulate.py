import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from escalation.models import ContactKind, Page, StepCondition, TargetKind
from tests.incidents.factories import SeverityFactory

from .factories import ContactMethodFactory, PersonFactory, PolicyFactory, step

pytestmark = pytest.mark.django_db
MIN = timedelta(minutes=1)


@pytest.fixture
def sev1():
    """The Alchemorsel management matrix for Sev1 (CTO 30 min, CEO 1 h, Board 2 h,
    External 4 h) behind a paging chain (primary at once, secondary at 15 min)."""
    people = {}
    for name in ("Primary", "Secondary", "CTO", "CEO", "Board", "External"):
        person = PersonFactory(name=name, backup_after=10 * MIN)
        ContactMethodFactory(person=person, address=f"{name.lower()}@example.com")
        people[name] = person
    ContactMethodFactory(
        person=people["CTO"],
        position=1,
        kind=ContactKind.SMS_WEBHOOK,
        address="https://sms.example.com/send",
    )
    policy = PolicyFactory(name="Sev1")
    step(policy, 0, 0 * MIN, (TargetKind.PERSON, people["Primary"]))
    step(policy, 1, 15 * MIN, (TargetKind.PERSON, people["Secondary"]))
    for position, (name, delay) in enumerate(
        [("CTO", 30), ("CEO", 60), ("Board", 120), ("External", 240)], start=2
    ):
        step(
            policy,
            position,
            delay * MIN,
            (TargetKind.PERSON, people[name]),
            condition=StepCondition.UNRESOLVED,
        )
    return SeverityFactory(level=1, escalation_policy=policy)


def test_simulation_lists_the_chain_then_the_matrix_in_order_with_backups(sev1):
    out = StringIO()
    call_command("simulate_escalation", "--severity", "1", "--json", stdout=out)
    pages = json.loads(out.getvalue())["pages"]
    assert [(p["offset_seconds"] // 60, p["person"], p["backup"]) for p in pages] == [
        (0, "Primary", False),
        (15, "Secondary", False),
        (30, "CTO", False),
        (40, "CTO", True),  # no acknowledgement in 10 min: the backup method
        (60, "CEO", False),
        (120, "Board", False),
        (240, "External", False),
    ]
    assert pages[3]["method"] == "SMS gateway webhook"
    assert not Page.objects.exists()  # a simulation pages nobody


def test_simulation_text_output_and_horizon(sev1):
    out = StringIO()
    call_command("simulate_escalation", "--severity", "1", "--minutes", "45", stdout=out)
    text = out.getvalue()
    assert "Sev1: policy Sev1, if nobody acknowledges:" in text
    assert "+     0s  step 1  Primary  Email  primary@example.com  [unacknowledged]" in text
    assert "CTO  SMS gateway webhook (backup)" in text
    assert "CEO" not in text


def test_simulation_refuses_unknown_severity_and_missing_policy():
    SeverityFactory(level=3)
    with pytest.raises(CommandError, match=r"No severity level 9 \(known: 3\)"):
        call_command("simulate_escalation", "--severity", "9")
    with pytest.raises(CommandError, match="Sev3 has no escalation policy"):
        call_command("simulate_escalation", "--severity", "3")
