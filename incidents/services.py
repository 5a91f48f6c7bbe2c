"""Every write to an incident. The admin, the API, webhooks and tasks all call these.

Each service runs in one transaction, locks the incident row, re-checks state inside the
lock, writes with a compare-and-set on the status it read, and appends one timeline event
per change. `actor` is the user who acted, or None with `actor_label` for the system.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from escalation.models import Team

from .deadlines import compute_deadlines
from .exceptions import ConcurrentChange, InvalidInput, InvalidTransition
from .models import (
    OPEN_STATUSES,
    STATUS_TIMESTAMP,
    Counter,
    EventKind,
    Impact,
    Incident,
    IncidentStatus,
    Role,
    RoleAssignment,
    Runbook,
    Service,
    Severity,
    TimelineEvent,
)

S = IncidentStatus
Actor = AbstractBaseUser | None

MAX_NOTE_LENGTH = 10_000
# Fields `incident_update` may change; status, severity and roles have their own services.
EDITABLE_FIELDS = (
    "title",
    "summary",
    "services",
    "team",
    "impact",
    "customer_impact",
    "is_drill",
    "false_positive",
    "runbook",
)


def next_number(name: str) -> int:
    """The next value of counter `name`. Must run inside the caller's transaction: the row
    stays locked until it commits, which serialises concurrent callers."""
    table = connection.ops.quote_name(Counter._meta.db_table)
    increment = f"UPDATE {table} SET value = value + 1 WHERE name = %s RETURNING value"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(increment, [name])
        row = cursor.fetchone()
        if row is None:
            try:
                with transaction.atomic():
                    Counter.objects.create(name=name, value=0)
            except IntegrityError:
                pass  # created concurrently; the increment below takes our number
            cursor.execute(increment, [name])
            row = cursor.fetchone()
    return row[0]


def _user(actor: Actor):
    """The user behind `actor`, or None for the system and anonymous callers."""
    return actor if actor is not None and actor.is_authenticated else None


def timeline_event(
    *,
    incident: Incident | int,
    kind: str,
    actor: Actor,
    now: datetime,
    previous: str = "",
    value: str = "",
    message: str = "",
    actor_label: str = "",
) -> TimelineEvent:
    """An unsaved timeline event, for callers that insert many at once (`bulk_create`)."""
    user = _user(actor)
    if not actor_label:
        actor_label = user.get_username() if user is not None else "system"
    return TimelineEvent(
        incident_id=incident.pk if isinstance(incident, Incident) else incident,
        at=now,
        kind=kind,
        actor=user,
        actor_label=actor_label[:150],
        previous=str(previous),
        value=str(value),
        message=message,
    )


def timeline_record(**fields) -> TimelineEvent:
    """Append one event to an incident's timeline (the arguments of `timeline_event`).
    Call inside the writing transaction."""
    event = timeline_event(**fields)
    event.save()
    return event


def refuse_unknown_fields(changes: dict[str, Any], allowed: Iterable[str]) -> None:
    """InvalidInput naming the first field of `changes` that is not in `allowed`."""
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise InvalidInput(unknown[0], "cannot be changed here.")


def _clean_text(field: str, value: str, *, required: bool, max_length: int) -> str:
    value = (value or "").strip()
    if required and not value:
        raise InvalidInput(field, "may not be blank.")
    if len(value) > max_length:
        raise InvalidInput(field, f"is {len(value)} characters long; at most {max_length}.")
    return value


def _lock(incident: Incident | int) -> Incident:
    pk = incident.pk if isinstance(incident, Incident) else incident
    return Incident.objects.select_for_update().select_related("severity").get(pk=pk)


def _compare_and_set(incident: Incident, expected_status: str, fields: dict[str, Any]) -> None:
    changed = Incident.objects.filter(pk=incident.pk, status=expected_status).update(**fields)
    if not changed:
        raise ConcurrentChange(f"{incident.reference} changed while this request ran; retry.")
    for name, value in fields.items():
        setattr(incident, name, value)


def incident_declare(
    *,
    title: str,
    severity: Severity,
    actor: Actor,
    summary: str = "",
    services: Iterable[Service] = (),
    team: Team | None = None,
    impact: str = Impact.NONE,
    customer_impact: str = "",
    is_drill: bool = False,
    detected_at: datetime | None = None,
    actor_label: str = "",
    runbook: Runbook | None = None,
    now: datetime | None = None,
) -> Incident:
    """Open a new incident in `triggered`, with the next INC-n reference and its deadlines.

    Not idempotent: each call declares one incident. Deadlines run from `detected_at`
    (default: now); the update cadence from now. Records a `declared` event.
    """
    now = now or timezone.now()
    title = _clean_text("title", title, required=True, max_length=200)
    detected_at = detected_at or now
    if detected_at > now:
        raise InvalidInput("detected_at", "is in the future.")
    if impact not in Impact.values:
        raise InvalidInput("impact", f"{impact!r} is not one of {', '.join(Impact.values)}.")
    deadlines = compute_deadlines(severity, detected_at, now, status=S.TRIGGERED)
    from escalation.services import plan_fields

    from .comms import updates as comms

    services = list(services)
    with transaction.atomic():
        number = next_number("incident")
        incident = Incident.objects.create(
            number=number,
            reference=f"INC-{number}",
            title=title,
            summary=summary or "",
            severity=severity,
            team=team,
            impact=impact,
            customer_impact=customer_impact or "",
            is_drill=is_drill,
            declared_by=_user(actor),
            runbook=runbook,
            created_at=now,
            updated_at=now,
            detected_at=detected_at,
            **deadlines.as_fields(),
            **plan_fields(severity=severity, started_at=now),
            **comms.declare_fields(services=services, is_drill=is_drill, now=now),
        )
        if services:
            incident.services.add(*services)
        timeline_record(
            incident=incident,
            kind=EventKind.DECLARED,
            actor=actor,
            actor_label=actor_label,
            now=now,
            value=severity.name,
            message=("[DRILL] " if is_drill else "") + title,
        )
        comms.chat_enqueue(incident, "initial", team=team)
    return incident


def incident_transition(
    *,
    incident: Incident | int,
    to: str,
    actor: Actor,
    message: str = "",
    actor_label: str = "",
    now: datetime | None = None,
) -> Incident:
    """Move an incident to status `to`: the one transition service the named verbs wrap.

    No-op (no event) if already there; raises InvalidTransition, changing nothing, if the
    move is not in TRANSITIONS. Stamps the status's `<status>_at` the first time, recomputes
    the stored deadlines and records one event. resolved -> investigating is a re-open.
    """
    if to not in S.values:
        raise InvalidInput("status", f"{to!r} is not one of {', '.join(S.values)}.")
    with transaction.atomic():
        return _transition_locked(
            _lock(incident),
            to=to,
            actor=actor,
            message=message,
            actor_label=actor_label,
            now=now or timezone.now(),
        )


def _transition_locked(
    locked: Incident, *, to: str, actor: Actor, message: str, actor_label: str, now: datetime
) -> Incident:
    """The body of `incident_transition`, for an incident already locked by the caller."""
    current = locked.status
    if current == to:
        return locked
    if not locked.can_transition(to):
        allowed = ", ".join(locked.legal_transitions) or "none: it is final"
        raise InvalidTransition(
            locked.reference, current, to, f"from {current} it can go to {allowed}."
        )
    fields: dict[str, Any] = {"status": to, "updated_at": now}
    stamp = STATUS_TIMESTAMP[to]
    if getattr(locked, stamp) is None or to in {S.RESOLVED, S.CLOSED}:
        fields[stamp] = now
    if to in {S.INVESTIGATING, S.MITIGATING, S.MONITORING} and locked.acknowledged_at is None:
        # Working on it implies someone has acknowledged it.
        fields["acknowledged_at"] = now
    reopening = current == S.RESOLVED and to in OPEN_STATUSES
    if reopening:
        fields.update(resolved_at=None, reopened_at=now, reopened_count=locked.reopened_count + 1)
    for name, value in fields.items():
        setattr(locked, name, value)
    fields.update(
        compute_deadlines(
            locked.severity,
            locked.detected_at,
            now,
            status=to,
            update_base=locked.update_base,
        ).as_fields()
    )
    from .comms.updates import transition_fields

    fields.update(transition_fields(locked, reopening=reopening, now=now))
    _compare_and_set(locked, current, fields)
    kind = {
        S.ACKNOWLEDGED: EventKind.ACKNOWLEDGED,
        S.RESOLVED: EventKind.RESOLVED,
        S.CLOSED: EventKind.CLOSED,
    }.get(to, EventKind.REOPENED if reopening else EventKind.STATUS_CHANGED)
    timeline_record(
        incident=locked,
        kind=kind,
        actor=actor,
        actor_label=actor_label,
        now=now,
        previous=current,
        value=to,
        message=message,
    )
    from escalation.services import on_status_change

    on_status_change(locked, current, now)
    return locked


def incident_acknowledge(
    *,
    incident: Incident | int,
    actor: Actor,
    actor_label: str = "",
    now: datetime | None = None,
) -> Incident:
    """Acknowledge a triggered incident. Idempotent: an open incident that is already
    acknowledged is returned unchanged; a resolved or closed one is refused."""
    with transaction.atomic():
        locked = _lock(incident)
        if locked.status in OPEN_STATUSES and locked.acknowledged_at is not None:
            return locked
        return _transition_locked(
            locked,
            to=S.ACKNOWLEDGED,
            actor=actor,
            message="",
            actor_label=actor_label,
            now=now or timezone.now(),
        )


def incident_resolve(
    *,
    incident: Incident | int,
    actor: Actor,
    resolution: str = "",
    actor_label: str = "",
    now: datetime | None = None,
) -> Incident:
    """Resolve an open incident; `resolution` says what fixed it. No-op if resolved."""
    resolution = _clean_text("resolution", resolution, required=False, max_length=MAX_NOTE_LENGTH)
    return incident_transition(
        incident=incident,
        to=S.RESOLVED,
        actor=actor,
        message=resolution,
        actor_label=actor_label,
        now=now,
    )


def incident_reopen(
    *,
    incident: Incident | int,
    actor: Actor,
    reason: str = "",
    now: datetime | None = None,
) -> Incident:
    """Re-open a resolved incident (a failed resolution) into investigating."""
    reason = _clean_text("reason", reason, required=False, max_length=MAX_NOTE_LENGTH)
    with transaction.atomic():
        locked = _lock(incident)
        if locked.status != S.RESOLVED:
            raise InvalidTransition(
                locked.reference,
                locked.status,
                S.INVESTIGATING,
                "only a resolved incident can be re-opened.",
            )
        return _transition_locked(
            locked,
            to=S.INVESTIGATING,
            actor=actor,
            message=reason,
            actor_label="",
            now=now or timezone.now(),
        )


def incident_close(
    *,
    incident: Incident | int,
    actor: Actor,
    now: datetime | None = None,
) -> Incident:
    """Close a resolved incident: the end of its life, after the follow-up is done."""
    return incident_transition(incident=incident, to=S.CLOSED, actor=actor, now=now)


def incident_change_severity(
    *,
    incident: Incident | int,
    severity: Severity,
    actor: Actor,
    reason: str = "",
    now: datetime | None = None,
) -> Incident:
    """Set a new severity and re-base the deadlines on its targets. No-op if unchanged;
    refused on a closed incident."""
    now = now or timezone.now()
    reason = _clean_text("reason", reason, required=False, max_length=MAX_NOTE_LENGTH)
    with transaction.atomic():
        locked = _lock(incident)
        if locked.severity_id == severity.pk:
            return locked
        if locked.status == S.CLOSED:
            raise InvalidTransition(
                locked.reference,
                locked.status,
                f"severity {severity.name}",
                "a closed incident cannot change.",
            )
        previous = locked.severity
        locked.severity = severity
        fields: dict[str, Any] = {"severity": severity, "updated_at": now}
        fields.update(
            compute_deadlines(
                severity,
                locked.detected_at,
                now,
                status=locked.status,
                update_base=locked.update_base,
            ).as_fields()
        )
        _compare_and_set(locked, locked.status, fields)
        timeline_record(
            incident=locked,
            kind=EventKind.SEVERITY_CHANGED,
            actor=actor,
            now=now,
            previous=previous.name,
            value=severity.name,
            message=reason,
        )
        from escalation.services import replan

        replan(locked, severity, now)
    return locked


def incident_assign_role(
    *,
    incident: Incident | int,
    role: Role,
    user: AbstractBaseUser,
    actor: Actor,
    now: datetime | None = None,
) -> RoleAssignment:
    """Give `role` on the incident to `user`, ending the previous holder's assignment.
    Idempotent: assigning the current holder again changes nothing. Refused when closed."""
    now = now or timezone.now()
    if not user.is_active:
        raise InvalidInput("user", f"{user.get_username()} is not an active user.")
    with transaction.atomic():
        locked = _lock(incident)
        current = (
            RoleAssignment.objects.select_for_update()
            .select_related("user")
            .filter(incident=locked, role=role, until__isnull=True)
            .first()
        )
        if current is not None and current.user_id == user.pk:
            return current
        if locked.status == S.CLOSED:
            raise InvalidTransition(
                locked.reference,
                locked.status,
                f"{role.name} assignment",
                "a closed incident cannot change.",
            )
        if current is not None:
            RoleAssignment.objects.filter(pk=current.pk).update(until=now)
        assignment = RoleAssignment.objects.create(
            incident=locked,
            role=role,
            user=user,
            since=now,
            assigned_by=_user(actor),
        )
        Incident.objects.filter(pk=locked.pk).update(updated_at=now)
        timeline_record(
            incident=locked,
            kind=EventKind.ROLE_ASSIGNED,
            actor=actor,
            now=now,
            previous=current.user.get_username() if current else "",
            value=user.get_username(),
            message=role.name,
        )
    return assignment


def incident_add_note(
    *,
    incident: Incident | int,
    body: str,
    actor: Actor,
    now: datetime | None = None,
) -> TimelineEvent:
    """Append a free-text note to the timeline. Allowed in every status."""
    now = now or timezone.now()
    body = _clean_text("body", body, required=True, max_length=MAX_NOTE_LENGTH)
    with transaction.atomic():
        locked = _lock(incident)
        return timeline_record(
            incident=locked, kind=EventKind.NOTE, actor=actor, now=now, message=body
        )


def _display(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple | set):
        return ", ".join(sorted(str(v) for v in value))
    return str(value)


def incident_update(
    *,
    incident: Incident | int,
    changes: dict[str, Any],
    actor: Actor,
    now: datetime | None = None,
) -> Incident:
    """Change descriptive fields (EDITABLE_FIELDS). Records one `edited` event per field
    whose value really changed; unchanged values and an empty `changes` are no-ops."""
    refuse_unknown_fields(changes, EDITABLE_FIELDS)
    now = now or timezone.now()
    if "title" in changes:
        changes["title"] = _clean_text("title", changes["title"], required=True, max_length=200)
    if "services" in changes and not all(isinstance(v, Service) for v in changes["services"]):
        raise InvalidInput("services", "must be a list of services.")
    if "team" in changes and changes["team"] is not None and not isinstance(changes["team"], Team):
        raise InvalidInput("team", "must be a team or empty.")
    if (
        "runbook" in changes
        and changes["runbook"] is not None
        and not isinstance(changes["runbook"], Runbook)
    ):
        raise InvalidInput("runbook", "must be a runbook or empty.")
    for flag in ("is_drill", "false_positive"):
        if flag in changes and not isinstance(changes[flag], bool):
            raise InvalidInput(flag, "must be true or false.")
    if "impact" in changes and changes["impact"] not in Impact.values:
        raise InvalidInput("impact", f"{changes['impact']!r} is not a known impact.")
    with transaction.atomic():
        locked = _lock(incident)
        if locked.status == S.CLOSED:
            raise InvalidTransition(
                locked.reference, locked.status, "an edit", "a closed incident cannot change."
            )
        fields: dict[str, Any] = {}
        events: list[tuple[str, str, str]] = []
        for name, value in changes.items():
            if name == "services":
                before = {s.name for s in locked.services.all()}
                after = {s.name for s in value}
                if before != after:
                    locked.services.set(value)
                    events.append((name, _display(before), _display(after)))
                continue
            old = getattr(locked, name)
            if old != value:
                fields[name] = value
                events.append((name, _display(old), _display(value)))
        if not events:
            return locked
        fields["updated_at"] = now
        if any(name in {"services", "is_drill"} for name, _old, _new in events):
            from .comms.updates import public_update_fields

            fields.update(
                public_update_fields(
                    locked, now=now, is_drill=fields.get("is_drill", locked.is_drill)
                )
            )
        _compare_and_set(locked, locked.status, fields)
        for name, old, new in events:
            timeline_record(
                incident=locked,
                kind=EventKind.EDITED,
                actor=actor,
                now=now,
                previous=old,
                value=new,
                message=name.replace("_", " "),
            )
    return locked


def incident_merge(
    *,
    source: Incident | int,
    target: Incident | int,
    actor: Actor,
    reason: str = "",
    now: datetime | None = None,
) -> Incident:
    """Merge `source` into `target`, two incidents opened for one cause. The source's alerts
    and alert groups move to the target (so its later alerts join the target), copies of its
    timeline events are appended to the target's (marked with their origin; the source's own
    timeline stays as it was), both timelines record the merge, and the source is resolved
    and closed with `merged_into` pointing at the target. Returns the target.

    Refused (InvalidInput / InvalidTransition) when they are the same incident, either is
    closed, or the source was merged already.
    """
    from .models import Alert, AlertGroup

    now = now or timezone.now()
    reason = _clean_text("reason", reason, required=False, max_length=MAX_NOTE_LENGTH)
    source_pk = source.pk if isinstance(source, Incident) else source
    target_pk = target.pk if isinstance(target, Incident) else target
    if source_pk == target_pk:
        raise InvalidInput("target", "an incident cannot be merged into itself.")
    with transaction.atomic():
        # Ingestion locks an incident's firing alerts before the incident; so does the
        # merge, or a delivery re-sending the source's alerts and this merge would each
        # hold what the other waits for.
        list(
            Alert.objects.select_for_update()
            .filter(incident_id=source_pk, status="firing")
            .order_by("integration_id", "fingerprint")
            .values_list("pk", flat=True)
        )
        # Then both incidents in primary-key order, whichever way round the merge goes.
        locked = {
            i.pk: i
            for i in Incident.objects.select_for_update()
            .select_related("severity")
            .filter(pk__in=[source_pk, target_pk])
            .order_by("pk")
        }
        if len(locked) != 2:
            raise InvalidInput("target", "no such incident.")
        src, dst = locked[source_pk], locked[target_pk]
        for incident in (src, dst):
            if incident.status == S.CLOSED:
                raise InvalidTransition(
                    incident.reference,
                    incident.status,
                    "a merge",
                    "a closed incident cannot merge.",
                )
        Alert.objects.filter(incident=src).update(incident=dst)
        AlertGroup.objects.filter(incident=src).update(incident=dst)
        copies = [
            TimelineEvent(
                incident=dst,
                at=event.at,
                kind=event.kind,
                actor_id=event.actor_id,
                actor_label=event.actor_label,
                previous=event.previous,
                value=event.value,
                message=event.message,
                origin_id=event.origin_id or src.pk,
            )
            for event in TimelineEvent.objects.filter(incident=src).order_by("at", "pk")
        ]
        TimelineEvent.objects.bulk_create(copies, batch_size=500)
        if dst.services.exists() or src.services.exists():
            dst.services.add(*src.services.all())
        message = f"{src.reference} merged into {dst.reference}" + (f": {reason}" if reason else "")
        timeline_record(
            incident=dst,
            kind=EventKind.MERGED,
            actor=actor,
            now=now,
            previous=src.reference,
            value=dst.reference,
            message=message,
        )
        timeline_record(
            incident=src,
            kind=EventKind.MERGED,
            actor=actor,
            now=now,
            previous=src.reference,
            value=dst.reference,
            message=message,
        )
        if src.status != S.RESOLVED:
            _transition_locked(
                src, to=S.RESOLVED, actor=actor, message=message, actor_label="", now=now
            )
        _compare_and_set(src, src.status, {"merged_into": dst})
        _transition_locked(src, to=S.CLOSED, actor=actor, message=message, actor_label="", now=now)
        from .comms.updates import public_update_fields

        Incident.objects.filter(pk=dst.pk).update(
            updated_at=now, **public_update_fields(dst, now=now)
        )
    return dst


SEVERITY_EDITABLE = (
    "name",
    "description",
    "examples",
    "ack_target",
    "resolve_target",
    "update_interval",
    "postmortem_required",
    "postmortem_due_after",
    "notify_customers",
)


def severity_update(*, severity: Severity, changes: dict[str, Any], actor: Actor) -> Severity:
    """Change a severity's targets, cadence or description, validated by the model (each
    error on a field: Django's ValidationError, a 400 in the API). Incidents already
    running keep their stored deadlines until their next change re-computes them."""
    from django.core.exceptions import NON_FIELD_ERRORS
    from django.core.exceptions import ValidationError as DjangoValidationError

    refuse_unknown_fields(changes, SEVERITY_EDITABLE)
    for name, value in changes.items():
        setattr(severity, name, value)
    try:
        severity.full_clean()
    except DjangoValidationError as error:
        errors = error.message_dict
        # The post-mortem constraint is about the due time: report it there.
        for message in errors.pop(NON_FIELD_ERRORS, []):
            errors.setdefault("postmortem_due_after", []).append(message)
        raise DjangoValidationError(errors) from error
    if changes:
        severity.save(update_fields=list(changes))
    return severity
