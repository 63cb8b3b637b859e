"""`manage.py qcluster`: django-q2's worker cluster, with a stop that cannot hang.

django-q2 (1.11.1, the newest release) stops the cluster from inside its SIGTERM/SIGINT handler: the
handler sets a multiprocessing Event and joins the sentinel process. That hangs for good, after the log
line "Q Cluster … stopping.", in two ways (upstream django-q2/django-q2#346 reports the second):

- The whole process group gets SIGTERM (`kill -- -PGID`, `pkill -f qcluster`, systemd's default
  `KillMode=control-group`). The sentinel, waiting on that Event, dies of the signal (its SIGTERM is
  SIG_DFL), and `Event.set()` in the main process then waits for the dead waiter to acknowledge.
- The signal lands while the main thread holds the Event's lock.

This command keeps django-q2's cluster and its options, but its signal handler only records the signal.
The main thread notices it, and sets the Event from a daemon thread, so a dead sentinel can never block
the exit. A stop then behaves as an operator expects:

- SIGTERM or SIGINT (Ctrl-C) to this process: the cluster drains, as django-q2 intends. It stops taking
  tasks, lets running ones finish, then exits 0.
- A second signal while it drains: the cluster's processes get SIGTERM now and this one exits 0. The runs
  they were executing are failed (and undone) by the reaper, as after any lost worker.
- SIGTERM to the whole group: the cluster's processes are already gone. This process says so and exits 0.
- The sentinel dies when nobody asked for a stop: its orphaned processes get SIGTERM and this one exits 1,
  so a supervisor restarts the worker. Before, the command went on living with no cluster behind it.

Two threads of this process serve a fleet of worker machines (README "Several workers"): the worker's beat
(`WorkerBeat`, every KASA_HEARTBEAT_SECONDS: a run whose Redis task this worker took is lost once it stops) and
its own reaper pass over this machine (every KASA_REAP_SECONDS).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from django.conf import settings
from django.db import connections
from django.utils import timezone
from django_q.cluster import Cluster
from django_q.management.commands.qcluster import Command as DjangoQClusterCommand
from django_q.scheduler import scheduler

from operations.models import WorkerBeat
from operations.services import runs_reap

logger = logging.getLogger("kasa.worker")

# A sentinel that received the same group-wide SIGTERM needs a moment to be reaped; without that grace the
# stop below would mistake it for a live one and wait on it needlessly.
_GROUP_SIGNAL_GRACE = 1.0
_POLL = 0.2


class WorkerBeating:
    """This worker machine's `WorkerBeat`, refreshed every KASA_HEARTBEAT_SECONDS from a thread of the main process
    while it runs (operations.broker: the reaper finds a task lost with a worker that stopped beating)."""

    def __init__(self):
        self.name = settings.KASA_WORKER_NAME
        self.stop = threading.Event()

    def first(self) -> None:
        now = timezone.now()
        try:
            WorkerBeat.objects.update_or_create(name=self.name, defaults={"pid": os.getpid(), "started_at": now,
                                                                          "seen_at": now})
        except Exception:  # noqa: BLE001  (the cluster must start: its thread tries again)
            logger.exception("worker %s: its beat could not be written", self.name)
        finally:
            connections.close_all()  # nothing the cluster forks may inherit a connection

    def start(self) -> None:
        threading.Thread(target=self._loop, name="worker-beat", daemon=True).start()
        threading.Thread(target=self._reap_loop, name="worker-reaper", daemon=True).start()

    def _reap_loop(self) -> None:
        """This machine's own reaper pass, every KASA_REAP_SECONDS. The scheduled reaper task goes to whichever
        worker of the fleet takes it off the queue; what only a worker on this machine can do — sweep its local
        journals, judge its own processes, the undos owed to its host (Run.abandon_host) — must not wait for chance
        to send it here. A thread of its own: a long undo never delays the beat."""
        while not self.stop.wait(settings.KASA_REAP_SECONDS):
            try:
                reaped = runs_reap()
                if reaped:
                    logger.warning("worker %s: its reaper pass failed or reconciled runs %s", self.name, reaped)
            except Exception:  # noqa: BLE001  (the next pass tries again)
                logger.exception("worker %s: its reaper pass failed", self.name)
            finally:
                connections.close_all()

    def _loop(self) -> None:
        while not self.stop.wait(settings.KASA_HEARTBEAT_SECONDS):
            try:
                WorkerBeat.objects.filter(name=self.name).update(seen_at=timezone.now(), pid=os.getpid())
            except Exception:  # noqa: BLE001  (the database comes back; the next beat goes through)
                logger.warning("worker %s: beat not written (control database?)", self.name)
                connections.close_all()


class KasaCluster(Cluster):
    """django-q2's Cluster whose signal handler only takes note (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self.signals: list[int] = []
        super().__init__(*args, **kwargs)  # installs self.sig_handler for SIGTERM and SIGINT

    def sig_handler(self, signum, frame):
        # Nothing here may take a lock: a list append is atomic under the GIL and allocates no lock.
        self.signals.append(signum)

    def serve(self) -> int:
        """Start, run until a signal or the sentinel's death, stop; the command's exit status."""
        beat = WorkerBeating()
        beat.first()  # before the cluster takes any task: a run it takes is never older than its beat's start
        try:
            self.start()
        except RuntimeError:
            # The sentinel died during start-up: of a group signal (a stop) or of a real failure.
            if not self.signals:
                raise
        else:
            self._schedule_now()
        beat.start()  # after the fork of the sentinel: no process inherits its database connection
        while not self.signals and self.sentinel.is_alive():
            time.sleep(_POLL)
        if not self.signals:
            logger.error("Q Cluster %s: its sentinel exited by itself (code %s); the worker exits so that its "
                         "supervisor restarts it", self.name, self.sentinel.exitcode)
            self._terminate_processes()  # its orphaned workers: no task reaches them any more
            return 1
        self.sentinel.join(_GROUP_SIGNAL_GRACE)
        if not self.sentinel.is_alive():
            if self.sentinel.exitcode != 0:
                logger.warning("Q Cluster %s: its processes were stopped by the same signal (sent to the whole "
                               "process group); runs they were executing are failed by the reaper",
                               self.name)
            return 0
        logger.info("Q Cluster %s stopping: running tasks finish first; a second signal stops them now",
                    self.name)
        seen = len(self.signals)
        threading.Thread(target=self.stop_event.set, name="qcluster-stop", daemon=True).start()
        while self.sentinel.is_alive():
            if len(self.signals) > seen:
                logger.warning("Q Cluster %s: second signal, stopping its processes now", self.name)
                self._terminate_processes()
                self.sentinel.join(5)
                break
            self.sentinel.join(_POLL)
        logger.info("Q Cluster %s has stopped.", self.name)
        return 0

    def _schedule_now(self) -> None:
        """Fire what fell due while no worker ran (backups, rollout ticks) now: django-q2's guard loop calls its
        scheduler only every 30 s, the first time 30 s after the start. Schedules are claimed under
        select_for_update and moved on at once, so the guard's own call never fires them twice."""
        try:
            scheduler(broker=self.broker)
        except Exception:  # noqa: BLE001  (the guard loop tries again in 30 s)
            logger.exception("Q Cluster %s: the schedules due at start could not be fired", self.name)
        finally:
            connections.close_all()  # this process only waits for signals: it holds no database connection

    def _terminate_processes(self) -> None:
        # The sentinel, the workers, the monitor and the pusher have SIGTERM at its default: they end at
        # once. When this process leads its own group (a supervisor, `make run`, the tests), the group is
        # exactly those processes plus this one, which ignores the signal from now on.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGTERM)
        elif self.sentinel.is_alive():
            os.kill(self.sentinel.pid, signal.SIGTERM)


class Command(DjangoQClusterCommand):
    help = "Starts a django-q2 cluster (Kasa's workers), with a stop that cannot hang."

    def handle(self, *args, **options):
        settings.SECRET_KEY  # noqa: B018 -- as django-q2's command: a missing key fails here, before any fork
        if options.get("run_once"):
            return super().handle(*args, **options)
        if options.get("cluster_name"):
            os.environ["Q_CLUSTER_NAME"] = options["cluster_name"]
        status = KasaCluster().serve()
        if status:
            raise SystemExit(status)
