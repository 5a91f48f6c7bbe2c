from django import template

from incidents.formatting import humanize_duration, severity_badge, status_badge, target_badge

register = template.Library()


@register.simple_tag
def sla_badge(state):
    return target_badge(state)


@register.simple_tag
def incident_status_badge(incident):
    return status_badge(incident.status, incident.get_status_display())


@register.simple_tag
def incident_severity_badge(severity):
    return severity_badge(severity.level, severity.name)


@register.filter
def duration(delta):
    return humanize_duration(delta) if delta is not None else ""
