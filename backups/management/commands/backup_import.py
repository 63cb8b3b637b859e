from backups.catalogue import backup_import
from backups.models import StorageTarget
from core.cli import BadInput, KasaCommand


class Command(KasaCommand):
    help = ("Rebuild the backup catalogue from the manifests (backup.json) on a storage target: after a fresh "
            "install, every backup there can be listed and restored. Idempotent. Every manifest must be signed "
            "under a key of KASA_BACKUP_KEYS; any manifest refused imports nothing (exit 2).")

    def add_arguments(self, parser):
        parser.add_argument("--target", required=True, help="storage target name")
        parser.add_argument("--trust-unsigned", action="store_true",
                            help="also import backups whose manifest carries no signature (made before manifests "
                                 "were signed, or without KASA_BACKUP_KEYS); they are marked unsigned")

    def handle(self, *args, **o):
        target = StorageTarget.objects.filter(name=o["target"]).first()
        if target is None:
            raise BadInput(f"no storage target named {o['target']!r}")
        result = backup_import(target, trust_unsigned=o["trust_unsigned"], log=lambda m: self.stderr.write(m))
        doc = result.document()
        if result.refused:  # exit 2: storage holds manifests Kasa must not trust; nothing was imported
            exc = BadInput(f"nothing imported: {len(result.refused)} manifest(s) refused: " + "; ".join(result.refused))
            if self.json_output:
                self.emit(doc)
                exc._kasa_printed = True
            raise exc
        summary = (f"imported {len(result.imported)} backup(s), {result.known} already known, "
                   f"{len(result.problems)} not imported")
        if result.problems:  # exit 1: something on storage could not be catalogued, and the operator must know
            self.fail(summary + ": " + "; ".join(result.problems), doc)
        if self.json_output:
            self.emit(doc)
        else:
            self.stdout.write(summary)
