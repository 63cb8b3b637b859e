from backups.models import Backup
from backups.move_service import customer_move
from backups.services import BackupInputError, restore_start
from core.cli import BadInput, KasaCommand
from engines.humanize import human_duration
from operations.cli import add_run_arguments, run_in_command
from operations.services import OperationRefused


class Command(KasaCommand):
    help = ("Restore a backup in place (verify, safety backup, stage, swap, health-check; any failure puts the "
            "previous state back), into a copy elsewhere with --to-root / --to-database (on the customer's own host), "
            "or move the customer to another host with --to-host (restored there, started, health-checked, then "
            "switched; the old copy is stopped and kept until `customer_move DOMAIN --confirm`).")

    def add_arguments(self, parser):
        parser.add_argument("backup_id", type=int)
        parser.add_argument("--only", action="append", default=[], metavar="NAME",
                            help="restore only this artifact: a service, 'config' or a database name (repeatable)")
        parser.add_argument("--to-root", help="restore the files into this (empty) folder instead of in place")
        parser.add_argument("--to-database", action="append", default=[], metavar="NAME=URL",
                            help="restore database NAME into this new database instead of in place (repeatable)")
        parser.add_argument("--to-host", metavar="NAME",
                            help="move the customer to host NAME with this backup (no --yes needed: nothing is "
                                 "replaced, the old copy is stopped and kept)")
        parser.add_argument("--rewrite-env", action="store_true",
                            help="in a copy, point the .env database settings at the --to-database URLs")
        parser.add_argument("--no-safety-backup", action="store_true",
                            help="skip the backup of the current state taken before an in-place restore")
        parser.add_argument("--yes", action="store_true", help="confirm: the restore replaces the current state")
        add_run_arguments(parser)

    def handle(self, *args, **o):
        bk = Backup.objects.select_related("customer").filter(pk=o["backup_id"]).first()
        if bk is None:
            raise BadInput(f"no backup #{o['backup_id']}")
        if o["to_host"]:
            return self._move(bk, o)
        to_databases = {}
        for item in o["to_database"]:
            name, sep, url = item.partition("=")
            if not sep or not name or not url:
                raise BadInput("--to-database takes NAME=URL, e.g. main=postgresql://user:pass@host:5432/copy")
            to_databases[name] = url
        try:
            run = restore_start(bk, only=o["only"], to_root=o["to_root"], to_databases=to_databases,
                                rewrite_env=o["rewrite_env"], confirmed=o["yes"],
                                safety_backup=not o["no_safety_backup"], via="cli", enqueue=o["enqueue"])
        except (BackupInputError, OperationRefused) as exc:
            raise BadInput(str(exc)) from None
        def done(run) -> str:
            r = run.result
            where = r.get("root") if r.get("clone") else f"{bk.customer.domain} (in place)"
            return f"restored backup #{bk.pk} into {where} in {human_duration(r.get('seconds', run.duration))}"

        run_in_command(self, run, enqueue=o["enqueue"], wait=o["wait"], what=f"restore of backup #{bk.pk}",
                       done_text=done)

    def _move(self, bk, o):
        if o["to_root"] or o["to_database"] or o["only"]:
            raise BadInput("--to-host moves the whole customer: it takes no --to-root, --to-database or --only")
        try:
            run = customer_move(bk.customer, host=o["to_host"], backup=bk, via="cli", enqueue=o["enqueue"])
        except (BackupInputError, OperationRefused) as exc:
            raise BadInput(str(exc)) from None

        def done(run) -> str:
            r = run.result
            return (f"moved {bk.customer.domain} to host {r.get('host')} ({r.get('root')}) with backup #{bk.pk} in "
                    f"{human_duration(r.get('seconds', run.duration))}; the old copy stays on host "
                    f"{r.get('from_host')} at {r.get('old_root')}"
                    + (" (stopped)" if r.get("old_stopped") else " (NOT stopped)")
                    + f" until `customer_move {bk.customer.domain} --confirm`")

        run_in_command(self, run, enqueue=o["enqueue"], wait=o["wait"], what=f"move of {bk.customer.domain}",
                       done_text=done)
