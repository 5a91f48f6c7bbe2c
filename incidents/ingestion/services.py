"""Every write of alert ingestion: integrations and their tokens, alerts into incidents,
heartbeats.

An alert delivery is processed one group at a time, each group in its own transaction, in
a fixed order (so two deliveries never wait on each other's locks in opposite orders). A
group's transaction stores its alerts with their payloads, opens or finds the incident,
appends the timeline events, and resolves the incident when its last alert resolves. The
database constraints (one firing alert per fingerprint, one open group per key) are what
make duplicates impossible under concurrency; a transaction that loses such a race rolls
back and is replayed, and then finds what the winner stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, OperationalError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.functional import cached_property

from incidents.exceptions import InvalidInput, InvalidTransition
from incidents.models import (
    OPEN_STATUSES,
    Alert,
    AlertGroup,
    AlertRoute,
    AlertStatus,
    EventKind,
    Incident,
    Integration,
    IntegrationKind,
    Severity,
    TimelineEvent,
)
from incidents.services import (
    incident_acknowledge,
    incident_declare,
    incident_resolve,
    refuse_unknown_fields,
    timeline_event,
)

from .payloads import AlertIn, Delivery

logger = logging.getLogger(__name__)

TOKEN_BYTES = 24  # 192 bits; 32 URL-safe characters
RACE_RETRIES = 5
# Events v2 and common Alertmanager severity labels, when an integration maps none.
DEFAULT_SEVERITY_MAP = {
    "critical": 1,
    "page": 1,
    "error": 2,
    "high": 2,
    "major": 2,
    "warning": 3,
    "medium": 3,
    "minor": 3,
    "info": 4,
    "low": 4,
}
# Reserved (senders cannot use the prefix), so a sender's own "heartbeat" alert never
# collides with the tracker's, and heartbeats never join another group.
HEARTBEAT_FINGERPRINT = "tracker:heartbeat"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def integration_by_token(token: str, *, kind: str | None = None) -> Integration | None:
    """The active integration whose token this is, or None. Only hashes are compared (the
    lookup is by an indexed hash, then a constant-time check of the row found)."""
    if not token or len(token) > 200:
        return None
    digest = token_hash(token)
    # No joins: the defaults are read only when an alert opens an incident.
    integration = Integration.objects.filter(token_hash=digest, is_active=True).first()
    if integration is None or not hmac.compare_digest(integration.token_hash, digest):
        return None
    if kind is not None and integration.kind != kind:
        return None
    return integration


# token hash -> (monotonic expiry, integration). Each web process keeps the integrations it
# has authenticated for INTEGRATION_CACHE_SECONDS, so a steady sender costs no lookup; a
# rotation or deactivation reaches other processes within that time (this one at once).
_TOKENS: dict[str, tuple[float, Integration]] = {}
_TOKENS_MAX = 1024


def cached_integration(token: str, *, kind: str | None) -> Integration | None:
    """The active integration whose token this is (of `kind`, when given), or None.
    Positive answers are kept per process for a few seconds; unknown tokens are looked up
    every time, so random tokens cannot fill the cache."""
    ttl = settings.INTEGRATION_CACHE_SECONDS
    if not token or len(token) > 200:
        return None
    digest = token_hash(token)
    hit = _TOKENS.get(digest)
    if hit is not None and hit[0] > time.monotonic():
        integration = hit[1]
    else:
        integration = integration_by_token(token)
        if integration is None:
            _TOKENS.pop(digest, None)
            return None
        if ttl > 0:
            if len(_TOKENS) >= _TOKENS_MAX:
                _TOKENS.clear()
            _TOKENS[digest] = (time.monotonic() + ttl, integration)
    if kind is not None and integration.kind != kind:
        return None
    return integration


def forget_integration(integration: Integration) -> None:
    """Drop this process's cached copy of an integration (after a change to it)."""
    for digest, (_, cached) in list(_TOKENS.items()):
        if cached.pk == integration.pk:
            _TOKENS.pop(digest, None)


