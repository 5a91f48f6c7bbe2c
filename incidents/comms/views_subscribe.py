"""Public pages for customer notices: subscribe, confirm, unsubscribe. No login.

The subscribe form answers the same whatever the address's state (new, pending, already
subscribed), so it tells nobody who subscribes; what an already subscribed address asks to
add is applied only through a link mailed to it. Subscribe POSTs are throttled per client
address (REMOTE_ADDR, which a deployment behind a proxy must set from the proxy's header):
over the limit the answer is 429 and nothing is stored or sent.

Confirming and unsubscribing take a POST: a GET only shows a button, so a mail scanner
that fetches links changes nothing. The unsubscribe POST is exempt from CSRF: mail
providers send it as RFC 8058 one-click (`List-Unsubscribe=One-Click`) without a token,
and the unguessable token in the URL is what authorises it.
"""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from incidents.exceptions import InvalidInput
from incidents.models import Service

from . import notices

TEMPLATES = "comms/subscribe/"


class SubscribeForm(forms.Form):
    email = forms.CharField(
        max_length=254,
        widget=forms.EmailInput(attrs={"autocomplete": "email"}),
        # Checked by the service (one rule for every caller); CR and LF are refused there.
        strip=False,
    )
    services = forms.ModelMultipleChoiceField(
        queryset=Service.objects.filter(is_public=True).order_by("name"),
        required=False,
        widget=forms.CheckboxSelectMultiple,
    )
    all_services = forms.BooleanField(required=False, label="All services, now and later")


def _page(request: HttpRequest, name: str, context: dict, status: int = 200) -> HttpResponse:
    context = {"site_name": settings.SITE_NAME, **context}
    response = render(request, TEMPLATES + name, context, status=status)
    response["X-Robots-Tag"] = "noindex"
    return response


@never_cache
@require_http_methods(["GET", "POST"])
def subscribe(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _page(request, "subscribe.html", {"form": SubscribeForm()})
    if not notices.subscribe_throttle_allows(client_ip=request.META.get("REMOTE_ADDR", "")):
        # Before the form is read: nothing is stored or sent.
        response = _page(request, "throttled.html", {}, status=429)
        response["Retry-After"] = "3600"
        return response
    form = SubscribeForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            notices.subscriber_subscribe(
                email=data["email"],
                service_ids=[service.pk for service in data["services"]],
                all_services=data["all_services"],
            )
        except InvalidInput as error:
            field = error.field if error.field in form.fields else None
            reason = str(error).removeprefix(f"{error.field}: ")
            form.add_error(field, f"{error.field.replace('_', ' ').capitalize()} {reason}")
        else:
            # The same answer for a new, a pending and an existing subscriber.
            return _page(request, "requested.html", {"email": notices.clean_email(data["email"])})
    return _page(request, "subscribe.html", {"form": form}, status=400)


@never_cache
@require_http_methods(["GET", "POST"])
def confirm(request: HttpRequest, token: str) -> HttpResponse:
    try:
        asked = notices.confirmation_for(token)
        if request.method == "POST":
            subscriber = notices.subscriber_confirm(token=token)
            context = {
                "subscriber": subscriber,
                "services": notices.subscriber_service_names(subscriber),
                "change": asked.change,
            }
            return _page(request, "confirmed.html", context)
    except InvalidInput as error:
        message = str(error).removeprefix("token: ")
        return _page(request, "invalid.html", {"error": message}, status=404)
    context = {"subscriber": asked.subscriber, "services": asked.services, "change": asked.change}
    if asked.subscriber.is_active and not asked.change:
        return _page(request, "confirmed.html", context)
    return _page(request, "confirm.html", context)


@csrf_exempt
@never_cache
@require_http_methods(["GET", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    try:
        if request.method == "POST":
            subscriber = notices.subscriber_unsubscribe(token=token)
            return _page(request, "unsubscribed.html", {"subscriber": subscriber})
        subscriber = notices.subscriber_for_unsubscribe(token)
    except InvalidInput as error:
        message = str(error).removeprefix("token: ")
        return _page(request, "invalid.html", {"error": message}, status=404)
    if subscriber.unsubscribed_at is not None:
        return _page(request, "unsubscribed.html", {"subscriber": subscriber})
    return _page(request, "unsubscribe.html", {"subscriber": subscriber})
