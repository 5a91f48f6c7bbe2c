"""Status updates: posting them, the update cadence and the first-public-update rule,
reminders when an update is overdue, and the team's chat channel (docs/status-updates.md).

- `status_update_post` is the one write path of a status update (admin, API).
- The cadence is stored on the incident (`next_update_due_at`, from the severity's
  `update_interval`); a public incident also owes its first public update by
  `public_update_due_at` (settings.PUBLIC_UPDATE_DUE after it became public). The engine's
  breach sweep (`escalation.services.record_breaches`) records each overdue one once and,
  for the cadence, calls `update_reminders_plan`, which queues one reminder per overdue
  period to the incident's Communications Lead.
- Internal updates, the declaration and the resolution go to the team's Slack-compatible
  incoming webhook when it has one (`chat_post`, a Celery task queued on commit), for the
  incident's channel named from the team's pattern (`chat_channel_for`).

Sending goes through `escalation.channels` (its email sender and its guarded HTTP client).
"""

from __future__ import annotations

import hashlib
import logging
import string
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from incidents.deadlines import compute_deadlines
from incidents.exceptions import InvalidInput, InvalidTransition, RetryLater
from incidents.models import (
    OPEN_STATUSES,
    EventKind,
    Incident,
    IncidentStatus,
    PublicStage,
    RoleAssignment,
    Service,
    StatusUpdate,
    TemplateKind,
    TimelineEvent,
)

if TYPE_CHECKING:
    from escalation.channels import PageMessage

    from .templates import Rendered

logger = logging.getLogger(__name__)
S = IncidentStatus

MAX_UPDATE_LENGTH = 5_000
COMMS_LEAD_SLUG = "communications-lead"
COMMANDER_SLUG = "incident-commander"
REMINDER_KIND = "update_reminder"  # OncallNotice.kind of a sent reminder
ENGINE_LABEL = "escalation engine"

# The public stage an update takes by default, from the incident's status.
STAGE_FOR_STATUS: dict[str, str] = {
    S.TRIGGERED: PublicStage.INVESTIGATING,
    S.ACKNOWLEDGED: PublicStage.INVESTIGATING,
    S.INVESTIGATING: PublicStage.INVESTIGATING,
    S.MITIGATING: PublicStage.IDENTIFIED,
    S.MONITORING: PublicStage.MONITORING,
    S.RESOLVED: PublicStage.RESOLVED,
}


# --- posting an update ----------------------------------------------------------------------


def status_update_post(
    *,
    incident: Incident | int,
    body: str,
    actor,
    public: bool = False,
    stage: str | None = None,
    actor_label: str = "",
    now: datetime | None = None,
) -> StatusUpdate:
    """Post a status update on an incident, internal or public.

    Requires a non-blank `body` of at most MAX_UPDATE_LENGTH characters; `stage` is a
    PublicStage (default: from the incident's status, e.g. mitigating -> identified).
    Refused (InvalidTransition) on a closed incident. In one transaction it stores the
    update, sets `last_update_at`, restarts the severity's cadence from now
    (`next_update_due_at`, also kept on the update as `next_due_at`; none once resolved),
    clears `update_breached_at` so the next overdue update is recorded again, clears
    `public_update_due_at` for a public update, and records one `status_update` event
    ("public" or "internal" in its value). Not idempotent: each call posts one update.
    An internal update is queued, on commit, for the team's chat webhook if it has one.
    """
    from incidents.services import _clean_text, _compare_and_set, _lock, _user, timeline_record

    now = now or timezone.now()
    if not isinstance(public, bool):
        raise InvalidInput("public", "must be true or false.")
    body = _clean_text("body", body, required=True, max_length=MAX_UPDATE_LENGTH)
    if "\x00" in body:
        raise InvalidInput("body", "may not contain NUL characters.")
    if stage and stage not in PublicStage.values:
        raise InvalidInput("stage", f"{stage!r} is not one of {', '.join(PublicStage.values)}.")
    with transaction.atomic():
        locked = _lock(incident)
        if locked.status == S.CLOSED:
            raise InvalidTransition(
                locked.reference,
                locked.status,
                "a status update",
                "a closed incident takes no more updates.",
            )
        stage = stage or STAGE_FOR_STATUS[locked.status]
        next_due = compute_deadlines(
            locked.severity, locked.detected_at, now, status=locked.status, update_base=now
        ).next_update_due_at
        fields: dict[str, Any] = {
            "last_update_at": now,
            "next_update_due_at": next_due,
            "update_breached_at": None,
            "updated_at": now,
        }
        if public:
            fields["public_update_due_at"] = None
        _compare_and_set(locked, locked.status, fields)
        user = _user(actor)
        update = StatusUpdate.objects.create(
            incident=locked,
            stage=stage,
            body=body,
            public=public,
            posted_at=now,
            posted_by=user,
            posted_by_label=(actor_label or (user.get_username() if user else "system"))[:150],
            next_due_at=next_due,
        )
        stage_label = PublicStage(stage).label
        timeline_record(
            incident=locked,
            kind=EventKind.STATUS_UPDATE,
            actor=actor,
            actor_label=actor_label,
            now=now,
            value="public" if public else "internal",
            message=f"{stage_label}: {body}" if public else body,
        )
        if not public:
            chat_enqueue(locked, TemplateKind.UPDATE, update_id=update.pk)
    return update


