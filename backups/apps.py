from django.apps import AppConfig


class BackupsConfig(AppConfig):
    name = "backups"

    def ready(self):
        from operations import registry

        registry.register("backup", "backups.operations.backup", mutating=True,
                          on_abandon="backups.operations.abandon")
        registry.register("restore", "backups.restore.restore", mutating=True, on_abandon="backups.restore.abandon")
        # A drill touches no customer file or database: it may run beside a backup (not beside another drill).
        registry.register("verify", "backups.verify.verify", mutating=False)
        for kind in ("backup", "restore", "verify"):  # what the run page shows of each
            registry.register_details(kind, f"backups.live.{kind}_details")
