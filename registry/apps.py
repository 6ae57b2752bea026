from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Clinical registry"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from registry.roles import ensure_roles

        post_migrate.connect(ensure_roles, sender=self)
