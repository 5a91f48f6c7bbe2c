"""The acknowledgement link in a page: no login, signed, expiring, single use.

GET shows what will be acknowledged and a button; only the POST acknowledges, so mail
scanners that fetch links cannot acknowledge an incident by themselves.
"""

from __future__ import annotations

from django.core import signing
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods

from incidents.exceptions import DomainError

from .models import Page
from .services import page_acknowledge, page_from_token


@require_http_methods(["GET", "POST"])
def page_ack(request: HttpRequest, token: str) -> HttpResponse:
    try:
        page = page_from_token(token)
    except signing.SignatureExpired:
        return render(
            request, "escalation/ack.html", {"error": "This link has expired."}, status=410
        )
    except (signing.BadSignature, Page.DoesNotExist):
        return render(
            request, "escalation/ack.html", {"error": "This link is not valid."}, status=404
        )
    context = {"page": page, "incident": page.incident}
    if request.method == "POST":
        try:
            context["incident"] = page_acknowledge(page=page)
            context["done"] = True
        except DomainError as error:
            context["error"] = str(error)
            return render(request, "escalation/ack.html", context, status=409)
    elif page.acked_at is not None:
        context["error"] = "This acknowledgement link was already used."
    return render(request, "escalation/ack.html", context)
