"""The escalation engine. Every write of this app happens here.

The database drives time: `engine_tick` (a Celery beat task every ENGINE_TICK_SECONDS)
selects what is due on indexes, in batches, with `select_for_update(skip_locked=True)`, and
acts; each write is a compare-and-set, so a tick that runs twice, late, or in two beat
processes at once is harmless. Pages are an outbox: rows move pending -> sending -> sent /
failed / cancelled / unknown, deliveries read pending rows, and delivery tasks are queued
only with `transaction.on_commit`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.core import signing
from django.db import IntegrityError, transaction
from django.db.models import Exists, F, Min, OuterRef, Q
from django.urls import reverse
from django.utils import timezone

from incidents.models import OPEN_STATUSES, Alert, EventKind, Incident, IncidentStatus
from incidents.services import timeline_record

from .models import (
    ContactMethod,
    EngineState,
    Page,
    PageAttempt,
    PageStatus,
    Person,
    Rotation,
    StepCondition,
    TargetKind,
)
from .planning import Plan, next_position, policy_snapshot, round_length, step_due_at

logger = logging.getLogger(__name__)
ENGINE = "escalation engine"
ACK_SALT = "escalation.page-ack"
BATCH = 200
# Temporary failures on one contact method are retried this many times, with this backoff,
# before the next method takes over.
RETRY_BACKOFF = (timedelta(seconds=30), timedelta(minutes=2))
# A queued delivery that has not started after this long is queued again (the broker may have
# lost it, e.g. Redis restarted empty). A duplicate is harmless: only a pending page is sent.
REQUEUE_AFTER = timedelta(seconds=max(15.0, 3 * settings.ENGINE_TICK_SECONDS))


class EscalationError(Exception):
    """A refused escalation request; the message says why."""


def _engine_event(incident: Incident, kind: str, now: datetime, *, value: str, message: str):
    """A timeline event written by the engine."""
    return timeline_record(
        incident=incident,
        kind=kind,
        actor=None,
        actor_label=ENGINE,
        now=now,
        value=value,
        message=message,
    )


def _cancel_page(page: Page, now: datetime, reason: str) -> bool:
    """Cancel a pending page (it will never be sent) and say why on the timeline."""
    if not Page.objects.filter(pk=page.pk, status=PageStatus.PENDING).update(
        status=PageStatus.CANCELLED, next_attempt_at=None, last_error=reason
    ):
        return False
    _engine_event(
        page.incident,
        EventKind.PAGE_CANCELLED,
        now,
        value=page.person.name,
        message=f"Page not sent: {reason}.",
    )
    return True


# --- plans ----------------------------------------------------------------------------------


def plan_fields(*, severity, started_at: datetime, version: int = 1) -> dict[str, Any]:
    """The escalation fields of an incident starting now under `severity`'s policy."""
    plan = policy_snapshot(severity.escalation_policy, version=version)
    return {
        "escalation_plan": plan,
        "escalation_step": 0,
        "escalation_round": 0,
        "escalation_started_at": started_at,
        "next_escalation_at": step_due_at(plan, started_at, 0, 0),
    }


def _condition_holds(condition: str, status: str) -> bool:
    if condition == StepCondition.UNACKNOWLEDGED:
        return status == IncidentStatus.TRIGGERED
    return status in OPEN_STATUSES


def _step(incident: Incident, plan_version: int, step_index: int) -> dict | None:
    plan = incident.escalation_plan or {}
    if plan.get("version", 1) != plan_version:
        return None
    steps = plan.get("steps") or []
    return steps[step_index] if step_index < len(steps) else None


# --- who gets paged --------------------------------------------------------------------------


def resolve_targets(step: dict, *, at: datetime, is_drill: bool = False) -> list[Person]:
    """The people a step pages at `at`, in target order, each once. Inactive people are left
    out, and for a drill only those who opted in to drills."""
    people: list[Person] = []
    for target in step.get("targets", []):
        kind = target["kind"]
        if kind in (TargetKind.ONCALL, TargetKind.NEXT_IN_LINE):
            from .oncall import next_in_line, oncall_at

            rotation = (
                Rotation.objects.prefetch_related("members__person", "overrides__person")
                .filter(pk=target["rotation_id"])
                .first()
            )
            if rotation is None:
                continue
            pick = oncall_at if kind == TargetKind.ONCALL else next_in_line
            person = pick(rotation, at)
            if person is not None:
                people.append(person)
        elif kind == TargetKind.PERSON:
            people.extend(Person.objects.filter(pk=target["person_id"]))
        elif kind == TargetKind.TEAM:
            people.extend(
                Person.objects.filter(user__teams=target["team_id"]).order_by("name", "pk")
            )
    seen: set[int] = set()
    chosen = []
    for person in people:
        if person.pk in seen or not person.is_active or (is_drill and not person.opt_in_drills):
            continue
        seen.add(person.pk)
        chosen.append(person)
    return chosen


# --- escalation ------------------------------------------------------------------------------


def _current_round(plan: Plan, started_at: datetime, now: datetime) -> int:
    """The round `now` falls in (0 while the first round runs)."""
    length = round_length(plan)
    if not length or now <= started_at:
        return 0
    return min(int((now - started_at) / length), plan.get("repeat", 0))


