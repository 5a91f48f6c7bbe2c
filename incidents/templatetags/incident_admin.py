import calendar
import datetime

from django import template
from django.contrib.admin.templatetags.base import InclusionAdminNode
from django.db.models import Max, Min
from django.utils import formats, timezone
from django.utils.text import capfirst
from django.utils.translation import gettext as _

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


def _month_span(first: datetime.date, last: datetime.date, year: int) -> list[int]:
    start = first.month if first.year == year else 1
    end = last.month if last.year == year else 12
    return list(range(start, end + 1))


def incident_date_hierarchy(cl):
    """Django's date drill-down, without its DISTINCT scan of the whole table.

    Django lists the years, months or days that have rows with a `SELECT DISTINCT
    date_trunc(...)`, which reads every row. This reads only Min and Max (the two ends of
    the created_at index) and offers every period in that range: an empty period shows an
    empty list, and the cost no longer grows with the table. Always exactly one query.
    """
    field_name = cl.date_hierarchy
    year_field, month_field, day_field = (f"{field_name}__{p}" for p in ("year", "month", "day"))
    year_lookup = cl.params.get(year_field)
    month_lookup = cl.params.get(month_field)
    day_lookup = cl.params.get(day_field)

    def link(filters):
        return cl.get_query_string(filters, [f"{field_name}__"])

    bounds = cl.queryset.aggregate(first=Min(field_name), last=Max(field_name))
    if not (bounds["first"] and bounds["last"]):
        return {"show": False}
    first, last = (timezone.localtime(bounds[k]).date() for k in ("first", "last"))
    if not (year_lookup or month_lookup or day_lookup) and first.year == last.year:
        year_lookup = first.year
        if first.month == last.month:
            month_lookup = first.month
    try:
        year = int(year_lookup) if year_lookup else None
        month = int(month_lookup) if month_lookup else None
        day = int(day_lookup) if day_lookup else None
        if year and month and day:
            chosen = datetime.date(year, month, day)
            return {
                "show": True,
                "back": {
                    "link": link({year_field: year, month_field: month}),
                    "title": capfirst(formats.date_format(chosen, "YEAR_MONTH_FORMAT")),
                },
                "choices": [{"title": capfirst(formats.date_format(chosen, "MONTH_DAY_FORMAT"))}],
            }
        if year and month:
            days_in_month = calendar.monthrange(year, month)[1]
            start = first.day if (first.year, first.month) == (year, month) else 1
            end = last.day if (last.year, last.month) == (year, month) else days_in_month
            return {
                "show": True,
                "back": {"link": link({year_field: year}), "title": str(year)},
                "choices": [
                    {
                        "link": link({year_field: year, month_field: month, day_field: d}),
                        "title": capfirst(
                            formats.date_format(datetime.date(year, month, d), "MONTH_DAY_FORMAT")
                        ),
                    }
                    for d in range(start, end + 1)
                ],
            }
        if year:
            return {
                "show": True,
                "back": {"link": link({}), "title": _("All dates")},
                "choices": [
                    {
                        "link": link({year_field: year, month_field: m}),
                        "title": capfirst(
                            formats.date_format(datetime.date(year, m, 1), "YEAR_MONTH_FORMAT")
                        ),
                    }
                    for m in _month_span(first, last, year)
                ],
            }
    except ValueError:  # a hand-edited URL with an impossible date
        return {"show": False}
    return {
        "show": True,
        "back": None,
        "choices": [
            {"link": link({year_field: y}), "title": str(y)}
            for y in range(first.year, last.year + 1)
        ],
    }


@register.tag(name="incident_date_hierarchy")
def incident_date_hierarchy_tag(parser, token):
    return InclusionAdminNode(
        parser,
        token,
        func=incident_date_hierarchy,
        template_name="date_hierarchy.html",
        takes_context=False,
    )
