"""Business-hours arithmetic: working days, hours and holidays in a time zone."""

from __future__ import annotations

from datetime import date

from django.core.exceptions import ValidationError


def validate_calendar(calendar) -> None:
    errors = {}
    try:
        days = [int(d) for d in calendar.working_days.split(",") if d.strip()]
    except ValueError:
        days = []
    if not days or any(d < 1 or d > 7 for d in days):
        errors["working_days"] = "List ISO weekdays 1 (Monday) to 7 (Sunday), e.g. 1,2,3,4,5."
    if calendar.day_start and calendar.day_end and calendar.day_start >= calendar.day_end:
        errors["day_end"] = "The working day must end after it starts."
    if not isinstance(calendar.holidays, list):
        errors["holidays"] = "A list of ISO dates."
    else:
        for value in calendar.holidays:
            try:
                date.fromisoformat(str(value))
            except ValueError:
                errors["holidays"] = f"{value!r} is not an ISO date (YYYY-MM-DD)."
                break
    if errors:
        raise ValidationError(errors)