def _advance_fields(incident: Incident, now: datetime) -> dict[str, Any]:
    plan = incident.escalation_plan or {}
    position = next_position(plan, incident.escalation_step, incident.escalation_round)
    if position is None or incident.escalation_started_at is None:
        return {"next_escalation_at": None, "escalation_step": incident.escalation_step + 1}
    step_index, round_ = position
    # After an outage or a re-plan, rounds that are entirely over are not replayed: the
    # chain goes on from the start of the round running now (no burst of repeats).
    current = _current_round(plan, incident.escalation_started_at, now)
    if round_ < current:
        step_index, round_ = 0, current
    return {
        "escalation_step": step_index,
        "escalation_round": round_,
        "next_escalation_at": step_due_at(plan, incident.escalation_started_at, step_index, round_),
    }


def _escalate_one(incident: Incident, now: datetime) -> int:
    """Fire the incident's due step (if its condition holds) and schedule the next.
    The caller holds the row lock. Returns the number of pages created."""
    plan: Plan = incident.escalation_plan or {}
    version = plan.get("version", 1)
    step_index, round_ = incident.escalation_step, incident.escalation_round
    due = incident.next_escalation_at
    steps = plan.get("steps") or []
    live = incident.status in OPEN_STATUSES and step_index < len(steps)
    forced = plan.get("forced") == [step_index, round_]
    fields: dict[str, Any] = (
        _advance_fields(incident, now) if live else {"next_escalation_at": None}
    )
    if forced:
        fields["escalation_plan"] = {**plan, "forced": None}
    changed = Incident.objects.filter(
        pk=incident.pk,
        next_escalation_at=due,
        escalation_step=step_index,
        escalation_round=round_,
    ).update(**fields)
    if not changed or not live:
        return 0
    step = steps[step_index]
    label = f"step {step_index + 1}" + (f", round {round_ + 1}" if round_ else "")
    if not forced and not _condition_holds(step["condition"], incident.status):
        _engine_event(
            incident,
            EventKind.ESCALATED,
            now,
            value=label,
            message=f"Escalation {label} skipped: the incident is no longer {step['condition']}.",
        )
        return 0
    people = resolve_targets(step, at=now, is_drill=incident.is_drill)
    if not people:
        _engine_event(
            incident,
            EventKind.ESCALATED,
            now,
            value=label,
            message=f"Escalation {label}: nobody to page (no one on call).",
        )
        return 0
    Page.objects.bulk_create(
        [
            Page(
                incident=incident,
                plan_version=version,
                step_index=step_index,
                round=round_,
                person=person,
                due_at=due or now,
                created_at=now,
                next_attempt_at=now,
            )
            for person in people
        ]
    )
    _engine_event(
        incident,
        EventKind.ESCALATED,
        now,
        value=label,
        message=f"Escalation {label} ({step['condition']}): paging "
        + ", ".join(p.name for p in people)
        + ".",
    )
    return len(people)


# --- maintenance windows silence paging -----------------------------------------------------

# A held escalation (or page) is looked at again this often while its window runs, so a
# window cancelled or cut short releases it within a minute.
MAINTENANCE_RECHECK = timedelta(minutes=1)


@dataclass(frozen=True)
class Silence:
    """The running maintenance window that silences an incident, and the incident's
    services (all of which it covers)."""

    window_id: int
    title: str
    ends_at: datetime
    services: tuple[str, ...]

    def resume_at(self, now: datetime) -> datetime:
        return min(self.ends_at, now + MAINTENANCE_RECHECK)


def silences_for(incident_ids: list[int], *, now: datetime) -> dict[int, Silence]:
    """The incidents among `incident_ids` that a running maintenance window silences, each
    with the window that ends last. A window silences an incident only when all hold:

    - the incident was opened by an alert: nobody declared it (`declared_by` is None) and
      it has alerts. An incident a person declared is paged as usual: they want help;
    - it was detected inside the window (`starts_at <= detected_at < ends_at`): an incident
      already running when the window began keeps escalating;
    - the window covers every one of the incident's services (it has at least one): an
      incident that also touches a service outside the window is not planned work.

    At most two queries, whatever the number of incidents: the running windows with their
    services and, if there are any, the candidates' services (with their detection time)."""
    from incidents.comms.maintenance import windows_active

    if not incident_ids:
        return {}
    windows: dict[int, tuple[str, datetime, datetime, set[int]]] = {}
    for window_id, title, starts_at, ends_at, service_id in (
        windows_active(now=now)
        .filter(services__isnull=False)
        .values_list("pk", "title", "starts_at", "ends_at", "services__id")
    ):
        windows.setdefault(window_id, (title, starts_at, ends_at, set()))[3].add(service_id)
    if not windows:
        return {}
    candidates: dict[int, tuple[datetime, dict[int, str]]] = {}
    for incident_id, detected_at, service_id, service_name in (
        Incident.services.through.objects.filter(
            incident_id__in=incident_ids, incident__declared_by__isnull=True
        )
        .filter(Exists(Alert.objects.filter(incident_id=OuterRef("incident_id"))))
        .values_list("incident_id", "incident__detected_at", "service_id", "service__name")
    ):
        candidates.setdefault(incident_id, (detected_at, {}))[1][service_id] = service_name
    silences = {}
    for incident_id, (detected_at, services) in candidates.items():
        covering = [
            (ends_at, window_id, title)
            for window_id, (title, starts_at, ends_at, covered) in windows.items()
            if starts_at <= detected_at < ends_at and services.keys() <= covered
        ]
        if covering:
            ends_at, window_id, title = max(covering)
            silences[incident_id] = Silence(
                window_id, title, ends_at, tuple(sorted(services.values()))
            )
    return silences


