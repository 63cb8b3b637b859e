"""Read-only queries for the backup pages of the admin (nothing here writes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from django.utils import timezone

from customers.scoping import scope_to_user
from engines.humanize import human_duration, human_size

from .models import Backup, BackupArtifact

MANIFEST = "backup.json"  # the same name backups.operations writes beside the artifacts


def backups_visible_to(user):
    """Backups of the customers the user may see (superusers: all)."""
    return scope_to_user(Backup.objects.all(), user, "customer")


def customer_backups(customer, limit: int = 20):
    """The newest backups of one customer, ready for a table (no query per row): each carries
    size_text, duration_text and trigger_text for display."""
    rows = list(Backup.objects.filter(customer=customer).select_related("target", "requested_by")
                .order_by("-created_at", "-id")[:limit])
    for bk in rows:
        bk.size_text = human_size(bk.size) if bk.size else "—"
        bk.duration_text = human_duration(bk.duration)
        bk.trigger_text = trigger_label(bk)
    return rows


def downloadable_names(backup: Backup) -> list[str]:
    """What may be downloaded of a backup: its artifacts and the manifest. Nothing of a backup that is
    not a restore point (running, failed, deleted): its objects are partial or gone."""
    if backup.status != Backup.Status.SUCCEEDED or not backup.prefix:
        return []
    names = []
    for name, details in BackupArtifact.objects.filter(backup=backup).values_list("name", "details"):
        names.append(name)
        names += [side["name"] for what in ("index", "changes") if (side := (details or {}).get(what))]
    return names + [MANIFEST]


def trigger_label(backup: Backup) -> str:
    """Who or what asked for the backup: a user, a schedule, an upgrade…"""
    if backup.trigger == Backup.Trigger.MANUAL:
        return backup.requested_by.get_username() if backup.requested_by_id else "manual (CLI)"
    label = backup.get_trigger_display().lower()
    if backup.requested_by_id and backup.trigger != Backup.Trigger.SCHEDULE:
        label += f" ({backup.requested_by.get_username()})"
    return label


# --- the size/duration chart -----------------------------------------------------------------
@dataclass
class ChartPoint:
    x: float
    y_size: float
    y_duration: float
    backup_id: int
    label: str


@dataclass
class Chart:
    """Coordinates for a small inline SVG (viewBox 0 0 width height), computed here so the template
    only draws. Two series over the same time axis: size (left axis) and duration (right axis)."""

    width: int = 640
    height: int = 200
    left: int = 64
    right: int = 64
    top: int = 16
    bottom: int = 36
    points: list[ChartPoint] = field(default_factory=list)
    size_max: str = ""
    duration_max: str = ""
    first: str = ""
    last: str = ""

    @property
    def plot_right(self) -> int:
        return self.width - self.right

    @property
    def plot_bottom(self) -> int:
        return self.height - self.bottom

    @property
    def size_path(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y_size:.1f}" for p in self.points)

    @property
    def duration_path(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y_duration:.1f}" for p in self.points)

    @property
    def grid(self) -> list[float]:
        h = self.plot_bottom - self.top
        return [self.top + h * i / 4 for i in range(5)]


def _nice_max(value: float) -> float:
    """A round axis maximum ≥ value: 1, 2, 2.5, 5 × 10^k."""
    if value <= 0:
        return 1.0

    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if value <= m * exp:
            return m * exp
    return 10 * exp  # pragma: no cover


def backup_chart(customer, limit: int = 60) -> Chart | None:
    """Size and duration of the customer's successful backups over time; None without any."""
    rows = list(Backup.objects.filter(customer=customer, status=Backup.Status.SUCCEEDED, started_at__isnull=False,
                                      finished_at__isnull=False)
                .order_by("-finished_at").values("id", "size", "started_at", "finished_at", "scope")[:limit])
    rows.reverse()
    if not rows:
        return None

    for r in rows:
        r["finished_at"] = timezone.localtime(r["finished_at"])
        r["started_at"] = timezone.localtime(r["started_at"])
    chart = Chart()
    durations = [(r["finished_at"] - r["started_at"]).total_seconds() for r in rows]
    size_top = _nice_max(max(r["size"] for r in rows))
    duration_top = _nice_max(max(durations))
    t0 = rows[0]["finished_at"].timestamp()
    span = rows[-1]["finished_at"].timestamp() - t0
    plot_w = chart.plot_right - chart.left
    plot_h = chart.plot_bottom - chart.top
    for i, (r, d) in enumerate(zip(rows, durations, strict=True)):
        if span > 0:
            x = chart.left + plot_w * (r["finished_at"].timestamp() - t0) / span
        else:
            x = chart.left + (plot_w * i / (len(rows) - 1) if len(rows) > 1 else plot_w / 2)
        chart.points.append(ChartPoint(
            x=x,
            y_size=chart.plot_bottom - plot_h * r["size"] / size_top,
            y_duration=chart.plot_bottom - plot_h * d / duration_top,
            backup_id=r["id"],
            label=f"#{r['id']} {r['finished_at']:%Y-%m-%d %H:%M} {r['scope']}: {human_size(r['size'])}, "
                  f"{human_duration(d)}",
        ))
    chart.size_max = human_size(size_top)
    chart.duration_max = human_duration(duration_top)
    chart.first = f"{rows[0]['finished_at']:%Y-%m-%d %H:%M}"
    chart.last = f"{rows[-1]['finished_at']:%Y-%m-%d %H:%M}"
    return chart