def integration_create(
    *,
    name: str,
    kind: str,
    default_severity: Severity | None = None,
    heartbeat_interval=None,
    now: datetime | None = None,
    **fields,
) -> tuple[Integration, str]:
    """Create an integration; returns it with its token, which is not stored and cannot be
    shown again. Refuses a duplicate name or an unknown kind (InvalidInput)."""
    name = (name or "").strip()
    if not name:
        raise InvalidInput("name", "may not be blank.")
    if kind not in IntegrationKind.values:
        raise InvalidInput("kind", f"{kind!r} is not one of {', '.join(IntegrationKind.values)}.")
    if Integration.objects.filter(name=name).exists():
        raise InvalidInput("name", f"an integration named {name!r} exists already.")
    now = now or timezone.now()
    token = secrets.token_urlsafe(TOKEN_BYTES)
    integration = Integration(
        name=name,
        kind=kind,
        token_hash=token_hash(token),
        token_prefix=token[:8],
        token_rotated_at=now,
        created_at=now,
        default_severity=default_severity,
        heartbeat_interval=heartbeat_interval,
        heartbeat_due_at=now + heartbeat_interval if heartbeat_interval else None,
        **fields,
    )
    integration.full_clean()
    integration.save()
    return integration, token


def integration_rotate_token(*, integration: Integration, now: datetime | None = None) -> str:
    """Give the integration a new token. The old one stops working at once in this
    process, and within INTEGRATION_CACHE_SECONDS in other web processes."""
    now = now or timezone.now()
    token = secrets.token_urlsafe(TOKEN_BYTES)
    Integration.objects.filter(pk=integration.pk).update(
        token_hash=token_hash(token), token_prefix=token[:8], token_rotated_at=now
    )
    integration.token_hash, integration.token_prefix = token_hash(token), token[:8]
    integration.token_rotated_at = now
    forget_integration(integration)
    return token


# Fields an admin may change on an existing integration; the token has its own service.
INTEGRATION_EDITABLE = (
    "name",
    "is_active",
    "default_service",
    "default_severity",
    "default_team",
    "severity_label",
    "severity_map",
    "grouping_keys",
    "auto_resolve",
    "rate_limit",
    "heartbeat_interval",
)


def integration_update(
    *, integration: Integration, changes: dict, now: datetime | None = None
) -> Integration:
    """Change an integration's settings; writes only the changed fields, so it never puts
    back counters, token or heartbeat times that requests wrote meanwhile. Changing the
    heartbeat interval re-bases the next due heartbeat on now (cleared: none is expected)."""
    refuse_unknown_fields(changes, INTEGRATION_EDITABLE)
    now = now or timezone.now()
    for name, value in changes.items():
        setattr(integration, name, value)
    fields = list(changes)
    if "heartbeat_interval" in changes:
        interval = changes["heartbeat_interval"]
        integration.heartbeat_due_at = now + interval if interval else None
        fields.append("heartbeat_due_at")
    if fields:
        integration.save(update_fields=fields)
    forget_integration(integration)
    return integration


def throttle_allows(integration: Integration, *, now: datetime | None = None) -> bool:
    """Count one request in this minute's window; False once the integration's limit is
    passed. A cache that cannot be reached lets the request through: refusing alerts
    because a counter is unavailable would be worse than not counting them."""
    if not integration.rate_limit:
        return True
    now = now or timezone.now()
    # Keyed by the token's hash, not the primary key: it names this integration in any
    # database that shares the cache (staging beside production, parallel test runs).
    key = f"alert-throttle:{integration.token_hash[:24]}:{int(now.timestamp() // 60)}"
    try:
        cache.add(key, 0, timeout=120)
        count = cache.incr(key)
    except Exception:  # noqa: BLE001 - fail open, see above
        logger.warning("throttle cache unavailable; not counting", exc_info=True)
        return True
    return count <= integration.rate_limit


def count_rejected(integration: Integration) -> None:
    Integration.objects.filter(pk=integration.pk).update(
        requests_rejected=F("requests_rejected") + 1
    )


class NotConfigured(Exception):
    """The tracker cannot store this alert until it is configured (no severity exists). Not
    the sender's fault: the webhook answers 503, so the sender retries."""


