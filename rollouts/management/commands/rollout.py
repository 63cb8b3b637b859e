"""manage.py rollout start|show|list|pause|resume|promote|promote-all|abort|retry — fleet rollouts from the shell.

`rollout start` runs in the foreground until the rollout ends (bakes included; its upgrades run in this process,
at most --concurrency at once) and prints the rollout; exit 0 completed, 1 halted or aborted, 2 bad input.
With --enqueue it returns at once and the workers' scheduler drives the rollout. Ctrl-C pauses it (the upgrades
running finish first); `rollout resume ID` goes on, driven by the workers.
"""

from __future__ import annotations

import sys
import threading
import time

from django.core.exceptions import PermissionDenied
from django.db import connection

from core.cli import BadInput, KasaCommand
from engines import rolloutplan
from engines.humanize import human_duration
from operations.services import run_execute
from releases.models import Release
from rollouts import driver, planning, services
from rollouts.models import Rollout, RolloutTarget
from rollouts.selectors import rollout_document

ACTIONS = ("start", "show", "list", "pause", "resume", "promote", "promote-all", "abort", "retry")


class _Threads:
    """Runs each upgrade or rollback the driver starts in a thread of this process (its own DB connection)."""

    def __init__(self):
        self.threads: list[threading.Thread] = []

    def __call__(self, run) -> None:
        thread = threading.Thread(target=self._execute, args=(run.pk,), name=f"run-{run.pk}", daemon=False)
        thread.start()
        self.threads.append(thread)

    @staticmethod
    def _execute(run_id: int) -> None:
        try:
            run_execute(run_id)
        finally:
            connection.close()

    def alive(self) -> int:
        self.threads = [t for t in self.threads if t.is_alive()]
        return len(self.threads)

    def join(self) -> None:
        for t in self.threads:
            t.join()


