"""django-q2's Redis broker, writing down which worker took a run's task off the queue.

The Redis broker has no delivery receipts: BLPOP removes the task, and the cluster that popped it holds it only in
its own memory (its pusher, then a local queue of up to `queue_limit` tasks) until one of its processes claims the
run. A cluster killed in between loses the task, and the run would stay `pending` for good — a silent gap, and a
customer whose next backup is refused as "already pending". So when a cluster pops `execute_run(pk)`, it records
its worker name on the still-pending run (`Run.worker`, with the time in `heartbeat_at`), a conditional UPDATE.
The reaper (`operations.services.runs_reap`) fails a pending run whose taker stopped beating
(`WorkerBeat`, refreshed by Kasa's qcluster) or restarted since, and one that no worker took and that is no longer
in the Redis list either (Redis lost it): "task lost".

The ORM broker (no REDIS_URL) keeps a task until it is acknowledged and hands it out again after
KASA_TASK_RETRY, so it needs none of this.
"""

from __future__ import annotations

import logging

from django.db import connection
from django.utils import timezone
from django_q.brokers.redis_broker import Redis
from django_q.signing import BadSignature, SignedPackage

from .models import Run
from .slots import worker_name

log = logging.getLogger(__name__)

EXECUTE_RUN = "operations.tasks.execute_run"


def run_of(payload) -> int | None:
    """The run id of an `execute_run` task package, else None."""
    try:
        task = SignedPackage.loads(payload)
    except (BadSignature, Exception):  # noqa: BLE001  (not ours to judge: django-q2's worker reports it)
        return None
    if not isinstance(task, dict) or task.get("func") != EXECUTE_RUN:
        return None
    args = task.get("args") or ()
    return args[0] if len(args) == 1 and isinstance(args[0], int) else None


def mark_taken(payload) -> None:
    run_id = run_of(payload)
    if run_id is None:
        return
    try:
        Run.objects.filter(pk=run_id, status=Run.Status.PENDING).update(worker=worker_name(),
                                                                        heartbeat_at=timezone.now())
    except Exception:  # noqa: BLE001  (the task goes on; lost, the reaper finds it neither taken nor queued)
        log.exception("could not record that this worker took run %s off the queue", run_id)
        connection.close()  # the pusher lives long: the next task gets a fresh connection


class RedisBroker(Redis):
    def dequeue(self):
        tasks = super().dequeue()
        for _ack, payload in tasks or ():
            mark_taken(payload)
        return tasks

    def queued_run_ids(self) -> set[int]:
        """The runs whose task is still in the Redis list (no worker took it yet)."""
        ids = set()
        for payload in self.connection.lrange(self.list_key, 0, -1):
            run_id = run_of(payload)
            if run_id is not None:
                ids.add(run_id)
        return ids