def updates_for(incident: Incident):
    """An incident's status updates, newest first, with who posted them."""
    return StatusUpdate.objects.filter(incident=incident).order_by("-posted_at", "-pk")


# --- the first public update ----------------------------------------------------------------


def _owes_public_update(
    incident: Incident, *, is_drill: bool, has_public_service: bool | None
) -> bool:
    """Open, not a drill, on at least one public service, and no public update yet. Reads
    the database only for what the caller did not say (cheap conditions first)."""
    if incident.status not in OPEN_STATUSES or is_drill:
        return False
    if has_public_service is None:
        has_public_service = incident.services.filter(is_public=True).exists()
    if not has_public_service:
        return False
    return not StatusUpdate.objects.filter(incident=incident, public=True).exists()


def public_update_fields(
    incident: Incident,
    *,
    now: datetime,
    is_drill: bool | None = None,
    has_public_service: bool | None = None,
) -> dict[str, Any]:
    """The change to `public_update_due_at` an incident needs now: due PUBLIC_UPDATE_DUE
    from now when it has just become public (and its breach was not recorded already),
    cleared when it no longer owes one (no public service left, a drill, resolved).
    Call with the incident locked, after its services or status changed."""
    is_drill = incident.is_drill if is_drill is None else is_drill
    owes = _owes_public_update(incident, is_drill=is_drill, has_public_service=has_public_service)
    if owes:
        if incident.public_update_due_at is None and incident.public_update_breached_at is None:
            return {"public_update_due_at": now + settings.PUBLIC_UPDATE_DUE}
        return {}
    return {"public_update_due_at": None} if incident.public_update_due_at is not None else {}


def declare_fields(*, services: Iterable[Service], is_drill: bool, now: datetime) -> dict:
    """The communication fields of an incident being declared on `services`."""
    public = not is_drill and any(service.is_public for service in services)
    return {"public_update_due_at": now + settings.PUBLIC_UPDATE_DUE} if public else {}


def transition_fields(incident: Incident, *, reopening: bool, now: datetime) -> dict[str, Any]:
    """What a status change means for communications, for `incidents.services` to write
    with the transition (the incident is locked and already carries its new status).

    Leaving the open statuses ends the first-public-update obligation; a re-open starts a
    new update period (its breach is recorded again) and may owe a public update again.
    A resolution is queued for the team's chat webhook."""
    if incident.status not in OPEN_STATUSES:
        if incident.status == S.RESOLVED:
            chat_enqueue(incident, TemplateKind.RESOLUTION)
        return {"public_update_due_at": None} if incident.public_update_due_at else {}
    if reopening:
        return {"update_breached_at": None, **public_update_fields(incident, now=now)}
    return {}


# --- reminders for overdue updates ----------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """Who is reminded and how: `methods` are (contact kind, address) in the order tried."""

    name: str
    why: str
    via: str
    methods: tuple[tuple[str, str], ...]


def _user_recipient(user, why: str, persons: dict) -> Recipient | None:
    if user is None or not user.is_active:
        return None
    person = persons.get(user.pk)
    if person is not None and person.is_active:
        methods = tuple((m.kind, m.address) for m in person.contact_methods.all())
        if methods:
            return Recipient(person.name, why, "their escalation contact methods", methods)
    if user.email:
        return Recipient(user.get_username(), why, "email", (("email", user.email),))
    return None