class Command(KasaCommand):
    help = ("Fleet rollouts: take a release to many customers in canary waves with bakes and gates. "
            "start runs in the foreground until the rollout ends (--enqueue: the workers drive it).")

    def add_arguments(self, parser):
        parser.add_argument("action", choices=ACTIONS)
        parser.add_argument("id", nargs="?", type=int, help="the rollout (all actions but start and list)")
        parser.add_argument("--to", metavar="RELEASE", help="start: the release's name")
        parser.add_argument("--team", default="", help="start: only this team's customers")
        parser.add_argument("--tag", action="append", default=[], help="start: only customers with this tag "
                            "(repeat: every tag)")
        parser.add_argument("--domain", action="append", default=[], help="start: only these customers (repeat)")
        parser.add_argument("--from", dest="from_version", default="", metavar="VERSION",
                            help="start: only customers currently on this release (or version)")
        parser.add_argument("--waves", default="10,25,50,100", help="cumulative percentages (default %(default)s)")
        parser.add_argument("--bake", default="30m,1h,2h", help="bake after each wave (default %(default)s; 0: none)")
        parser.add_argument("--concurrency", type=int, default=2, help="upgrades at once in a wave (default 2)")
        parser.add_argument("--max-failures", type=int, default=0, help="failed upgrades a wave may have")
        parser.add_argument("--consecutive-errors", type=int, default=4,
                            help="gate measurements that may fail in a row before the rollout stops")
        parser.add_argument("--on-failure", choices=Rollout.OnFailure.values, default=Rollout.OnFailure.HALT)
        parser.add_argument("--strategy", choices=Rollout.Strategy.values, default=Rollout.Strategy.IN_PLACE,
                            help="each customer's upgrade: in place, or blue-green (checked beside the live one)")
        parser.add_argument("--no-health-gate", action="store_true", help="do not require health URLs to answer")
        parser.add_argument("--prometheus", default="", metavar="'QUERY OP THRESHOLD'",
                            help="a PromQL gate, e.g. 'sum(rate(http_errors{customer=~\"$customers\"}[5m])) < 0.05'")
        parser.add_argument("--window", default="", metavar="HH:MM-HH:MM", help="a daily maintenance window")
        parser.add_argument("--window-zone", default="UTC", help="the window's time zone (IANA name)")
        parser.add_argument("--dry-run", action="store_true", help="start: print the plan; nothing starts")
        parser.add_argument("--enqueue", action="store_true", help="start: return at once; the workers drive it")
        parser.add_argument("--revert", action="store_true", help="abort: also roll back the customers it upgraded")
        parser.add_argument("--confirm", default="", help=f"promote-all: type {services.PROMOTE_ALL_CONFIRMATION!r}")

    def handle(self, *args, **o):
        action = o["action"]
        try:
            if action == "start":
                return self.start(o)
            if action == "list":
                return self.list()
            rollout = self.rollout(o["id"])
            if action == "show":
                return self.show(rollout)
            control = {"pause": services.rollout_pause, "resume": services.rollout_resume,
                       "promote": services.rollout_promote, "retry": services.rollout_retry}.get(action)
            if control is not None:
                rollout = control(rollout, via="cli")
            elif action == "promote-all":
                rollout = services.rollout_promote_all(rollout, via="cli", confirmation=o["confirm"])
            elif action == "abort":
                rollout = services.rollout_abort(rollout, via="cli", revert=True if o["revert"] else None)
            # The change is written; the driver acts on it at its next tick (the workers' scheduler, or the
            # foreground `rollout start` that drives it).
            rollout.refresh_from_db()
            return self.show(rollout)
        except (services.RolloutError, rolloutplan.PlanError, PermissionDenied) as exc:
            raise BadInput(str(exc)) from None

    @staticmethod
    def rollout(pk) -> Rollout:
        if pk is None:
            raise BadInput("name the rollout by its id (rollout list)")
        rollout = Rollout.objects.select_related("release").filter(pk=pk).first()
        if rollout is None:
            raise BadInput(f"no rollout #{pk}")
        return rollout

    # --- start ---------------------------------------------------------------------------------------------------
    def start(self, o) -> None:
        if not o["to"]:
            raise BadInput("name the release to roll out with --to")
        release = Release.objects.filter(name=o["to"]).first()
        if release is None:
            names = ", ".join(Release.objects.values_list("name", flat=True)[:20]) or "none registered"
            raise BadInput(f"no release named {o['to']!r} (releases: {names})")
        plan = planning.plan(release, team=o["team"], tags=o["tag"], domains=o["domain"],
                             from_version=o["from_version"], percents=o["waves"], bakes=o["bake"])
        if o["dry_run"]:
            return self.emit(plan.document()) if self.json_output else self.print_plan(plan)
        rollout = services.rollout_create(
            plan, via="cli", concurrency=o["concurrency"], max_failures=o["max_failures"],
            consecutive_errors=o["consecutive_errors"], on_failure=o["on_failure"],
            health_gate=not o["no_health_gate"], prometheus=services.parse_prometheus(o["prometheus"]),
            window=o["window"], window_zone=o["window_zone"], strategy=o["strategy"])
        if o["enqueue"]:
            if self.json_output:
                return self.emit(rollout_document(rollout))
            self.stdout.write(f"rollout #{rollout.pk} to {release} scheduled for {len(plan.members)} customers; "
                              "the workers drive it (rollout show " f"{rollout.pk})")
            return None
        rollout = self.drive(rollout)
        return self.show(rollout)

    def print_plan(self, plan: planning.Plan) -> None:
        doc = plan.document()
        self.stdout.write(f"rollout of {doc['release']} to {doc['customers']} customers:")
        for w in doc["waves"]:
            bake = f", then bake {human_duration(w['bake_seconds'])}" if w["bake_seconds"] else ""
            self.stdout.write(f"  wave {w['position']} ({w['percent']} %{bake}): {', '.join(w['customers'])}")
        for s in doc["skipped"]:
            self.stdout.write(f"  skipped {s['domain']}: {s['reason']}")

    def drive(self, rollout: Rollout) -> Rollout:
        """Tick until the rollout has ended, running its upgrades here; Ctrl-C pauses it."""
        threads = _Threads()
        seen: dict[int, str] = {}
        said = ""
        try:
            while True:
                driver.advance(rollout.pk, start_run=threads, via="cli")
                rollout.refresh_from_db()
                self.say_changes(rollout, seen)
                if rollout.status in Rollout.ENDED and not threads.alive():
                    if not rollout.targets.filter(state__in=RolloutTarget.RUNNING).exists():
                        return rollout
                if rollout.status == Rollout.Status.PAUSED and rollout.reason != said:
                    said = rollout.reason
                    sys.stderr.write(f"paused: {rollout.reason} (rollout resume {rollout.pk} / promote "
                                     f"{rollout.pk} / abort {rollout.pk} from another shell or the admin)\n")
                time.sleep(0.3 if threads.alive() else 1.0)
        except KeyboardInterrupt:
            try:
                services.rollout_pause(rollout, via="cli")
            except services.RolloutError:
                pass
            sys.stderr.write("interrupted: the rollout is paused; waiting for the upgrades that run to finish\n")
            threads.join()
            driver.advance(rollout.pk, via="cli")
            rollout.refresh_from_db()
            self.fail(f"rollout #{rollout.pk} paused by Ctrl-C; `rollout resume {rollout.pk}` goes on (driven by "
                      "the workers)", rollout_document(rollout))
        return rollout

    @staticmethod
    def say_changes(rollout: Rollout, seen: dict[int, str]) -> None:
        for t in rollout.targets.select_related("customer", "wave"):
            key = f"{t.state}:{t.attempts}"
            if seen.get(t.pk) != key:
                if t.pk in seen or t.state != RolloutTarget.State.PENDING:
                    why = f" ({t.error[:200]})" if t.error and t.state != RolloutTarget.State.UPGRADED else ""
                    sys.stderr.write(f"wave {t.wave.position}: {t.customer} {t.get_state_display().lower()}{why}\n")
                seen[t.pk] = key
        status_key = -1
        if seen.get(status_key) != rollout.status:
            sys.stderr.write(f"rollout #{rollout.pk}: {rollout.status}"
                             + (f" ({rollout.reason})" if rollout.reason else "") + "\n")
            seen[status_key] = rollout.status

    # --- show / list ----------------------------------------------------------------------------------------------
    def show(self, rollout: Rollout) -> None:
        doc = rollout_document(rollout)
        if rollout.status in (Rollout.Status.HALTED, Rollout.Status.ABORTED):
            self.fail(f"rollout #{rollout.pk} {rollout.status}: {rollout.reason}", doc)
        if self.json_output:
            return self.emit(doc)
        self.stdout.write(f"rollout #{doc['id']} to {doc['release']}: {doc['status']}"
                          + (f" — {doc['reason']}" if doc["reason"] else ""))
        for w in doc["waves"]:
            left = f", {human_duration(w['bake_left_seconds'])} of bake left" if w["bake_left_seconds"] else ""
            self.stdout.write(f"  wave {w['position']} ({w['percent']} %): {w['state']}{left}")
            for g in w["gates"]:
                self.stdout.write(f"    gate {g['gate']}: {g['result']} — {g['summary']}")
            for c in w["customers"]:
                versions = ", ".join(f"{k} {v}" for k, v in sorted((c["versions"] or {}).items()))
                self.stdout.write(f"    {c['customer']}: {c['state']} ({versions})"
                                  + (f" — {c['error'][:200]}" if c["error"] and c["state"] != "upgraded" else ""))
        for s in doc["skipped"]:
            self.stdout.write(f"  skipped {s['domain']}: {s['reason']}")
        return None

    def list(self) -> None:
        rows = list(Rollout.objects.select_related("release").order_by("-created_at")[:50])
        if self.json_output:
            return self.emit([{"id": r.pk, "release": r.release.name, "status": r.status, "reason": r.reason,
                               "created_at": r.created_at, "finished_at": r.finished_at} for r in rows])
        for r in rows:
            self.stdout.write(f"#{r.pk}  {r.release}  {r.status}  {r.created_at:%Y-%m-%d %H:%M}"
                              + (f"  {r.reason[:80]}" if r.reason else ""))
        return None
