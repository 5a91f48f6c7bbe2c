"""`manage.py create_integration`: the token and URL printed once, only a hash stored, and
every mistake refused with one line and nothing created."""

import re
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command, execute_from_command_line
from django.core.management.base import CommandError
from django.test import override_settings

from incidents.ingestion.services import integration_by_token, token_hash
from incidents.models import Integration

from .factories import ServiceFactory, SeverityFactory, TeamFactory

pytestmark = pytest.mark.django_db
SITE = "https://tracker.example.com"


def run(*args: str) -> str:
    out = StringIO()
    call_command("create_integration", *args, stdout=out)
    return out.getvalue()


def printed_token(output: str) -> str:
    return re.search(r"^Token:\s+(\S+)$", output, re.MULTILINE).group(1)


@override_settings(SITE_URL=SITE)
def test_alertmanager_integration_prints_its_token_and_url_once_and_stores_the_hash():
    sev2, service, team = SeverityFactory(level=2), ServiceFactory(slug="api"), TeamFactory()
    output = run(
        "--kind",
        "alertmanager",
        "--name",
        "Prometheus",
        "--severity",
        "2",
        "--service",
        "api",
        "--team",
        team.slug,
        "--heartbeat-minutes",
        "5",
        "--no-auto-resolve",
    )
    token = printed_token(output)
    assert len(token) >= 22  # at least 128 bits, URL-safe
    assert f"{SITE}/api/v1/integrations/{token}/alertmanager/" in output
    assert f"{SITE}/api/v1/integrations/{token}/heartbeat/" in output

    integration = Integration.objects.get(name="Prometheus")
    assert integration.token_hash == token_hash(token)
    assert token not in {str(v) for v in Integration.objects.values().get().values()}
    assert integration_by_token(token) == integration
    assert (integration.kind, integration.default_severity, integration.default_service) == (
        "alertmanager",
        sev2,
        service,
    )
    assert integration.default_team == team
    assert integration.heartbeat_interval == timedelta(minutes=5)
    assert integration.heartbeat_due_at is not None
    assert integration.auto_resolve is False


@override_settings(SITE_URL=SITE)
def test_generic_and_events_v2_print_their_own_endpoints():
    generic = run("--kind", "generic", "--name", "Cron checks")
    token = printed_token(generic)
    assert f"{SITE}/api/v1/integrations/{token}/generic/" in generic
    assert "heartbeat" not in generic.lower()

    events = run("--kind", "events_v2", "--name", "Datadog")
    token = printed_token(events)
    assert f"{SITE}/api/v1/events/v2/enqueue" in events
    assert re.search(rf"^routing_key:\s+{re.escape(token)}$", events, re.MULTILINE)
    assert Integration.objects.get(name="Datadog").auto_resolve is True


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--kind", "nagios", "--name", "X"], "--kind 'nagios' is not one of"),
        (["--name", "X"], "--kind is required"),
        (["--kind", "generic"], "--name is required"),
        (["--kind", "generic", "--name", "  "], "--name is required"),
        (["--kind", "generic", "--name", "Taken"], "an integration named 'Taken' exists already"),
        (["--kind", "generic", "--name", "X", "--severity", "7"], "no such severity level"),
        (["--kind", "generic", "--name", "X", "--severity", "high"], "is not a whole number"),
        (["--kind", "generic", "--name", "X", "--service", "nope"], "no service has this slug"),
        (["--kind", "generic", "--name", "X", "--team", "nope"], "no team has this slug"),
        (["--kind", "generic", "--name", "X", "--heartbeat-minutes", "0"], "at least 1"),
        (["--kind", "generic", "--name", "X", "--heartbeat-minutes", "5m"], "not a whole number"),
        (["--kind", "generic", "--name", "N" * 101], "at most 100 characters"),
    ],
)
def test_bad_input_is_refused_with_one_line_and_nothing_created(args, problem):
    SeverityFactory(level=1)
    run("--kind", "generic", "--name", "Taken")
    before = list(Integration.objects.values_list("pk", "token_hash"))

    with pytest.raises(CommandError) as refused:
        run(*args)

    message = str(refused.value)
    assert problem in message
    assert "\n" not in message
    assert list(Integration.objects.values_list("pk", "token_hash")) == before


# run_from_argv closes the database connections when it ends: a transactional test reconnects.
@pytest.mark.django_db(transaction=True)
def test_from_the_command_line_a_refusal_exits_non_zero_with_one_line(capsys):
    SeverityFactory(level=1)
    with pytest.raises(SystemExit) as exited:
        execute_from_command_line(
            [
                "manage.py",
                "create_integration",
                "--kind",
                "generic",
                "--name",
                "X",
                "--severity",
                "9",
            ]
        )
    assert exited.value.code != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["CommandError: --severity 9: no such severity level (levels: 1)."]
    assert not Integration.objects.exists()
