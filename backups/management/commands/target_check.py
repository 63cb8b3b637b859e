from backups.models import StorageTarget
from backups.services import BackupInputError, target_check
from core.cli import BadInput, KasaCommand


class Command(KasaCommand):
    help = ("Check storage targets (all enabled ones, or those named): the bucket or folder is there, a probe object "
            "is written, read back and deleted, and a locked S3 target's bucket has Object Lock and versioning. "
            "Exits non-zero when any check fails (for cron or a monitoring system).")

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", help="target names (default: every enabled target)")

    def handle(self, *args, **o):
        targets = StorageTarget.objects.all() if o["names"] else StorageTarget.objects.filter(enabled=True)
        if o["names"]:
            targets = targets.filter(name__in=o["names"])
            missing = sorted(set(o["names"]) - set(targets.values_list("name", flat=True)))
            if missing:
                raise BadInput(f"no storage target named {', '.join(missing)}")
        docs = []
        for target in targets:
            try:
                docs.append({"target": target.name, "ok": True, "detail": target_check(target, actor=None)})
            except BackupInputError as exc:
                docs.append({"target": target.name, "ok": False, "detail": str(exc)})
        failed = sum(not d["ok"] for d in docs)
        if not self.json_output:
            for d in docs:
                self.stdout.write(f"{'ok  ' if d['ok'] else 'FAIL'} {d['detail']}")
        if failed:
            self.fail(f"{failed} storage target check(s) failed", docs)
        if self.json_output:
            self.emit(docs)
