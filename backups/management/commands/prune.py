from backups.services import prune_customer
from core.cli import BadInput, KasaCommand
from customers.models import Customer


class Command(KasaCommand):
    help = "Apply retention: delete the backups each customer's policy no longer keeps (--dry-run: only show)."

    def add_arguments(self, parser):
        parser.add_argument("domain", nargs="?")
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args, **o):
        customers = Customer.objects.all()
        if o["domain"]:
            customers = customers.filter(domain=o["domain"].lower())
            if not customers.exists():
                raise BadInput(f"no customer with domain {o['domain']!r}")
        docs = []
        for customer in customers:
            plan = prune_customer(customer, dry_run=o["dry_run"], via="cli")
            docs.append({"customer": customer.domain, "dry_run": o["dry_run"], "delete": plan.delete,
                         "keep": {str(k): v for k, v in plan.keep.items()}})
        if self.json_output:
            self.emit(docs)
            return
        for d in docs:
            verb = "would delete" if d["dry_run"] else "deleted"
            self.stdout.write(f"{d['customer']}: {verb} {len(d['delete'])} backup(s) "
                              f"{' '.join(f'#{i}' for i in d['delete'])}; keeping {len(d['keep'])}")
            if d["dry_run"]:
                for bk_id, reasons in d["keep"].items():
                    self.stdout.write(f"  keep #{bk_id}: {', '.join(reasons)}")
