"""The public status page's reads: service states, the 90-day uptime bars, open and past
public incidents with their public updates, and scheduled maintenance.

Everything leaves this module as plain frozen dataclasses built from an allow-list of fields,
never as model instances, so a template or the feed cannot reach anything internal (notes,
the timeline, people, alerts, internal updates) by following a relation.

What is public:

- a service with `is_public`;
- an incident that is not a drill and touches at least one public service: its impact
  colours the states and the uptime of its public services (false positives never do);
- an incident is *listed* (its public title, public updates) only once a public update
  was posted for it: an incident nobody has told customers about shows only as a service
  state;
- an incident's name is `public_title`: the title a person gave it, or, for one opened by
  an alert (nobody declared it), its impact and public services, never the alert's text;
- a maintenance window with at least one public service (its other services are left out).

The page costs a fixed number of queries whatever the number of incidents and updates.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.core.cache import cache
from django.db.models import Exists, Max, OuterRef, Prefetch, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils.html import escape, linebreaks

from incidents.models import (
    OPEN_STATUSES,
    Impact,
    Incident,
    IncidentStatus,
    MaintenanceWindow,
    PublicStage,
    Service,
    StatusUpdate,
)

from .maintenance import WindowState, window_state

logger = logging.getLogger(__name__)

HISTORY_DAYS = 90
FEED_MAX_ENTRIES = 100


class ServiceState:
    """A public service's state, worst last. An incident's impact outranks maintenance: it
    says something unplanned is happening."""

    OPERATIONAL = "operational"
    MAINTENANCE = "maintenance"
    DEGRADED = "degraded"
    PARTIAL_OUTAGE = "partial_outage"
    MAJOR_OUTAGE = "major_outage"

    LABELS = {
        OPERATIONAL: "Operational",
        MAINTENANCE: "Under maintenance",
        DEGRADED: "Degraded performance",
        PARTIAL_OUTAGE: "Partial outage",
        MAJOR_OUTAGE: "Major outage",
    }
    RANK = {name: rank for rank, name in enumerate(LABELS)}


IMPACT_STATE = {
    Impact.DEGRADED: ServiceState.DEGRADED,
    Impact.PARTIAL_OUTAGE: ServiceState.PARTIAL_OUTAGE,
    Impact.MAJOR_OUTAGE: ServiceState.MAJOR_OUTAGE,
}
IMPACT_RANK = {Impact.NONE: 0, Impact.DEGRADED: 1, Impact.PARTIAL_OUTAGE: 2, Impact.MAJOR_OUTAGE: 3}
# How much of an impact's time counts as downtime (docs/status-page.md): a major outage all
# of it; a partial outage (some requests or some customers fail) 30 %; degraded performance
# (slow, but working) none, though it still colours the day.
DOWNTIME_WEIGHT = {
    Impact.DEGRADED: 0.0,
    Impact.PARTIAL_OUTAGE: 0.3,
    Impact.MAJOR_OUTAGE: 1.0,
}
OVERALL_LABELS = {
    ServiceState.OPERATIONAL: "All systems operational",
    ServiceState.MAINTENANCE: "Scheduled maintenance in progress",
    ServiceState.DEGRADED: "Some systems have degraded performance",
    ServiceState.PARTIAL_OUTAGE: "Partial outage",
    ServiceState.MAJOR_OUTAGE: "Major outage",
}


# --- what the page and the feed may show ----------------------------------------------------


@dataclass(frozen=True)
class UptimeDay:
    day: date
    impact: str  # the worst Impact value that touched the day; "none" for a clean day
    label: str


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    description: str
    state: str
    state_label: str
    days: tuple[UptimeDay, ...]
    uptime_percent: str  # "99.95", rounded down so that any downtime shows


@dataclass(frozen=True)
class PublicUpdate:
    pk: int
    stage: str
    stage_label: str
    body: str
    posted_at: datetime


@dataclass(frozen=True)
class PublicIncident:
    pk: int
    title: str
    impact: str
    impact_label: str
    services: tuple[str, ...]
    stage: str  # the latest public update's stage
    stage_label: str
    started_at: datetime
    resolved_at: datetime | None
    updates: tuple[PublicUpdate, ...]  # newest first


@dataclass(frozen=True)
class PublicWindow:
    pk: int
    title: str
    description: str
    services: tuple[str, ...]
    starts_at: datetime
    ends_at: datetime
    state: str
    created_at: datetime
    cancelled_at: datetime | None


@dataclass(frozen=True)
class StatusPage:
    site_name: str
    generated_at: datetime
    overall: str
    overall_label: str
    services: tuple[ServiceStatus, ...]
    open_incidents: tuple[PublicIncident, ...]
    maintenance_running: tuple[PublicWindow, ...]
    maintenance_upcoming: tuple[PublicWindow, ...]
    history: tuple[PublicIncident, ...]
    history_since: date
    uptime_since: date


# --- querysets -------------------------------------------------------------------------------


def _public_services() -> QuerySet[Service]:
    return Service.objects.filter(is_public=True).only("id", "name", "description")


def _on_public_service() -> Exists:
    return Exists(
        Incident.services.through.objects.filter(
            incident_id=OuterRef("pk"), service__is_public=True
        )
    )


def _window_on_public_service() -> Exists:
    return Exists(
        MaintenanceWindow.services.through.objects.filter(
            maintenancewindow_id=OuterRef("pk"), service__is_public=True
        )
    )


def public_incidents(*, now: datetime) -> QuerySet[Incident]:
    """Incidents customers may hear of: not drills, on at least one public service."""
    return Incident.objects.filter(is_drill=False, detected_at__lte=now).filter(
        _on_public_service()
    )


def _public_updates(now: datetime) -> QuerySet[StatusUpdate]:
    return StatusUpdate.objects.filter(public=True, posted_at__lte=now).only(
        "id", "incident_id", "stage", "body", "posted_at"
    )


def listed_incidents(*, now: datetime) -> QuerySet[Incident]:
    """Public incidents with at least one public update, with their public updates (newest
    first, in `public_updates`) and public services (`public_services`) prefetched."""
    has_update = Exists(_public_updates(now).filter(incident_id=OuterRef("pk")))
    return (
        public_incidents(now=now)
        .filter(has_update)
        .only("id", "title", "declared_by", "impact", "status", "detected_at", "resolved_at")
        .prefetch_related(
            Prefetch(
                "updates",
                queryset=_public_updates(now).order_by("-posted_at", "-pk"),
                to_attr="public_updates",
            ),
            Prefetch(
                "services", queryset=_public_services().order_by("name"), to_attr="public_services"
            ),
        )
    )


def public_windows(*, now: datetime) -> QuerySet[MaintenanceWindow]:
    """Maintenance windows with a public service, their public services prefetched."""
    return (
        MaintenanceWindow.objects.filter(_window_on_public_service())
        .defer("created_by")
        .prefetch_related(
            Prefetch(
                "services", queryset=_public_services().order_by("name"), to_attr="public_services"
            )
        )
    )


# --- conversions -----------------------------------------------------------------------------

# What an incident nobody declared is called, by impact: "Partial outage affecting Checkout".
PUBLIC_TITLE_LEAD = {
    Impact.NONE: "Incident",
    Impact.DEGRADED: "Degraded performance",
    Impact.PARTIAL_OUTAGE: "Partial outage",
    Impact.MAJOR_OUTAGE: "Major outage",
}


def public_title(incident: Incident, *, service_names: Sequence[str] | None = None) -> str:
    """The name customers see for `incident` (the status page, the feed, customer notices).

    The title only when a person declared the incident (`declared_by` set): they wrote it
    for people to read. An incident opened by an alert has the alert's name and summary as
    its title (hosts, addresses, label values), so it is named from its impact and public
    services instead: "Partial outage affecting Checkout, Search", or just "Partial outage"
    without a public service. `service_names` are the incident's public service names; when
    not given they come from a `public_services` prefetch, else from one query. Read-only."""
    if incident.declared_by_id is not None:
        return incident.title
    if service_names is None:
        prefetched = getattr(incident, "public_services", None)
        if prefetched is not None:
            service_names = [s.name for s in prefetched]
        else:
            service_names = list(
                incident.services.filter(is_public=True)
                .order_by("name")
                .values_list("name", flat=True)
            )
    lead = PUBLIC_TITLE_LEAD.get(incident.impact, "Incident")
    return f"{lead} affecting {', '.join(service_names)}" if service_names else lead


def _update(update: StatusUpdate) -> PublicUpdate:
    return PublicUpdate(
        pk=update.pk,
        stage=update.stage,
        stage_label=PublicStage(update.stage).label,
        body=update.body,
        posted_at=update.posted_at,
    )


def _incident(incident: Incident) -> PublicIncident:
    updates = tuple(_update(u) for u in incident.public_updates)
    services = tuple(s.name for s in incident.public_services)
    return PublicIncident(
        pk=incident.pk,
        title=public_title(incident, service_names=services),
        impact=incident.impact,
        impact_label=Impact(incident.impact).label,
        services=services,
        stage=updates[0].stage,
        stage_label=updates[0].stage_label,
        started_at=incident.detected_at,
        resolved_at=incident.resolved_at,
        updates=updates,
    )


def _window(window: MaintenanceWindow, now: datetime) -> PublicWindow:
    return PublicWindow(
        pk=window.pk,
        title=window.title,
        description=window.description,
        services=tuple(s.name for s in window.public_services),
        starts_at=window.starts_at,
        ends_at=window.ends_at,
        state=window_state(window, now=now),
        created_at=window.created_at,
        cancelled_at=window.cancelled_at,
    )


# --- uptime ----------------------------------------------------------------------------------


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def weighted_downtime(intervals: list[tuple[datetime, datetime, str]]) -> timedelta:
    """The downtime of one service: at each instant the worst impact among the intervals
    (start, end, impact) covering it counts with its weight, so overlapping incidents are
    never counted twice."""
    events: list[tuple[datetime, int, str]] = []
    for start, end, impact in intervals:
        if end > start:
            events += [(start, 1, impact), (end, -1, impact)]
    events.sort(key=lambda e: (e[0], e[1]))
    covering = {impact: 0 for impact in DOWNTIME_WEIGHT}
    seconds = 0.0
    previous: datetime | None = None
    for at, step, impact in events:
        if previous is not None and at > previous:
            weight = max((DOWNTIME_WEIGHT[i] for i, n in covering.items() if n > 0), default=0.0)
            seconds += weight * (at - previous).total_seconds()
        covering[impact] += step
        previous = at
    return timedelta(seconds=seconds)


def uptime_percent(downtime: timedelta, period: timedelta) -> str:
    """100 x (1 - downtime / period), rounded down to two decimals: a minute of outage in
    90 days shows as 99.99, never as 100.00."""
    if period <= timedelta(0):
        return "100.00"
    ratio = max(0.0, 1 - downtime / period)
    # The small epsilon keeps 100 x 0.9995 = 99.94999... from flooring to 99.94.
    return f"{math.floor(ratio * 10_000 + 1e-6) / 100:.2f}"


def _impact_intervals(
    *, now: datetime, since: datetime
) -> tuple[dict[int, list[tuple[datetime, datetime, str]]], dict[int, str]]:
    """Per public service: the impact windows of its incidents since `since` (detection to
    resolution, or to now while open), and the worst impact among its open incidents.
    One query: the incident's public service ids come from a prefetch on the through table."""
    incidents = (
        public_incidents(now=now)
        .filter(false_positive=False)
        .exclude(impact=Impact.NONE)
        .filter(Q(status__in=OPEN_STATUSES) | Q(resolved_at__gt=since))
        .only("id", "impact", "status", "detected_at", "resolved_at")
        .prefetch_related(
            Prefetch("services", queryset=Service.objects.filter(is_public=True).only("id"))
        )
    )
    intervals: dict[int, list[tuple[datetime, datetime, str]]] = defaultdict(list)
    worst_open: dict[int, str] = {}
    for incident in incidents:
        is_open = incident.status in OPEN_STATUSES
        end = now if is_open or incident.resolved_at is None else min(incident.resolved_at, now)
        start = max(incident.detected_at, since)
        for service in incident.services.all():
            if end > start:
                intervals[service.pk].append((start, end, incident.impact))
            if (
                is_open
                and IMPACT_RANK[incident.impact]
                > IMPACT_RANK[worst_open.get(service.pk, Impact.NONE)]
            ):
                worst_open[service.pk] = incident.impact
    return intervals, worst_open


