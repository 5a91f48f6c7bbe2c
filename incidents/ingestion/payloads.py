"""Parse and validate the three webhook formats into one shape, `AlertIn`.

Parsing never touches the database. Every problem is a `PayloadError` naming the path of
the first bad field (`alerts[2].startsAt`) and what was expected, so the sender's 400 says
exactly what to fix. Limits keep one request from storing unbounded text.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.utils.dateparse import parse_datetime

MAX_ALERTS = 1000
MAX_KEY = 255
MAX_TEXT = 10_000
MAX_LABELS = 100
EVENTS_V2_SEVERITIES = ("critical", "error", "warning", "info")
EVENTS_V2_ACTIONS = ("trigger", "acknowledge", "resolve")
# Alertmanager's "no end time" is Go's zero time.
ZERO_TIME_PREFIX = "0001-01-01T00:00:00"


class PayloadError(ValueError):
    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}" if path else reason)


@dataclass
class AlertIn:
    """One alert as any source sends it, normalised."""

    fingerprint: str
    status: str  # "firing" or "resolved"
    name: str
    group_hint: str  # Alertmanager's groupKey, the Events v2 dedup key, generic "group"
    summary: str = ""
    source: str = ""
    severity_label: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    # Events v2 only: "acknowledge" acknowledges the alert's incident.
    action: str = ""


@dataclass
class Delivery:
    alerts: list[AlertIn]
    truncated: int = 0  # Alertmanager's truncatedAlerts: alerts left out of this request


# Deeper than any format here needs; bounded so that storing the payload (jsonb) cannot hit
# PostgreSQL's stack limit, which would look like an outage (503) instead of a 400.
MAX_DEPTH = 32
# Text PostgreSQL refuses to store (in text or jsonb): NUL, and halves of surrogate pairs.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _reject_constant(name: str):
    raise PayloadError("", f"malformed JSON: {name} is not valid JSON.")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise PayloadError("", f"the number {text[:40]} is out of range.")
    return value


def parse_json(body: bytes) -> Any:
    """The body as JSON, refusing what could not be stored: NaN and Infinity, numbers out of
    range, nesting deeper than MAX_DEPTH, and text with NUL or unpaired surrogates."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PayloadError("", "the body is not UTF-8 text.") from error
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except PayloadError:
        raise
    except json.JSONDecodeError as error:
        raise PayloadError("", f"malformed JSON: {error.msg} at line {error.lineno}.") from error
    except RecursionError as error:
        raise PayloadError("", f"the JSON is nested too deep (at most {MAX_DEPTH}).") from error
    except ValueError as error:  # an integer with more digits than Python converts
        raise PayloadError("", "a number in the body is too long.") from error
    if _may_be_unstorable(text):
        _check_storable(data)
    return data


# How NUL and surrogates can reach a parsed string: only as \u escapes, since the JSON
# decoder refuses raw control characters in strings and the UTF-8 decoder refuses encoded
# surrogates. (An escaped backslash before "u0000" also matches: a false alarm, never a miss.)
UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89abcdefABCDEF][0-9a-fA-F]{2})")


def _may_be_unstorable(text: str) -> bool:
    """False when the body provably holds nothing `_check_storable` would refuse: no escape
    that can decode to NUL or a surrogate, and fewer brackets than MAX_DEPTH (so no nesting
    that deep). The walk is then skipped: it is a fifth of a webhook request's CPU."""
    if UNSTORABLE_ESCAPE.search(text):
        return True
    return text.count("{") + text.count("[") > MAX_DEPTH