def reminder_recipients(incidents: list[Incident]) -> dict[int, Recipient | None]:
    """Who to remind of each incident's overdue update, in a fixed number of queries.

    The Communications Lead; without one (or one who cannot be reached), the Incident
    Commander, who holds every role nobody else was given; then whoever declared the
    incident; then the team's summary address. A user is reached through their escalation
    person's contact methods when they have one, else by email. None: nobody to remind."""
    from django.contrib.auth import get_user_model
    from django.db.models import Prefetch

    from escalation.models import ContactMethod, Person, Team

    if not incidents:
        return {}
    ids = [incident.pk for incident in incidents]
    roles: dict[int, dict[str, Any]] = {pk: {} for pk in ids}
    for assignment in RoleAssignment.objects.filter(
        incident_id__in=ids, until__isnull=True, role__slug__in=[COMMS_LEAD_SLUG, COMMANDER_SLUG]
    ).select_related("user", "role"):
        roles[assignment.incident_id][assignment.role.slug] = assignment
    declarers = {
        user.pk: user
        for user in get_user_model().objects.filter(
            pk__in={i.declared_by_id for i in incidents if i.declared_by_id}
        )
    }
    user_ids = {a.user_id for held in roles.values() for a in held.values()} | set(declarers)
    persons = {
        person.user_id: person
        for person in Person.objects.filter(user_id__in=user_ids).prefetch_related(
            Prefetch("contact_methods", queryset=ContactMethod.objects.order_by("position", "pk"))
        )
    }
    teams = {
        team.pk: team
        for team in Team.objects.filter(pk__in={i.team_id for i in incidents if i.team_id})
    }
    chosen: dict[int, Recipient | None] = {}
    for incident in incidents:
        held = roles[incident.pk]
        lead, commander = held.get(COMMS_LEAD_SLUG), held.get(COMMANDER_SLUG)
        candidates = [
            (lead.user if lead else None, "Communications Lead"),
            (
                commander.user if commander else None,
                "Incident Commander (no Communications Lead to reach)",
            ),
            (
                declarers.get(incident.declared_by_id),
                "declarer of the incident (no Communications Lead or Incident Commander)",
            ),
        ]
        recipient = None
        for user, why in candidates:
            recipient = _user_recipient(user, why, persons)
            if recipient is not None:
                break
        team = teams.get(incident.team_id)
        if recipient is None and team is not None and team.summary_email:
            recipient = Recipient(
                team.name,
                "team (nobody on the incident to reach)",
                "the team's summary address",
                (("email", team.summary_email),),
            )
        chosen[incident.pk] = recipient
    return chosen


def update_reminders_plan(incidents: list[Incident], *, now: datetime) -> int:
    """For incidents whose update breach was just recorded (the engine's sweep, inside its
    transaction): one `update_reminder` event each, naming who is reminded and how, and a
    reminder queued on commit. Once per overdue period, because the breach is recorded
    once per period. Returns how many were queued."""
    from incidents.services import timeline_record
    from incidents.tasks import send_update_reminder

    queued = 0
    recipients = reminder_recipients(incidents)
    for incident in incidents:
        recipient = recipients.get(incident.pk)
        due = incident.next_update_due_at
        due_text = f"{due:%Y-%m-%d %H:%M} UTC" if due else "earlier"
        if recipient is None:
            message = (
                f"The status update due {due_text} is overdue and nobody can be reminded: no "
                "Communications Lead, Incident Commander or declarer with an email address "
                "or contact method, and no team summary address."
            )
        else:
            message = (
                f"The status update due {due_text} is overdue: reminding {recipient.name} "
                f"({recipient.why}) through {recipient.via}."
            )
            transaction.on_commit(
                partial(_enqueue, send_update_reminder, incident.pk, due.isoformat())
            )
            queued += 1
        timeline_record(
            incident=incident,
            kind=EventKind.UPDATE_REMINDER,
            actor=None,
            actor_label=ENGINE_LABEL,
            now=now,
            value=recipient.name if recipient else "nobody",
            message=message,
        )
    return queued


