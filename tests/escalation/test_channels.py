"""Delivery channels against real servers: what arrives, how failures are classified, and
which webhook targets are refused."""

from __future__ import annotations

import socket
import time

import pytest
import requests
from django.core.exceptions import ValidationError
from django.utils import timezone

from escalation.channels import (
    DeliveryError,
    PageMessage,
    compose_page,
    send,
    validate_contact_address,
    validate_webhook_url,
)
from escalation.models import ContactKind, ContactMethod, Page
from tests.escalation.factories import ContactMethodFactory, PersonFactory
from tests.incidents.factories import SeverityFactory, declare

ACK_URL = "http://tracker.example/ack/token-123/"
HOSTILE_TITLE = "Checkout <script>alert(1)</script> down\r\nBcc: victim@example.com"
HOSTILE_SUMMARY = 'Users see <b>errors</b> & "500"\nSecond line <img src=x onerror=alert(2)>'


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_dns(monkeypatch, answers: dict[str, list[str]] | None = None, *, sequence=None):
    """Answer getaddrinfo for made-up names (other names resolve as usual). `sequence`
    gives one answer per call instead: a resolver that changes its mind (DNS rebinding)."""
    real = socket.getaddrinfo
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, bytes):
            host = host.decode()
        if sequence is not None and host == "rebind.example":
            addresses = sequence[min(len(calls), len(sequence) - 1)]
        elif answers and host in answers:
            addresses = answers[host]
        else:
            return real(host, port, *args, **kwargs)
        calls.append(host)
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (address, int(port or 80)),
            )
            for address in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


@pytest.fixture
def page(db):
    incident = declare(
        title=HOSTILE_TITLE, summary=HOSTILE_SUMMARY, severity=SeverityFactory(level=1)
    )
    created = Page.objects.create(
        incident=incident,
        step_index=1,
        round=0,
        person=PersonFactory(name="Ada Oncall"),
        due_at=timezone.now(),
    )
    return Page.objects.select_related("incident__severity", "person").get(pk=created.pk)


@pytest.fixture
def message(page) -> PageMessage:
    return compose_page(page, ACK_URL)


def method(kind: str, address: str) -> ContactMethod:
    return ContactMethod(kind=kind, address=address)


# --- URL safety -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://127.1/hook", "loopback"),
        ("http://localhost:8000/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://10.0.0.1/hook", "private"),
        ("http://192.168.1.10/hook", "private"),
        ("http://172.16.5.4/hook", "private"),
        ("http://[fc00::1]/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://240.0.0.1/hook", "reserved"),
        ("http://[::ffff:10.0.0.1]/hook", "private"),
        ("http://100.64.0.1/hook", "not a public"),
    ],
)
@pytest.mark.parametrize("resolve", [False, True])
def test_webhook_url_to_a_non_public_address_is_refused(settings, url, reason, resolve):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    with pytest.raises(ValidationError) as caught:
        validate_webhook_url(url, resolve=resolve)
    [text] = caught.value.message_dict["address"]
    assert reason in text


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "file:///etc/passwd", "gopher://x/"])
def test_webhook_url_must_be_http_or_https(settings, url):
    settings.WEBHOOK_ALLOW_PRIVATE = True
    with pytest.raises(ValidationError) as caught:
        validate_webhook_url(url, resolve=False)
    assert "http or https" in caught.value.message_dict["address"][0]


def test_allow_private_setting_admits_loopback_but_not_other_schemes(settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True
    validate_webhook_url("http://127.0.0.1:8080/hook", resolve=True)
    validate_webhook_url("http://[::1]/hook", resolve=True)
    with pytest.raises(ValidationError):
        validate_webhook_url("ftp://127.0.0.1/hook", resolve=True)


def test_public_ip_literal_is_accepted_without_dns(settings, monkeypatch):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("DNS was used"))
    validate_webhook_url("https://93.184.216.34/hook", resolve=True)
    validate_webhook_url("https://[2606:2800:220:1:248:1893:25c8:1946]/hook", resolve=True)