def _silences_or_none(incident_ids: list[int], *, now: datetime) -> dict[int, Silence]:
    """`silences_for`, failing open: if the maintenance lookup breaks, paging goes on (a
    page too many beats a page lost), and the log says why."""
    try:
        with transaction.atomic():
            return silences_for(incident_ids, now=now)
    except Exception:
        logger.exception("maintenance windows could not be read; paging as usual")
        return {}


def _note_silence(incident: Incident, silence: Silence, now: datetime) -> dict[str, Any]:
    """The plan change that marks the incident as silenced by this window, and the
    timeline event saying why, the first time this window silences it; else {}."""
    plan = incident.escalation_plan or {}
    if plan.get("silenced_by") == silence.window_id:
        return {}
    _engine_event(
        incident,
        EventKind.PAGING_SILENCED,
        now,
        value=silence.title,
        message=f"Paging silenced: the maintenance window “{silence.title}” covers "
        f"{', '.join(silence.services) or 'its services'} until "
        f"{silence.ends_at:%Y-%m-%d %H:%M} UTC. Alerts are still recorded; escalation "
        "resumes from where it stands when the window ends.",
    )
    return {"escalation_plan": {**plan, "silenced_by": silence.window_id}}


def _silence_one(incident: Incident, silence: Silence, now: datetime) -> None:
    """Hold a due escalation step while a maintenance window runs: the whole plan moves
    later by the time held, so at the window's end the step that was due fires and the
    ones after it keep their spacing. The caller holds the row lock."""
    due = incident.next_escalation_at
    resume = silence.resume_at(now)
    shift = resume - due
    fields: dict[str, Any] = {
        "next_escalation_at": resume,
        "escalation_started_at": (incident.escalation_started_at or due) + shift,
    }
    changed = Incident.objects.filter(
        pk=incident.pk,
        next_escalation_at=due,
        escalation_step=incident.escalation_step,
        escalation_round=incident.escalation_round,
    ).update(**fields)
    if changed:
        marker = _note_silence(incident, silence, now)
        if marker:
            Incident.objects.filter(pk=incident.pk).update(**marker)


def escalate_due(*, now: datetime | None = None, batch: int = BATCH) -> int:
    """Fire every escalation step due by `now` (one step per incident per call), in due
    order. Safe to run concurrently: rows are claimed with skip_locked and advanced with a
    compare-and-set. An incident a running maintenance window silences (`silences_for`: opened
    by an alert during the window, on the window's services only) pages nobody: its
    step is held until the window ends (the timeline says why, once per window). Returns
    the number of pages created."""
    now = now or timezone.now()
    created = 0
    with transaction.atomic():
        due = list(
            Incident.objects.select_for_update(skip_locked=True)
            .filter(next_escalation_at__lte=now)
            .order_by("next_escalation_at", "pk")[:batch]
        )
        silences = _silences_or_none(
            [
                i.pk
                for i in due
                if i.status in OPEN_STATUSES and (i.escalation_plan or {}).get("steps")
            ],
            now=now,
        )
        for incident in due:
            try:
                with transaction.atomic():
                    silence = silences.get(incident.pk)
                    if silence is not None:
                        _silence_one(incident, silence, now)
                        continue
                    created += _escalate_one(incident, now)
            except IntegrityError:
                # The unique page key refused a second page for the same step: another
                # process already paged it. Nothing to do.
                logger.warning("duplicate page refused for %s", incident.reference)
            except Exception:
                # One broken configuration (a calendar without working days, a rotation
                # that cannot be computed) must not stop paging for every other incident.
                # This one stays due; the auditor reports it as overdue.
                logger.exception("escalation of %s failed", incident.reference)
    if created:
        schedule_deliveries(now=now)
    return created


# --- triggers beyond the clock -----------------------------------------------------------


def on_status_change(incident: Incident, previous: str, now: datetime) -> None:
    """Called by `incidents.services` inside the transition's transaction.

    Acknowledged: pending pages of unacknowledged-steps are cancelled. Resolved or closed:
    every pending page is cancelled and the escalation stops. Re-opened (a failed
    resolution): the escalation goes on to its next level at once."""
    status = incident.status
    if status in (IncidentStatus.RESOLVED, IncidentStatus.CLOSED):
        _cancel_pages(incident, now, reason=f"incident {status}", conditions=None)
        Incident.objects.filter(pk=incident.pk).update(next_escalation_at=None)
        incident.next_escalation_at = None
    elif previous == IncidentStatus.TRIGGERED and status != IncidentStatus.TRIGGERED:
        _cancel_pages(
            incident, now, reason="incident acknowledged", conditions={StepCondition.UNACKNOWLEDGED}
        )
    if (
        previous == IncidentStatus.RESOLVED
        and status in OPEN_STATUSES
        and ((incident.escalation_plan or {}).get("steps"))
    ):
        _escalate_now(incident, now, why="re-opened after a failed resolution")


def _cancel_pages(incident: Incident, now: datetime, *, reason: str, conditions) -> int:
    pages = Page.objects.filter(incident=incident, status=PageStatus.PENDING).select_related(
        "person", "incident"
    )
    cancelled = 0
    for page in pages:
        step = _step(incident, page.plan_version, page.step_index)
        if conditions is not None and step is not None and step["condition"] not in conditions:
            continue
        cancelled += _cancel_page(page, now, reason)
    return cancelled


