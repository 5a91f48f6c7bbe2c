"""End to end in a real headless Chromium: a responder acknowledges an incident in the admin.

Needs Debian's chromium and chromium-driver. Without them the test is skipped, except with
CI=true, where it fails: the browser check may not silently disappear there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.urls import reverse
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from incidents.defaults import ensure_groups, ensure_roles
from incidents.models import EventKind, Incident, IncidentStatus, TimelineEvent
from tests.incidents.factories import UserFactory, declare

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
CHROMIUM = "/usr/bin/chromium"
WAIT_SECONDS = 20
PASSWORD = "pw"  # what UserFactory sets

pytestmark = pytest.mark.browser


def _missing_browser_parts(driver_path: str) -> list[str]:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"chromium ({CHROMIUM})")
    if not os.access(driver_path, os.X_OK):
        missing.append(f"chromedriver ({driver_path})")
    return missing


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = _missing_browser_parts(driver_path)
    if missing:
        message = f"{' and '.join(missing)} not found"
        if IN_CI:
            pytest.fail(f"CI=true needs a browser for the admin tests: {message}.")
        pytest.skip(f"{message}; install with `apt-get install chromium chromium-driver`")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1024",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=ChromeService(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def plain_static_storage(settings) -> None:
    """Static URLs without a collectstatic manifest, whatever STATIC_MANIFEST says.

    The live server serves static files from the finders; with the manifest storage every
    `{% static %}` would raise "Missing staticfiles manifest entry" unless collectstatic ran.
    """
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    """WebDriverWait, failing with what was awaited and where the browser is instead."""
    try:
        return WebDriverWait(driver, WAIT_SECONDS).until(condition)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text[:2000]
        pytest.fail(
            f"Timed out after {WAIT_SECONDS}s waiting for {what}.\n"
            f"URL: {driver.current_url}\nTitle: {driver.title}\nPage text:\n{body}"
        )


def visible(driver: WebDriver, css: str) -> WebElement:
    return wait_for(driver, EC.visibility_of_element_located((By.CSS_SELECTOR, css)), css)


def timeline_rows(driver: WebDriver) -> list[tuple[str, str]]:
    """(kind, actor) of each row of the Timeline inline, as displayed."""
    rows = driver.find_elements(By.CSS_SELECTOR, "#timeline-group tr.form-row")
    return [
        (
            row.find_element(By.CSS_SELECTOR, "td.field-kind").text.strip(),
            row.find_element(By.CSS_SELECTOR, "td.field-actor_name").text.strip(),
        )
        for row in rows
    ]


def test_responder_acknowledges_an_incident_from_its_change_page(
    live_server, browser: WebDriver, plain_static_storage
):
    # The live server's database is flushed after every test, groups and roles with it.
    ensure_groups(apps)
    ensure_roles(apps)
    user = UserFactory(username="responder", groups=["Responders"])
    assert not user.is_superuser
    assert user.has_perms(["incidents.change_incident", "incidents.view_timelineevent"])
    incident = declare(title="Checkout is down")
    changelist = reverse("admin:incidents_incident_changelist")
    change_page = reverse("admin:incidents_incident_change", args=[incident.pk])

    # Log in through the admin's form, which then sends us to the changelist.
    browser.get(f"{live_server.url}{reverse('admin:login')}?next={changelist}")
    visible(browser, "#id_username").send_keys(user.username)
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click()
    wait_for(browser, EC.url_to_be(f"{live_server.url}{changelist}"), "the changelist")

    # The changelist lists the incident; its reference links to the change page.
    visible(browser, "#result_list")
    browser.find_element(By.CSS_SELECTOR, "#result_list").find_element(
        By.LINK_TEXT, incident.reference
    ).click()
    wait_for(browser, EC.url_to_be(f"{live_server.url}{change_page}"), "the change page")
    assert visible(browser, "#incident-transitions .badge").text == "Triggered"
    assert ("Acknowledged", user.username) not in timeline_rows(browser)

    # Acknowledge: the form posts, and the transition view redirects back to the change page.
    button = visible(browser, "button[data-transition='acknowledged']")
    assert button.text == "Acknowledged"
    button.click()
    wait_for(browser, EC.staleness_of(button), "the page to reload after the transition")
    wait_for(browser, EC.url_to_be(f"{live_server.url}{change_page}"), "the redirect back")

    message = visible(browser, ".messagelist .success")
    assert f"{incident.reference.lower()} is now acknowledged" in message.text.lower()
    badge = visible(browser, "#incident-transitions .badge")
    assert badge.text == "Acknowledged"
    # The static files were served: incidents/admin.css colours the badge, admin JS loaded.
    assert badge.value_of_css_property("background-color") == "rgba(217, 72, 15, 1)"
    assert browser.execute_script("return typeof window.django?.jQuery === 'function'")
    assert not browser.find_elements(By.CSS_SELECTOR, "button[data-transition='acknowledged']")
    visible(browser, "#timeline-group")
    rows = timeline_rows(browser)
    assert ("Acknowledged", user.username) in rows, rows
    assert ("Declared", "system") in rows, rows

    incident = Incident.objects.get(pk=incident.pk)
    assert incident.status == IncidentStatus.ACKNOWLEDGED
    assert incident.acknowledged_at is not None
    assert TimelineEvent.objects.filter(
        incident=incident, kind=EventKind.ACKNOWLEDGED, actor=user
    ).exists()