def _check_storable(data: Any) -> None:
    """Walk the parsed body without recursion; raise for the first value PostgreSQL could
    not store, naming its path."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if UNSTORABLE.search(value):
                raise PayloadError(path, "contains a NUL character or an unpaired surrogate.")
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_DEPTH:
            raise PayloadError(path, f"is nested too deep (at most {MAX_DEPTH} levels).")
        if isinstance(value, dict):
            for key in value:
                if UNSTORABLE.search(key):
                    raise PayloadError(
                        f"{path}.{key}" if path else key,
                        "the name contains a NUL character or an unpaired surrogate.",
                    )
            for key, item in reversed(value.items()):
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        else:
            for index, item in reversed(list(enumerate(value))):
                stack.append((item, f"{path}[{index}]", depth + 1))


def _object(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise PayloadError(path, f"must be an object, not {_type(value)}.")
    return value


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _string(obj: dict, key: str, path: str, *, required: bool = False, limit: int = MAX_KEY) -> str:
    value = obj.get(key)
    where = f"{path}.{key}" if path else key
    if value is None:
        if required:
            raise PayloadError(where, "is required.")
        return ""
    if not isinstance(value, str):
        raise PayloadError(where, f"must be a string, not {_type(value)}.")
    if required and not value.strip():
        raise PayloadError(where, "may not be empty.")
    if len(value) > limit:
        raise PayloadError(where, f"is {len(value)} characters long; at most {limit}.")
    return value


def _string_map(obj: dict, key: str, path: str) -> dict[str, str]:
    where = f"{path}.{key}" if path else key
    value = obj.get(key)
    if value is None:
        return {}
    value = _object(value, where)
    if len(value) > MAX_LABELS:
        raise PayloadError(where, f"has {len(value)} entries; at most {MAX_LABELS}.")
    for name, item in value.items():
        if not isinstance(item, str):
            raise PayloadError(f"{where}.{name}", f"must be a string, not {_type(item)}.")
        if len(name) > MAX_KEY or len(item) > MAX_TEXT:
            raise PayloadError(f"{where}.{name}", "is too long.")
    return value


def _time(obj: dict, key: str, path: str, *, zero_is_none: bool = False) -> datetime | None:
    value = _string(obj, key, path)
    if not value:
        return None
    if zero_is_none and value.startswith(ZERO_TIME_PREFIX):
        return None
    where = f"{path}.{key}" if path else key
    try:
        parsed = parse_datetime(value)
    except ValueError:
        parsed = None
    if parsed is None:
        raise PayloadError(where, f"{value[:40]!r} is not an RFC 3339 date and time.")
    if parsed.tzinfo is None:
        raise PayloadError(where, f"{value[:40]!r} has no time zone offset.")
    if parsed.year < 1970:
        return None
    try:
        return parsed.astimezone(UTC)
    except OverflowError as error:
        raise PayloadError(where, f"{value[:40]!r} is out of range.") from error


def labels_fingerprint(*parts: Any) -> str:
    """A stable fingerprint for sources that send none: SHA-256 of the canonical JSON."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def parse_alertmanager(data: Any) -> Delivery:
    """Alertmanager's webhook, version 4 (every field it sends is accepted)."""
    data = _object(data, "")
    version = data.get("version")
    if version != "4":
        raise PayloadError("version", f'must be "4" (Alertmanager webhook v4), not {version!r}.')
    group_key = _string(data, "groupKey", "", limit=MAX_TEXT)
    truncated = data.get("truncatedAlerts", 0)
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise PayloadError("truncatedAlerts", "must be a whole number, zero or more.")
    for key in ("groupLabels", "commonLabels", "commonAnnotations"):
        _string_map(data, key, "")
    _string(data, "status", "")
    _string(data, "receiver", "", limit=MAX_TEXT)
    _string(data, "externalURL", "", limit=MAX_TEXT)
    items = data.get("alerts")
    if not isinstance(items, list):
        raise PayloadError("alerts", f"must be a list, not {_type(items)}.")
    if len(items) > MAX_ALERTS:
        raise PayloadError("alerts", f"has {len(items)} alerts; at most {MAX_ALERTS}.")
    alerts = []
    for index, item in enumerate(items):
        path = f"alerts[{index}]"
        item = _object(item, path)
        status = _string(item, "status", path, required=True)
        if status not in ("firing", "resolved"):
            raise PayloadError(f"{path}.status", f'must be "firing" or "resolved", not {status!r}.')
        labels = _string_map(item, "labels", path)
        annotations = _string_map(item, "annotations", path)
        starts_at = _time(item, "startsAt", path, zero_is_none=True)
        ends_at = _time(item, "endsAt", path, zero_is_none=True)
        generator_url = _string(item, "generatorURL", path, limit=MAX_TEXT)
        fingerprint = _string(item, "fingerprint", path) or labels_fingerprint(labels)
        alerts.append(
            AlertIn(
                fingerprint=fingerprint,
                status=status,
                name=labels.get("alertname", "").strip()[:MAX_KEY] or "Alert",
                group_hint=group_key or labels_fingerprint(labels),
                summary=annotations.get("summary") or annotations.get("description", ""),
                source=generator_url[:MAX_KEY],
                labels=labels,
                annotations=annotations,
                payload=item,
                starts_at=starts_at,
                ends_at=ends_at,
            )
        )
    return Delivery(alerts=alerts, truncated=truncated)


# Fingerprints the tracker makes for itself (heartbeats) start with this; senders may not.
RESERVED_PREFIX = "tracker:"


def _reserved_check(value: str, path: str) -> str:
    if value.startswith(RESERVED_PREFIX):
        raise PayloadError(path, f'may not start with "{RESERVED_PREFIX}" (reserved).')
    return value