def test_name_resolving_to_any_private_address_is_refused_at_send_check(settings, monkeypatch):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    fake_dns(monkeypatch, {"mixed.example": ["93.184.216.34", "10.1.2.3"]})
    with pytest.raises(ValidationError) as caught:
        validate_webhook_url("https://mixed.example/hook", resolve=True)
    assert "resolves to 10.1.2.3, a private address" in caught.value.message_dict["address"][0]


def test_name_resolving_to_public_addresses_is_accepted(settings, monkeypatch):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    fake_dns(monkeypatch, {"hooks.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    validate_webhook_url("https://hooks.example/hook", resolve=True)


def test_unresolvable_host_is_refused_saying_so(settings, monkeypatch):
    fake_dns(monkeypatch, {"nowhere.invalid": []})
    with pytest.raises(ValidationError) as caught:
        validate_webhook_url("https://nowhere.invalid/hook", resolve=True)
    assert "could not be resolved" in caught.value.message_dict["address"][0]


def test_saving_a_contact_method_checks_without_dns(settings, monkeypatch):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    calls = fake_dns(monkeypatch, {"hooks.example": ["10.0.0.1"]})
    validate_contact_address(ContactKind.WEBHOOK, "https://hooks.example/hook")
    assert calls == []  # a name is checked when sent, not when saved
    for kind in (ContactKind.WEBHOOK, ContactKind.SLACK_WEBHOOK, ContactKind.SMS_WEBHOOK):
        with pytest.raises(ValidationError) as caught:
            validate_contact_address(kind, "http://169.254.169.254/latest/meta-data/")
        assert "link-local" in caught.value.message_dict["address"][0]


@pytest.mark.django_db
def test_contact_method_with_a_loopback_webhook_is_refused_by_full_clean(settings):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    contact = ContactMethodFactory.build(
        person=PersonFactory(), kind=ContactKind.SLACK_WEBHOOK, address="http://[::1]/hook"
    )
    with pytest.raises(ValidationError) as caught:
        contact.full_clean()
    assert "loopback" in caught.value.message_dict["address"][0]


def test_email_contact_address_must_be_an_email():
    validate_contact_address(ContactKind.EMAIL, "oncall@example.com")
    with pytest.raises(ValidationError) as caught:
        validate_contact_address(ContactKind.EMAIL, "not an address")
    assert "address" in caught.value.message_dict


# --- composition ----------------------------------------------------------------------------


def test_composed_page_escapes_html_and_keeps_the_subject_on_one_line(page, message):
    assert "\r" not in message.subject
    assert "\n" not in message.subject
    assert message.subject.startswith(f"[Sev1] {page.incident.reference}: Checkout")
    assert "<script>" not in message.html
    assert "<img" not in message.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in message.html
    assert "&lt;b&gt;errors&lt;/b&gt; &amp; &quot;500&quot;<br>" in message.html
    assert f'href="{ACK_URL}"' in message.html
    assert ACK_URL in message.text
    assert "Second line <img src=x onerror=alert(2)>" in message.text
    assert (message.step, message.round) == (2, 1)
    assert message.title == HOSTILE_TITLE  # the data itself is kept as stored
    assert message.recipient == "Ada Oncall"
    assert message.message_id.startswith(f"<page-{page.pk}.")


# --- email ----------------------------------------------------------------------------------


def test_email_page_arrives_with_text_and_html_parts(smtp_server, page, message, settings):
    send(method(ContactKind.EMAIL, "ada@example.com"), message)

    [envelope] = smtp_server.envelopes
    assert envelope.rcpt_tos == ("ada@example.com",)
    [mail] = smtp_server.messages
    assert mail["To"] == "ada@example.com"
    assert mail["From"] == settings.DEFAULT_FROM_EMAIL
    assert mail["Message-ID"] == message.message_id
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["Bcc"] is None
    assert "victim@example.com" not in str(mail["To"])
    subject = str(mail["Subject"])
    assert "\n" not in subject
    assert "\r" not in subject
    assert subject == message.subject
    text = mail.get_body(("plain",)).get_content()
    html = mail.get_body(("html",)).get_content()
    assert ACK_URL in text
    assert page.incident.reference in text
    assert "&lt;script&gt;" in html
    assert "<script>" not in html
    assert f'href="{ACK_URL}"' in html


def test_email_refused_with_5xx_is_a_permanent_failure(smtp_server, message):
    smtp_server.reject_with("550 5.1.1 No such user")
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.EMAIL, "gone@example.com"), message)
    assert caught.value.permanent
    assert "550" in caught.value.reason
    assert smtp_server.messages == []


