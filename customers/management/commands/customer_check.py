from core.cli import BadInput, KasaCommand
from customers.models import Customer
from customers.services import customer_check_start
from operations.cli import follow_run, run_document
from operations.services import OperationRefused


class Command(KasaCommand):
    help = "Check a customer's databases and services (executed by a worker; this command waits)."

    def add_arguments(self, parser):
        parser.add_argument("domain")
        parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run")
        parser.add_argument("--no-wait", action="store_true", help="print the queued run and return")

    def handle(self, *args, **o):
        customer = Customer.objects.filter(domain=o["domain"].lower()).first()
        if customer is None:
            raise BadInput(f"no customer with domain {o['domain']!r}")
        try:
            run = customer_check_start(customer, via="cli")
        except OperationRefused as exc:
            raise BadInput(str(exc)) from None
        if not o["no_wait"]:
            run = follow_run(run, self, timeout=o["timeout"])
        doc = run_document(run)
        if not o["no_wait"] and run.status != "succeeded":
            self.fail(f"check of {customer} {run.status}: {run.error or 'timed out waiting'}", doc)
        if self.json_output:
            self.emit(doc)
        else:
            self.stdout.write(f"check of {customer}: {run.status}")
