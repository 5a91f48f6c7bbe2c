"""`manage.py create_integration --kind alertmanager --name Prometheus`: make an alert source
and print its token and webhook URL, once (only a hash of the token is stored)."""

from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from escalation.models import Team
from incidents.admin_alerts import integration_endpoints
from incidents.exceptions import DomainError
from incidents.ingestion.services import integration_create
from incidents.models import IntegrationKind, Service, Severity


class Command(BaseCommand):
    help = (
        "Create an alert integration and print its token and URL. The token is shown only "
        "now: keep it (a lost token is replaced by rotating it in the admin)."
    )

    def add_arguments(self, parser):
        # Checked in handle(), not by argparse, so every mistake is one CommandError line.
        parser.add_argument("--kind", default="", help=f"One of {', '.join(IntegrationKind)}.")
        parser.add_argument("--name", default="", help="A unique name, e.g. Prometheus.")
        parser.add_argument(
            "--severity", default="", help="Default severity level (a number, e.g. 2)."
        )
        parser.add_argument("--service", default="", help="Default service (its slug).")
        parser.add_argument("--team", default="", help="Default team (its slug).")
        parser.add_argument(
            "--heartbeat-minutes",
            default="",
            help="Expect a heartbeat this often; a missed one opens an incident.",
        )
        parser.add_argument(
            "--no-auto-resolve",
            action="store_true",
            help="Keep incidents open when their alerts resolve.",
        )

    def handle(self, *args, **options):
        kind = options["kind"].strip()
        if not kind:
            raise CommandError(f"--kind is required: one of {', '.join(IntegrationKind)}.")
        if kind not in IntegrationKind.values:
            raise CommandError(
                f"--kind {kind!r} is not one of {', '.join(IntegrationKind.values)}."
            )
        name = options["name"].strip()
        if not name:
            raise CommandError("--name is required and may not be blank.")
        integration, token = self._create(kind, name, options)
        endpoints = integration_endpoints(integration, token)
        write = self.stdout.write
        write(f"Created integration {integration.name!r} ({integration.get_kind_display()}).")
        write(f"Token:        {token}")
        if kind == IntegrationKind.EVENTS_V2:
            write(f"Events URL:   {endpoints.webhook_url}")
            write(f"routing_key:  {endpoints.routing_key}")
        else:
            write(f"Webhook URL:  {endpoints.webhook_url}")
        if endpoints.heartbeat_url:
            write(f"Heartbeat:    {endpoints.heartbeat_url} (POST or GET)")
        write("The token is shown only now; only a hash of it is stored.")

    def _create(self, kind: str, name: str, options: dict):
        fields: dict = {"auto_resolve": not options["no_auto_resolve"]}
        severity = None
        if options["severity"]:
            level = _positive_int("--severity", options["severity"])
            severity = Severity.objects.filter(level=level).first()
            if severity is None:
                levels = ", ".join(str(v) for v in Severity.objects.values_list("level", flat=True))
                raise CommandError(
                    f"--severity {level}: no such severity level (levels: {levels or 'none'})."
                )
        if options["service"]:
            fields["default_service"] = Service.objects.filter(slug=options["service"]).first()
            if fields["default_service"] is None:
                raise CommandError(f"--service {options['service']!r}: no service has this slug.")
        if options["team"]:
            fields["default_team"] = Team.objects.filter(slug=options["team"]).first()
            if fields["default_team"] is None:
                raise CommandError(f"--team {options['team']!r}: no team has this slug.")
        heartbeat = None
        if options["heartbeat_minutes"]:
            heartbeat = timedelta(
                minutes=_positive_int("--heartbeat-minutes", options["heartbeat_minutes"])
            )
        try:
            return integration_create(
                name=name,
                kind=kind,
                default_severity=severity,
                heartbeat_interval=heartbeat,
                **fields,
            )
        except DomainError as error:
            raise CommandError(str(error)) from error
        except ValidationError as error:
            problems = "; ".join(
                f"{field}: {' '.join(messages)}" for field, messages in error.message_dict.items()
            )
            raise CommandError(problems) from error


def _positive_int(option: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise CommandError(f"{option} {raw!r} is not a whole number.") from None
    if value < 1:
        raise CommandError(f"{option} must be at least 1, not {value}.")
    return value
