import os

from django.conf import settings

from core.cli import BadInput, KasaCommand, OperationFailed
from engines.backupcrypto import BackupDecryptError, KeyRing, decrypt_file


class Command(KasaCommand):
    help = "Decrypt one backup artifact with KASA_BACKUP_KEYS; nothing is written unless it all authenticates."

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("--out", required=True, help="where to write the decrypted artifact")

    def handle(self, *args, **o):
        if not os.path.isfile(o["file"]):
            raise BadInput(f"{o['file']} is not a file")
        if os.path.exists(o["out"]):
            raise BadInput(f"{o['out']} exists already; refusing to overwrite it")
        if not settings.KASA_BACKUP_KEYS:
            raise BadInput("KASA_BACKUP_KEYS is not set")
        try:
            written = decrypt_file(o["file"], o["out"], KeyRing(settings.KASA_BACKUP_KEYS))
        except BackupDecryptError as exc:
            raise OperationFailed(f"{o['file']}: {exc}") from None
        if self.json_output:
            self.emit({"file": o["file"], "out": o["out"], "size": written})
        else:
            self.stdout.write(f"decrypted {written} bytes to {o['out']}")
