from core.cli import KasaCommand
from customers.models import Customer
from customers.services import customer_describe


class Command(KasaCommand):
    help = "List customers with their services, databases (no passwords) and versions."

    def handle(self, *args, **o):
        customers = Customer.objects.select_related("team", "host").prefetch_related("services", "databases")
        docs = [customer_describe(c) for c in customers]
        if self.json_output:
            self.emit(docs)
            return
        for d in docs:
            versions = ", ".join(f"{k} {v}" for k, v in d["versions"].items()) or "-"
            self.stdout.write(
                f"{d['domain']:<32} {d['status']:<12} services={len(d['services'])} "
                f"databases={len(d['databases'])} versions={versions}"
            )
