from django.apps import AppConfig

from operations import registry


class RolloutsConfig(AppConfig):
    name = "rollouts"
    verbose_name = "Rollouts"

    def ready(self):
        registry.add_end_hook("rollouts.tasks.on_run_end")
