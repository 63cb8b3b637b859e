from backups.models import Backup
from backups.move_service import customer_move, move_confirm
from backups.services import BackupInputError
from core.cli import BadInput, KasaCommand
from customers.models import Customer
from engines.humanize import human_duration
from operations.cli import add_run_arguments, run_in_command
from operations.services import OperationRefused


class Command(KasaCommand):
    help = ("Move a customer to another host (--to NAME: its newest verified backup, or --backup ID, restored there, "
            "started, health-checked, then the customer switched; the old copy is stopped and kept), or, after a "
            "move, delete the old copy (--confirm).")

    def add_arguments(self, parser):
        parser.add_argument("domain")
        parser.add_argument("--to", metavar="HOST", help="the host to move to")
        parser.add_argument("--backup", type=int, metavar="ID", help="this backup (default: the newest verified one)")
        parser.add_argument("--confirm", action="store_true",
                            help="the move is confirmed: delete the old copy it left on the previous host")
        add_run_arguments(parser)

    def handle(self, *args, **o):
        customer = Customer.objects.select_related("host").filter(domain=o["domain"].lower()).first()
        if customer is None:
            raise BadInput(f"no customer {o['domain']}")
        if o["confirm"] == bool(o["to"]):
            raise BadInput("give either --to HOST (move) or --confirm (delete the old copy of a move)")
        if o["confirm"]:
            try:
                gone = move_confirm(customer, via="cli")
            except (BackupInputError, OperationRefused) as exc:
                raise BadInput(str(exc)) from None
            text = f"deleted the old copy of {customer} on host {gone['host']} ({gone['root']})"
            if self.json_output:
                self.emit({"customer": customer.domain, "deleted": gone})
            else:
                self.stdout.write(text)
            return
        backup = None
        if o["backup"]:
            backup = Backup.objects.filter(pk=o["backup"], customer=customer).first()
            if backup is None:
                raise BadInput(f"no backup #{o['backup']} of {customer}")
        try:
            run = customer_move(customer, host=o["to"], backup=backup, via="cli", enqueue=o["enqueue"])
        except (BackupInputError, OperationRefused) as exc:
            raise BadInput(str(exc)) from None
        run_in_command(self, run, enqueue=o["enqueue"], wait=o["wait"], what=f"move of {customer}",
                       done_text=lambda run: f"moved {customer} to host {run.result.get('host')} in "
                                             f"{human_duration(run.result.get('seconds', run.duration))}; the old "
                                             f"copy stays on {run.result.get('from_host')} at "
                                             f"{run.result.get('old_root')} until --confirm")
