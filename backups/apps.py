from django.apps import AppConfig


class BackupsConfig(AppConfig):
    name = "backups"

    def ready(self):
        from operations import registry

        registry.register("backup", "backups.operations.backup", mutating=True,
                          on_abandon="backups.operations.abandon")