def test_email_refused_with_4xx_is_a_temporary_failure(smtp_server, message):
    smtp_server.reject_with("451 4.3.0 Try again later")
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.EMAIL, "ada@example.com"), message)
    assert not caught.value.permanent
    assert "451" in caught.value.reason


def test_unreachable_mail_server_is_a_temporary_failure(settings, message):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", closed_port(), 2
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.EMAIL, "ada@example.com"), message)
    assert not caught.value.permanent


# --- webhooks -------------------------------------------------------------------------------


def test_sms_webhook_posts_recipient_and_short_text(http_server, allow_private_webhooks, message):
    send(method(ContactKind.SMS_WEBHOOK, http_server.url("/sms")), message)

    [request] = http_server.requests
    assert (request.method, request.path) == ("POST", "/sms")
    assert request.headers["Content-Type"] == "application/json"
    assert set(request.json) == {"to", "message"}
    assert request.json["to"] == "Ada Oncall"
    text = request.json["message"]
    assert ACK_URL in text
    assert message.reference in text
    assert "\n" not in text
    assert "\r" not in text
    assert len(text) <= 100 + len(ACK_URL)


def test_slack_webhook_posts_plain_text_with_the_ack_link(
    http_server, allow_private_webhooks, message
):
    send(method(ContactKind.SLACK_WEBHOOK, http_server.url("/slack")), message)

    [request] = http_server.requests
    assert set(request.json) == {"text"}
    text = request.json["text"]
    assert f"Acknowledge: {ACK_URL}" in text
    # Slack reads <...> as links and mentions: incident text is escaped for it.
    assert "&lt;script&gt;" in text
    assert "<script>" not in text
    assert "<img" not in text


def test_generic_webhook_posts_the_structured_page(
    http_server, allow_private_webhooks, page, message
):
    send(method(ContactKind.WEBHOOK, http_server.url("/hook")), message)

    [request] = http_server.requests
    assert request.headers["Idempotency-Key"] == f"page-{page.pk}"
    assert request.json == {
        "event": "page",
        "page_id": page.pk,
        "recipient": "Ada Oncall",
        "incident": {
            "reference": page.incident.reference,
            "title": HOSTILE_TITLE,
            "severity": "Sev1",
            "severity_level": 1,
            "status": "triggered",
            "summary": HOSTILE_SUMMARY,
        },
        "step": 2,
        "round": 1,
        "ack_url": ACK_URL,
    }


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(200, None), (204, None), (400, True), (404, True), (408, False), (429, False),
     (500, False), (503, False)],
)  # fmt: skip
def test_webhook_answer_decides_success_or_failure_kind(
    http_server, allow_private_webhooks, message, status, permanent
):
    http_server.respond_with(status, body="upstream says no")
    contact = method(ContactKind.WEBHOOK, http_server.url("/hook"))
    if permanent is None:
        send(contact, message)
        return
    with pytest.raises(DeliveryError) as caught:
        send(contact, message)
    assert caught.value.permanent is permanent
    assert f"answered {status}" in caught.value.reason
    assert "upstream says no" in caught.value.reason


