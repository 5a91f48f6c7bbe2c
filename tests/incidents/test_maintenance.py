"""Maintenance windows: scheduling rules, changes, cancellation, the admin, and the
announcement to subscribers through a real SMTP server."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from incidents.comms import notices
from incidents.comms.maintenance import (
    WindowState,
    maintenance_announce,
    maintenance_cancel,
    maintenance_schedule,
    maintenance_update,
    window_state,
    windows_active,
)
from incidents.exceptions import InvalidInput
from incidents.models import CustomerNotice, MaintenanceWindow, NoticeStatus
from tests.incidents.factories import (
    MaintenanceWindowFactory,
    ServiceFactory,
    SubscriberFactory,
    UserFactory,
)
from tests.incidents.notice_support import parts, smtp_server  # noqa: F401 - a fixture

pytestmark = pytest.mark.django_db

T = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)


@pytest.fixture
def web():
    return ServiceFactory(name="Web", slug="web")


@pytest.fixture
def ledger():
    return ServiceFactory(name="Ledger", slug="ledger", is_public=False)


@pytest.fixture
def staff():
    return UserFactory(username="ops", is_superuser=True)


def schedule(service_ids, *, now=T, **fields):
    values = {
        "title": "Database upgrade",
        "description": "Primary failover; a minute of errors.",
        "starts_at": T + D,
        "ends_at": T + D + 2 * H,
        **fields,
    }
    return maintenance_schedule(service_ids=service_ids, actor=None, now=now, **values)


# --- scheduling ------------------------------------------------------------------------------


def test_schedule_makes_a_window_for_its_services(web, ledger, staff):
    window = maintenance_schedule(
        title="  Database upgrade ",
        description="Failover.",
        service_ids=[web.pk, ledger.pk],
        starts_at=T + D,
        ends_at=T + D + H,
        actor=staff,
        now=T,
    )
    window.refresh_from_db()
    assert window.title == "Database upgrade"
    assert sorted(s.name for s in window.services.all()) == ["Ledger", "Web"]
    assert (window.created_by, window.created_at, window.announced_at) == (staff, T, None)
    assert window_state(window, now=T) == WindowState.UPCOMING
    assert window_state(window, now=T + D) == WindowState.RUNNING
    assert window_state(window, now=T + D + H) == WindowState.COMPLETED
    assert list(windows_active(now=T + D + H / 2)) == [window]


def test_a_start_a_moment_ago_counts_as_now(web):
    window = schedule([web.pk], starts_at=T - timedelta(minutes=4), ends_at=T + H)
    assert window_state(window, now=T) == WindowState.RUNNING


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"ends_at": T + D}, "ends_at", "must be after the start"),
        ({"ends_at": T + D - H}, "ends_at", "must be after the start"),
        ({"ends_at": T + 8 * D + H}, "ends_at", "at most 7 days"),
        ({"starts_at": T - timedelta(minutes=10)}, "starts_at", "in the past"),
        ({"starts_at": T - 3 * H, "ends_at": T - H}, "ends_at", "in the past"),
        ({"starts_at": datetime(2026, 6, 16, 12, 0)}, "starts_at", "time zone"),  # noqa: DTZ001
        ({"ends_at": None}, "ends_at", "is required"),
        ({"title": "   "}, "title", "may not be blank"),
        ({"title": "Upgrade\r\nBcc: victim@example.com"}, "title", "one line"),
        # The announcement's subject check, at save time: other control characters too.
        ({"title": "Upgrade\x1b[2J done"}, "title", "contains control characters"),
        ({"title": "Upgrade\u2028Bcc: victim@example.com"}, "title", "control characters"),
        ({"title": "Upgrade\x00"}, "title", "control characters"),
        ({"title": "x" * 201}, "title", "at most 200"),
        ({"description": "x" * 10_001}, "description", "at most 10000"),
    ],
)
def test_schedule_refuses_bad_input_naming_the_field(web, fields, field, message):
    with pytest.raises(InvalidInput, match=message) as refused:
        schedule([web.pk], **fields)
    assert refused.value.field == field
    assert not MaintenanceWindow.objects.exists()


@pytest.mark.parametrize(
    ("service_ids", "message"),
    [([], "at least one service"), ([999_999], "no service with id 999999"), ("1", "list")],
)
def test_schedule_refuses_missing_or_unknown_services(service_ids, message):
    with pytest.raises(InvalidInput, match=message) as refused:
        schedule(service_ids)
    assert refused.value.field == "services"
    assert not MaintenanceWindow.objects.exists()


# --- changing and cancelling -----------------------------------------------------------------


def test_a_change_to_a_title_with_control_characters_is_refused(web):
    window = schedule([web.pk])
    with pytest.raises(InvalidInput, match="control characters") as refused:
        maintenance_update(window=window, changes={"title": "Kernel\x7fupgrade"}, actor=None, now=T)
    assert refused.value.field == "title"
    window.refresh_from_db()
    assert window.title == "Database upgrade"


def test_an_upcoming_window_can_change_and_a_running_one_keeps_its_start(web, ledger):
    window = schedule([web.pk])
    maintenance_update(
        window=window,
        changes={"title": "Kernel upgrade", "service_ids": [ledger.pk], "ends_at": T + D + 3 * H},
        actor=None,
        now=T,
    )
    window.refresh_from_db()
    assert (window.title, window.ends_at) == ("Kernel upgrade", T + D + 3 * H)
    assert [s.name for s in window.services.all()] == ["Ledger"]

    running = T + D + H
    with pytest.raises(InvalidInput, match="its start cannot move") as refused:
        maintenance_update(window=window, changes={"starts_at": T + D + H}, actor=None, now=running)
    assert refused.value.field == "starts_at"
    maintenance_update(window=window, changes={"ends_at": T + D + 4 * H}, actor=None, now=running)
    window.refresh_from_db()
    assert window.ends_at == T + D + 4 * H

    with pytest.raises(InvalidInput, match="cannot be changed here"):
        maintenance_update(window=window, changes={"announced_at": T}, actor=None, now=running)


def test_ended_and_cancelled_windows_are_history(web):
    ended = schedule([web.pk], starts_at=T, ends_at=T + H)
    with pytest.raises(InvalidInput, match="has ended"):
        maintenance_update(window=ended, changes={"title": "New"}, actor=None, now=T + 2 * H)
    with pytest.raises(InvalidInput, match="has already ended"):
        maintenance_cancel(window=ended, actor=None, now=T + 2 * H)
    # Nothing to change is no change at all, whatever the window's state.
    assert maintenance_update(window=ended, changes={}, actor=None, now=T + 2 * H).title == (
        "Database upgrade"
    )

    upcoming = schedule([web.pk])
    cancelled = maintenance_cancel(window=upcoming, actor=None, now=T + H)
    assert (cancelled.cancelled_at, window_state(cancelled, now=T + D)) == (
        T + H,
        WindowState.CANCELLED,
    )
    assert maintenance_cancel(window=upcoming, actor=None, now=T + 2 * H).cancelled_at == T + H
    with pytest.raises(InvalidInput, match="was cancelled"):
        maintenance_update(window=upcoming, changes={"title": "New"}, actor=None, now=T + 2 * H)
    assert list(windows_active(now=T + D + H)) == []


def test_cancelling_a_running_window_ends_it_now(web):
    window = schedule([web.pk], starts_at=T, ends_at=T + 2 * H)
    ended = maintenance_cancel(window=window, actor=None, now=T + H)
    window.refresh_from_db()
    assert (window.ends_at, window.cancelled_at) == (T + H, None)
    assert ended.ends_at == T + H
    assert window_state(window, now=T + H) == WindowState.COMPLETED
    assert list(windows_active(now=T + H)) == []


# --- the admin -------------------------------------------------------------------------------


def login(client, user):
    client.force_login(user)
    return client


def admin_url(name: str, *args) -> str:
    return reverse(f"admin:incidents_maintenancewindow_{name}", args=args)


def form_data(services, *, title="Router swap", starts_at=T + D, ends_at=T + D + H):
    return {
        "title": title,
        "description": "Swap the edge routers.",
        "services": [s.pk for s in services],
        "starts_at_0": starts_at.strftime("%Y-%m-%d"),
        "starts_at_1": starts_at.strftime("%H:%M:%S"),
        "ends_at_0": ends_at.strftime("%Y-%m-%d"),
        "ends_at_1": ends_at.strftime("%H:%M:%S"),
    }


def test_admin_add_schedules_through_the_service(client, staff, web, settings):
    settings.TIME_ZONE = "UTC"
    with time_machine.travel(T, tick=False):
        login(client, staff)
        assert client.get(admin_url("add")).status_code == 200
        response = client.post(admin_url("add"), form_data([web]))
    assert response.status_code == 302, response.content.decode()[:2000]
    window = MaintenanceWindow.objects.get()
    assert (window.title, window.starts_at, window.created_by) == ("Router swap", T + D, staff)
    assert [s.name for s in window.services.all()] == ["Web"]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"ends_at": T + D - H}, "must be after the start."),
        ({"starts_at": T - D, "ends_at": T + H}, "is in the past."),
        ({"title": "x" * 201}, "Ensure this value has at most 200 characters"),
        ({"title": "Router\x07swap"}, "contains control characters: it goes in email subjects."),
    ],
)
def test_admin_add_shows_the_refusal_beside_the_field_and_saves_nothing(
    client, staff, web, settings, changes, error
):
    settings.TIME_ZONE = "UTC"
    with time_machine.travel(T, tick=False):
        login(client, staff)
        response = client.post(admin_url("add"), form_data([web], **changes))
    assert response.status_code == 200
    assert error in response.content.decode()
    assert not MaintenanceWindow.objects.exists()


def test_admin_change_uses_the_service_and_keeps_a_running_start(client, staff, web, ledger):
    window = MaintenanceWindowFactory(
        title="Upgrade", services=[web], starts_at=T - H, ends_at=T + H, created_at=T - D
    )
    with time_machine.travel(T, tick=False):
        login(client, staff)
        page = client.get(admin_url("change", window.pk)).content.decode()
        assert 'name="starts_at_0"' not in page  # read-only while it runs
        data = form_data([web, ledger], title="Upgrade, longer", ends_at=T + 3 * H)
        response = client.post(admin_url("change", window.pk), data)
    assert response.status_code == 302
    window.refresh_from_db()
    assert (window.title, window.starts_at, window.ends_at) == ("Upgrade, longer", T - H, T + 3 * H)
    assert sorted(s.name for s in window.services.all()) == ["Ledger", "Web"]


def test_admin_shows_past_windows_read_only_and_offers_no_delete(client, staff, web):
    window = MaintenanceWindowFactory(services=[web], starts_at=T - 3 * H, ends_at=T - H)
    with time_machine.travel(T, tick=False):
        login(client, staff)
        page = client.get(admin_url("change", window.pk)).content.decode()
        listing = client.get(admin_url("changelist")).content.decode()
    assert 'name="title"' not in page
    assert "Completed" in page
    assert "delete_selected" not in listing


def test_admin_filters_by_when(client, staff, web):
    MaintenanceWindowFactory(title="Soon", services=[web], starts_at=T + H)
    MaintenanceWindowFactory(title="Now", services=[web], starts_at=T - H, ends_at=T + H)
    MaintenanceWindowFactory(title="Before", services=[web], starts_at=T - 3 * H, ends_at=T - H)
    MaintenanceWindowFactory(title="Dropped", services=[web], starts_at=T + H, cancelled_at=T - H)
    shown = {}
    with time_machine.travel(T, tick=False):
        login(client, staff)
        for when in ("upcoming", "running", "past", "cancelled"):
            page = client.get(admin_url("changelist") + f"?when={when}").content.decode()
            shown[when] = [t for t in ("Soon", "Now", "Before", "Dropped") if f">{t}<" in page]
    assert shown == {
        "upcoming": ["Soon"],
        "running": ["Now"],
        "past": ["Before"],
        "cancelled": ["Dropped"],
    }


def test_admin_changelist_queries_do_not_grow(client, staff, web, ledger):
    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert client.get(admin_url("changelist")).status_code == 200
        return len(queries)

    def make(n: int) -> None:
        for i in range(n):
            MaintenanceWindowFactory(services=[web, ledger], starts_at=T + i * H)

    with time_machine.travel(T, tick=False):
        login(client, staff)
        make(3)
        small = count()
        make(40)
        large = count()
    assert large == small
    assert small <= 9


def test_admin_cancel_action_reports_each_window(client, staff, web):
    upcoming = MaintenanceWindowFactory(title="Soon", services=[web], starts_at=T + H)
    running = MaintenanceWindowFactory(title="Now", services=[web], starts_at=T - H, ends_at=T + H)
    ended = MaintenanceWindowFactory(
        title="Before", services=[web], starts_at=T - 3 * H, ends_at=T - H
    )
    with time_machine.travel(T, tick=False):
        login(client, staff)
        response = client.post(
            admin_url("changelist"),
            {"action": "cancel_windows", "_selected_action": [upcoming.pk, running.pk, ended.pk]},
            follow=True,
        )
    texts = [str(m) for m in response.context["messages"]]
    assert texts == [
        "Not cancelled: window: “Before” has already ended.",
        "“Now” ended now.",
        "“Soon” cancelled.",
    ]
    upcoming.refresh_from_db()
    running.refresh_from_db()
    assert (upcoming.cancelled_at, running.ends_at) == (T, T)


# --- the announcement ------------------------------------------------------------------------


def deliver(notice: CustomerNotice) -> None:
    """What the worker does with the queued batch."""
    notices.notice_deliver_batch(notice_id=notice.pk)


def test_announcing_mails_each_subscriber_of_its_public_services_once(
    smtp_server,  # noqa: F811
    client,
    staff,
    web,
    ledger,
    settings,
    django_capture_on_commit_callbacks,
):
    settings.SITE_NAME = "Acme Status"
    settings.SITE_URL = "https://status.example.com"
    search = ServiceFactory(name="Search", slug="search")
    followers = [SubscriberFactory(services=[web]) for _ in range(2)]
    everything = SubscriberFactory(all_services=True)
    SubscriberFactory(services=[search])  # another service
    SubscriberFactory(services=[web], confirmed_at=None)  # never confirmed
    window = MaintenanceWindowFactory(
        title="Router swap",
        description="Expect a short blip.",
        services=[web],
        starts_at=T + D,
        ends_at=T + D + H,
    )

    with (
        time_machine.travel(T, tick=False),
        django_capture_on_commit_callbacks(execute=False) as queued,
    ):
        login(client, staff)
        response = client.post(
            admin_url("changelist"),
            {"action": "announce_windows", "_selected_action": [window.pk]},
            follow=True,
        )
    assert [str(m) for m in response.context["messages"]] == [
        "“Router swap” announced to 3 subscribers."
    ]
    assert len(queued) == 1  # one batch, queued on commit
    notice = CustomerNotice.objects.get()
    assert (notice.kind, notice.maintenance, notice.status) == (
        "maintenance",
        window,
        NoticeStatus.SENDING,
    )
    deliver(notice)

    received = smtp_server.messages
    assert sorted(m["To"] for m in received) == sorted(s.email for s in [*followers, everything])
    message = received[0]
    assert message["Subject"] == "Acme Status maintenance: Router swap"
    text, html = parts(message)
    assert "2026-06-16 12:00 UTC" in text
    assert "2026-06-16 13:00 UTC" in text
    assert "Expect a short blip." in text
    assert "https://status.example.com/status/" in text
    assert "Router swap" in html
    window.refresh_from_db()
    assert window.announced_at == T
    notice.refresh_from_db()
    assert notice.status == NoticeStatus.SENT

    # A second announcement is refused and sends nothing.
    with time_machine.travel(T + H, tick=False):
        again = client.post(
            admin_url("changelist"),
            {"action": "announce_windows", "_selected_action": [window.pk]},
            follow=True,
        )
    assert [str(m) for m in again.context["messages"]] == [
        "Not announced: window: “Router swap” was announced at 2026-06-15 12:00 UTC."
    ]
    assert CustomerNotice.objects.count() == 1
    assert len(smtp_server.messages) == 3


def test_announcing_is_refused_for_history_and_private_windows(web, ledger):
    private = MaintenanceWindowFactory(services=[ledger], starts_at=T + D)
    with pytest.raises(InvalidInput, match="no public service") as refused:
        maintenance_announce(window=private, actor=None, now=T)
    assert refused.value.field == "services"
    ended = MaintenanceWindowFactory(services=[web], starts_at=T - 3 * H, ends_at=T - H)
    with pytest.raises(InvalidInput, match="has ended"):
        maintenance_announce(window=ended, actor=None, now=T)
    dropped = MaintenanceWindowFactory(services=[web], starts_at=T + H, cancelled_at=T - H)
    with pytest.raises(InvalidInput, match="was cancelled"):
        maintenance_announce(window=dropped, actor=None, now=T)
    assert not CustomerNotice.objects.exists()
    assert not MaintenanceWindow.objects.filter(announced_at__isnull=False).exists()


def test_a_window_nobody_follows_is_announced_to_nobody(web):
    window = MaintenanceWindowFactory(services=[web], starts_at=T + D)
    assert maintenance_announce(window=window, actor=None, now=T) == 0
    window.refresh_from_db()
    assert window.announced_at == T
    assert CustomerNotice.objects.get().status == NoticeStatus.SENT


@pytest.mark.django_db(transaction=True)
def test_two_announcements_at_once_send_one_notice(web):
    """Two connections announce the same window at the same moment: the row lock and the
    compare-and-set on announced_at let exactly one through."""
    # Nobody follows the service, so no batch is queued to the broker.
    window = MaintenanceWindowFactory(services=[web], starts_at=T + D)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def announce() -> None:
        try:
            barrier.wait(timeout=10)
            maintenance_announce(window=window.pk, actor=None, now=T)
            outcomes.append("sent")
        except InvalidInput as error:
            outcomes.append(str(error))
        finally:
            connection.close()

    threads = [threading.Thread(target=announce) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    refused = [outcome for outcome in outcomes if outcome != "sent"]
    assert len(outcomes) == 2
    assert len(refused) == 1
    assert "was announced at" in refused[0]
    assert CustomerNotice.objects.count() == 1
