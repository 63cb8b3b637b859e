from django.apps import AppConfig

from operations import registry


class CustomersConfig(AppConfig):
    name = "customers"

    def ready(self):
        registry.register("check", "customers.operations.check", mutating=False)
        registry.add_guard("customers.operations.guard")
        registry.register_replay("customer_versions", "customers.replays.replay_versions")
        registry.register_details("check", "customers.live.check_details")
