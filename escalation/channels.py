"""Delivery channels: email, SMS gateway webhook, Slack-style webhook, generic webhook.

`compose_page` turns a page into a `PageMessage`; `send` delivers it over one contact method
and raises `DeliveryError` (permanent or temporary) when it could not. Incident text is
untrusted everywhere: escaped in HTML and Slack markup, flattened to one line in headers,
plain data in JSON.

Webhook targets are checked twice: when a contact method is saved (`validate_contact_address`,
no DNS) and just before each send (`validate_webhook_url(resolve=True)`, every address the
name resolves to). The connection itself checks the address it actually reached, so a name
that resolves differently a moment later (DNS rebinding) still cannot reach a private
network. `settings.WEBHOOK_ALLOW_PRIVATE` lifts the address checks (development and tests).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import smtplib
import socket
from dataclasses import dataclass
from email.utils import make_msgid, parseaddr
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
import urllib3
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import EmailMultiAlternatives
from django.core.validators import EmailValidator, URLValidator
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .models import ContactKind

if TYPE_CHECKING:
    from .models import ContactMethod, Page

logger = logging.getLogger(__name__)

WEBHOOK_KINDS = frozenset(
    kind.value for kind in (ContactKind.SMS_WEBHOOK, ContactKind.SLACK_WEBHOOK, ContactKind.WEBHOOK)
)
USER_AGENT = "incident-tracker/0.1 (escalation pager)"
# How much of a failed webhook's answer is kept in the error (it is shown in the admin).
ERROR_BODY_BYTES = 300
SUBJECT_LIMIT = 200
SMS_TITLE_LIMIT = 60
SLACK_SUMMARY_LIMIT = 1000
# 4xx answers that mean "later", not "never".
RETRYABLE_4XX = frozenset({408, 425, 429})


# --- errors ---------------------------------------------------------------------------------


class DeliveryError(Exception):
    """A page could not be delivered over one contact method.

    `permanent`: retrying the same method will not help (a refused address, a 4xx, a
    redirect); the engine moves to the backup method. Otherwise it retries with backoff."""

    def __init__(self, reason: str, permanent: bool, unknown: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        # The message may have been delivered (the receiver stopped answering after it was
        # sent): the engine never retries the same method, it moves to the backup.
        self.unknown = unknown

    def __repr__(self) -> str:
        return f"DeliveryError({self.reason!r}, permanent={self.permanent})"


# --- address safety -------------------------------------------------------------------------

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_problem(ip: IPAddress) -> str | None:
    """Why a webhook must not reach `ip` ("a loopback address", ...), or None if it is public.

    IPv6 forms that carry an IPv4 address (mapped, 6to4, NAT64) are judged by that address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            problem = address_problem(embedded)
            if problem:
                return problem
    checks = (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private address"),
        (not ip.is_global, "not a public internet address"),
    )
    return next((label for failed, label in checks if failed), None)