@dataclass
class IngestResult:
    created: int = 0  # new alerts stored
    duplicates: int = 0  # repeated deliveries of firing alerts
    resolved: int = 0  # alerts resolved
    ignored: int = 0  # resolutions of alerts never seen firing
    incidents: set[str] = field(default_factory=set)  # references touched
    opened: set[str] = field(default_factory=set)  # references opened

    def as_dict(self) -> dict:
        return {
            "alerts_created": self.created,
            "duplicates": self.duplicates,
            "alerts_resolved": self.resolved,
            "ignored": self.ignored,
            "incidents": sorted(self.incidents),
            "incidents_opened": sorted(self.opened),
        }


def group_key_for(integration: Integration, alert: AlertIn) -> str:
    """The key that puts alerts into one incident: the integration's grouping labels when
    it names some, else the source's own hint. Long keys are hashed to fit the column.
    The tracker's own alerts (heartbeats) keep their reserved key."""
    if alert.fingerprint == HEARTBEAT_FINGERPRINT:
        return HEARTBEAT_FINGERPRINT
    if integration.grouping_keys:
        values = [alert.labels.get(name, "") for name in integration.grouping_keys]
        key = json.dumps(values, separators=(",", ":"))
    else:
        key = alert.group_hint or alert.fingerprint
    if len(key) > 255:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


def _fingerprint(alert: AlertIn) -> str:
    if len(alert.fingerprint) > 255:
        return "sha256:" + hashlib.sha256(alert.fingerprint.encode()).hexdigest()
    return alert.fingerprint


def alerts_ingest(
    *, integration: Integration, delivery: Delivery, now: datetime | None = None
) -> IngestResult:
    """Store a parsed delivery and apply it to incidents. Idempotent per alert: a delivery
    repeated (a sender's retry) bumps counts and opens nothing. Commits before it returns;
    raises on a database failure, having committed the groups processed before it (a retry
    of the whole delivery is then harmless)."""
    now = now or timezone.now()
    result = IngestResult()
    groups: dict[str, list[AlertIn]] = {}
    for alert in delivery.alerts:
        groups.setdefault(group_key_for(integration, alert), []).append(alert)
    config = _Config(integration)
    for key in sorted(groups):
        for attempt in range(RACE_RETRIES):
            partial = IngestResult()
            try:
                with transaction.atomic():
                    _ingest_group(
                        integration,
                        key,
                        groups[key],
                        delivery=delivery,
                        config=config,
                        result=partial,
                        now=now,
                    )
            except (IntegrityError, OperationalError) as error:
                # A concurrent delivery stored the same alert or opened the same group
                # first (replaying finds what it stored), or the database broke a lock
                # cycle with a merge or another delivery (replaying takes the locks anew).
                if isinstance(error, OperationalError) and not _is_lock_conflict(error):
                    raise
                if attempt == RACE_RETRIES - 1:
                    raise
                logger.info("group %r of %s lost a race; replaying", key, integration.name)
                continue
            break
        result.created += partial.created
        result.duplicates += partial.duplicates
        result.resolved += partial.resolved
        result.ignored += partial.ignored
        result.incidents |= partial.incidents
        result.opened |= partial.opened
    Integration.objects.filter(pk=integration.pk).update(
        alerts_received=F("alerts_received") + len(delivery.alerts), last_received_at=now
    )
    return result


class _Config:
    """Routes and severities, read once per delivery and only if an alert opens an
    incident: deliveries that only add to open incidents never read them."""

    def __init__(self, integration: Integration) -> None:
        self.integration = integration

    @cached_property
    def routes(self) -> list[AlertRoute]:
        return list(
            AlertRoute.objects.filter(Q(integration__isnull=True) | Q(integration=self.integration))
            .filter(is_active=True)
            .select_related("runbook", "severity", "service", "team")
            .order_by("position", "pk")
        )

    @cached_property
    def severities(self) -> dict[int, Severity]:
        return {s.level: s for s in Severity.objects.all()}


def _is_lock_conflict(error: OperationalError) -> bool:
    """A deadlock or serialization failure: the transaction can simply run again."""
    return getattr(error.__cause__, "sqlstate", None) in ("40P01", "40001")