def update_reminders_requeue(
    *, now: datetime | None = None, grace: timedelta = timedelta(minutes=2), batch: int = 100
) -> list[tuple[int, str]]:
    """Queue again the reminders whose queueing was lost (the broker was down when the
    breach was recorded): open incidents whose update breach is recorded, overdue by more
    than `grace` and less than an hour, with no reminder sent for that due time. A reminder
    still queued is queued twice, which `update_reminder_send` absorbs (one claim per
    incident and due time). Beat, every minute. Returns the (incident, due) queued."""
    from escalation.models import OncallNotice
    from incidents.tasks import send_update_reminder

    now = now or timezone.now()
    overdue = (
        Incident.objects.filter(
            status__in=OPEN_STATUSES,
            update_breached_at__isnull=False,
            next_update_due_at__lte=now - grace,
            next_update_due_at__gt=now - timedelta(hours=1),
        )
        .order_by("next_update_due_at", "pk")
        .values_list("pk", "next_update_due_at")[:batch]
    )
    keys = {f"incident:{pk}:{due.isoformat()}": (pk, due.isoformat()) for pk, due in overdue}
    sent = set(
        OncallNotice.objects.filter(kind=REMINDER_KIND, key__in=list(keys)).values_list(
            "key", flat=True
        )
    )
    queued = [args for key, args in keys.items() if key not in sent]
    for args in queued:
        _enqueue(send_update_reminder, *args)
    return queued


def _notice_recipient(address: str) -> str:
    """An address short enough for OncallNotice.recipient (webhook URLs can be longer)."""
    if len(address) <= 254:
        return address
    return "sha256:" + hashlib.sha256(address.encode()).hexdigest()


def admin_url(incident: Incident, anchor: str = "") -> str:
    path = reverse("admin:incidents_incident_change", args=[incident.pk])
    return f"{settings.SITE_URL}{path}{anchor}"


def compose_reminder(incident: Incident, recipient: Recipient) -> PageMessage:
    """The reminder as a PageMessage, the form every escalation channel sends."""
    from escalation.channels import SUBJECT_LIMIT, PageMessage, _mail_domain, one_line
    from incidents.formatting import humanize_duration

    due = incident.next_update_due_at
    severity = incident.severity
    title = one_line(incident.title)
    url = admin_url(incident, "#status-updates")
    cadence = humanize_duration(severity.update_interval)
    subject = one_line(
        f"[{severity.name}] {incident.reference}: status update overdue", SUBJECT_LIMIT
    )
    text = (
        f"Hello {recipient.name},\n\n"
        f"The next status update on {incident.reference} ({severity.name}): {title} was due "
        f"at {due:%Y-%m-%d %H:%M} UTC ({severity.name} updates every {cadence}).\n"
        f"You are reminded as its {recipient.why}.\n\nPost an update:\n{url}\n"
    )
    html = format_html(
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{}</title></head>\n<body>\n'
        "<p>Hello {},</p>\n<p>The next status update on <strong>{}</strong> ({}): "
        "<strong>{}</strong> was due at {} UTC ({} updates every {}).<br>\n"
        "You are reminded as its {}.</p>\n"
        '<p><a href="{}">Post an update</a></p>\n</body></html>\n',
        subject,
        recipient.name,
        incident.reference,
        severity.name,
        title,
        f"{due:%Y-%m-%d %H:%M}",
        severity.name,
        cadence,
        recipient.why,
        url,
    )
    return PageMessage(
        subject=subject,
        text=text,
        html=str(html),
        ack_url=url,
        reference=incident.reference,
        title=incident.title,
        severity=severity.name,
        status=incident.status,
        summary="",
        step=0,
        round=0,
        recipient=recipient.name,
        severity_level=severity.level,
        message_id=f"<reminder-{incident.pk}-{int(due.timestamp())}@{_mail_domain()}>",
    )