def _literal_ip(host: str) -> IPAddress | None:
    """The address a host names without DNS: an IP literal, or a legacy IPv4 form such as
    127.1 or 2130706433 that resolvers would turn into one."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _refuse(message: str, code: str) -> ValidationError:
    return ValidationError({"address": ValidationError(message, code=code)})


def validate_webhook_url(url: str, *, resolve: bool) -> None:
    """Refuse a webhook URL that is not http(s) or whose host is not a public address.

    IP literals (and `localhost`) are judged without DNS. With `resolve=True` the host name
    is resolved and every address it has must be allowed; a name that does not resolve is
    refused too (code "unresolvable"). With settings.WEBHOOK_ALLOW_PRIVATE only the scheme,
    the form and (with `resolve`) resolvability are checked.
    Raises ValidationError({"address": reason}); the inner error's code is one of
    "invalid", "scheme", "disallowed" or "unresolvable"."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise _refuse(f"{url!r} is not a valid URL: {error}.", "invalid") from error
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"}:
        raise _refuse(f"{url!r} is not an http(s) URL: webhooks use http or https only.", "scheme")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _refuse(f"{url!r} has no host.", "invalid")
    allow_private = settings.WEBHOOK_ALLOW_PRIVATE
    suffix = " (set WEBHOOK_ALLOW_PRIVATE to allow it)"

    literal = _literal_ip(host)
    if literal is not None:
        problem = None if allow_private else address_problem(literal)
        if problem:
            raise _refuse(f"The webhook host {host} is {problem}{suffix}.", "disallowed")
        return
    if not allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise _refuse(f"The webhook host {host} is a loopback address{suffix}.", "disallowed")
    if not resolve:
        return
    try:
        infos = socket.getaddrinfo(
            host, port or (443 if scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError) as error:
        raise _refuse(
            f"The webhook host {host} could not be resolved ({error}).", "unresolvable"
        ) from error
    if not infos:
        raise _refuse(f"The webhook host {host} could not be resolved.", "unresolvable")
    if allow_private:
        return
    for *_, sockaddr in infos:
        address = str(sockaddr[0]).split("%", 1)[0]
        problem = address_problem(ipaddress.ip_address(address))
        if problem:
            raise _refuse(
                f"The webhook host {host} resolves to {address}, {problem}{suffix}.",
                "disallowed",
            )


def validate_contact_address(kind: str, address: str) -> None:
    """Refuse an address its channel cannot use; raises ValidationError on `address`.

    Webhook URLs are checked without DNS here (a name may not resolve yet when it is saved,
    and form validation should not wait on resolvers); every send resolves and checks
    again."""
    if kind == ContactKind.EMAIL:
        try:
            EmailValidator()(address)
        except ValidationError as error:
            raise ValidationError({"address": f"{address!r} is not an email address."}) from error
        return
    if kind not in WEBHOOK_KINDS:
        raise ValidationError({"kind": f"{kind!r} is not a kind of contact method."})
    try:
        URLValidator(schemes=["http", "https"])(address)
    except ValidationError as error:
        raise ValidationError({"address": f"{address!r} is not an http(s) URL."}) from error
    validate_webhook_url(address, resolve=False)


# --- message composition --------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def one_line(value: object, limit: int | None = None) -> str:
    """`value` as one line: CR, LF and every other control or line-separator character
    become spaces, runs of whitespace collapse. Safe in a mail header."""
    text = " ".join(_LINE_BREAKS.sub(" ", str(value)).split())
    return _truncate(text, limit) if limit else text


def _plain(value: object) -> str:
    """Multi-line text with control characters (other than newline and tab) removed."""
    return _CONTROL.sub("", str(value).replace("\r\n", "\n").replace("\r", "\n")).strip()


@dataclass(frozen=True)
class PageMessage:
    """What one page says, in every form a channel needs. `step` and `round` count from 1.

    The incident fields hold the stored (untrusted) text as is; `subject` is one line,
    `html` is escaped, `text` is plain."""

    subject: str
    text: str
    html: str
    ack_url: str
    reference: str
    title: str
    severity: str
    status: str
    summary: str
    step: int
    round: int
    recipient: str = ""
    severity_level: int | None = None
    page_id: int | None = None
    message_id: str = ""


def _mail_domain() -> str:
    domain = parseaddr(settings.DEFAULT_FROM_EMAIL)[1].rpartition("@")[2]
    if not domain:
        domain = urlsplit(settings.SITE_URL).hostname or "localhost"
    return re.sub(r"[^A-Za-z0-9.-]", "", domain) or "localhost"


def compose_page(page: Page, ack_url: str) -> PageMessage:
    """The message for `page` (with its incident and person; select_related them), carrying
    the acknowledgement link. Pure: reads the rows, writes nothing."""
    incident = page.incident
    severity = incident.severity
    reference = incident.reference
    step, round_ = page.step_index + 1, page.round + 1
    status_label = incident.get_status_display()
    title, summary = incident.title, incident.summary
    flat_title = one_line(title)

    subject = one_line(f"[{severity.name}] {reference}: {flat_title}", SUBJECT_LIMIT)
    summary_text = _plain(summary)
    text_lines = [
        f"You are paged for {reference} ({severity.name}): {flat_title}",
        "",
        f"Status: {status_label}",
        f"Escalation: step {step}, round {round_}",
    ]
    if summary_text:
        text_lines += ["", "Summary:", summary_text]
    text_lines += [
        "",
        "Acknowledge (no login needed):",
        ack_url,
        "",
    ]
    summary_html = format_html_join(
        mark_safe("<br>\n"), "{}", ((line,) for line in summary_text.splitlines())
    )
    html = format_html(
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{subject}</title></head>\n'
        "<body>\n<p>You are paged for <strong>{reference}</strong> ({severity}): "
        "<strong>{title}</strong></p>\n"
        "<p>Status: {status}<br>\nEscalation: step {step}, round {round}</p>\n"
        "{summary}"
        '<p><a href="{ack_url}">Acknowledge {reference}</a> '
        "(no login needed)</p>\n</body></html>\n",
        subject=subject,
        reference=reference,
        severity=severity.name,
        title=flat_title,
        status=status_label,
        step=step,
        round=round_,
        summary=format_html("<p>{}</p>\n", summary_html) if summary_text else "",
        ack_url=ack_url,
    )
    message_id = (
        f"<page-{page.pk}.{re.sub(r'[^A-Za-z0-9-]', '', reference)}@{_mail_domain()}>"
        if page.pk
        else make_msgid(domain=_mail_domain())
    )
    return PageMessage(
        subject=subject,
        text="\n".join(text_lines),
        html=str(html),
        ack_url=ack_url,
        reference=reference,
        title=title,
        severity=severity.name,
        status=incident.status,
        summary=summary,
        step=step,
        round=round_,
        recipient=page.person.name,
        severity_level=severity.level,
        page_id=page.pk,
        message_id=one_line(message_id),
    )


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>) and & as an entity.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_payload(kind: str, message: PageMessage) -> dict[str, Any]:
    """The JSON body a webhook channel POSTs for `message`."""
    if kind == ContactKind.SMS_WEBHOOK:
        head = one_line(f"[{message.severity}] {message.reference}: {message.title}")
        text = f"{_truncate(head, SMS_TITLE_LIMIT + 20)} Ack: {message.ack_url}"
        return {"to": message.recipient, "message": text}
    if kind == ContactKind.SLACK_WEBHOOK:
        lines = [
            _slack_escape(one_line(f"[{message.severity}] {message.reference}: {message.title}")),
            _slack_escape(f"Status: {message.status}, step {message.step}, round {message.round}"),
        ]
        summary = _plain(message.summary)
        if summary:
            lines.append(_slack_escape(_truncate(summary, SLACK_SUMMARY_LIMIT)))
        lines.append(f"Acknowledge: {message.ack_url}")
        return {"text": "\n".join(lines)}
    if kind == ContactKind.WEBHOOK:
        return {
            "event": "page",
            "page_id": message.page_id,
            "recipient": message.recipient,
            "incident": {
                "reference": message.reference,
                "title": message.title,
                "severity": message.severity,
                "severity_level": message.severity_level,
                "status": message.status,
                "summary": message.summary,
            },
            "step": message.step,
            "round": message.round,
            "ack_url": message.ack_url,
        }
    raise ValueError(f"{kind!r} is not a webhook kind")


