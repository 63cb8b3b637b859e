from core.cli import KasaCommand
from operations.services import runs_reap


class Command(KasaCommand):
    help = "Mark failed the running runs whose worker is gone (also scheduled every minute)."

    def add_arguments(self, parser):
        parser.add_argument("--stale-after", type=int, default=None, help="seconds without heartbeat")

    def handle(self, *args, **o):
        reaped = runs_reap(stale_after=o["stale_after"])
        if self.json_output:
            self.emit({"reaped": reaped})
        else:
            self.stdout.write(f"reaped {len(reaped)} run(s)")