def _ingest_group(
    integration: Integration,
    key: str,
    alerts: list[AlertIn],
    *,
    delivery: Delivery,
    config: _Config,
    result: IngestResult,
    now: datetime,
) -> None:
    label = f"integration {integration.name}"
    # The last word on each fingerprint in this delivery wins (a sender that batches a
    # firing and its resolution sends them in order).
    latest: dict[str, AlertIn] = {}
    for alert in alerts:
        latest[_fingerprint(alert)] = alert
    fingerprints = sorted(latest)
    firing_rows = {
        row.fingerprint: row
        for row in Alert.objects.select_for_update(of=("self",))
        .filter(integration=integration, fingerprint__in=fingerprints, status=AlertStatus.FIRING)
        .annotate(incident_reference=F("incident__reference"))
        .only("pk", "fingerprint", "incident_id", "name")
        .order_by("fingerprint")
    }
    new_alerts: list[tuple[str, AlertIn]] = []
    touched: dict[int, None] = {}
    acknowledge: dict[int, None] = {}
    repeated: list[int] = []
    events: list[TimelineEvent] = []
    references: set[str] = set()
    for fingerprint in fingerprints:
        alert = latest[fingerprint]
        row = firing_rows.get(fingerprint)
        if alert.action == "acknowledge":
            if row is None or not row.incident_id:
                result.ignored += 1
            else:
                acknowledge[row.incident_id] = None
                references.add(row.incident_reference)
        elif alert.status == AlertStatus.RESOLVED:
            if row is None:
                result.ignored += 1
                continue
            resolved_fields = {
                "status": AlertStatus.RESOLVED,
                "resolved_at": now,
                "ends_at": alert.ends_at or now,
                "last_received_at": now,
            }
            if alert.payload:
                resolved_fields["payload"] = alert.payload
            Alert.objects.filter(pk=row.pk).update(**resolved_fields)
            result.resolved += 1
            if row.incident_id:
                touched[row.incident_id] = None
                references.add(row.incident_reference)
                events.append(
                    timeline_event(
                        incident=row.incident_id,
                        kind=EventKind.ALERT_RESOLVED,
                        actor=None,
                        actor_label=label,
                        now=now,
                        value=fingerprint,
                        message=row.name,
                    )
                )
        elif row is not None:
            # A repeated delivery of an alert that is still firing: count it, nothing more.
            repeated.append(row.pk)
            result.duplicates += 1
            if row.incident_id:
                references.add(row.incident_reference)
        else:
            new_alerts.append((fingerprint, alert))
    if repeated:
        Alert.objects.filter(pk__in=repeated).update(count=F("count") + 1, last_received_at=now)
    if new_alerts:
        incident = _group_incident(
            integration, key, [a for _, a in new_alerts], config, result, now
        )
        Alert.objects.bulk_create(
            [
                Alert(
                    integration=integration,
                    incident=incident,
                    fingerprint=fingerprint,
                    group_key=key,
                    status=AlertStatus.FIRING,
                    name=alert.name,
                    summary=alert.summary,
                    source=alert.source,
                    severity_label=alert.severity_label or _severity_label(integration, alert),
                    labels=alert.labels,
                    annotations=alert.annotations,
                    payload=alert.payload,
                    starts_at=alert.starts_at,
                    ends_at=alert.ends_at,
                    first_received_at=now,
                    last_received_at=now,
                )
                for fingerprint, alert in new_alerts
            ]
        )
        result.created += len(new_alerts)
        references.add(incident.reference)
        truncated = (
            f" ({delivery.truncated} more alerts of this group were left out by the sender)"
            if delivery.truncated
            else ""
        )
        events.extend(
            timeline_event(
                incident=incident,
                kind=EventKind.ALERT_FIRED,
                actor=None,
                actor_label=label,
                now=now,
                value=fingerprint,
                message=(alert.name + (f": {alert.summary}" if alert.summary else ""))[:2000]
                + truncated,
            )
            for fingerprint, alert in new_alerts
        )
    if events:
        TimelineEvent.objects.bulk_create(events)
    for incident_id in acknowledge:
        try:
            # Idempotent for an acknowledged incident; a resolved or closed one (perhaps
            # resolved a moment ago by someone else) has nothing left to acknowledge.
            incident_acknowledge(incident=incident_id, actor=None, actor_label=label, now=now)
        except InvalidTransition:
            result.ignored += 1
    for incident_id in sorted(touched):
        if integration.auto_resolve:
            _resolve_if_quiet(incident_id, label=label, now=now)
    references.discard(None)
    result.incidents |= references


