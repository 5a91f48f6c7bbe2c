"""Delivery channels: email, SMS gateway webhook, Slack-style webhook, generic webhook."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import EmailValidator, URLValidator

from .models import ContactKind


def validate_contact_address(kind: str, address: str) -> None:
    """Refuse an address its channel cannot use; raises ValidationError on `address`."""
    if kind == ContactKind.EMAIL:
        try:
            EmailValidator()(address)
        except ValidationError as error:
            raise ValidationError({"address": f"{address!r} is not an email address."}) from error
        return
    try:
        URLValidator(schemes=["http", "https"])(address)
    except ValidationError as error:
        raise ValidationError({"address": f"{address!r} is not an http(s) URL."}) from error