def _uptime_days(
    intervals: list[tuple[datetime, datetime, str]], first_day: date, today: date
) -> tuple[UptimeDay, ...]:
    worst: dict[date, str] = {}
    for start, end, impact in intervals:
        day = start.astimezone(UTC).date()
        last = (end - timedelta(microseconds=1)).astimezone(UTC).date()
        while day <= last:
            if IMPACT_RANK[impact] > IMPACT_RANK[worst.get(day, Impact.NONE)]:
                worst[day] = impact
            day += timedelta(days=1)
    days = []
    for offset in range((today - first_day).days + 1):
        day = first_day + timedelta(days=offset)
        impact = worst.get(day, Impact.NONE)
        text = "No incidents" if impact == Impact.NONE else Impact(impact).label
        days.append(UptimeDay(day=day, impact=impact, label=f"{day:%Y-%m-%d}: {text}"))
    return tuple(days)


# --- the page --------------------------------------------------------------------------------


def status_page(*, now: datetime) -> StatusPage:
    """Everything `/status/` shows at `now`. A fixed number of queries (eight) whatever
    the number of services, incidents, updates and windows. Read-only."""
    today = now.astimezone(UTC).date()
    first_day = today - timedelta(days=HISTORY_DAYS - 1)
    since = _day_start(first_day)
    period = now - since

    services = list(_public_services().order_by("name"))
    intervals, worst_open = _impact_intervals(now=now, since=since)
    windows = [
        _window(w, now)
        for w in public_windows(now=now)
        .filter(cancelled_at__isnull=True, ends_at__gt=now)
        .order_by("starts_at", "pk")
    ]
    running = tuple(w for w in windows if w.state == WindowState.RUNNING)
    upcoming = tuple(w for w in windows if w.state == WindowState.UPCOMING)
    # Service names are unique, and all a public window holds of its services.
    in_maintenance = {name for window in running for name in window.services}

    statuses = []
    for service in services:
        impact = worst_open.get(service.pk, Impact.NONE)
        state = IMPACT_STATE.get(impact, ServiceState.OPERATIONAL)
        if state == ServiceState.OPERATIONAL and service.name in in_maintenance:
            state = ServiceState.MAINTENANCE
        service_intervals = intervals.get(service.pk, [])
        statuses.append(
            ServiceStatus(
                name=service.name,
                description=service.description,
                state=state,
                state_label=ServiceState.LABELS[state],
                days=_uptime_days(service_intervals, first_day, today),
                uptime_percent=uptime_percent(weighted_downtime(service_intervals), period),
            )
        )
    overall = max(
        (s.state for s in statuses), key=ServiceState.RANK.__getitem__, default="operational"
    )

    listed = listed_incidents(now=now).filter(
        Q(status__in=OPEN_STATUSES)
        | Q(status__in=[IncidentStatus.RESOLVED, IncidentStatus.CLOSED], resolved_at__gte=since)
    )
    open_incidents, history = [], []
    for incident in listed.order_by(Coalesce("resolved_at", "detected_at").desc(), "-pk"):
        (open_incidents if incident.status in OPEN_STATUSES else history).append(
            _incident(incident)
        )
    return StatusPage(
        site_name=settings.SITE_NAME,
        generated_at=now,
        overall=overall,
        overall_label=OVERALL_LABELS[overall],
        services=tuple(statuses),
        open_incidents=tuple(open_incidents),
        maintenance_running=running,
        maintenance_upcoming=upcoming,
        history=tuple(history),
        history_since=first_day,
        uptime_since=first_day,
    )


