"""Maintenance windows: the reads every part of the product shares (status page, engine,
ingestion) and the services that schedule, change, cancel and announce windows.

Rules (docs/status-page.md):

- a window ends after it starts, lasts at most MAX_WINDOW, and is not scheduled in the
  past (a start up to START_GRACE ago is taken as "now", so "from now" can be typed);
- its title is one line without control characters (it is an email subject; the same
  check as a customer notice's subject);
- it names at least one service. Non-public services are allowed, because a window also
  silences paging for incidents its services' alerts open while it runs
  (`escalation.services.silences_for`), and internal systems need that too; the status
  page and the announcement show only its public services, and a window without any
  public service is refused for announcement (there is nobody to tell);
- a window that ended or was cancelled is history and cannot change; a running window
  keeps its start, and cancelling it ends it now;
- a window is announced to subscribers once.

Windows have no timeline of their own (the timeline belongs to incidents): the admin's
change history records who did what.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import models, transaction
from django.db.models import QuerySet
from django.utils import timezone

from incidents.exceptions import InvalidInput
from incidents.models import MaintenanceWindow, Service, TemplateKind

from .notices import header_problem

Actor = AbstractBaseUser | None

MAX_WINDOW = timedelta(days=7)
START_GRACE = timedelta(minutes=5)
MAX_TITLE = 200
MAX_DESCRIPTION = 10_000
EDITABLE_FIELDS = ("title", "description", "service_ids", "starts_at", "ends_at")


class WindowState(models.TextChoices):
    UPCOMING = "upcoming", "Upcoming"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    CANCELLED = "cancelled", "Cancelled"


def window_state(window: MaintenanceWindow, *, now: datetime) -> str:
    if window.cancelled_at is not None:
        return WindowState.CANCELLED
    if now < window.starts_at:
        return WindowState.UPCOMING
    if now < window.ends_at:
        return WindowState.RUNNING
    return WindowState.COMPLETED


def windows_active(*, now: datetime) -> QuerySet[MaintenanceWindow]:
    """Windows running at `now` (started, not ended, not cancelled)."""
    return MaintenanceWindow.objects.filter(
        starts_at__lte=now, ends_at__gt=now, cancelled_at__isnull=True
    )


# --- validation ------------------------------------------------------------------------------


def _user(actor: Actor):
    return actor if actor is not None and actor.is_authenticated else None


def _text(field: str, value: Any, *, required: bool, max_length: int, one_line: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidInput(field, "must be text.")
    value = value.strip()
    if required and not value:
        raise InvalidInput(field, "may not be blank.")
    if len(value) > max_length:
        raise InvalidInput(field, f"is {len(value)} characters long; at most {max_length}.")
    if one_line:
        # The announcement's subject check, applied when the window is saved, so a title
        # that could never be announced is refused at once.
        problem = header_problem(value)
        if problem:
            raise InvalidInput(field, f"{problem.removesuffix('.')}: it goes in email subjects.")
    return value


def _when(field: str, value: Any) -> datetime:
    if value is None:
        raise InvalidInput(field, "is required.")
    if not isinstance(value, datetime) or timezone.is_naive(value):
        raise InvalidInput(field, "must be a date and time with a time zone.")
    return value


def _services(service_ids: Any) -> list[Service]:
    if isinstance(service_ids, str | bytes) or not isinstance(service_ids, Iterable):
        raise InvalidInput("services", "must be a list of service ids.")
    ids = list(service_ids)
    if not ids:
        raise InvalidInput("services", "name at least one service.")
    if not all(isinstance(pk, int) and not isinstance(pk, bool) for pk in ids):
        raise InvalidInput("services", "must be a list of service ids.")
    found = {s.pk: s for s in Service.objects.filter(pk__in=ids)}
    missing = sorted(set(ids) - set(found))
    if missing:
        raise InvalidInput("services", f"no service with id {missing[0]}.")
    return [found[pk] for pk in dict.fromkeys(ids)]


def maintenance_validate(
    *,
    title: Any,
    description: Any,
    service_ids: Any,
    starts_at: Any,
    ends_at: Any,
    now: datetime,
    window: MaintenanceWindow | None = None,
) -> tuple[str, str, list[Service], datetime, datetime]:
    """Check a new window (`window` None) or the new values of `window`; returns the cleaned
    (title, description, services, starts_at, ends_at) or raises InvalidInput naming the
    field. Writes nothing: the admin form calls it to show errors beside the fields."""
    title = _text("title", title, required=True, max_length=MAX_TITLE, one_line=True)
    description = _text(
        "description", description, required=False, max_length=MAX_DESCRIPTION, one_line=False
    )
    starts_at = _when("starts_at", starts_at)
    ends_at = _when("ends_at", ends_at)
    if ends_at <= starts_at:
        raise InvalidInput("ends_at", "must be after the start.")
    if ends_at - starts_at > MAX_WINDOW:
        raise InvalidInput("ends_at", f"a window lasts at most {MAX_WINDOW.days} days.")
    if ends_at <= now:
        raise InvalidInput("ends_at", "is in the past.")
    started = window is not None and window.starts_at <= now
    if started:
        if starts_at != window.starts_at:
            raise InvalidInput("starts_at", "the window is running: its start cannot move.")
    elif starts_at < now - START_GRACE:
        raise InvalidInput("starts_at", "is in the past.")
    services = _services(service_ids)
    return title, description, services, starts_at, ends_at


def _refuse_history(window: MaintenanceWindow, now: datetime, doing: str) -> None:
    state = window_state(window, now=now)
    if state == WindowState.CANCELLED:
        raise InvalidInput("window", f"“{window.title}” was cancelled; it cannot be {doing}.")
    if state == WindowState.COMPLETED:
        raise InvalidInput("window", f"“{window.title}” has ended; it cannot be {doing}.")


def _lock(window: MaintenanceWindow | int) -> MaintenanceWindow:
    pk = window.pk if isinstance(window, MaintenanceWindow) else window
    try:
        return MaintenanceWindow.objects.select_for_update().get(pk=pk)
    except MaintenanceWindow.DoesNotExist:
        raise InvalidInput("window", "no such maintenance window.") from None


def _changed() -> None:
    from .status import status_page_changed

    transaction.on_commit(status_page_changed)


# --- services --------------------------------------------------------------------------------


def maintenance_schedule(
    *,
    title: str,
    description: str = "",
    service_ids: Iterable[int],
    starts_at: datetime,
    ends_at: datetime,
    actor: Actor,
    now: datetime | None = None,
) -> MaintenanceWindow:
    """Schedule a maintenance window (validated by `maintenance_validate`). Not idempotent:
    each call makes one window. Nothing is sent: `maintenance_announce` tells subscribers.
    Refreshes the status page's cache on commit."""
    now = now or timezone.now()
    title, description, services, starts_at, ends_at = maintenance_validate(
        title=title,
        description=description,
        service_ids=service_ids,
        starts_at=starts_at,
        ends_at=ends_at,
        now=now,
    )
    with transaction.atomic():
        window = MaintenanceWindow.objects.create(
            title=title,
            description=description,
            starts_at=starts_at,
            ends_at=ends_at,
            created_by=_user(actor),
            created_at=now,
        )
        window.services.set(services)
        _changed()
    return window


