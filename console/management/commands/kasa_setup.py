import os
import secrets

from django.contrib.auth import get_user_model
from django_q.models import Schedule

from backups.schedules import schedules_sync
from backups.services import global_policy
from console.setup import ensure_operator_group
from core.cli import KasaCommand
from customers.demo import demo_seed, demo_start

REAPER = "kasa: reap runs whose worker is gone"
ROLLOUTS = "kasa: advance fleet rollouts"
STANDBYS = "kasa: stop blue-green standbys past their grace"
HOST_PROBES = "kasa: probe hosts"


class Command(KasaCommand):
    help = "Idempotent first-run setup: admin login, scheduled reaper, demo customer."

    def add_arguments(self, parser):
        parser.add_argument("--no-demo", action="store_true")
        parser.add_argument("--sqlite-demo", action="store_true",
                            help="demo database in SQLite even if PostgreSQL is up")
        parser.add_argument("--no-start", action="store_true",
                            help="do not start the demo's services (they are started unless they answer already)")

    def handle(self, *args, **o):
        ensure_operator_group()
        doc = {"admin": self._admin(), "reaper_schedule": self._reaper(),
               "backup_target": global_policy().target.name}
        if not o["no_demo"]:
            customer, created = demo_seed(prefer_postgres=not o["sqlite_demo"])
            doc["demo"] = {"domain": customer.domain, "created": created,
                           "database": customer.databases.first().display_url(), "run_as": customer.run_as or None,
                           "note": getattr(customer, "demo_note", ""),
                           "services": None if o["no_start"] else demo_start(customer)}
        doc["backup_schedules"] = schedules_sync(strict=False)  # after the demo customer exists
        if self.json_output:
            self.emit(doc)
            return
        admin = doc["admin"]
        if admin.get("password"):
            self.stdout.write(f"admin login: {admin['username']} / {admin['password']}  (shown once; "
                              "change it with `manage.py changepassword`)")
        else:
            self.stdout.write(f"admin login: {admin['username']} ({admin['note']})")
        if "demo" in doc:
            self.stdout.write(f"demo customer: {doc['demo']['domain']} with database {doc['demo']['database']}"
                              + (f"; {doc['demo']['note']}" if doc["demo"]["note"] else "")
                              + (f"; {doc['demo']['services']}" if doc["demo"]["services"] else ""))

    def _admin(self) -> dict:
        User = get_user_model()
        username = os.environ.get("KASA_ADMIN_USER", "admin")
        env_password = os.environ.get("KASA_ADMIN_PASSWORD", "")
        user = User.objects.filter(username=username).first()
        if user is None:
            password = env_password or secrets.token_urlsafe(12)
            User.objects.create_superuser(username=username, email="", password=password)
            return {"username": username, "created": True, "password": None if env_password else password,
                    "note": "password from KASA_ADMIN_PASSWORD" if env_password else "generated"}
        if env_password and not user.check_password(env_password):
            user.set_password(env_password)
            user.save(update_fields=["password"])
            return {"username": username, "created": False, "note": "password set from KASA_ADMIN_PASSWORD"}
        return {"username": username, "created": False,
                "note": "existing; its password was printed when it was created, or set KASA_ADMIN_PASSWORD"}

    def _reaper(self) -> str:
        Schedule.objects.update_or_create(
            name=REAPER,
            defaults={"func": "operations.tasks.reap_stale_runs", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1},
        )
        # Bakes, gates and windows of every rollout move on this tick (an upgrade that ends ticks its own at once).
        Schedule.objects.update_or_create(
            name=ROLLOUTS,
            defaults={"func": "rollouts.tasks.advance_rollouts", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1},
        )
        # The previous release a blue-green upgrade kept running stops when its grace period ends.
        Schedule.objects.update_or_create(
            name=STANDBYS,
            defaults={"func": "upgrades.tasks.end_standbys", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1},
        )
        # Reachability, free space and tools of every enabled host (a task per host: hosts.tasks).
        Schedule.objects.update_or_create(
            name=HOST_PROBES,
            defaults={"func": "hosts.tasks.probe_hosts", "schedule_type": Schedule.MINUTES, "minutes": 5,
                      "repeats": -1},
        )
        return REAPER