# --- senders --------------------------------------------------------------------------------


def send(contact_method: ContactMethod, message: PageMessage) -> None:
    """Deliver `message` over `contact_method`; returns when the receiver accepted it.

    Raises DeliveryError (permanent or not) on failure. Webhook URLs are validated with DNS
    just before sending; redirects are never followed."""
    kind, address = contact_method.kind, contact_method.address
    if kind == ContactKind.EMAIL:
        _send_email(address, message)
    elif kind in WEBHOOK_KINDS:
        _post(address, webhook_payload(kind, message), message)
    else:
        raise DeliveryError(f"unknown contact method kind {kind!r}", permanent=True)


def _smtp_permanent(code: int) -> bool:
    return 500 <= code < 600


def _send_email(address: str, message: PageMessage) -> None:
    headers = {
        "Message-ID": message.message_id or make_msgid(domain=_mail_domain()),
        # RFC 3834: an automatic message; out-of-office replies should not answer it.
        "Auto-Submitted": "auto-generated",
        "X-Auto-Response-Suppress": "All",
        "X-Incident-Reference": one_line(message.reference, 50),
    }
    email = EmailMultiAlternatives(
        subject=one_line(message.subject, SUBJECT_LIMIT),
        body=message.text,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[address],
        headers=headers,
    )
    email.attach_alternative(message.html, "text/html")
    try:
        sent = email.send(fail_silently=False)
    except smtplib.SMTPRecipientsRefused as error:
        codes = [code for code, _ in error.recipients.values()]
        detail = "; ".join(f"{code} {_decode(text)}" for code, text in error.recipients.values())
        raise DeliveryError(
            f"the mail server refused {address}: {detail}",
            permanent=all(_smtp_permanent(code) for code in codes),
        ) from error
    except smtplib.SMTPResponseException as error:
        raise DeliveryError(
            f"the mail server answered {error.smtp_code} {_decode(error.smtp_error)}",
            permanent=_smtp_permanent(error.smtp_code),
        ) from error
    except (smtplib.SMTPServerDisconnected, TimeoutError) as error:
        # The connection dropped or stalled mid-conversation: the message may have gone.
        raise DeliveryError(
            f"the mail server stopped answering: {error}", permanent=False, unknown=True
        ) from error
    except (smtplib.SMTPException, OSError) as error:
        raise DeliveryError(f"could not reach the mail server: {error}", permanent=False) from error
    if not sent:
        raise DeliveryError("the mail backend sent nothing", permanent=False)


