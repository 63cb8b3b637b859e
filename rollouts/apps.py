from django.apps import AppConfig

from core import permissions
from customers import page
from operations import registry


class RolloutsConfig(AppConfig):
    name = "rollouts"
    verbose_name = "Rollouts"

    def ready(self):
        registry.add_end_hook("rollouts.tasks.on_run_end")
        # The customers changelist: "Roll out a release to the selected customers…" (customers.page).
        page.register_action("rollouts.views.rollout_action", permission=permissions.ROLLOUT)
