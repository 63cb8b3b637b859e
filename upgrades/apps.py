from django.apps import AppConfig


class UpgradesConfig(AppConfig):
    name = "upgrades"

    def ready(self):
        from operations import registry

        # Both change the customer (one mutating run per customer at a time); a dead worker's journal is
        # undone by on_abandon (the reaper, or a redelivery of the task).
        registry.register("upgrade", "upgrades.operations.upgrade", mutating=True,
                          on_abandon="upgrades.operations.abandon")
        registry.register("rollback", "upgrades.operations.rollback", mutating=True,
                          on_abandon="upgrades.operations.abandon")