def _reminder_payload(kind: str, message: PageMessage, due: datetime) -> dict[str, Any]:
    from escalation.channels import _slack_escape, _truncate, one_line
    from escalation.models import ContactKind

    head = one_line(f"[{message.severity}] {message.reference}: {message.title}")
    if kind == ContactKind.SMS_WEBHOOK:
        return {
            "to": message.recipient,
            "message": f"{_truncate(head, 80)} status update overdue: {message.ack_url}",
        }
    if kind == ContactKind.SLACK_WEBHOOK:
        return {
            "text": f"{_slack_escape(head)}\nStatus update overdue (due {due:%H:%M} UTC).\n"
            f"Post an update: {message.ack_url}"
        }
    return {
        "event": "update_reminder",
        "recipient": message.recipient,
        "incident": {
            "reference": message.reference,
            "title": message.title,
            "severity": message.severity,
            "severity_level": message.severity_level,
            "status": message.status,
        },
        "due_at": due.isoformat(),
        "url": message.ack_url,
    }


def update_reminder_send(*, incident_id: int, due_at: str) -> str:
    """Send the reminder for the update of incident `incident_id` that was due at `due_at`
    (ISO), over the recipient's methods in order until one takes it. Idempotent: each
    (incident, due time) is sent at most once (a unique OncallNotice row is claimed before
    each send and dropped if the send fails). Nothing is sent once an update was posted
    (the due time moved) or the incident is no longer open. Raises RetryLater when every
    method failed and one of the failures was temporary. Returns the outcome."""
    from escalation.channels import DeliveryError, _post, _send_email
    from escalation.models import ContactKind, OncallNotice

    incident = (
        Incident.objects.select_related("severity", "team")
        .defer("escalation_plan")
        .filter(pk=incident_id)
        .first()
    )
    if incident is None or incident.status not in OPEN_STATUSES:
        return "skipped"
    due = incident.next_update_due_at
    if due is None or due.isoformat() != due_at:
        return "skipped"  # an update was posted meanwhile: the reminder is moot
    recipient = reminder_recipients([incident])[incident.pk]
    if recipient is None:
        return "nobody"
    key = f"incident:{incident.pk}:{due_at}"
    if OncallNotice.objects.filter(kind=REMINDER_KIND, key=key).exists():
        return "sent already"
    message = compose_reminder(incident, recipient)
    temporary = False
    for kind, address in recipient.methods:
        try:
            with transaction.atomic():
                claim = OncallNotice.objects.create(
                    kind=REMINDER_KIND, key=key, recipient=_notice_recipient(address)
                )
        except IntegrityError:
            return "sent already"
        try:
            if kind == ContactKind.EMAIL:
                _send_email(address, message)
            else:
                _post(address, _reminder_payload(kind, message, due), message)
        except DeliveryError as error:
            logger.warning(
                "update reminder for %s by %s failed: %s", incident.reference, kind, error.reason
            )
            if error.unknown:
                return "unknown"  # it may have gone out: keep the claim, send no more
            OncallNotice.objects.filter(pk=claim.pk).delete()
            temporary = temporary or not error.permanent
            continue
        return "sent"
    if temporary:
        raise RetryLater(f"no method reached {recipient.name} for {incident.reference}")
    return "failed"


# --- the chat channel -----------------------------------------------------------------------

CHANNEL_FIELDS = ("year", "month", "day", "date", "number", "seq", "year_seq")
CHANNEL_MAX_LENGTH = 80
_SAMPLE = {
    "year": 2026,
    "month": 1,
    "day": 2,
    "date": "2026-01-02",
    "number": 1042,
    "seq": 1,
    "year_seq": 1,
}


def chat_channel_pattern_validate(pattern: str) -> None:
    """Refuse a channel pattern that cannot name a channel: an unknown placeholder (the
    known ones are {year}, {month}, {day}, {date}, {number}, {seq}, {year_seq}), a
    conversion, a bad format spec, or a result with spaces or longer than 80 characters.
    Blank is allowed (the webhook's own channel). Raises
    InvalidInput("chat_channel_pattern", ...)."""
    field = "chat_channel_pattern"
    if not pattern:
        return
    try:
        parts = list(string.Formatter().parse(pattern))
    except ValueError as error:
        raise InvalidInput(field, f"is not a valid pattern: {error}.") from error
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in CHANNEL_FIELDS:
            shown = "{" + name + "}"
            raise InvalidInput(
                field,
                f"{shown} is not a known placeholder; use "
                + ", ".join("{" + f + "}" for f in CHANNEL_FIELDS)
                + ".",
            )
        if conversion:
            raise InvalidInput(field, f"conversions such as !{conversion} are not allowed.")
        if spec and "{" in spec:
            raise InvalidInput(field, "a format spec cannot hold another placeholder.")
    try:
        sample = pattern.format(**_SAMPLE)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise InvalidInput(field, f"cannot be filled in: {error}.") from error
    if len(sample) > CHANNEL_MAX_LENGTH:
        raise InvalidInput(
            field, f"gives a name of {len(sample)} characters; at most {CHANNEL_MAX_LENGTH}."
        )
    if any(ch.isspace() or not ch.isprintable() for ch in sample):
        raise InvalidInput(field, "gives a name with spaces or control characters.")


