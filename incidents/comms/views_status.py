"""The public status page and its Atom feed: no login, the same bytes for everyone.

Each response is built once per cache version (`status.status_cache_version`: the latest
public update, the maintenance generation and the max-age time bucket) and kept in the
Django cache, with its ETag (a hash of the body) and Last-Modified (when it was built), so
a conditional request is answered 304 from the cache, and a crowd refreshing the page
during an outage costs one indexed query per request. An unreachable cache makes the page
slower, never unavailable.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_cache_control
from django.utils.feedgenerator import Atom1Feed
from django.views.decorators.http import condition, require_safe

from .status import feed_entries, status_cache_version, status_page

logger = logging.getLogger(__name__)

PAGE_TEMPLATE = "comms/status/page.html"
# No scripts, no outside assets: the page's only subresource is its own stylesheet.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Snapshot:
    body: bytes
    etag: str
    last_modified: datetime


def _cache_get(key: str) -> dict | None:
    try:
        return cache.get(key)
    except Exception:  # noqa: BLE001 - serve an uncached page rather than none
        logger.warning("status page: cache read failed", exc_info=True)
        return None


def _cache_set(key: str, value: dict) -> None:
    try:
        cache.set(key, value, timeout=settings.STATUS_PAGE_MAX_AGE)
    except Exception:  # noqa: BLE001
        logger.warning("status page: cache write failed", exc_info=True)


def _snapshot(request: HttpRequest, kind: str, build: Callable[[datetime], bytes]) -> Snapshot:
    """The response body of `kind` for this request: from the cache, else built now. Kept
    on the request, because the conditional decorator asks for the ETag and Last-Modified
    before the view runs."""
    held = getattr(request, "_status_snapshot", None)
    if held is not None:
        return held
    now = timezone.now()
    key = f"status:{kind}:{status_cache_version(now=now)}"
    stored = _cache_get(key)
    if stored is None:
        body = build(now)
        stored = {
            "body": body,
            "etag": hashlib.sha256(body).hexdigest()[:32],
            "last_modified": int(now.timestamp()),
        }
        _cache_set(key, stored)
    snapshot = Snapshot(
        body=stored["body"],
        etag=stored["etag"],
        last_modified=datetime.fromtimestamp(stored["last_modified"], tz=UTC),
    )
    request._status_snapshot = snapshot
    return snapshot


def _public(view):
    """Cache-Control: public, max-age on every answer, the 304s included."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        patch_cache_control(response, public=True, max_age=settings.STATUS_PAGE_MAX_AGE)
        return response

    return wrapper


def _conditional(kind: str, build: Callable[[datetime], bytes]):
    return condition(
        etag_func=lambda request: _snapshot(request, kind, build).etag,
        last_modified_func=lambda request: _snapshot(request, kind, build).last_modified,
    )


# --- the page --------------------------------------------------------------------------------


def build_page(now: datetime) -> bytes:
    """The page's HTML. Rendered without the request (no context processors, no session,
    no CSRF cookie), so it is the same for everyone and safe to share from a cache."""
    return render_to_string(
        PAGE_TEMPLATE, {"page": status_page(now=now), "max_age": settings.STATUS_PAGE_MAX_AGE}
    ).encode()


@require_safe
@_public
@_conditional("page", build_page)
def status_page_view(request: HttpRequest) -> HttpResponse:
    """GET /status/: each public service's state and 90-day uptime, open incidents,
    maintenance and history. No login."""
    response = HttpResponse(
        _snapshot(request, "page", build_page).body, content_type="text/html; charset=utf-8"
    )
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


# --- the feed --------------------------------------------------------------------------------


def build_feed(now: datetime) -> bytes:
    """The Atom 1.0 document: an entry per public update and per maintenance window, with
    tag: ids that never change and absolute links from settings.SITE_URL."""
    page_url = settings.SITE_URL + reverse("status-page")
    feed = Atom1Feed(
        title=settings.SITE_NAME,
        link=page_url,
        description=f"Incidents and maintenance of {settings.SITE_NAME}",
        feed_url=settings.SITE_URL + reverse("status-feed"),
        feed_guid=page_url,
        author_name=settings.SITE_NAME,
        language="en",
    )
    for entry in feed_entries(now=now, page_url=page_url):
        feed.add_item(
            title=entry.title,
            link=entry.link,
            description=entry.summary_html,
            unique_id=entry.unique_id,
            pubdate=entry.published,
            updateddate=entry.updated,
        )
    return feed.writeString("utf-8").encode()


@require_safe
@_public
@_conditional("feed", build_feed)
def status_feed_view(request: HttpRequest) -> HttpResponse:
    """GET /status/feed.atom."""
    return HttpResponse(
        _snapshot(request, "feed", build_feed).body,
        content_type="application/atom+xml; charset=utf-8",
    )
