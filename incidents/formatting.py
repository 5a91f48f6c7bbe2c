"""Small display helpers shared by the admin, templates and commands. All output is escaped."""

from __future__ import annotations

from datetime import timedelta

from django.utils.html import format_html
from django.utils.safestring import SafeString

from .deadlines import TargetState


def humanize_duration(delta: timedelta) -> str:
    """'45s', '12m', '3h 05m', '2d 4h': short, and exact enough for on-call decisions."""
    seconds = int(abs(delta.total_seconds()))
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


STATE_TEXT = {
    "pending": "{name}: {delta} left",
    "breached": "{name}: breached by {delta}",
    "met": "{name}: met",
    "missed": "{name}: missed by {delta}",
}


def target_badge(state: TargetState) -> SafeString:
    text = STATE_TEXT[state.state].format(name=state.name, delta=humanize_duration(state.delta))
    return format_html(
        '<span class="sla sla-{}" title="target {}">{}</span>',
        state.state,
        humanize_duration(state.target),
        text,
    )


def status_badge(status: str, label: str) -> SafeString:
    return format_html('<span class="badge status-{}">{}</span>', status, label)


def severity_badge(level: int, name: str) -> SafeString:
    return format_html('<span class="badge sev sev-{}">{}</span>', min(level, 5), name)