def _escalate_now(incident: Incident, now: datetime, *, why: str) -> None:
    plan = incident.escalation_plan or {}
    steps = plan.get("steps") or []
    if not steps:
        raise EscalationError(f"{incident.reference} has no escalation policy to follow.")
    fields: dict[str, Any] = {"next_escalation_at": now}
    if incident.escalation_step >= len(steps):
        # The plan was spent: run its last level again, as a new round.
        fields.update(
            escalation_step=len(steps) - 1, escalation_round=incident.escalation_round + 1
        )
    # Asked for explicitly: that level is paged whatever its condition (an acknowledged or
    # re-opened incident would otherwise skip an "unacknowledged" step).
    fields["escalation_plan"] = {
        **plan,
        "forced": [
            fields.get("escalation_step", incident.escalation_step),
            fields.get("escalation_round", incident.escalation_round),
        ],
    }
    if incident.escalation_started_at is None:
        fields["escalation_started_at"] = now
    Incident.objects.filter(pk=incident.pk).update(**fields)
    for name, value in fields.items():
        setattr(incident, name, value)
    _engine_event(
        incident,
        EventKind.ESCALATED,
        now,
        value="next level",
        message=f"Escalating to the next level: {why}.",
    )


def incident_escalate(
    *, incident: Incident | int, actor, reason: str = "", now: datetime | None = None
) -> Incident:
    """The manual "escalate" action: the next level is paged at the next tick.
    Refused for incidents that are not open or have no policy."""
    from incidents.exceptions import InvalidTransition

    now = now or timezone.now()
    pk = incident.pk if isinstance(incident, Incident) else incident
    with transaction.atomic():
        locked = Incident.objects.select_for_update().get(pk=pk)
        if locked.status not in OPEN_STATUSES:
            raise InvalidTransition(
                locked.reference,
                locked.status,
                "escalated",
                "only an open incident can be escalated.",
            )
        try:
            _escalate_now(
                locked,
                now,
                why=f"requested by {actor or 'the system'}" + (f" ({reason})" if reason else ""),
            )
        except EscalationError as error:
            raise InvalidTransition(
                locked.reference, locked.status, "escalated", str(error)
            ) from error
    return locked


def replan(incident: Incident, severity, now: datetime) -> None:
    """A new severity brings its own policy: plan anew, keeping the incident's start, so
    steps whose time has passed fire at once. Caller holds the lock."""
    if not incident.is_open:
        return
    if (incident.escalation_plan or {}).get("policy_id") == severity.escalation_policy_id:
        return  # same policy: the running plan stands
    version = (incident.escalation_plan or {}).get("version", 1) + 1
    fields = plan_fields(
        severity=severity, started_at=incident.escalation_started_at or now, version=version
    )
    current = _current_round(fields["escalation_plan"], fields["escalation_started_at"], now)
    if current:  # start in the round running now, not with rounds long over
        fields.update(
            escalation_round=current,
            next_escalation_at=step_due_at(
                fields["escalation_plan"], fields["escalation_started_at"], 0, current
            ),
        )
    Incident.objects.filter(pk=incident.pk).update(**fields)
    for name, value in fields.items():
        setattr(incident, name, value)
    _cancel_pages(incident, now, reason="re-planned under a new severity", conditions=None)
    _engine_event(
        incident,
        EventKind.ESCALATION_REPLANNED,
        now,
        value=fields["escalation_plan"]["policy"] or "no policy",
        message=f"Escalation re-planned under {severity.name}'s policy.",
    )


# --- delivery -------------------------------------------------------------------------------


def ack_token(page: Page) -> str:
    return signing.dumps({"page": page.pk}, salt=ACK_SALT, compress=True)


def ack_url(page: Page) -> str:
    return settings.SITE_URL + reverse("escalation:page-ack", args=[ack_token(page)])


def page_from_token(token: str) -> Page:
    """The page a signed link names; raises signing.BadSignature (or SignatureExpired)."""
    data = signing.loads(token, salt=ACK_SALT, max_age=settings.ACK_LINK_MAX_AGE)
    return Page.objects.select_related("incident", "person").get(pk=data["page"])


def _enqueue(page_id: int) -> None:
    from .tasks import deliver_page

    try:
        deliver_page.delay(page_id)
    except Exception:  # noqa: BLE001 - the broker is down: the next tick queues it again
        logger.warning("could not queue delivery of page %s; will retry", page_id, exc_info=True)
        Page.objects.filter(pk=page_id, status=PageStatus.PENDING).update(enqueued_at=None)


def schedule_deliveries(*, now: datetime | None = None, batch: int = BATCH) -> list[int]:
    """Queue a delivery task, after commit, for each pending page whose attempt is due and
    that is not already queued. Returns the page ids."""
    now = now or timezone.now()
    with transaction.atomic():
        ids = list(
            Page.objects.select_for_update(skip_locked=True)
            .filter(status=PageStatus.PENDING, next_attempt_at__lte=now)
            .filter(Q(enqueued_at__isnull=True) | Q(enqueued_at__lte=now - REQUEUE_AFTER))
            .order_by("next_attempt_at", "pk")
            .values_list("pk", flat=True)[:batch]
        )
        if ids:
            Page.objects.filter(pk__in=ids).update(enqueued_at=now)
            for page_id in ids:
                transaction.on_commit(partial(_enqueue, page_id))
    return ids


