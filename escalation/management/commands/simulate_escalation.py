import json
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from escalation.simulation import simulate
from incidents.formatting import humanize_duration
from incidents.models import Severity


class Command(BaseCommand):
    help = (
        "Print who would be paged when, and how, if nobody acknowledged an incident of this "
        "severity now. Pages nobody."
    )

    def add_arguments(self, parser):
        parser.add_argument("--severity", type=int, required=True, help="Severity level, e.g. 1")
        parser.add_argument("--minutes", type=int, help="Only the first M minutes.")
        parser.add_argument("--json", action="store_true", help="Machine-readable output.")

    def handle(self, *args, severity: int, minutes: int | None, json: bool, **options):
        found = Severity.objects.select_related("escalation_policy").filter(level=severity).first()
        if found is None:
            levels = ", ".join(str(s) for s in Severity.objects.values_list("level", flat=True))
            raise CommandError(f"No severity level {severity} (known: {levels or 'none'}).")
        if minutes is not None and minutes < 0:
            raise CommandError("--minutes must be zero or more.")
        if found.escalation_policy is None:
            raise CommandError(f"{found.name} has no escalation policy: nobody would be paged.")
        start = timezone.now()
        horizon = timedelta(minutes=minutes) if minutes is not None else None
        pages = simulate(found.escalation_policy, start=start, horizon=horizon)
        if json:
            self.stdout.write(
                _json_dumps(
                    {
                        "severity": found.name,
                        "policy": found.escalation_policy.name,
                        "start": start.isoformat(),
                        "pages": [p.as_json() for p in pages],
                    }
                )
            )
            return
        self.stdout.write(
            f"{found.name}: policy {found.escalation_policy.name}, if nobody acknowledges:"
        )
        if not pages:
            self.stdout.write("  nobody would be paged.")
        for page in pages:
            self.stdout.write(
                f"  +{humanize_duration(page.offset):>7}  step {page.step}"
                f"{f' (round {page.round})' if page.round > 1 else ''}  {page.person}  "
                f"{page.method}{' (backup)' if page.backup else ''}  {page.address}"
                f"  [{page.condition}]"
            )


def _json_dumps(data) -> str:
    return json.dumps(data, indent=2)
