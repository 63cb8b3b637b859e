"""What the workers run for upgrades besides the runs themselves: ending the standbys whose grace is over."""

from __future__ import annotations

import logging

from . import standby

log = logging.getLogger(__name__)


def end_standbys() -> list[int]:
    """kasa_setup's minute schedule: stop the previous releases blue-green upgrades kept running past their grace
    period; returns the upgrades whose standby ended."""
    return standby.end_due(log.info)
