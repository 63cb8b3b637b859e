from django.apps import AppConfig

from core import permissions
from customers import page
from operations import registry


class BackupsConfig(AppConfig):
    name = "backups"

    def ready(self):
        from hosts import services as host_services  # imports models: not before the apps are loaded

        # A dead backup's partial objects are on its storage target, which every worker reaches.
        registry.register("backup", "backups.operations.backup", mutating=True,
                          on_abandon="backups.operations.abandon", abandon_anywhere=True)
        registry.register("restore", "backups.restore.restore", mutating=True, on_abandon="backups.restore.abandon")
        # A remote restore's journal that a lost host kept is replayed once the host answers its probe again.
        host_services.add_journal_hook("backups.host_journals.replay_from_probe")
        # A drill touches no customer file or database: it may run beside a backup (not beside another drill).
        registry.register("verify", "backups.verify.verify", mutating=False)
        for kind in ("backup", "restore", "verify"):  # what the run page shows of each
            registry.register_details(kind, f"backups.live.{kind}_details")
        # The customer's page (customers.page): backups, chart, restores and drills, recovery figures, Back up now.
        page.register_card("backups.customer_page.backups_card")
        page.register_card("backups.customer_page.recovery_card")
        page.register_page("backup", "backups.views.backup_now_view")
        # Moving to another host (backups.move): the page, and the confirmation that deletes the old copy.
        page.register_page("move", "backups.move_views.move_view")
        page.register_page("move_confirm", "backups.move_views.move_confirm_view")
        page.register_action("backups.customer_page.backup_action", permission=permissions.BACKUP)
