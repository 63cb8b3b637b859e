"""Where a copy of a remote customer may go (restore --to-root on its host), judged by name on the worker when the
run is asked for (backups.services.restore_start); the host resolves its links again before anything is made there
(engines.hostmove.root_check, backups.remote_copy). Kept apart from remote_copy: restore_start imports it."""

from __future__ import annotations

import posixpath
from pathlib import PurePosixPath

from customers.models import Customer
from engines import paths


def to_root_problem(customer: Customer, raw: str) -> tuple[str, str | None]:
    """(the copy's folder normalised, why it may not be one or None), by name on the worker (the host resolves its
    links again before anything is made there)."""
    host = customer.host
    if not raw or "\x00" in raw or not posixpath.isabs(raw) or ".." in raw.split("/"):
        return raw, f"--to-root {raw!r} must be an absolute path on host {host.name} without '..'"
    norm, base = posixpath.normpath(raw), posixpath.normpath(host.root())
    if not norm.startswith(base.rstrip("/") + "/"):
        return norm, f"--to-root {norm} is not inside host {host.name}'s customers root {base}"
    for other in Customer.objects.filter(host=host).values_list("root", flat=True):
        how = paths.overlap(PurePosixPath(norm), PurePosixPath(posixpath.normpath(other)))
        if how:
            whose = "the customer's live root" if other == customer.root else "another customer's root folder"
            return norm, f"--to-root {norm} {how} {whose} on host {host.name}: a copy goes into a folder of its own"
    return norm, None
