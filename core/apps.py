from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Kasa core"

    def ready(self):
        from . import checks  # noqa: F401 (registers Kasa's deployment checks)