def _group_incident(
    integration: Integration,
    key: str,
    alerts: list[AlertIn],
    config: _Config,
    result: IngestResult,
    now: datetime,
) -> Incident:
    """The open incident of the group, locked; a new one (and a new group) if there is none
    or the group's incident is no longer open.

    The group is read without a lock (a merge locks incidents first, then moves groups), so
    after the incident's lock is granted the group is read again: a merge that committed
    meanwhile has moved it to the surviving incident, and that is the one to lock."""
    for _ in range(RACE_RETRIES):
        group = (
            AlertGroup.objects.filter(integration=integration, key=key, is_open=True)
            .only("pk", "incident_id")
            .first()
        )
        if group is None:
            break
        incident = (
            Incident.objects.select_for_update()
            .only("pk", "reference", "status")
            .get(pk=group.incident_id)
        )
        if not AlertGroup.objects.filter(
            pk=group.pk, incident_id=incident.pk, is_open=True
        ).exists():
            continue  # moved by a merge, or closed, while we waited for the lock
        if incident.status in OPEN_STATUSES:
            return incident
        AlertGroup.objects.filter(pk=group.pk, is_open=True).update(is_open=False)
        break
    first = alerts[0]
    # Routes match the alert's name label where it has one (Alertmanager, heartbeats), else
    # its display name (Events v2 summary, generic title).
    route_name = first.labels.get("alertname") or first.name
    route = next((r for r in config.routes if r.matches(route_name, first.labels)), None)
    severity = _pick_severity(integration, alerts, route, config.severities)
    service = (route.service if route and route.service_id else None) or (
        integration.default_service
    )
    team = (route.team if route and route.team_id else None) or integration.default_team
    summary = "\n".join(dict.fromkeys(a.summary for a in alerts if a.summary))[:10_000]
    name = first.name.strip() or "Alert"
    incident = incident_declare(
        title=(name if len(alerts) == 1 else f"{name} and {len(alerts) - 1} more")[:200],
        severity=severity,
        actor=None,
        actor_label=f"integration {integration.name}",
        summary=summary,
        services=[service] if service else [],
        team=team,
        runbook=route.runbook if route and route.runbook_id else None,
        detected_at=min(
            [a.starts_at for a in alerts if a.starts_at and a.starts_at <= now] or [now]
        ),
        now=now,
    )
    AlertGroup.objects.create(integration=integration, key=key, incident=incident, created_at=now)
    result.opened.add(incident.reference)
    return incident


def _severity_label(integration: Integration, alert: AlertIn) -> str:
    return alert.labels.get(integration.severity_label, "")[:100]


def _pick_severity(
    integration: Integration,
    alerts: list[AlertIn],
    route: AlertRoute | None,
    severities: dict[int, Severity],
) -> Severity:
    """A matching route's severity; else the worst severity the mapping gives the group's
    alerts; else the integration's default; else the least severe level."""
    if route is not None and route.severity_id:
        return severities.get(route.severity.level) or route.severity
    mapping = {
        str(k).strip().lower(): _level(v)
        for k, v in (integration.severity_map or DEFAULT_SEVERITY_MAP).items()
    }
    levels = []
    for alert in alerts:
        value = (alert.severity_label or _severity_label(integration, alert)).strip().lower()
        level = mapping.get(value)
        if level in severities:
            levels.append(level)
    if levels:
        return severities[min(levels)]
    if integration.default_severity_id:
        return integration.default_severity
    if not severities:
        raise NotConfigured("No severity is configured; load a playbook first.")
    return severities[max(severities)]