def _decode(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return one_line(text, 200)


class _DisallowedPeer(Exception):
    """The connection reached an address a webhook must not reach."""


def _check_peer(sock: socket.socket) -> None:
    if settings.WEBHOOK_ALLOW_PRIVATE:
        return
    peer = str(sock.getpeername()[0]).split("%", 1)[0]
    problem = address_problem(ipaddress.ip_address(peer))
    if problem:
        sock.close()
        raise _DisallowedPeer(f"the webhook connection reached {peer}, {problem}")


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_peer(sock)
        return sock


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_peer(sock)
        return sock


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    """Checks the address each new connection actually reached, before a byte is sent: the
    validation's DNS answer and the connection's may differ (DNS rebinding). Connections
    through a configured proxy reach the proxy, and are not checked here."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


def _session() -> requests.Session:
    session = requests.Session()
    adapter = _GuardedAdapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _post(url: str, payload: dict[str, Any], message: PageMessage) -> None:
    try:
        validate_webhook_url(url, resolve=True)
    except ValidationError as error:
        inner = error.error_dict["address"][0]
        raise DeliveryError(
            " ".join(inner.messages), permanent=inner.code != "unresolvable"
        ) from error
    headers = {"User-Agent": USER_AGENT}
    if message.page_id is not None:
        # The same page retried carries the same key, so a receiver can drop a duplicate.
        headers["Idempotency-Key"] = f"page-{message.page_id}"
    timeout = settings.WEBHOOK_TIMEOUT
    try:
        with _session() as session:
            response = session.post(
                url,
                json=payload,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                stream=True,
            )
            try:
                _check_response(response)
            finally:
                response.close()
    except _DisallowedPeer as error:
        raise DeliveryError(str(error), permanent=True) from error
    except requests.ConnectTimeout as error:
        raise DeliveryError(
            f"could not connect to the webhook within {timeout:g} s", permanent=False
        ) from error
    except requests.Timeout as error:
        # The request went out; whether it was acted on is unknown.
        raise DeliveryError(
            f"the webhook did not answer within {timeout:g} s", permanent=False, unknown=True
        ) from error
    except requests.ConnectionError as error:
        raise DeliveryError(
            f"could not connect to the webhook: {_scrub(error, url)}", permanent=False
        ) from error
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as error:
        raise DeliveryError(f"invalid webhook URL: {_scrub(error, url)}", permanent=True) from error
    except requests.RequestException as error:
        raise DeliveryError(
            f"the webhook request failed: {_scrub(error, url)}", permanent=False
        ) from error


_URL_PATH_IN_ERROR = re.compile(r"(url: )\S+")


def _scrub(error: Exception, url: str) -> str:
    """The error text without the webhook's path and query: Slack-style webhooks carry
    their secret there, and page errors are shown to every user of the API."""
    parts = urlsplit(url)
    text = str(error).replace(url, f"{parts.scheme}://{parts.netloc}/...")
    if parts.path and parts.path != "/":
        text = text.replace(parts.path, "/...")
    return _URL_PATH_IN_ERROR.sub(r"\1/...", text)


def _check_response(response: requests.Response) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    if 300 <= status < 400:
        location = one_line(response.headers.get("Location", "(no Location)"), 200)
        raise DeliveryError(
            f"the webhook answered {status} redirecting to {location}; redirects are not followed",
            permanent=True,
        )
    reason = f"the webhook answered {status} {one_line(response.reason or '', 80)}".rstrip()
    body = _body_excerpt(response)
    if body:
        reason += f": {body}"
    permanent = 400 <= status < 500 and status not in RETRYABLE_4XX
    raise DeliveryError(reason, permanent=permanent)


def _body_excerpt(response: requests.Response) -> str:
    # Read a little only: the answer of a failed webhook is untrusted and may be endless.
    try:
        data = response.raw.read(ERROR_BODY_BYTES, decode_content=True)
    except (urllib3.exceptions.HTTPError, OSError):
        return ""
    return one_line(data.decode("utf-8", "replace"), ERROR_BODY_BYTES) if data else ""