def _obsolete(page: Page) -> str:
    """Why a page should no longer go out, or ''."""
    incident = page.incident
    step = _step(incident, page.plan_version, page.step_index)
    if page.acked_at is not None:
        return "acknowledged by its recipient"
    if incident.status not in OPEN_STATUSES:
        return f"incident {incident.status}"
    if step is None:
        return "escalation re-planned"
    if not _condition_holds(step["condition"], incident.status):
        return "incident acknowledged"
    return ""


def _methods(person: Person) -> list[ContactMethod]:
    return list(person.contact_methods.order_by("position", "pk"))


def page_deliver(*, page_id: int, now: datetime | None = None) -> str:
    """Deliver one pending page over its current contact method; idempotent.

    Claims the row (pending -> sending) in a short transaction, sends outside any
    transaction, then records the attempt and the outcome. A page that is not pending is
    left alone; a page whose incident no longer needs it is cancelled, never sent.
    A page whose incident a running maintenance window silences stays pending until the
    window ends ("held").
    Returns the outcome: sent, retry, backup, failed, cancelled, held or skipped."""
    from .channels import DeliveryError, compose_page, send

    clock_injected = now is not None
    now = now or timezone.now()
    with transaction.atomic():
        # Lock order everywhere: the incident, then its pages. Holding the incident's lock
        # while claiming means an acknowledgement either committed before (the page is
        # cancelled here) or waits until the claim is done.
        incident_id = Page.objects.filter(pk=page_id).values_list("incident_id", flat=True)
        list(Incident.objects.select_for_update().filter(pk__in=incident_id).values_list("pk"))
        page = (
            Page.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("incident__severity", "person")
            .filter(pk=page_id, status=PageStatus.PENDING, next_attempt_at__lte=now)
            .first()
        )
        if page is None:
            return "skipped"  # not pending, or its retry is not due yet (a stale task)
        reason = _obsolete(page)
        if reason:
            _cancel_page(page, now, reason)
            return "cancelled"
        silence = _silences_or_none([page.incident_id], now=now).get(page.incident_id)
        if silence is not None:
            # A window that silences the incident was scheduled after this page was made
            # (a window's start may be typed a few minutes back): a retry or a backup
            # method waits, pending, until the window ends.
            Page.objects.filter(pk=page.pk, status=PageStatus.PENDING).update(
                next_attempt_at=silence.resume_at(now), enqueued_at=None
            )
            marker = _note_silence(page.incident, silence, now)
            if marker:
                Incident.objects.filter(pk=page.incident_id).update(**marker)
            return "held"
        methods = _methods(page.person)
        if page.method_index >= len(methods):
            _fail(
                page,
                now,
                "no contact method left to try"
                if methods
                else f"{page.person.name} has no contact method",
            )
            return "failed"
        method = methods[page.method_index]
        Page.objects.filter(pk=page.pk, status=PageStatus.PENDING).update(
            status=PageStatus.SENDING,
            claimed_at=now,
            attempts=F("attempts") + 1,
            channel=method.kind,
        )
    error: DeliveryError | None = None
    try:
        send(method, compose_page(page, ack_url(page)))
    except DeliveryError as failure:
        error = failure
    except Exception as failure:  # noqa: BLE001 - an unexpected bug must not lose the page
        logger.exception("delivery of page %s crashed", page.pk)
        error = DeliveryError(f"unexpected error: {failure}", permanent=False)
    # The outcome is stamped when the send returned (or at the injected time in tests).
    return _finish(page.pk, method, len(methods), error, now if clock_injected else timezone.now())


def _finish(page_id: int, method: ContactMethod, method_count: int, error, now: datetime) -> str:
    with transaction.atomic():
        page = (
            Page.objects.select_for_update(of=("self",))
            .select_related("incident", "person")
            .get(pk=page_id)
        )
        unknown = error is not None and getattr(error, "unknown", False)
        PageAttempt.objects.create(
            page=page,
            at=now,
            contact_method=method,
            channel=method.kind,
            address=method.address,
            outcome="sent" if error is None else ("unknown" if unknown else "failed"),
            error="" if error is None else str(error.reason),
        )
        if page.status != PageStatus.SENDING:
            # The auditor gave up on this send meanwhile; its attempt is on record now.
            return "late"
        incident, person = page.incident, page.person
        if error is None:
            has_backup = page.method_index + 1 < method_count
            Page.objects.filter(pk=page.pk).update(
                status=PageStatus.SENT,
                sent_at=now,
                last_error="",
                backup_at=now + person.backup_after if has_backup else None,
            )
            _engine_event(
                incident,
                EventKind.PAGE_SENT,
                now,
                value=person.name,
                message=f"Paged {person.name} by {method.get_kind_display()} "
                f"(step {page.step_index + 1}, round {page.round + 1}).",
            )
            return "sent"
        if unknown:
            more = page.method_index + 1 < method_count
            Page.objects.filter(pk=page.pk).update(
                status=PageStatus.PENDING if more else PageStatus.UNKNOWN,
                method_index=page.method_index + (1 if more else 0),
                next_attempt_at=now if more else None,
                enqueued_at=None,
                last_error=f"outcome unknown: {error.reason}",
            )
            _engine_event(
                incident,
                EventKind.PAGE_UNKNOWN,
                now,
                value=person.name,
                message=f"The page to {person.name} by {method.get_kind_display()} may or may "
                f"not have gone out ({error.reason}); it is not re-sent that way."
                + (" Trying the backup contact method." if more else ""),
            )
            if more:
                transaction.on_commit(partial(_enqueue, page.pk))
            return "backup" if more else "unknown"
        tries = PageAttempt.objects.filter(page=page, contact_method=method).count()
        if not error.permanent and tries <= len(RETRY_BACKOFF):
            Page.objects.filter(pk=page.pk).update(
                status=PageStatus.PENDING,
                next_attempt_at=now + RETRY_BACKOFF[tries - 1],
                enqueued_at=None,
                last_error=str(error.reason),
            )
            return "retry"
        if page.method_index + 1 < method_count:
            Page.objects.filter(pk=page.pk).update(
                status=PageStatus.PENDING,
                method_index=page.method_index + 1,
                next_attempt_at=now,
                enqueued_at=None,
                last_error=str(error.reason),
            )
            _engine_event(
                incident,
                EventKind.PAGE_BACKUP,
                now,
                value=person.name,
                message=f"{method.get_kind_display()} to {person.name} failed ({error.reason}); "
                "trying the backup contact method.",
            )
            transaction.on_commit(partial(_enqueue, page.pk))
            return "backup"
        _fail(page, now, str(error.reason))
        return "failed"


