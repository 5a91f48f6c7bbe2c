from __future__ import annotations

from datetime import date, timedelta

import factory

from escalation.models import (
    BusinessCalendar,
    ContactKind,
    ContactMethod,
    EscalationPolicy,
    EscalationStep,
    Override,
    Person,
    Rotation,
    RotationMember,
    StepCondition,
    StepTarget,
    TargetKind,
)
from tests.incidents.factories import TeamFactory, UserFactory


class PersonFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Person

    name = factory.Sequence(lambda n: f"Person {n}")
    time_zone = "UTC"


class ContactMethodFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ContactMethod

    person = factory.SubFactory(PersonFactory)
    kind = ContactKind.EMAIL
    address = factory.Sequence(lambda n: f"person{n}@example.com")
    position = 0


class RotationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Rotation

    team = factory.SubFactory(TeamFactory)
    name = factory.Sequence(lambda n: f"Primary {n}")
    time_zone = "UTC"
    shift_length = timedelta(days=7)
    handoff_time = "09:00"
    start_date = date(2026, 1, 5)  # a Monday


def rotation_with(people: list[Person], **kwargs) -> Rotation:
    rotation = RotationFactory(**kwargs)
    for position, person in enumerate(people):
        RotationMember.objects.create(rotation=rotation, person=person, position=position)
    return rotation


class OverrideFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Override

    rotation = factory.SubFactory(RotationFactory)
    person = factory.SubFactory(PersonFactory)


class CalendarFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = BusinessCalendar

    name = factory.Sequence(lambda n: f"Office hours {n}")
    time_zone = "UTC"


class PolicyFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = EscalationPolicy

    name = factory.Sequence(lambda n: f"Policy {n}")


def step(policy, position, delay, *targets, condition=StepCondition.UNACKNOWLEDGED, **kwargs):
    """A step with targets given as (kind, object) pairs."""
    created = EscalationStep.objects.create(
        policy=policy, position=position, delay=delay, condition=condition, **kwargs
    )
    for kind, obj in targets:
        field = {
            TargetKind.ONCALL: "rotation",
            TargetKind.NEXT_IN_LINE: "rotation",
            TargetKind.PERSON: "person",
            TargetKind.TEAM: "team",
        }[kind]
        StepTarget.objects.create(step=created, kind=kind, **{field: obj})
    return created


__all__ = ["TeamFactory", "UserFactory"]