def parse_events_v2(data: Any) -> tuple[str, Delivery]:
    """A PagerDuty Events API v2 event. Returns the routing key and the delivery; a trigger
    without a dedup key gets a new one (returned to the sender in the 202)."""
    data = _object(data, "")
    # Checked, not required: the webhook also takes the key from `Authorization: Bearer`, and
    # refuses a request that has it in neither place.
    routing_key = _string(data, "routing_key", "")
    action = _string(data, "event_action", "", required=True)
    if action not in EVENTS_V2_ACTIONS:
        raise PayloadError("event_action", f"must be one of {', '.join(EVENTS_V2_ACTIONS)}.")
    dedup_key = _reserved_check(_string(data, "dedup_key", ""), "dedup_key")
    # The stored copy of the event leaves the routing key out: it is the integration's
    # secret token, and stored alerts are readable by every user.
    stored = {key: value for key, value in data.items() if key != "routing_key"}
    for key in ("client", "client_url"):
        _string(data, key, "", limit=MAX_TEXT)
    for key in ("images", "links"):
        if key in data and not isinstance(data[key], list):
            raise PayloadError(key, f"must be a list, not {_type(data[key])}.")
    if action != "trigger":
        if not dedup_key:
            raise PayloadError("dedup_key", f"is required to {action}.")
        alert = AlertIn(
            fingerprint=dedup_key,
            status="resolved" if action == "resolve" else "firing",
            name="",
            group_hint=dedup_key,
            payload=stored,
            action=action,
        )
        return routing_key, Delivery(alerts=[alert])
    payload = _object(data.get("payload"), "payload") if "payload" in data else None
    if payload is None:
        raise PayloadError("payload", "is required to trigger.")
    summary = _string(payload, "summary", "payload", required=True, limit=1024)
    source = _string(payload, "source", "payload", required=True)
    severity = _string(payload, "severity", "payload", required=True)
    if severity not in EVENTS_V2_SEVERITIES:
        raise PayloadError("payload.severity", f"must be one of {', '.join(EVENTS_V2_SEVERITIES)}.")
    timestamp = _time(payload, "timestamp", "payload")
    labels = {"severity": severity, "source": source}
    for key in ("component", "group", "class"):
        value = _string(payload, key, "payload")
        if value:
            labels[key] = value
    details = payload.get("custom_details")
    if details is not None and not isinstance(details, dict | str):
        raise PayloadError("payload.custom_details", "must be an object or a string.")
    dedup_key = dedup_key or uuid.uuid4().hex
    alert = AlertIn(
        fingerprint=dedup_key,
        status="firing",
        name=summary[:MAX_KEY],
        group_hint=dedup_key,
        summary=summary,
        source=source,
        severity_label=severity,
        labels=labels,
        annotations={"summary": summary},
        payload=stored,
        starts_at=timestamp,
        action="trigger",
    )
    return routing_key, Delivery(alerts=[alert])


def parse_generic(data: Any) -> Delivery:
    """The tracker's own format (docs/alerts.md): one alert object, or `{"alerts": [...]}`.

    Fields: `title` (required to fire), `status` (firing or resolved, default firing), `id`
    (the dedup key; default: a hash of title, source and labels), `group`, `severity`,
    `description`, `source`, `labels`, `starts_at`, `ends_at`.
    """
    data = _object(data, "")
    if "alerts" in data:
        items = data["alerts"]
        if not isinstance(items, list) or not items:
            raise PayloadError("alerts", "must be a non-empty list.")
        if len(items) > MAX_ALERTS:
            raise PayloadError("alerts", f"has {len(items)} alerts; at most {MAX_ALERTS}.")
        prefix = "alerts"
    else:
        items, prefix = [data], ""
    alerts = []
    for index, item in enumerate(items):
        path = f"{prefix}[{index}]" if prefix else ""
        item = _object(item, path or "body")
        status = _string(item, "status", path) or "firing"
        if status not in ("firing", "resolved"):
            raise PayloadError(_join(path, "status"), 'must be "firing" or "resolved".')
        alert_id = _reserved_check(_string(item, "id", path), _join(path, "id"))
        title = _string(item, "title", path, required=status == "firing" and not alert_id)
        labels = _string_map(item, "labels", path)
        source = _string(item, "source", path)
        severity = _string(item, "severity", path, limit=100)
        fingerprint = alert_id or labels_fingerprint(title, source, labels)
        alerts.append(
            AlertIn(
                fingerprint=fingerprint,
                status=status,
                name=title[:MAX_KEY],
                group_hint=_string(item, "group", path) or fingerprint,
                summary=_string(item, "description", path, limit=MAX_TEXT) or title,
                source=source,
                severity_label=severity,
                labels=labels,
                annotations={},
                payload=item,
                starts_at=_time(item, "starts_at", path),
                ends_at=_time(item, "ends_at", path),
            )
        )
    return Delivery(alerts=alerts)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