def chat_channel_format(
    pattern: str, *, declared_at: datetime, number: int, seq: int, year_seq: int = 1
) -> str:
    """`pattern` filled in for an incident declared at `declared_at` (its UTC date)."""
    day = declared_at.astimezone(UTC)
    return pattern.format(
        year=day.year,
        month=day.month,
        day=day.day,
        date=f"{day:%Y-%m-%d}",
        number=number,
        seq=seq,
        year_seq=year_seq,
    )[:CHANNEL_MAX_LENGTH]


def _team_place(incident: Incident, start: datetime, end: datetime) -> int:
    """The incident's place (1, 2, ...) among its team's incidents declared in [start, end),
    by number."""
    place = Incident.objects.filter(
        team_id=incident.team_id,
        created_at__gte=start,
        created_at__lt=end,
        number__lte=incident.number,
    ).count()
    return max(place, 1)


def _names_in(pattern: str) -> set[str]:
    try:
        return {name for _text, name, _spec, _conv in string.Formatter().parse(pattern) if name}
    except ValueError:
        return set()


def chat_channel_for(incident: Incident) -> str:
    """The incident's chat channel: the stored name, or one named now from its team's
    pattern and stored (`seq` is its place among the team's incidents declared that UTC
    day, `year_seq` that UTC year, by number). Blank when the team has no pattern.
    Idempotent: a name is stored once (compare-and-set), and a concurrent caller reads back
    the winner's."""
    if incident.chat_channel or incident.team is None or not incident.team.chat_channel_pattern:
        return incident.chat_channel
    pattern = incident.team.chat_channel_pattern
    declared = incident.created_at.astimezone(UTC)
    day = datetime.combine(declared.date(), time.min, tzinfo=UTC)
    seq = _team_place(incident, day, day + timedelta(days=1))
    year_seq = 1
    if "year_seq" in _names_in(pattern):
        year = datetime(declared.year, 1, 1, tzinfo=UTC)
        year_seq = _team_place(incident, year, datetime(declared.year + 1, 1, 1, tzinfo=UTC))
    try:
        name = chat_channel_format(
            pattern, declared_at=declared, number=incident.number, seq=seq, year_seq=year_seq
        )
    except (ValueError, TypeError, KeyError, IndexError):
        # A pattern saved before validation existed: fall back to the default shape.
        name = f"#incident-{declared:%Y-%m-%d}-{seq:03d}"
    if not Incident.objects.filter(pk=incident.pk, chat_channel="").update(chat_channel=name):
        name = Incident.objects.filter(pk=incident.pk).values_list("chat_channel", flat=True)[0]
    incident.chat_channel = name
    return name


def _enqueue(task, *args) -> None:
    try:
        task.delay(*args)
    except Exception:  # noqa: BLE001 - the broker is down: log it, never fail the caller
        logger.warning("could not queue %s%r", task.name, args, exc_info=True)


def chat_enqueue(incident: Incident, kind: str, *, update_id: int | None = None, team=None) -> bool:
    """Queue, on commit, the chat message of `kind` (initial, update, resolution) for the
    incident's team webhook, if the team has one (pass `team` when it is at hand, to save
    the query). Call inside the writing transaction."""
    from escalation.models import Team
    from incidents.tasks import post_chat_message

    if incident.team_id is None:
        return False
    if team is not None and team.pk == incident.team_id:
        has_webhook = bool(team.chat_webhook_url)
    else:
        has_webhook = Team.objects.filter(pk=incident.team_id).exclude(chat_webhook_url="").exists()
    if not has_webhook:
        return False
    transaction.on_commit(partial(_enqueue, post_chat_message, incident.pk, kind, update_id))
    return True