def maintenance_update(
    *,
    window: MaintenanceWindow | int,
    changes: dict[str, Any],
    actor: Actor,
    now: datetime | None = None,
) -> MaintenanceWindow:
    """Change an upcoming or running window's EDITABLE_FIELDS (`service_ids` for its
    services). Empty `changes` is a no-op; an ended or cancelled window is refused, and so is
    moving a running window's start. An announced window stays announced: tell subscribers
    of a change with a customer notice."""
    unknown = sorted(set(changes) - set(EDITABLE_FIELDS))
    if unknown:
        raise InvalidInput(unknown[0], "cannot be changed here.")
    now = now or timezone.now()
    with transaction.atomic():
        locked = _lock(window)
        if not changes:
            return locked
        _refuse_history(locked, now, "changed")
        current = {
            "title": locked.title,
            "description": locked.description,
            "service_ids": list(locked.services.values_list("pk", flat=True)),
            "starts_at": locked.starts_at,
            "ends_at": locked.ends_at,
        }
        title, description, services, starts_at, ends_at = maintenance_validate(
            **{**current, **changes}, now=now, window=locked
        )
        locked.title, locked.description = title, description
        locked.starts_at, locked.ends_at = starts_at, ends_at
        locked.save(update_fields=["title", "description", "starts_at", "ends_at"])
        if {s.pk for s in services} != set(current["service_ids"]):
            locked.services.set(services)
        _changed()
    return locked


def maintenance_cancel(
    *,
    window: MaintenanceWindow | int,
    actor: Actor,
    now: datetime | None = None,
) -> MaintenanceWindow:
    """Cancel an upcoming window (it stops counting anywhere), or end a running one now (it
    stays in the history as done, and paging for its services resumes at once). A
    cancelled window is returned unchanged (idempotent); an ended one is refused."""
    now = now or timezone.now()
    with transaction.atomic():
        locked = _lock(window)
        state = window_state(locked, now=now)
        if state == WindowState.CANCELLED:
            return locked
        if state == WindowState.COMPLETED:
            raise InvalidInput("window", f"“{locked.title}” has already ended.")
        if state == WindowState.RUNNING and now > locked.starts_at:
            locked.ends_at = now
            locked.save(update_fields=["ends_at"])
        else:
            locked.cancelled_at = now
            locked.save(update_fields=["cancelled_at"])
        _changed()
    return locked


def maintenance_announce(
    *,
    window: MaintenanceWindow | int,
    actor: Actor,
    now: datetime | None = None,
) -> int:
    """Tell the confirmed subscribers of the window's public services about it: composes a
    `maintenance` customer notice (the kind's default template) and sends it (the notice
    service enqueues the deliveries on commit). Returns the number of recipients.

    Once per window: stamps `announced_at` with a compare-and-set, so a second call, or two
    at once, is refused and sends nothing. Refused for a cancelled or ended window and for
    one without public services."""
    from .notices import notice_compose, notice_send

    now = now or timezone.now()
    with transaction.atomic():
        locked = _lock(window)
        if locked.announced_at is not None:
            raise InvalidInput(
                "window",
                f"“{locked.title}” was announced at {locked.announced_at:%Y-%m-%d %H:%M} UTC.",
            )
        _refuse_history(locked, now, "announced")
        public_ids = list(locked.services.filter(is_public=True).values_list("pk", flat=True))
        if not public_ids:
            raise InvalidInput(
                "services", f"“{locked.title}” has no public service: there is nobody to tell."
            )
        stamped = MaintenanceWindow.objects.filter(pk=locked.pk, announced_at__isnull=True).update(
            announced_at=now
        )
        if not stamped:
            raise InvalidInput("window", f"“{locked.title}” was announced meanwhile.")
        locked.announced_at = now
        notice = notice_compose(
            kind=TemplateKind.MAINTENANCE,
            maintenance=locked,
            service_ids=public_ids,
            actor=actor,
            now=now,
        )
        return notice_send(notice=notice, actor=actor, now=now)
