from django.core.management.base import BaseCommand

from incidents.demo import DEMO_ADMIN, demo_password, load_demo


class Command(BaseCommand):
    help = "Load demo services, severities, users and incidents. Safe to run again."

    def handle(self, *args, **options):
        created = load_demo()
        summary = ", ".join(f"{count} {name}" for name, count in created.items())
        self.stdout.write(f"Demo data ready (created now: {summary}).")
        self.stdout.write(f"Admin login: {DEMO_ADMIN} / {demo_password()}")
