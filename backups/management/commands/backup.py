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
        kind = parser.add_mutually_exclusive_group()
        kind.add_argument("--full", dest="kind", action="store_const", const="full",
                          help="a full backup, whatever the policy's full_every_days says")
        kind.add_argument("--differential", dest="kind", action="store_const", const="differential",
                          help="only the files changed since the newest full backup (a full if there is none "
                               "usable; the log says why)")
        add_run_arguments(parser)

    def handle(self, *args, **o):
        customer = Customer.objects.filter(domain=o["domain"].lower()).first()
        if customer is None:
            raise BadInput(f"no customer with domain {o['domain']!r}")
        try:
            run = backup_start(
                customer, scope=o["scope"], services=o["service"], compression=o["compression"],
                encrypt=False if o["no_encrypt"] else None, target=o["target"], via="cli", enqueue=o["enqueue"],
                kind=o["kind"] or "auto",
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
            kind = doc["kind"] + (f" on full #{doc['base']['id']}" if doc.get("base") else "")
            self.stdout.write(f"backup #{doc['id']} of {customer} ({kind}): {human_size(doc['size'])} in "
                              f"{human_duration(doc['duration'])}, finished {human_time(doc['finished_at'])}, "
                              f"at {doc['location']}")