def test_webhook_redirect_is_refused_and_not_followed(http_server, allow_private_webhooks, message):
    elsewhere = http_server.url("/elsewhere")
    http_server.respond_with(302, headers={"Location": elsewhere})
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.WEBHOOK, http_server.url("/hook")), message)
    assert caught.value.permanent
    assert elsewhere in caught.value.reason
    assert [r.path for r in http_server.requests] == ["/hook"]


def test_slow_webhook_times_out_as_a_temporary_failure(
    http_server, allow_private_webhooks, settings, message
):
    settings.WEBHOOK_TIMEOUT = 0.3
    http_server.respond_with(200, delay=5)
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.WEBHOOK, http_server.url("/slow")), message)
    assert time.monotonic() - started < 2
    assert not caught.value.permanent
    assert "did not answer within 0.3 s" in caught.value.reason
    assert len(http_server.requests) == 1


def test_refused_connection_is_a_temporary_failure(allow_private_webhooks, message):
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.WEBHOOK, f"http://127.0.0.1:{closed_port()}/hook"), message)
    assert not caught.value.permanent


def test_loopback_webhook_is_refused_at_send_when_private_is_not_allowed(
    http_server, settings, message
):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    for kind in (ContactKind.WEBHOOK, ContactKind.SLACK_WEBHOOK, ContactKind.SMS_WEBHOOK):
        with pytest.raises(DeliveryError) as caught:
            send(method(kind, http_server.url("/hook")), message)
        assert caught.value.permanent
        assert "loopback" in caught.value.reason
    assert http_server.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://10.0.0.1/hook",
        "ftp://example.com/hook",
    ],
)
def test_unsafe_webhook_targets_are_refused_at_send(settings, message, url):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.WEBHOOK, url), message)
    assert caught.value.permanent


def test_name_resolving_to_a_private_address_is_not_posted_to(
    http_server, settings, monkeypatch, message
):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    fake_dns(monkeypatch, {"internal.example": ["127.0.0.1"]})
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.WEBHOOK, f"http://internal.example:{http_server.port}/"), message)
    assert caught.value.permanent
    assert "resolves to 127.0.0.1" in caught.value.reason
    assert http_server.requests == []


def test_dns_rebinding_after_the_check_is_caught_at_connect(
    http_server, settings, monkeypatch, message
):
    """The name is public when validated and loopback when connected: refused all the
    same, before a byte reaches the server."""
    settings.WEBHOOK_ALLOW_PRIVATE = False
    calls = fake_dns(monkeypatch, sequence=[["93.184.216.34"], ["127.0.0.1"]])
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.WEBHOOK, f"http://rebind.example:{http_server.port}/"), message)
    assert len(calls) == 2  # validated, then resolved again by the connection
    assert caught.value.permanent
    assert "reached 127.0.0.1, a loopback address" in caught.value.reason
    assert http_server.requests == []


def test_unresolvable_webhook_host_is_a_temporary_failure(settings, monkeypatch, message):
    fake_dns(monkeypatch, {"gone.example": []})
    with pytest.raises(DeliveryError) as caught:
        send(method(ContactKind.WEBHOOK, "https://gone.example/hook"), message)
    assert not caught.value.permanent
    assert "could not be resolved" in caught.value.reason


def test_unknown_contact_kind_is_a_permanent_failure(message):
    with pytest.raises(DeliveryError) as caught:
        send(method("pigeon", "coop"), message)
    assert caught.value.permanent


def test_webhook_errors_do_not_carry_the_secret_path():
    from escalation.channels import _scrub

    url = "https://hooks.example.com/services/T000/B000/SECRETsecret?token=abc"
    error = requests.ConnectionError(
        "HTTPSConnectionPool(host='hooks.example.com', port=443): Max retries exceeded with "
        "url: /services/T000/B000/SECRETsecret?token=abc (Caused by NewConnectionError)"
    )
    text = _scrub(error, url)
    assert "SECRET" not in text
    assert "token=abc" not in text
    assert "hooks.example.com" in text
