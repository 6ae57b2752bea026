"""Create one demo login per role (embedded demo mode only)."""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError

from registry.roles import ROLES

DEMO_PASSWORD = "demo-password-change-me"  # noqa: S105 - documented demo credential


class Command(BaseCommand):
    help = "Create demo users (admin, clinician, coordinator, qi_analyst) for `make run`."

    def handle(self, *args, **options) -> None:
        if not settings.DEMO_MODE:
            raise CommandError("Demo users are only created with DEMO_MODE=true.")
        user_model = get_user_model()
        for role in ROLES:
            if role == "feed":
                continue
            user, created = user_model.objects.get_or_create(username=f"demo-{role}")
            if created:
                user.set_password(DEMO_PASSWORD)
                user.is_staff = role == "admin"
                user.is_superuser = role == "admin"
                user.save()
            user.groups.set([Group.objects.get(name=role)])
        self.stdout.write(f"Demo users: demo-<role>, password {DEMO_PASSWORD}")