def _fail(page: Page, now: datetime, reason: str) -> None:
    Page.objects.filter(pk=page.pk).update(
        status=PageStatus.FAILED, next_attempt_at=None, last_error=reason
    )
    _engine_event(
        page.incident,
        EventKind.PAGE_FAILED,
        now,
        value=page.person.name,
        message=f"Could not page {page.person.name}: {reason}.",
    )


def pages_try_backup(*, now: datetime | None = None, batch: int = BATCH) -> int:
    """Sent pages with no acknowledgement by their `backup_at`: the person's next contact
    method is tried (the executive contact protocol). Returns how many moved on."""
    now = now or timezone.now()
    moved = 0
    with transaction.atomic():
        pages = list(
            Page.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("incident", "person")
            .filter(status=PageStatus.SENT, acked_at__isnull=True, backup_at__lte=now)
            .order_by("backup_at", "pk")[:batch]
        )
        for page in pages:
            if _obsolete(page):
                Page.objects.filter(pk=page.pk).update(backup_at=None)
                continue
            Page.objects.filter(pk=page.pk, status=PageStatus.SENT).update(
                status=PageStatus.PENDING,
                method_index=page.method_index + 1,
                next_attempt_at=now,
                backup_at=None,
                enqueued_at=None,
            )
            _engine_event(
                page.incident,
                EventKind.PAGE_BACKUP,
                now,
                value=page.person.name,
                message=f"No acknowledgement from {page.person.name} within "
                f"{page.person.backup_after}; trying the backup contact method.",
            )
            moved += 1
    if moved:
        schedule_deliveries(now=now)
    return moved


def pages_recover_stuck(*, now: datetime | None = None, batch: int = BATCH) -> int:
    """Pages left in `sending` longer than PAGE_SENDING_STUCK_AFTER: the worker died
    mid-send, so nobody knows whether the message went out. They are marked `unknown` on
    the record and the timeline, never re-sent over the same method; a backup method, if
    the person has one, is tried next."""
    now = now or timezone.now()
    stuck_after = timedelta(seconds=settings.PAGE_SENDING_STUCK_AFTER)
    recovered = 0
    with transaction.atomic():
        pages = list(
            Page.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("incident", "person")
            .filter(status=PageStatus.SENDING, claimed_at__lte=now - stuck_after)
            .order_by("claimed_at", "pk")[:batch]
        )
        for page in pages:
            methods = _methods(page.person)
            method = methods[page.method_index] if page.method_index < len(methods) else None
            PageAttempt.objects.create(
                page=page,
                at=now,
                contact_method=method,
                channel=page.channel,
                address=method.address if method else "",
                outcome="unknown",
                error="the worker stopped during delivery",
            )
            more = page.method_index + 1 < len(methods) and not _obsolete(page)
            Page.objects.filter(pk=page.pk, status=PageStatus.SENDING).update(
                status=PageStatus.PENDING if more else PageStatus.UNKNOWN,
                method_index=page.method_index + (1 if more else 0),
                next_attempt_at=now if more else None,
                enqueued_at=None,
                last_error="outcome unknown: the worker stopped during delivery",
            )
            _engine_event(
                page.incident,
                EventKind.PAGE_UNKNOWN,
                now,
                value=page.person.name,
                message=f"The page to {page.person.name} by {page.channel} may or may not have "
                "gone out (the worker stopped during delivery); it is not re-sent that way."
                + (" Trying the backup contact method." if more else ""),
            )
            recovered += 1
    if recovered:
        schedule_deliveries(now=now)
    return recovered


