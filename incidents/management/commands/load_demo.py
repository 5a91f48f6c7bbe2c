from django.core.management.base import BaseCommand

from incidents.demo import DEMO_ADMIN, demo_password, load_demo


class Command(BaseCommand):
    help = "Load demo services, severities, users and incidents. Safe to run again."

    def add_arguments(self, parser):
        parser.add_argument("--admin-url", default="", help="Print this as the admin's address.")

    def handle(self, *args, admin_url: str = "", **options):
        created = load_demo(out=self.stdout)
        summary = ", ".join(f"{count} {name}" for name, count in created.items())
        self.stdout.write(f"Demo data ready (created now: {summary}).")
        if admin_url:
            self.stdout.write(f"\n  Admin:  {admin_url}")
        self.stdout.write(f"  Login:  {DEMO_ADMIN} / {demo_password()}\n")
