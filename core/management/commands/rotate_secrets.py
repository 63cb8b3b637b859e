from core.cli import KasaCommand, OperationFailed
from core.secrets import rotate_all
from engines.secretbox import SecretDecryptError


class Command(KasaCommand):
    help = "Re-encrypt every stored secret with the newest key in KASA_SECRET_KEYS."

    def handle(self, *args, **o):
        try:
            counts = rotate_all()
        except SecretDecryptError as exc:
            raise OperationFailed(str(exc)) from None
        if self.json_output:
            self.emit({"rotated": counts, "total": sum(counts.values())})
        else:
            for label, n in counts.items():
                self.stdout.write(f"{label}: {n} re-encrypted")
