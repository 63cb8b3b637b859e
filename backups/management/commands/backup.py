from backups.models import Backup
from backups.services import BackupInputError, backup_document, backup_start
from core.cli import BadInput, KasaCommand
from customers.models import Customer
from engines.humanize import human_duration, human_size, human_time
from operations.cli import add_run_arguments, enqueued_or_run_here
from operations.services import OperationRefused


class Command(KasaCommand):
    help = "Back up a customer: runs in the foreground (log on stderr) unless --enqueue."

    def add_arguments(self, parser):
        parser.add_argument("domain")
        parser.add_argument("--scope", choices=["full", "files", "database", "config"])
        parser.add_argument("--service", action="append", default=[], help="only this service folder (repeatable)")
        parser.add_argument("--no-encrypt", action="store_true", help="store artifacts unencrypted (not advised)")
        parser.add_argument("--compression", choices=["zstd", "gzip", "none"])
        parser.add_argument("--target", help="storage target name (default: the policy's)")
        add_run_arguments(parser)

    def handle(self, *args, **o):
        customer = Customer.objects.filter(domain=o["domain"].lower()).first()
        if customer is None:
            raise BadInput(f"no customer with domain {o['domain']!r}")
        try:
            run = backup_start(
                customer, scope=o["scope"], services=o["service"], compression=o["compression"],
                encrypt=False if o["no_encrypt"] else None, target=o["target"], via="cli", enqueue=o["enqueue"],
            )
        except (BackupInputError, OperationRefused) as exc:
            raise BadInput(str(exc)) from None
        run = enqueued_or_run_here(self, run, enqueue=o["enqueue"], wait=o["wait"], what="backup")
        if run is None:
            return
        bk = Backup.objects.filter(run=run).first()
        doc = backup_document(bk) if bk else {"id": None, "customer": customer.domain, "status": run.status,
                                               "error": run.error}
        doc["run"] = run.pk
        if run.status != "succeeded":
            self.fail(f"backup of {customer} {run.status}: {run.error}", doc)
        if self.json_output:
            self.emit(doc)
        else:
            self.stdout.write(f"backup #{doc['id']} of {customer}: {human_size(doc['size'])} in "
                              f"{human_duration(doc['duration'])}, finished {human_time(doc['finished_at'])}, "
                              f"at {doc['location']}")
