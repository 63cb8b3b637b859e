"""Which customers a rollout takes, which it skips and why, and who goes in which wave: computed before anything
starts (the confirmation page and `rollout start --dry-run` show it) and again, identically, when it starts.

Selection: every customer the requester may see, narrowed by a team, tags (a customer must carry every tag
given), explicit domains, and "currently on version X" (X a release name, or one version every component has).
Skipped, and listed with the reason: customers pinned to another release, with an unresolved quarantine, for
which the target release failed before, already on it, without any release (an install is a person's job),
not active, or in another active rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core import permissions
from customers.models import Customer
from customers.validators import normalize_tags
from engines import rolloutplan
from releases.models import Release
from upgrades.models import BadRelease, Upgrade

from .models import Rollout, RolloutTarget


@dataclass
class Plan:
    release: Release
    selection: dict
    percents: list[int]
    bakes: list[int]
    waves: list[list[Customer]] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def members(self) -> list[Customer]:
        return [c for wave in self.waves for c in wave]

    def document(self) -> dict:
        return {
            "release": self.release.name, "selection": self.selection, "customers": len(self.members),
            "waves": [{"position": i + 1, "percent": self.percents[i] if i < len(self.percents) else 100,
                       "bake_seconds": self.bakes[i] if i < len(self.bakes) else 0,
                       "customers": [c.domain for c in wave]} for i, wave in enumerate(self.waves)],
            "skipped": self.skipped,
        }


def matches_version(customer: Customer, wanted: str, release: Release | None) -> bool:
    versions = {k: v for k, v in (customer.versions or {}).items() if v}
    if release is not None:
        return bool(versions) and versions == release.versions()
    return bool(versions) and all(v == wanted for v in versions.values())


def plan(release: Release, *, user=None, team: str = "", tags=(), domains=(), from_version: str = "",
         percents="10,25,50,100", bakes="30m,1h,2h") -> Plan:
    """The plan of a rollout of `release` (rolloutplan.PlanError for bad input, with what to write)."""
    percents = rolloutplan.parse_percents(percents)
    tags = [t for t in normalize_tags(",".join(tags)).split(",") if t]
    domains = [d.strip().lower() for d in domains if d.strip()]
    selection = {k: v for k, v in {"team": team, "tags": tags, "domains": domains,
                                   "from_version": from_version}.items() if v}
    qs = Customer.objects.select_related("team").order_by("domain")
    qs = qs.visible_to(user) if user is not None else qs
    if team:
        qs = qs.filter(team__name=team)
        if not qs.exists():
            raise rolloutplan.PlanError(f"no customer of team {team!r} that you may see")
    for tag in tags:
        qs = qs.tagged(tag)
    if domains:
        found = set(qs.filter(domain__in=domains).values_list("domain", flat=True))
        unknown = sorted(set(domains) - found)
        if unknown:
            raise rolloutplan.PlanError(f"no such customer (or not yours): {', '.join(unknown)}")
        qs = qs.filter(domain__in=domains)
    from_release = Release.objects.filter(name=from_version).first() if from_version else None
    customers = [c for c in qs if not from_version or matches_version(c, from_version, from_release)]

    skipped, chosen = [], []
    reasons = _skip_reasons(customers, release)
    for c in customers:
        if c.pk in reasons:
            skipped.append({"domain": c.domain, "reason": reasons[c.pk]})
        else:
            chosen.append(c)
    if user is not None:
        for c in chosen:
            permissions.require(user, permissions.UPGRADE, c)
    by_domain = {c.domain: c for c in chosen}
    planned = rolloutplan.assign_waves(((c.domain, "canary" in c.tag_list()) for c in chosen), percents)
    return Plan(release=release, selection=selection, percents=[p for p, _ in planned],
                bakes=rolloutplan.parse_bakes(bakes, len(planned)),
                waves=[[by_domain[d] for d in wave] for _, wave in planned], skipped=skipped)


def _skip_reasons(customers: list[Customer], release: Release) -> dict[int, str]:
    ids = [c.pk for c in customers]
    target = release.versions()
    reasons: dict[int, str] = {}
    quarantined = dict(Upgrade.objects.unresolved_quarantine().filter(customer_id__in=ids)
                       .values_list("customer_id", "pk"))
    bad = dict(BadRelease.objects.filter(customer_id__in=ids, release=release).values_list("customer_id", "reason"))
    busy = dict(RolloutTarget.objects.filter(customer_id__in=ids, active=True)
                .exclude(rollout__status__in=Rollout.ENDED).values_list("customer_id", "rollout_id"))
    for c in customers:
        versions = {k: v for k, v in (c.versions or {}).items() if v}
        if c.status != Customer.Status.ACTIVE:
            reasons[c.pk] = f"status is {c.get_status_display().lower()}"
        elif c.version_pin and c.version_pin != release.name:
            reasons[c.pk] = f"pinned to {c.version_pin}: {c.version_pin_reason}"
        elif c.pk in quarantined:
            reasons[c.pk] = f"quarantined by upgrade #{quarantined[c.pk]} (resolve it first)"
        elif c.pk in bad:
            reasons[c.pk] = f"{release.name} failed for it before: {bad[c.pk][:200]}"
        elif not versions:
            reasons[c.pk] = "has no release installed (an install is done one customer at a time)"
        elif all(versions.get(k) == v for k, v in target.items()):
            reasons[c.pk] = f"already on {release.name}"
        elif c.pk in busy:
            reasons[c.pk] = f"in rollout #{busy[c.pk]}"
    return reasons

