"""Execute a run in this process (a management command in the foreground).

The run executes in a thread (its own database connection) while the caller
follows its stored log, exactly as a worker's run would be followed. Ctrl-C
asks the run to cancel and waits for it to stop cleanly.
"""

from __future__ import annotations

import contextlib
import threading

from django.db import connection

from .cli import follow_run
from .models import Run
from .offline import DB_LOST
from .services import run_cancel, run_execute


def execute_in_foreground(run: Run, *, timeout: float = 24 * 3600) -> Run:
    finished = threading.Event()

    def target():
        try:
            run_execute(run.pk)
        finally:
            connection.close()
            finished.set()

    thread = threading.Thread(target=target, name=f"run-{run.pk}")
    thread.start()
    try:
        run = follow_run(run, None, timeout=timeout, done=finished)
    except KeyboardInterrupt:
        run_cancel(Run.objects.get(pk=run.pk), via="cli")
        thread.join()
        run.refresh_from_db()
        return run
    thread.join()
    with contextlib.suppress(*DB_LOST):  # still away: the run stays as last seen (follow_run said why)
        run.refresh_from_db()
    return run