# --- the feed --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedEntry:
    unique_id: str
    title: str
    link: str
    summary_html: str
    published: datetime
    updated: datetime


def _tag(at: datetime, specific: str) -> str:
    """A tag: URI (RFC 4151): stable for the life of the entry, whatever the URL of the
    page becomes later."""
    authority = urlsplit(settings.SITE_URL).hostname or "localhost"
    return f"tag:{authority},{at:%Y-%m-%d}:status/{specific}"


def _html(text: str) -> str:
    return linebreaks(escape(text))


def feed_entries(*, now: datetime, page_url: str) -> list[FeedEntry]:
    """Entries of `/status/feed.atom`, newest first: one per public update posted in the
    last HISTORY_DAYS days, and one per maintenance window created in that time or not yet
    over (a cancelled one says so; its `updated` is the cancellation). At most
    FEED_MAX_ENTRIES. Four queries. Read-only."""
    since = now - timedelta(days=HISTORY_DAYS)
    updates = (
        _public_updates(now)
        .filter(posted_at__gte=since)
        .filter(Exists(public_incidents(now=now).filter(pk=OuterRef("incident_id"))))
        .select_related("incident")
        .only(
            "id",
            "stage",
            "body",
            "posted_at",
            "incident__id",
            "incident__title",
            "incident__declared_by",
            "incident__impact",
        )
        .prefetch_related(
            Prefetch(
                "incident__services",
                queryset=_public_services().order_by("name"),
                to_attr="public_services",
            )
        )
        .order_by("-posted_at", "-pk")[:FEED_MAX_ENTRIES]
    )
    entries = []
    for update in updates:
        incident = update.incident
        stage = PublicStage(update.stage).label
        names = [s.name for s in incident.public_services]
        affected = ", ".join(names)
        entries.append(
            FeedEntry(
                unique_id=_tag(update.posted_at, f"update/{update.pk}"),
                title=f"{public_title(incident, service_names=names)}: {stage}",
                link=f"{page_url}#incident-{incident.pk}",
                summary_html=_html(update.body) + _html(f"{stage}. Affects: {affected}."),
                published=update.posted_at,
                updated=update.posted_at,
            )
        )
    windows = (
        public_windows(now=now)
        .filter(Q(created_at__gte=since) | Q(ends_at__gt=now), created_at__lte=now)
        .order_by("-created_at", "-pk")[:FEED_MAX_ENTRIES]
    )
    for window in windows:
        public = _window(window, now)
        cancelled = public.state == WindowState.CANCELLED
        when = f"{public.starts_at:%Y-%m-%d %H:%M} to {public.ends_at:%Y-%m-%d %H:%M} UTC"
        text = (
            f"{'Cancelled' if cancelled else 'Scheduled'} maintenance of "
            f"{', '.join(public.services)} from {when}."
        )
        entries.append(
            FeedEntry(
                unique_id=_tag(public.created_at, f"maintenance/{public.pk}"),
                title=f"{'Cancelled' if cancelled else 'Scheduled'} maintenance: {public.title}",
                link=f"{page_url}#maintenance-{public.pk}",
                summary_html=_html(text)
                + (_html(public.description) if public.description else ""),
                published=public.created_at,
                updated=public.cancelled_at if cancelled else public.created_at,
            )
        )
    entries.sort(key=lambda e: (e.updated, e.unique_id), reverse=True)
    return entries[:FEED_MAX_ENTRIES]


