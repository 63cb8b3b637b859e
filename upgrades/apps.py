from django.apps import AppConfig

from customers import page
from operations import registry


class UpgradesConfig(AppConfig):
    name = "upgrades"

    def ready(self):
        # Both change the customer (one mutating run per customer at a time); a dead worker's journal is
        # undone by on_abandon (the reaper, or a redelivery of the task).
        registry.register("upgrade", "upgrades.operations.upgrade", mutating=True,
                          on_abandon="upgrades.operations.abandon")
        registry.register("rollback", "upgrades.operations.rollback", mutating=True,
                          on_abandon="upgrades.operations.abandon")
        # A restore, upgrade or rollback first stops the previous release a blue-green upgrade kept running.
        registry.add_guard("upgrades.standby.end_before_run")
        # What a way back records while the control database does not answer, made at reconciliation.
        registry.register_replay("upgrade_step", "upgrades.journal.replay_step")
        registry.register_replay("upgrade_outcome", "upgrades.rollback.replay_outcome")
        registry.register_details("upgrade", "upgrades.live.upgrade_details")
        registry.register_details("rollback", "upgrades.live.upgrade_details")
        # The customer's page (customers.page): the Versions card and history, "Upgrade to…", "Roll back".
        page.register_card("upgrades.customer_page.versions")
        page.register_page("upgrade", "upgrades.views.upgrade_view")
        page.register_page("rollback", "upgrades.views.rollback_view")
