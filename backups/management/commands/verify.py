from backups.models import Backup
from backups.services import BackupInputError, verify_start
from core.cli import BadInput, KasaCommand
from engines.humanize import human_duration
from operations.cli import add_run_arguments, run_in_command
from operations.services import OperationRefused


class Command(KasaCommand):
    help = ("Verification drill: checksums, decryption, a test extraction of every archive and a test restore of "
            "every database into a scratch database (row counts against the manifest). Touches nothing live.")

    def add_arguments(self, parser):
        parser.add_argument("backup_id", type=int)
        add_run_arguments(parser)

    def handle(self, *args, **o):
        bk = Backup.objects.select_related("customer").filter(pk=o["backup_id"]).first()
        if bk is None:
            raise BadInput(f"no backup #{o['backup_id']}")
        try:
            run = verify_start(bk, via="cli", enqueue=o["enqueue"])
        except (BackupInputError, OperationRefused) as exc:
            raise BadInput(str(exc)) from None
        run_in_command(self, run, enqueue=o["enqueue"], wait=o["wait"], what=f"verification of backup #{bk.pk}",
                       done_text=lambda run: f"backup #{bk.pk} verified in "
                                             f"{human_duration(run.result.get('seconds', run.duration))}")
