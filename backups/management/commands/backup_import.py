from backups.catalogue import backup_import
from backups.models import StorageTarget
from core.cli import BadInput, KasaCommand


class Command(KasaCommand):
    help = ("Rebuild the backup catalogue from the manifests (backup.json) on a storage target: after a fresh "
            "install, every backup there can be listed and restored. Idempotent.")

    def add_arguments(self, parser):
        parser.add_argument("--target", required=True, help="storage target name")

    def handle(self, *args, **o):
        target = StorageTarget.objects.filter(name=o["target"]).first()
        if target is None:
            raise BadInput(f"no storage target named {o['target']!r}")
        result = backup_import(target, log=lambda m: self.stderr.write(m))
        doc = result.document()
        summary = (f"imported {len(result.imported)} backup(s), {result.known} already known, "
                   f"{len(result.problems)} not imported")
        if result.problems:  # exit 1: something on storage could not be catalogued, and the operator must know
            self.fail(summary + ": " + "; ".join(result.problems), doc)
        if self.json_output:
            self.emit(doc)
        else:
            self.stdout.write(summary)