def page_acknowledge(*, page: Page, now: datetime | None = None) -> Incident:
    """The signed link in a page was used: acknowledge the incident as its recipient.
    Single use: a second use is refused. Records who acknowledged on the timeline."""
    from incidents.exceptions import DomainError
    from incidents.services import incident_acknowledge

    now = now or timezone.now()
    with transaction.atomic():
        # The incident first, then the page: the same lock order as every other path.
        list(Incident.objects.select_for_update().filter(pk=page.incident_id).values_list("pk"))
        locked = (
            Page.objects.select_for_update(of=("self",))
            .select_related("person", "person__user", "incident")
            .get(pk=page.pk)
        )
        if locked.acked_at is not None:
            raise DomainError("This acknowledgement link was already used.")
        Page.objects.filter(pk=locked.pk).update(acked_at=now, backup_at=None)
        if locked.status == PageStatus.PENDING:  # a retry or backup still waiting: not needed
            Page.objects.filter(pk=locked.pk, status=PageStatus.PENDING).update(
                status=PageStatus.CANCELLED,
                next_attempt_at=None,
                last_error="acknowledged by its recipient",
            )
        person = locked.person
        return incident_acknowledge(
            incident=locked.incident,
            actor=person.user,
            actor_label=f"{person.name} (page link)",
            now=now,
        )


# --- targets and the auditor ----------------------------------------------------------------

# (due column, breach stamp, name, the severity's target; None: the public-update rule)
BREACHES = (
    ("ack_due_at", "ack_breached_at", "acknowledge", "ack_target"),
    ("resolve_due_at", "resolve_breached_at", "resolve", "resolve_target"),
    ("next_update_due_at", "update_breached_at", "status update", "update_interval"),
    ("public_update_due_at", "public_update_breached_at", "public update", None),
)


def record_breaches(*, now: datetime | None = None, batch: int = BATCH) -> int:
    """Record each target an open incident has missed, once, on its timeline: acknowledge,
    resolve, the update cadence, and a public incident's first public update (within
    PUBLIC_UPDATE_DUE). Each sweep reads `<due> <= now` on a partial index of unrecorded
    breaches, in batches. An overdue update also reminds the incident's Communications
    Lead (`incidents.comms.updates.update_reminders_plan`), once per overdue period."""
    from incidents.comms.updates import update_reminders_plan
    from incidents.formatting import humanize_duration

    now = now or timezone.now()
    recorded = 0
    for due_field, stamp, name, target in BREACHES:
        with transaction.atomic():
            rows = list(
                Incident.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("severity")
                .filter(**{f"{due_field}__lte": now, f"{stamp}__isnull": True})
                .order_by(due_field, "pk")[:batch]
            )
            breached = []
            for incident in rows:
                if not Incident.objects.filter(pk=incident.pk, **{f"{stamp}__isnull": True}).update(
                    **{stamp: now}
                ):
                    continue
                due = getattr(incident, due_field)
                late = now - due
                if target is None:
                    rule = (
                        f"The first public update ({humanize_duration(settings.PUBLIC_UPDATE_DUE)}"
                        " after the incident became public) was missed"
                    )
                else:
                    rule = (
                        f"The {name} target of {incident.severity.name} "
                        f"({humanize_duration(getattr(incident.severity, target))}) was missed"
                    )
                _engine_event(
                    incident,
                    EventKind.TARGET_BREACHED,
                    now,
                    value=name,
                    message=f"{rule} (due {due:%Y-%m-%d %H:%M:%S} UTC, "
                    f"noticed {humanize_duration(late)} later).",
                )
                breached.append(incident)
                recorded += 1
            if due_field == "next_update_due_at" and breached:
                update_reminders_plan(breached, now=now)
    return recorded


def escalations_overdue(*, now: datetime | None = None):
    now = now or timezone.now()
    limit = now - timedelta(seconds=settings.ESCALATION_OVERDUE_AFTER)
    return Incident.objects.filter(next_escalation_at__lt=limit)


def audit_escalations(*, now: datetime | None = None, batch: int = BATCH) -> int:
    """Report escalations overdue by more than ESCALATION_OVERDUE_AFTER: a log line each
    time, and one timeline event per overdue step. Returns how many are overdue."""
    now = now or timezone.now()
    overdue = list(escalations_overdue(now=now).order_by("next_escalation_at")[:batch])
    for incident in overdue:
        late = now - incident.next_escalation_at
        logger.error(
            "escalation overdue: %s step %s due %s, %ss late",
            incident.reference,
            incident.escalation_step + 1,
            incident.next_escalation_at.isoformat(),
            int(late.total_seconds()),
        )
        marker = incident.next_escalation_at.isoformat()
        if not incident.timeline.filter(kind=EventKind.ESCALATION_OVERDUE, value=marker).exists():
            timeline_record(
                incident=incident,
                kind=EventKind.ESCALATION_OVERDUE,
                actor=None,
                actor_label="auditor",
                now=now,
                value=marker,
                message=f"Escalation step {incident.escalation_step + 1} is "
                f"{int(late.total_seconds())} s overdue: is the engine tick running?",
            )
    return len(overdue)


# --- the tick -------------------------------------------------------------------------------


@dataclass
class TickReport:
    breaches: int = 0
    pages_created: int = 0
    backups: int = 0
    recovered: int = 0
    queued: list[int] = field(default_factory=list)


def engine_tick(*, now: datetime | None = None, batch: int = BATCH) -> TickReport:
    """One pass of the engine: record breaches, fire due steps, move unacknowledged pages to
    backup methods, recover stuck sends, queue due deliveries. Idempotent and safe to run
    concurrently. Reads the clock once."""
    now = now or timezone.now()
    started = time.perf_counter()
    report = TickReport()
    # How late the most overdue escalation is as the tick starts (the figure /metrics shows).
    oldest = Incident.objects.filter(
        status__in=OPEN_STATUSES, next_escalation_at__lte=now
    ).aggregate(oldest=Min("next_escalation_at"))["oldest"]
    lag = (now - oldest).total_seconds() if oldest else 0.0
    stages = [
        ("breaches", record_breaches),
        ("pages_created", escalate_due),
        ("backups", pages_try_backup),
        ("recovered", pages_recover_stuck),
        ("queued", schedule_deliveries),
    ]
    for name, stage in stages:
        try:
            setattr(report, name, stage(now=now, batch=batch))
        except Exception:
            # A failing stage must not keep the others (above all, delivery) from running.
            logger.exception("engine tick stage %s failed", name)
    _record_tick(now, duration=time.perf_counter() - started, lag=lag)
    return report


