"""The public status page and its Atom feed: states, uptime, incidents and their public
updates, maintenance, history, what never shows, escaping, caching and query counts."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.contrib.staticfiles import finders
from django.core.cache import cache

from incidents import services
from incidents.comms.maintenance import maintenance_cancel, maintenance_schedule
from incidents.comms.status import (
    ServiceState,
    public_title,
    status_page,
    uptime_percent,
    weighted_downtime,
)
from incidents.comms.updates import status_update_post
from incidents.ingestion import payloads
from incidents.ingestion.services import alerts_ingest
from incidents.models import Alert, Impact, Incident
from tests.incidents.factories import (
    MaintenanceWindowFactory,
    ServiceFactory,
    SeverityFactory,
    UserFactory,
    alertmanager_body,
    declare,
    integration,
    role,
)

pytestmark = pytest.mark.django_db

# A Monday noon; the 90 days shown run from 2026-03-18 00:00 to now.
T = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)
ATOM = "{http://www.w3.org/2005/Atom}"


@pytest.fixture(autouse=True)
def fresh_cache(settings):
    """The server-side cache lives in Redis across tests; each test starts without it."""
    settings.SITE_NAME = "Acme Cloud Status"
    settings.SITE_URL = "https://status.example.com"
    cache.clear()


def service(name: str, *, public: bool = True):
    return ServiceFactory(name=name, slug=name.lower().replace(" ", "-"), is_public=public)


def incident(
    services_,
    *,
    impact=Impact.NONE,
    at=T - H,
    resolved=None,
    title="Errors",
    is_drill=False,
    level=2,
    by="person",
):
    """An incident declared by a person (`by` a username; None: by nobody, as an
    integration does), so its title is its public name."""
    made = declare(
        actor=UserFactory(username=f"declarer-{by}") if by else None,
        title=title,
        severity=SeverityFactory(level=level),
        services=services_,
        impact=impact,
        is_drill=is_drill,
        detected_at=at,
        now=at,
    )
    if resolved is not None:
        services.incident_resolve(incident=made, actor=None, now=resolved)
    return made


def post(incident_, body, *, at, stage="investigating", public=True, actor=None):
    return status_update_post(
        incident=incident_, body=body, public=public, stage=stage, actor=actor, now=at
    )


def get(client, url="/status/", **headers):
    with time_machine.travel(T, tick=False):
        return client.get(url, **headers)


def states(page) -> dict[str, str]:
    return {s.name: s.state for s in page.services}


def parse_feed(response) -> ET.Element:
    assert response["Content-Type"] == "application/atom+xml; charset=utf-8"
    return ET.fromstring(response.content)  # noqa: S314 - our own response


# --- states ----------------------------------------------------------------------------------


def test_each_public_service_shows_the_worst_impact_of_its_open_incidents(client):
    web, api, db, cdn, mail = (service(n) for n in ("Web", "API", "Database", "CDN", "Mail"))
    service("Billing internals", public=False)
    incident([web], impact=Impact.DEGRADED)
    incident([web, api], impact=Impact.PARTIAL_OUTAGE)
    incident([api, db], impact=Impact.MAJOR_OUTAGE, at=T - 2 * H)
    incident([cdn], impact=Impact.NONE)  # declared, no customer impact
    incident([mail], impact=Impact.MAJOR_OUTAGE, at=T - 5 * H, resolved=T - 4 * H)
    incident([mail], impact=Impact.MAJOR_OUTAGE, is_drill=True)

    page = status_page(now=T)

    assert states(page) == {
        "API": ServiceState.MAJOR_OUTAGE,
        "CDN": ServiceState.OPERATIONAL,
        "Database": ServiceState.MAJOR_OUTAGE,
        "Mail": ServiceState.OPERATIONAL,
        "Web": ServiceState.PARTIAL_OUTAGE,
    }
    assert (page.overall, page.overall_label) == (ServiceState.MAJOR_OUTAGE, "Major outage")
    html = get(client).content.decode()
    assert "Billing internals" not in html
    for label in ("Major outage", "Partial outage", "Operational"):
        assert label in html


def test_a_false_positive_never_colours_a_service(client):
    web = service("Web")
    alarm = incident([web], impact=Impact.MAJOR_OUTAGE, at=T - 3 * H)
    services.incident_update(incident=alarm, changes={"false_positive": True}, actor=None, now=T)
    page = status_page(now=T)
    assert states(page) == {"Web": ServiceState.OPERATIONAL}
    assert page.services[0].uptime_percent == "100.00"
    assert page.overall_label == "All systems operational"


def test_running_maintenance_shows_unless_an_incident_says_worse(client):
    web, api, db = service("Web"), service("API"), service("Database")
    MaintenanceWindowFactory(
        title="Database upgrade", services=[web, api], starts_at=T - H, ends_at=T + H
    )
    MaintenanceWindowFactory(title="Disk swap", services=[db], starts_at=T + D, ends_at=T + D + H)
    gone = MaintenanceWindowFactory(
        title="Called off", services=[db], starts_at=T + 2 * D, ends_at=T + 2 * D + H
    )
    maintenance_cancel(window=gone, actor=None, now=T - D)
    incident([api], impact=Impact.DEGRADED)

    page = status_page(now=T)

    assert states(page) == {
        "API": ServiceState.DEGRADED,
        "Database": ServiceState.OPERATIONAL,
        "Web": ServiceState.MAINTENANCE,
    }
    assert [w.title for w in page.maintenance_running] == ["Database upgrade"]
    assert [w.title for w in page.maintenance_upcoming] == ["Disk swap"]
    html = get(client).content.decode()
    assert "Under maintenance" in html
    assert "Maintenance in progress" in html
    assert "Scheduled maintenance" in html
    assert "2026-06-16 12:00" in html  # the upcoming window's start, in UTC
    assert "Called off" not in html


def test_a_window_ended_early_no_longer_shows(client):
    web = service("Web")
    window = MaintenanceWindowFactory(services=[web], starts_at=T - 2 * H, ends_at=T + H)
    maintenance_cancel(window=window, actor=None, now=T - H)
    page = status_page(now=T)
    assert states(page) == {"Web": ServiceState.OPERATIONAL}
    assert page.maintenance_running == ()


# --- uptime ----------------------------------------------------------------------------------


def test_weighted_downtime_counts_overlaps_once_at_the_worst_weight():
    major = (T, T + 2 * H, Impact.MAJOR_OUTAGE)
    partial = (T + H, T + 3 * H, Impact.PARTIAL_OUTAGE)
    degraded = (T - 5 * H, T + 5 * H, Impact.DEGRADED)
    assert weighted_downtime([major, partial, degraded]) == timedelta(hours=2.3)
    assert weighted_downtime([major, major]) == 2 * H
    assert weighted_downtime([degraded]) == timedelta(0)
    assert uptime_percent(timedelta(minutes=1), 90 * D) == "99.99"  # never rounds up to 100
    assert uptime_percent(timedelta(0), 90 * D) == "100.00"
    assert uptime_percent(90 * D, 90 * D) == "0.00"


def test_ninety_day_bar_and_uptime_from_impact_windows_at_a_known_time(client):
    web, api = service("Web"), service("API")
    # 2 h of major outage on 2026-06-13, with a partial outage overlapping its last hour and
    # going on one more hour: counted once, at 0.3, for that hour.
    incident([web], impact=Impact.MAJOR_OUTAGE, at=T - 2 * D - 2 * H, resolved=T - 2 * D)
    incident([web], impact=Impact.PARTIAL_OUTAGE, at=T - 2 * D - H, resolved=T - 2 * D + H)
    # 10 h of partial outage across midnight: both days are coloured.
    incident(
        [web],
        impact=Impact.PARTIAL_OUTAGE,
        at=datetime(2026, 6, 4, 22, 0, tzinfo=UTC),
        resolved=datetime(2026, 6, 5, 8, 0, tzinfo=UTC),
    )
    # Degraded performance colours its day and costs no uptime.
    incident([web], impact=Impact.DEGRADED, at=T - 20 * D, resolved=T - 20 * D + H)
    # Before the 90 days: not shown, not counted.
    incident([web], impact=Impact.MAJOR_OUTAGE, at=T - 100 * D, resolved=T - 95 * D)
    # Still open: counts up to now.
    incident([api], impact=Impact.MAJOR_OUTAGE, at=T - timedelta(minutes=30))

    page = status_page(now=T)
    web_row, api_row = page.services[1], page.services[0]
    assert (web_row.name, api_row.name) == ("Web", "API")

    # The period: 2026-03-18 00:00 to 2026-06-15 12:00 = 2148 h. Downtime: 2 h major,
    # 1 h x 0.3 after it, 10 h x 0.3 = 5.3 h, so 1 - 5.3 / 2148 = 99.753 %.
    assert web_row.uptime_percent == "99.75"
    assert api_row.uptime_percent == "99.97"  # 0.5 h of 2148 h
    days = {d.day.isoformat(): d.impact for d in web_row.days}
    assert len(web_row.days) == 90
    assert (web_row.days[0].day.isoformat(), web_row.days[-1].day.isoformat()) == (
        "2026-03-18",
        "2026-06-15",
    )
    assert {day: impact for day, impact in days.items() if impact != Impact.NONE} == {
        "2026-05-26": Impact.DEGRADED,
        "2026-06-04": Impact.PARTIAL_OUTAGE,
        "2026-06-05": Impact.PARTIAL_OUTAGE,
        "2026-06-13": Impact.MAJOR_OUTAGE,
    }
    assert api_row.days[-1].impact == Impact.MAJOR_OUTAGE

    html = get(client).content.decode()
    assert "99.75% uptime" in html
    assert "99.97% uptime" in html
    assert html.count('class="day impact-') == 180
    assert 'title="2026-06-13: Major outage"' in html
    assert 'title="2026-06-12: No incidents"' in html


def test_a_day_later_the_bar_moves_on_and_a_resolved_outage_stops_counting(client):
    web = service("Web")
    incident([web], impact=Impact.MAJOR_OUTAGE, at=T - 3 * H, resolved=T - H)
    today = status_page(now=T).services[0]
    later = status_page(now=T + D).services[0]
    assert today.days[-1].impact == Impact.MAJOR_OUTAGE
    assert (later.days[-2].impact, later.days[-1].impact) == (Impact.MAJOR_OUTAGE, Impact.NONE)
    assert later.days[0].day.isoformat() == "2026-03-19"
    assert today.uptime_percent == later.uptime_percent == "99.90"  # 2 h of 2148 h


# --- incidents and their public updates ------------------------------------------------------


def test_open_incidents_show_their_public_updates_with_stages_newest_first(client):
    web = service("Web")
    outage = incident([web], impact=Impact.PARTIAL_OUTAGE, at=T - 3 * H, title="Slow checkout")
    post(outage, "We are looking into slow checkouts.", at=T - 3 * H + timedelta(minutes=5))
    post(outage, "Internal: db-3 is swapping", at=T - 2 * H, public=False)
    post(outage, "A database node is overloaded.", at=T - 2 * H, stage="identified")
    post(outage, "Load is back to normal; watching.", at=T - H, stage="monitoring")
    untold = incident([web], impact=Impact.MAJOR_OUTAGE, title="Nobody told yet")

    page = status_page(now=T)

    (shown,) = page.open_incidents
    assert shown.title == "Slow checkout"
    assert (shown.stage, shown.stage_label) == ("monitoring", "Monitoring")
    assert [u.stage_label for u in shown.updates] == ["Monitoring", "Identified", "Investigating"]
    assert shown.services == ("Web",)
    # Not told about yet: it colours the service, and is not listed.
    assert states(page) == {"Web": ServiceState.MAJOR_OUTAGE}
    assert untold.title not in [i.title for i in page.open_incidents]

    html = get(client).content.decode()
    assert html.index("Load is back to normal") < html.index("A database node is overloaded")
    assert html.index("A database node") < html.index("We are looking into slow checkouts")
    assert "Nobody told yet" not in html
    assert "db-3 is swapping" not in html
    assert f'id="incident-{outage.pk}"' in html


def test_history_holds_resolved_public_incidents_of_the_last_ninety_days(client):
    web = service("Web")
    inside = incident(
        [web], impact=Impact.MAJOR_OUTAGE, at=T - 89 * D - H, resolved=T - 89 * D, title="Inside"
    )
    outside = incident(
        [web], impact=Impact.MAJOR_OUTAGE, at=T - 91 * D, resolved=T - 90 * D - H, title="Outside"
    )
    recent = incident([web], at=T - 2 * D, resolved=T - D, title="Recent")
    quiet = incident([web], at=T - 3 * D, resolved=T - 3 * D + H, title="Quiet")
    old_but_open = incident([web], at=T - 120 * D, title="Long running")
    for made in (inside, outside, recent, old_but_open):
        post(made, f"About {made.title}.", at=made.detected_at + H)
    post(recent, "Fixed by a rollback.", at=T - D, stage="resolved")
    services.incident_close(incident=recent, actor=None, now=T - D + H)
    del quiet  # resolved without a public update: never listed

    page = status_page(now=T)

    assert [i.title for i in page.history] == ["Recent", "Inside"]
    assert [i.title for i in page.open_incidents] == ["Long running"]
    assert page.history[0].stage_label == "Resolved"
    html = get(client).content.decode()
    assert "Fixed by a rollback." in html
    assert "Outside" not in html
    assert "Quiet" not in html


# --- nothing internal ------------------------------------------------------------------------


def open_by_alert(service_, *, at, labels, annotations):
    """An incident opened by an Alertmanager alert on `service_`, through ingestion."""
    source, _token = integration(default_service=service_, default_severity=SeverityFactory())
    body = alertmanager_body(
        {"labels": labels, "annotations": annotations, "startsAt": at.isoformat()},
        group_key=f"{{}}:{{alertname={labels['alertname']!r}}}",
    )
    result = alerts_ingest(integration=source, delivery=payloads.parse_alertmanager(body), now=at)
    (reference,) = result.opened
    return Incident.objects.get(reference=reference)


def test_an_incident_opened_by_an_alert_is_named_by_its_impact_and_public_services(client):
    web, search = service("Web"), service("Search")
    hidden = service("Ledger", public=False)
    opened = open_by_alert(
        web,
        at=T - 2 * H,
        labels={"alertname": "Disk full on db-prod-3 10.0.4.7"},
        annotations={"summary": "Disk full"},
    )
    opened.services.add(search, hidden)
    services.incident_update(
        incident=opened, changes={"impact": Impact.PARTIAL_OUTAGE}, actor=None, now=T - 2 * H
    )
    opened.refresh_from_db()
    post(opened, "Searches fail for some customers.", at=T - H)
    person = incident([web], title="Checkout is slow", impact=Impact.DEGRADED)
    post(person, "Checkout is slow.", at=T - H)

    assert public_title(opened) == "Partial outage affecting Search, Web"
    assert public_title(person) == "Checkout is slow"
    services.incident_update(incident=opened, changes={"impact": Impact.NONE}, actor=None, now=T)
    opened.refresh_from_db()
    assert public_title(opened, service_names=[]) == "Incident"
    assert public_title(opened) == "Incident affecting Search, Web"

    services.incident_update(
        incident=opened, changes={"impact": Impact.PARTIAL_OUTAGE}, actor=None, now=T
    )
    titles = sorted(i.title for i in status_page(now=T).open_incidents)
    assert titles == ["Checkout is slow", "Partial outage affecting Search, Web"]
    feed = parse_feed(get(client, "/status/feed.atom"))
    entries = sorted(e.findtext(f"{ATOM}title") for e in feed.iter(f"{ATOM}entry"))
    assert entries == [
        "Checkout is slow: Investigating",
        "Partial outage affecting Search, Web: Investigating",
    ]
    html = get(client).content.decode()
    assert "Partial outage affecting Search, Web" in html
    assert "10.0.4.7" not in html
    assert "Ledger" not in html


def test_nothing_internal_reaches_the_page_or_the_feed(client):
    """Every internal string below contains SECRET; none may appear in either."""
    web = service("Web")
    hidden = service("SECRET internal service", public=False)
    commander = UserFactory(username="secret-commander", first_name="SECRET", email="s@x.io")
    poster = UserFactory(username="secret-poster")
    real = declare(
        title="Checkout errors",
        severity=SeverityFactory(level=1),
        services=[web, hidden],
        impact=Impact.PARTIAL_OUTAGE,
        summary="SECRET summary: the primary ran out of disk",
        detected_at=T - 3 * H,
        now=T - 3 * H,
    )
    services.incident_assign_role(
        incident=real, role=role(), user=commander, actor=None, now=T - 3 * H
    )
    services.incident_add_note(incident=real, body="SECRET note", actor=poster, now=T - 3 * H)
    source, _token = integration()
    Alert.objects.create(
        integration=source,
        incident=real,
        fingerprint="SECRET-fp",
        group_key="SECRET-group",
        name="SECRET alert name",
        summary="SECRET alert summary",
        labels={"instance": "SECRET-db-3"},
    )
    post(real, "SECRET internal update", at=T - 2 * H, public=False, actor=poster)
    post(real, "Payments are failing for some customers.", at=T - 2 * H, actor=poster)
    services.incident_transition(
        incident=real, to="mitigating", actor=poster, message="SECRET transition", now=T - H
    )
    drill = incident([web], impact=Impact.MAJOR_OUTAGE, title="SECRET drill", is_drill=True)
    post(drill, "SECRET drill update", at=T - H)
    private = incident([hidden], impact=Impact.MAJOR_OUTAGE, title="SECRET private incident")
    post(private, "SECRET private update", at=T - H)
    done = incident([web], at=T - 5 * D, resolved=T - 4 * D, title="Earlier errors")
    post(done, "Resolved earlier.", at=T - 4 * D, stage="resolved")
    for title, on, starts_at in [
        ("SECRET running private window", [hidden], T - H),
        ("SECRET upcoming private window", [hidden], T + H),
        ("Network work", [web, hidden], T + H),
    ]:
        MaintenanceWindowFactory(title=title, services=on, starts_at=starts_at, created_at=T - D)

    # An incident opened by an alert: its title is the alert's name; its name, summary and
    # labels (a host, an address) are internal, and so is the title made of them.
    opened = open_by_alert(
        web,
        at=T - 2 * H,
        labels={"alertname": "SecretDiskFull", "instance": "secret-db-prod-3:9100"},
        annotations={"summary": "SECRET disk full on db-prod-3 10.0.4.7", "runbook": "SECRET"},
    )
    assert opened.title == "SecretDiskFull"
    services.incident_update(
        incident=opened, changes={"impact": Impact.DEGRADED}, actor=None, now=T - 2 * H
    )
    post(opened, "Some pages load slowly.", at=T - H, actor=poster)

    page, feed = get(client), get(client, "/status/feed.atom")
    for response in (page, feed):
        text = response.content.decode()
        assert "Payments are failing for some customers." in text  # the public update shows
        assert "Some pages load slowly." in text
        assert "Degraded performance affecting Web" in text  # the alert incident's name
        assert "10.0.4.7" not in text
        assert "db-prod-3" not in text
        assert opened.reference not in text
        assert "Network work" in text
        assert "secret" not in text.lower(), re.findall(r".{40}secret.{40}", text, re.I)
        assert real.reference not in text
        assert "poster" not in text
        assert "commander" not in text.lower()


# --- escaping --------------------------------------------------------------------------------


def test_incident_and_update_text_is_inert_html(client):
    web = service("Web")
    evil = incident([web], impact=Impact.MAJOR_OUTAGE, title="<script>alert(1)</script>")
    post(evil, '<img src=x onerror="alert(2)"> & more', at=T - H)
    MaintenanceWindowFactory(
        title="<b onmouseover=alert(3)>window</b>",
        description="<iframe src=//evil>",
        services=[web],
        starts_at=T + H,
    )

    html = get(client).content.decode()
    assert "<script>alert(1)" not in html
    assert "<img src=x" not in html
    assert "<iframe" not in html
    assert "<b onmouseover" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt; &amp; more" in html
    assert "<script" not in html.lower()  # and the page has no scripts of its own

    feed = parse_feed(get(client, "/status/feed.atom"))
    titles = [e.findtext(f"{ATOM}title") for e in feed.iter(f"{ATOM}entry")]
    assert "<script>alert(1)</script>: Investigating" in titles  # plain text, XML-escaped
    summaries = [e.findtext(f"{ATOM}summary") for e in feed.iter(f"{ATOM}entry")]
    assert any("&lt;img src=x" in s for s in summaries)  # HTML escaped inside type="html"


# --- the feed --------------------------------------------------------------------------------


def test_feed_is_atom_with_an_entry_per_public_update_and_window(client):
    web = service("Web")
    service("Hidden", public=False)
    outage = incident([web], impact=Impact.MAJOR_OUTAGE, at=T - 3 * H, title="API errors")
    first = post(outage, "Investigating errors.", at=T - 3 * H)
    post(outage, "Internal only.", at=T - 2 * H, public=False)
    second = post(outage, "Root cause found.", at=T - 2 * H, stage="identified")
    window = MaintenanceWindowFactory(
        title="Router swap", services=[web], starts_at=T + D, created_at=T - 10 * H
    )
    called_off = MaintenanceWindowFactory(
        title="Patch day", services=[web], starts_at=T + 2 * D, created_at=T - 20 * H
    )
    maintenance_cancel(window=called_off, actor=None, now=T - timedelta(minutes=30))

    response = get(client, "/status/feed.atom")
    assert response.status_code == 200
    feed = parse_feed(response)
    assert feed.tag == f"{ATOM}feed"
    assert feed.findtext(f"{ATOM}title") == "Acme Cloud Status"
    assert feed.findtext(f"{ATOM}id") == "https://status.example.com/status/"
    assert feed.findtext(f"{ATOM}updated") == "2026-06-15T11:30:00+00:00"
    entries = [
        (
            e.findtext(f"{ATOM}id"),
            e.findtext(f"{ATOM}title"),
            e.findtext(f"{ATOM}updated"),
            e.find(f"{ATOM}link").get("href"),
        )
        for e in feed.iter(f"{ATOM}entry")
    ]
    assert entries == [
        (
            f"tag:status.example.com,2026-06-14:status/maintenance/{called_off.pk}",
            "Cancelled maintenance: Patch day",
            "2026-06-15T11:30:00+00:00",
            f"https://status.example.com/status/#maintenance-{called_off.pk}",
        ),
        (
            f"tag:status.example.com,2026-06-15:status/update/{second.pk}",
            "API errors: Identified",
            "2026-06-15T10:00:00+00:00",
            f"https://status.example.com/status/#incident-{outage.pk}",
        ),
        (
            f"tag:status.example.com,2026-06-15:status/update/{first.pk}",
            "API errors: Investigating",
            "2026-06-15T09:00:00+00:00",
            f"https://status.example.com/status/#incident-{outage.pk}",
        ),
        (
            f"tag:status.example.com,2026-06-15:status/maintenance/{window.pk}",
            "Scheduled maintenance: Router swap",
            "2026-06-15T02:00:00+00:00",
            f"https://status.example.com/status/#maintenance-{window.pk}",
        ),
    ]
    assert "Internal only." not in response.content.decode()

    # Ids stay put when more entries arrive.
    third = post(outage, "Fixed.", at=T, stage="resolved")
    with time_machine.travel(T + H, tick=False):
        later = parse_feed(client.get("/status/feed.atom"))
    ids = [e.findtext(f"{ATOM}id") for e in later.iter(f"{ATOM}entry")]
    assert ids[0].endswith(f"update/{third.pk}")
    assert ids[1:] == [entry[0] for entry in entries]


# --- the page as HTTP ------------------------------------------------------------------------


def test_page_needs_no_login_names_the_site_and_links_subscribe_and_feed(client):
    service("Web")
    response = get(client)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/html; charset=utf-8"
    html = response.content.decode()
    assert "<title>Acme Cloud Status: All systems operational</title>" in html
    assert "<h1>Acme Cloud Status</h1>" in html
    assert 'href="subscribe/"' in html  # /status/subscribe/
    assert 'href="feed.atom"' in html
    assert 'type="application/atom+xml"' in html
    assert 'href="/static/incidents/status.css"' in html
    assert finders.find("incidents/status.css")
    assert "http://" not in html
    assert "https://" not in html
    assert "script-src" not in response["Content-Security-Policy"]  # none allowed at all
    assert "Set-Cookie" not in response
    assert "Cookie" not in response.get("Vary", "")


def test_only_get_and_head_are_answered(client):
    assert get(client).status_code == 200
    with time_machine.travel(T, tick=False):
        assert client.head("/status/").status_code == 200
        assert client.post("/status/").status_code == 405
        assert client.post("/status/feed.atom").status_code == 405


def test_cache_headers_and_conditional_requests(client, settings):
    settings.STATUS_PAGE_MAX_AGE = 45
    service("Web")
    for url in ("/status/", "/status/feed.atom"):
        first = get(client, url)
        assert first.status_code == 200
        cache_control = set(first["Cache-Control"].split(", "))
        assert cache_control == {"public", "max-age=45"}
        assert first["ETag"].startswith('"')
        assert first["Last-Modified"]

        again = get(client, url, HTTP_IF_NONE_MATCH=first["ETag"])
        assert again.status_code == 304
        assert set(again["Cache-Control"].split(", ")) == {"public", "max-age=45"}
        since = get(client, url, HTTP_IF_MODIFIED_SINCE=first["Last-Modified"])
        assert since.status_code == 304


def test_the_server_cache_shows_a_new_public_update_at_once_and_the_rest_within_max_age(
    client, settings, django_assert_max_num_queries
):
    settings.STATUS_PAGE_MAX_AGE = 60
    web = service("Web")
    outage = incident([web], impact=Impact.DEGRADED, at=T - H, title="Slow pages")
    post(outage, "Looking into it.", at=T - H)
    assert "Degraded performance" in get(client).content.decode()

    # An impact change without an update: the cached page stands, at one query a request.
    services.incident_update(
        incident=outage, changes={"impact": Impact.MAJOR_OUTAGE}, actor=None, now=T
    )
    with django_assert_max_num_queries(1):
        cached = get(client).content.decode()
    assert 'class="state state-degraded"' in cached

    # A new public update changes the key: it shows at once, with the new state.
    post(outage, "Pages fail to load.", at=T, stage="identified")
    fresh = get(client).content.decode()
    assert "Pages fail to load." in fresh
    assert 'class="state state-major_outage"' in fresh

    # Anything else shows when the max-age bucket turns.
    services.incident_resolve(incident=outage, actor=None, now=T)
    assert "Pages fail to load." in get(client).content.decode().split("Past incidents")[0]
    with time_machine.travel(T + timedelta(seconds=60), tick=False):
        later = client.get("/status/").content.decode()
    assert "All systems operational" in later


def test_a_new_maintenance_window_shows_at_once(client, django_capture_on_commit_callbacks):
    web = service("Web")
    assert "Scheduled maintenance" not in get(client).content.decode()
    with time_machine.travel(T, tick=False), django_capture_on_commit_callbacks(execute=True):
        maintenance_schedule(
            title="Kernel upgrade",
            service_ids=[web.pk],
            starts_at=T + D,
            ends_at=T + D + H,
            actor=None,
        )
    assert "Kernel upgrade" in get(client).content.decode()


def test_the_page_still_answers_when_the_cache_is_unreachable(client, settings):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"socket_connect_timeout": 0.2, "socket_timeout": 0.2},
        }
    }
    service("Web")
    assert get(client).status_code == 200
    assert get(client, "/status/feed.atom").status_code == 200


# --- query counts ----------------------------------------------------------------------------

PAGE_QUERIES = 9  # cache version 1, services 1, impacts 2, windows 2, listed incidents 3
FEED_QUERIES = 5  # cache version 1, updates 2, windows 2


def populate(n_services: int, n_incidents: int, n_updates: int) -> None:
    made = [service(f"Service {i}") for i in range(n_services)]
    hidden = service("Hidden", public=False)
    for i in range(n_incidents):
        targets = [made[i % n_services], made[(i + 1) % n_services], hidden]
        resolved = T - i * D if i % 2 else None
        impact = [Impact.DEGRADED, Impact.PARTIAL_OUTAGE, Impact.MAJOR_OUTAGE][i % 3]
        one = incident(targets, impact=impact, at=T - i * D - 2 * H, resolved=resolved)
        for u in range(n_updates):
            post(one, f"Update {u}", at=T - i * D - H, public=bool(u % 3))
        MaintenanceWindowFactory(services=targets, starts_at=T + (i - 1) * H, created_at=T - D)


@pytest.mark.parametrize(("n_services", "n_incidents", "n_updates"), [(1, 2, 2), (8, 24, 6)])
def test_page_and_feed_queries_do_not_grow_with_the_data(
    client, django_assert_num_queries, n_services, n_incidents, n_updates
):
    populate(n_services, n_incidents, n_updates)
    with django_assert_num_queries(PAGE_QUERIES):
        page = get(client)
    with django_assert_num_queries(FEED_QUERIES):
        feed = get(client, "/status/feed.atom")
    assert page.status_code == feed.status_code == 200
    assert page.content.decode().count('class="service"') == n_services
