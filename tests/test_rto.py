"""RTO means one thing: the duration of the newest successful whole in-place restore or drill."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from backups.recovery import fleet, is_whole_recovery
from operations.models import Run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.smoke]

WHOLE = {"backup": 1, "only": [], "to_root": None, "to_databases": {}, "to_databases_shown": {},
         "rewrite_env": False, "safety_backup": True}


def _run(customer, kind, *, minutes_ago: float, seconds: float, status="succeeded", **params):
    """A finished run as the services leave it: started, finished `seconds` later, with the params they write."""
    started = timezone.now() - timedelta(minutes=minutes_ago)
    return Run.objects.create(kind=kind, customer=customer, status=status, started_at=started,
                              finished_at=started + timedelta(seconds=seconds), mutating=kind != "verify",
                              params=params)


def _rto(customer) -> float | None:
    return next(r for r in fleet() if r.customer.pk == customer.pk).rto_measured


def test_rto_is_the_whole_restore_and_later_clones_partials_and_failed_upgrades_leave_it(make_customer):
    customer = make_customer()
    _run(customer, "verify", minutes_ago=60, seconds=30.0, backup=1)
    _run(customer, "restore", minutes_ago=50, seconds=10.9, **WHOLE)
    assert _rto(customer) == pytest.approx(10.9)
    _run(customer, "restore", minutes_ago=40, seconds=0.4, **{**WHOLE, "to_root": "/srv/customers/copy"})
    _run(customer, "restore", minutes_ago=35, seconds=0.7, **{**WHOLE, "to_databases": {"main": "sealed"}})
    _run(customer, "restore", minutes_ago=30, seconds=2.0, **{**WHOLE, "only": ["backend"]})
    _run(customer, "upgrade", minutes_ago=20, seconds=95.0, status="failed", release=1)
    _run(customer, "upgrade", minutes_ago=15, seconds=50.0, release=1)
    _run(customer, "rollback", minutes_ago=12, seconds=40.0)
    _run(customer, "restore", minutes_ago=10, seconds=99.0, status="failed", **WHOLE)
    _run(customer, "verify", minutes_ago=5, seconds=77.0, status="failed", backup=1)
    assert _rto(customer) == pytest.approx(10.9)


def test_a_newer_drill_or_whole_restore_replaces_the_measure(make_customer):
    customer, other = make_customer(), make_customer()
    _run(customer, "restore", minutes_ago=50, seconds=10.9, **WHOLE)
    _run(customer, "verify", minutes_ago=40, seconds=25.0, backup=1)
    assert _rto(customer) == pytest.approx(25.0)
    _run(customer, "restore", minutes_ago=30, seconds=12.5, **WHOLE)
    assert _rto(customer) == pytest.approx(12.5)
    _run(other, "restore", minutes_ago=5, seconds=1.0, **{**WHOLE, "only": ["backend"]})
    assert _rto(other) is None  # only a partial restore: nothing measured yet


def test_which_runs_are_whole_recoveries():
    def run(kind, **params):
        return Run(kind=kind, params=params)

    assert is_whole_recovery(run("verify", backup=3))
    assert is_whole_recovery(run("restore", **WHOLE))
    assert not is_whole_recovery(run("restore", **{**WHOLE, "only": ["config"]}))
    assert not is_whole_recovery(run("restore", **{**WHOLE, "to_root": "/x"}))
    assert not is_whole_recovery(run("restore", **{**WHOLE, "to_databases": {"main": "x"}}))
    assert not is_whole_recovery(run("upgrade"))
    assert not is_whole_recovery(run("rollback"))
    assert not is_whole_recovery(run("backup"))
