"""django-q2 entry points: primary keys only, each calls a service. A probe never raises out of its task."""

from __future__ import annotations

import logging

from django.db import close_old_connections

from . import services
from .models import Host

log = logging.getLogger(__name__)


def probe_host(host_id: int) -> str:
    close_old_connections()
    try:
        host = Host.objects.filter(pk=host_id).first()
        if host is None:
            return f"host #{host_id} no longer exists"
        host = services.host_probe(host)
        if not host.reachable:
            return f"unreachable: {host.last_error}"
        if not host.is_local and getattr(host, "journals_left", 0):  # a run lost this host mid-way: undone now
            services.host_journals_left(host)
            found = "journals that the probe may not count" if host.journals_left < 0 else \
                f"{host.journals_left} journal(s)"
            return f"reachable; {found} found there handed over for replay"
        return "reachable"
    except Exception:  # recorded by host_probe when it is the host's fault; anything else is logged, not raised
        log.exception("probe of host #%s failed", host_id)
        return "probe failed (see the worker's log)"
    finally:
        close_old_connections()


def probe_hosts() -> int:
    """The schedule's tick: a probe task per enabled host."""
    close_old_connections()
    try:
        return services.host_probe_all()
    finally:
        close_old_connections()
