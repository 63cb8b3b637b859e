from backups.models import Backup
from backups.services import backup_document
from core.cli import BadInput, KasaCommand
from customers.models import Customer
from engines.humanize import human_size, human_time


class Command(KasaCommand):
    help = "List backups (newest first), optionally of one customer."

    def add_arguments(self, parser):
        parser.add_argument("domain", nargs="?")
        parser.add_argument("--all", action="store_true", help="include failed and deleted backups")

    def handle(self, *args, **o):
        backups = (Backup.objects.select_related("customer", "target", "base")
                   .prefetch_related("artifacts", "copies__target"))
        if o["domain"]:
            customer = Customer.objects.filter(domain=o["domain"].lower()).first()
            if customer is None:
                raise BadInput(f"no customer with domain {o['domain']!r}")
            backups = backups.filter(customer=customer)
        if not o["all"]:
            backups = backups.filter(status__in=[Backup.Status.SUCCEEDED, Backup.Status.RUNNING, Backup.Status.EXPIRED])
        stores: dict = {}
        docs = [backup_document(b, stores=stores) for b in backups]
        if self.json_output:
            self.emit(docs)
            return
        for d in docs:
            kind = "diff/#" + str(d["base"]["id"]) if d.get("base") else d["kind"]
            self.stdout.write(f"#{d['id']:<6} {d['customer']:<30} {d['status']:<10} {d['scope']:<8} {kind:<12} "
                              f"{human_size(d['size']):>10}  {human_time(d['finished_at'] or d['started_at'])}  "
                              f"{d['location']}")