def _record_tick(now: datetime, *, duration: float, lag: float) -> None:
    """Count the tick and keep its duration and lag on the one EngineState row (/metrics)."""
    fields = {"last_tick_at": now, "last_duration_seconds": duration, "last_lag_seconds": lag}
    try:
        if not EngineState.objects.filter(pk="engine").update(ticks=F("ticks") + 1, **fields):
            try:
                with transaction.atomic():
                    EngineState.objects.create(name="engine", ticks=1, **fields)
            except IntegrityError:  # a concurrent first tick created it
                EngineState.objects.filter(pk="engine").update(ticks=F("ticks") + 1, **fields)
    except Exception:
        # Bookkeeping for /metrics must never fail the tick.
        logger.exception("engine tick state not recorded")


# --- on-call awareness -------------------------------------------------------------------------


def _email_of(person: Person) -> str:
    method = person.contact_methods.filter(kind="email").order_by("position", "pk").first()
    if method is not None:
        return method.address
    return person.user.email if person.user_id and person.user.email else ""


def _send_once(kind: str, key: str, recipient: str, subject: str, body: str) -> bool:
    """Send one notice unless it was sent already. The unique row is claimed first; if the
    send fails the claim is dropped, so the next run tries again."""
    from django.core.mail import send_mail

    from .models import OncallNotice

    try:
        with transaction.atomic():
            notice = OncallNotice.objects.create(kind=kind, key=key, recipient=recipient)
    except IntegrityError:
        return False
    try:
        send_mail(
            subject.replace("\r", " ").replace("\n", " "),
            body,
            settings.DEFAULT_FROM_EMAIL,
            [recipient],
        )
    except Exception:  # noqa: BLE001 - retried at the next run
        logger.warning("could not send the %s notice to %s", kind, recipient, exc_info=True)
        OncallNotice.objects.filter(pk=notice.pk).delete()
        return False
    return True


def _fmt(at: datetime, zone: str) -> str:
    import zoneinfo

    return at.astimezone(zoneinfo.ZoneInfo(zone)).strftime(f"%a %d %b %H:%M ({zone})")


def notify_handoffs(*, now: datetime | None = None) -> int:
    """Tell each incoming on-call person, once, that their shift starts within the rotation's
    `handoff_notice`. Beat runs this every minute. Returns how many were told."""
    from .selectors import prefetch_oncall, rotation_oncall

    now = now or timezone.now()
    told = 0
    rotations = prefetch_oncall(Rotation.objects.select_related("team"), at=now)
    for rotation in rotations:
        row = rotation_oncall(rotation, now)
        upcoming = row.upcoming
        if (
            upcoming is None
            or upcoming.person is None
            or upcoming.start - now > rotation.handoff_notice
        ):
            continue
        if row.oncall is not None and row.oncall.pk == upcoming.person.pk:
            continue  # the same person carries on
        address = _email_of(upcoming.person)
        if not address:
            continue
        zone = upcoming.person.time_zone or rotation.time_zone
        told += _send_once(
            "handoff",
            f"rotation:{rotation.pk}:{upcoming.start.isoformat()}",
            address,
            f"You are on call for {rotation} from {_fmt(upcoming.start, zone)}",
            f"Hello {upcoming.person.name},\n\nYou take over {rotation} on call from "
            f"{_fmt(upcoming.start, zone)} until {_fmt(upcoming.end, zone)}, after "
            f"{row.oncall.name if row.oncall else 'nobody'}.\n\n{settings.SITE_URL}/admin/\n",
        )
    return told


def send_weekly_summaries(*, now: datetime | None = None) -> int:
    """Each team's weekly on-call summary (who is on call, who is next, per rotation), once
    per ISO week, to the team's summary address or else each active member with an email."""
    from .models import Team
    from .selectors import oncall_for_team

    now = now or timezone.now()
    year, week, _ = now.isocalendar()
    sent = 0
    for team in Team.objects.prefetch_related("members").order_by("name"):
        rows = oncall_for_team(team, now)
        if not rows:
            continue
        lines = []
        for row in rows:
            zone = row.rotation.time_zone
            lines.append(
                f"- {row.rotation.name}: {row.oncall.name if row.oncall else 'nobody'}"
                + (f" until {_fmt(row.shift_end, zone)}" if row.shift_end else "")
                + (
                    f"; then {row.upcoming.person.name}"
                    if row.upcoming and row.upcoming.person
                    else ""
                )
            )
        recipients = (
            [team.summary_email]
            if team.summary_email
            else sorted({u.email for u in team.members.all() if u.is_active and u.email})
        )
        for recipient in recipients:
            sent += _send_once(
                "weekly",
                f"team:{team.pk}:{year}-W{week:02d}",
                recipient,
                f"On call this week for {team.name}",
                f"On call for {team.name}, week {week} of {year}:\n\n" + "\n".join(lines) + "\n",
            )
    return sent
