from core.cli import BadInput, KasaCommand
from customers.models import Customer
from operations.cli import add_run_arguments, enqueued_or_run_here
from upgrades.management.commands.upgrade import report
from upgrades.models import Upgrade
from upgrades.services import UpgradeInputError, rollback_start


class Command(KasaCommand):
    help = ("Roll back a customer's last successful upgrade: safety backup, stop, previous releases back, "
            "databases from the pre-upgrade backup, start, health check. Exit 0 only when it succeeded.")

    def add_arguments(self, parser):
        parser.add_argument("domain")
        parser.add_argument("--switch-back", action="store_true",
                            help="go back to the previous release a blue-green upgrade keeps running for its grace "
                                 "period: links and processes only, the databases as they are, no backup")
        add_run_arguments(parser)

    def handle(self, *args, **o):
        customer = Customer.objects.filter(domain=o["domain"].lower()).first()
        if customer is None:
            raise BadInput(f"no customer with domain {o['domain']!r}")
        try:
            run = rollback_start(customer, via="cli", enqueue=o["enqueue"], switch_back=o["switch_back"])
        except UpgradeInputError as exc:
            raise BadInput(str(exc)) from None
        run = enqueued_or_run_here(self, run, enqueue=o["enqueue"], wait=o["wait"], what="rollback")
        if run is None:
            return
        report(self, Upgrade.objects.select_related("customer").get(run=run), run)
