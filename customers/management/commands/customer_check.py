import argparse

from core.cli import BadInput, KasaCommand
from customers.models import Customer
from customers.services import customer_check_start
from operations.cli import add_run_arguments, run_in_command
from operations.services import OperationRefused


class Command(KasaCommand):
    help = ("Check a customer's root, databases and services: runs in the foreground (log on stderr) unless "
            "--enqueue. Exit 1 when the check finds a problem.")

    def add_arguments(self, parser):
        parser.add_argument("domain")
        add_run_arguments(parser)
        # Before issue 12 the check waited for a worker; --no-wait was --enqueue and --timeout bounded the wait.
        parser.add_argument("--no-wait", dest="enqueue", action="store_true", help=argparse.SUPPRESS)
        parser.add_argument("--timeout", type=float, help=argparse.SUPPRESS)

    def handle(self, *args, **o):
        customer = Customer.objects.filter(domain=o["domain"].lower()).first()
        if customer is None:
            raise BadInput(f"no customer with domain {o['domain']!r}")
        try:
            run = customer_check_start(customer, via="cli", enqueue=o["enqueue"])
        except OperationRefused as exc:
            raise BadInput(str(exc)) from None

        def done(run) -> str:
            notes = [s["name"] for s in run.result.get("services", []) if not s.get("health")]
            extra = f" (no health URL: {', '.join(notes)})" if notes else ""
            return f"check of {customer}: {run.status}{extra}"

        run_in_command(self, run, enqueue=o["enqueue"], wait=o["wait"], what=f"check of {customer}", done_text=done)
