from backups.schedules import ScheduleError, schedules_document, schedules_sync
from core.cli import KasaCommand
from engines.humanize import human_time


class Command(KasaCommand):
    help = ("Sync the django-q2 schedules with every customer's backup policy, then list them. "
            "Exit 1 when a policy has a bad cron expression (the other customers are synced all the same).")

    def handle(self, *args, **o):
        result = schedules_sync(strict=False)
        doc = {"created": result["created"], "updated": result["updated"], "removed": result["removed"],
               "unchanged": result["unchanged"], "errors": result["errors"], "schedules": schedules_document()}
        if not self.json_output:
            for s in doc["schedules"]:
                when = s["cron"] or f"every {s['minutes']} min"
                nxt = human_time(s["next_run"])
                self.stdout.write(f"{s['name']:<45} {when:<18} next {nxt}")
            self.stdout.write(f"{len(result['created'])} created, {len(result['updated'])} updated, "
                              f"{len(result['removed'])} removed, {result['unchanged']} unchanged")
        if result["errors"]:
            self.fail(str(ScheduleError("; ".join(result["errors"].values()))), doc)
        if self.json_output:
            self.emit(doc)
