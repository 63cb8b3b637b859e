"""Host-local slots: at most N holders at once on one machine, whatever process they are in.

Each slot is a file `<dir>/backup-slot-<n>.lock` held with an exclusive
`flock`. The kernel releases the lock when the holding process exits or is
killed (SIGKILL included), so a dead worker never keeps a slot. The lock file
descriptor is not inherited by child processes (Python opens files with
O_CLOEXEC), so a lingering `tar` or `pg_dump` cannot keep a slot either.

    with acquire_slot(settings.KASA_SCRATCH_DIR, settings.KASA_MAX_BACKUPS_PER_HOST) as slot:
        ...  # at most KASA_MAX_BACKUPS_PER_HOST of these run at once on this host

Pure: no Django; only the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PREFIX = "backup-slot-"


class SlotsBusy(Exception):
    """Every slot is held and the caller asked not to wait."""


def slot_path(directory: str | os.PathLike, n: int) -> Path:
    return Path(directory) / f"{PREFIX}{n}.lock"


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def acquire_slot(
    directory: str | os.PathLike, count: int, *, wait: bool = True, poll: float = 1.0,
    on_wait: Callable[[float], None] | None = None,
) -> Iterator[int]:
    """Hold one of `count` slots in `directory` for the duration of the block; yields its number (0-based).

    All slots held: with wait=False raise SlotsBusy at once; otherwise try
    again every `poll` seconds. `on_wait(seconds_waited)` is called before
    each pause (first with 0.0): use it to log "waiting for a slot" once and to
    check for cancellation; an exception it raises stops the waiting and
    propagates (no slot is held then). count < 1 is treated as 1.
    """
    count = max(int(count), 1)
    Path(directory).mkdir(parents=True, exist_ok=True)
    started = None
    while True:
        for n in range(count):
            fd = _try_lock(slot_path(directory, n))
            if fd is not None:
                try:
                    yield n
                finally:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    finally:
                        os.close(fd)
                return
        if not wait:
            raise SlotsBusy(f"all {count} slot(s) in {directory} are in use")
        if started is None:
            started = time.monotonic()
            waited = 0.0
        else:
            waited = time.monotonic() - started
        if on_wait is not None:
            on_wait(waited)
        time.sleep(poll)


def slots_in_use(directory: str | os.PathLike, count: int) -> int:
    """How many of the `count` slots are held right now (for status pages and tests)."""
    busy = 0
    for n in range(max(int(count), 1)):
        path = slot_path(directory, n)
        if not path.exists():
            continue
        fd = _try_lock(path)
        if fd is None:
            busy += 1
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    return busy