def _update_values(body: str, stage: str, posted_at: datetime | None) -> dict[str, str]:
    return {
        "body": body,
        "stage": PublicStage(stage).label if stage in PublicStage.values else "",
        "posted_at": f"{posted_at:%Y-%m-%d %H:%M} UTC" if posted_at else "",
    }


def chat_message(incident: Incident, kind: str, *, update: StatusUpdate | None = None) -> Rendered:
    """The rendered message (templates of `kind`) for the chat: an internal update's own
    text, or for a resolution what fixed it."""
    from .templates import BUILT_IN, incident_context, render_message, render_source

    extra: dict[str, Any] = {}
    if update is not None:
        extra["update"] = _update_values(update.body, update.stage, update.posted_at)
    elif kind == TemplateKind.RESOLUTION:
        event = (
            TimelineEvent.objects.filter(incident=incident, kind=EventKind.RESOLVED)
            .order_by("-at", "-pk")
            .first()
        )
        if event is not None and event.message:
            extra["update"] = _update_values(event.message, PublicStage.RESOLVED, event.at)
    try:
        return render_message(kind=kind, incident=incident, extra=extra)
    except InvalidInput:
        # Templates are validated when saved; an incident's text cannot break one, but a
        # chat message must not be lost to a surprise either.
        logger.warning("template of kind %s failed for %s", kind, incident.reference)
        subject, body = BUILT_IN[kind]
        context = {"site_name": settings.SITE_NAME, "status_url": f"{settings.SITE_URL}/status/"}
        context.update(incident_context(incident))
        context.update(extra)
        return render_source(subject=subject, body=body, context=context)


def chat_payload(
    incident: Incident, kind: str, *, channel: str, rendered: Rendered
) -> dict[str, Any]:
    """A Slack-compatible incoming-webhook body. Incident text is escaped for Slack markup
    (so it cannot mention @channel or forge links); the one link is the tracker's."""
    from escalation.channels import _slack_escape

    drill = "[DRILL] " if incident.is_drill else ""
    text = (
        f"*{_slack_escape(drill + rendered.subject)}*\n{_slack_escape(rendered.text)}\n"
        f"<{admin_url(incident)}|Open {incident.reference} in the tracker>"
    )
    payload: dict[str, Any] = {"text": text}
    if channel:
        payload["channel"] = channel
    return payload


def chat_post(*, incident_id: int, kind: str, update_id: int | None = None) -> str:
    """Post the chat message of `kind` for an incident to its team's webhook, through the
    escalation channels' guarded HTTP client (address checks, no redirects, timeout).

    Skipped when the team has no webhook, or `update_id` names a public update (those are
    for the status page). Raises RetryLater on a temporary failure (5xx, 429, timeout to
    connect); a permanent one (4xx, a disallowed address) or an unknown outcome is logged
    and not retried. Names and stores the incident's channel on first use."""
    from escalation.channels import DeliveryError, PageMessage, _post

    if kind not in (TemplateKind.INITIAL, TemplateKind.UPDATE, TemplateKind.RESOLUTION):
        raise ValueError(f"{kind!r} is not a chat message kind")
    incident = (
        Incident.objects.select_related("severity", "team")
        .defer("escalation_plan")
        .filter(pk=incident_id)
        .first()
    )
    if incident is None or incident.team is None or not incident.team.chat_webhook_url:
        return "skipped"
    update = None
    if update_id is not None:
        update = StatusUpdate.objects.filter(pk=update_id, incident=incident).first()
        if update is None or update.public:
            return "skipped"
    channel = chat_channel_for(incident)
    rendered = chat_message(incident, kind, update=update)
    carrier = PageMessage(
        subject=rendered.subject,
        text=rendered.text,
        html=rendered.html,
        ack_url="",
        reference=incident.reference,
        title=incident.title,
        severity=incident.severity.name,
        status=incident.status,
        summary="",
        step=0,
        round=0,
    )
    try:
        _post(
            incident.team.chat_webhook_url,
            chat_payload(incident, kind, channel=channel, rendered=rendered),
            carrier,
        )
    except DeliveryError as error:
        if error.permanent or error.unknown:
            logger.warning(
                "chat message %s for %s not delivered: %s", kind, incident.reference, error.reason
            )
            return "failed"
        raise RetryLater(error.reason) from error
    return "sent"