# --- server-side cache -----------------------------------------------------------------------

GENERATION_KEY = "status:generation"


def status_cache_version(*, now: datetime) -> str:
    """What the cached page and feed are keyed by: the latest public update (one indexed
    query), the generation the maintenance services bump on commit, and the current
    max-age time bucket, so that a new public update or window shows at once and anything
    else that time changes (a window starting, an incident resolved, the uptime) within
    STATUS_PAGE_MAX_AGE seconds."""
    latest = StatusUpdate.objects.filter(public=True).aggregate(latest=Max("id"))["latest"]
    try:
        generation = cache.get(GENERATION_KEY) or "0"
    except Exception:  # noqa: BLE001 - an unreachable cache must not take the page down
        logger.warning("status page: the cache is unreachable", exc_info=True)
        generation = "down"
    bucket = int(now.timestamp()) // max(1, settings.STATUS_PAGE_MAX_AGE)
    return f"{latest or 0}.{generation}.{bucket}"


def status_page_changed() -> None:
    """Make the next request rebuild the status page and feed (a maintenance window was
    created, changed or cancelled). Call through `transaction.on_commit`."""
    import uuid

    try:
        cache.set(GENERATION_KEY, uuid.uuid4().hex, timeout=None)
    except Exception:  # noqa: BLE001 - the max-age bucket still refreshes the page
        logger.warning("status page: could not reach the cache to refresh it", exc_info=True)