def _level(value) -> int | None:
    """A severity level from a mapping value: 1, or "1" as typed in the admin's JSON."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _resolve_if_quiet(incident_id: int, *, label: str, now: datetime) -> None:
    """Resolve the incident if it is open and none of its alerts is firing. The incident
    row is locked first, as the firing path locks it, so a new alert joining the incident
    concurrently is either seen here or finds the incident resolved and opens another."""
    incident = Incident.objects.select_for_update().get(pk=incident_id)
    if incident.status not in OPEN_STATUSES:
        return
    if Alert.objects.filter(incident_id=incident_id, status=AlertStatus.FIRING).exists():
        return
    incident_resolve(
        incident=incident,
        actor=None,
        actor_label=label,
        resolution="Every alert of this incident has resolved.",
        now=now,
    )


# --- heartbeats -------------------------------------------------------------------------------


def _heartbeat_alert(integration: Integration, status: str) -> AlertIn:
    return AlertIn(
        fingerprint=HEARTBEAT_FINGERPRINT,
        status=status,
        name=f"Heartbeat missed: {integration.name}"[:255],
        group_hint=HEARTBEAT_FINGERPRINT,
        summary=(
            f"No heartbeat from {integration.name} for {integration.heartbeat_interval}."
            if integration.heartbeat_interval
            else ""
        ),
        source=integration.name,
        labels={"alertname": "HeartbeatMissed", "integration": integration.name},
    )


def heartbeat_ping(*, integration: Integration, now: datetime | None = None) -> IngestResult:
    """Record a heartbeat: the next one is due an interval from now. If a missed heartbeat
    had opened an incident, its alert resolves (and, with auto-resolve, the incident).

    Holds the integration's row lock, as `heartbeats_check` does, so a ping arriving while
    the check opens an incident waits for it and then resolves it."""
    now = now or timezone.now()
    with transaction.atomic():
        locked = Integration.objects.select_for_update().get(pk=integration.pk)
        if not locked.heartbeat_interval:
            raise InvalidInput("heartbeat", f"{locked.name} does not expect heartbeats.")
        Integration.objects.filter(pk=locked.pk).update(
            last_heartbeat_at=now, heartbeat_due_at=now + locked.heartbeat_interval
        )
        if Alert.objects.filter(
            integration=locked, fingerprint=HEARTBEAT_FINGERPRINT, status=AlertStatus.FIRING
        ).exists():
            return alerts_ingest(
                integration=locked,
                delivery=Delivery(alerts=[_heartbeat_alert(locked, AlertStatus.RESOLVED)]),
                now=now,
            )
    return IngestResult()


def heartbeats_check(*, now: datetime | None = None, batch: int = 100) -> int:
    """Open an incident, through the same path as an alert, for each integration whose
    heartbeat is overdue. Idempotent: each integration is claimed under its row lock
    (skipping one another sweep holds) and its due time cleared in the same transaction
    (the next ping sets it again). One integration that fails is logged and left due for
    the next sweep; it does not stop the others."""
    now = now or timezone.now()
    opened = 0
    due = list(
        Integration.objects.filter(
            is_active=True, heartbeat_interval__isnull=False, heartbeat_due_at__lte=now
        )
        .order_by("heartbeat_due_at", "pk")
        .values_list("pk", flat=True)[:batch]
    )
    for pk in due:
        try:
            with transaction.atomic():
                locked = (
                    Integration.objects.select_for_update(skip_locked=True)
                    .filter(
                        pk=pk,
                        is_active=True,
                        heartbeat_interval__isnull=False,
                        heartbeat_due_at__lte=now,
                    )
                    .first()
                )
                if locked is None:
                    continue
                Integration.objects.filter(pk=pk).update(heartbeat_due_at=None)
                alerts_ingest(
                    integration=locked,
                    delivery=Delivery(alerts=[_heartbeat_alert(locked, AlertStatus.FIRING)]),
                    now=now,
                )
        except Exception:
            logger.exception("heartbeat check of integration %s failed; retried next sweep", pk)
            continue
        opened += 1
    return opened
