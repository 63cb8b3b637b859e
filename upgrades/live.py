"""What a run page shows of an upgrade or rollback run (operations.registry.register_details): a summary, the
links to the upgrade and its safety backup, and the step table, read from the database on every change."""

from __future__ import annotations

from django.urls import reverse

from .admin_selectors import steps_document, versions_text
from .models import Upgrade


def upgrade_details(run) -> dict:
    up = Upgrade.objects.filter(run_id=run.pk).select_related("to_release").first()
    if up is None:
        return {}
    links = [{"label": f"{up.get_kind_display().lower()} #{up.pk}",
              "url": reverse("admin:upgrades_upgrade_change", args=[up.pk])}]
    if up.backup_id:
        links.append({"label": f"safety backup #{up.backup_id}",
                      "url": reverse("admin:backups_backup_change", args=[up.backup_id])})
    summary = ""
    if up.status in Upgrade.TERMINAL:
        summary = f"{up.get_status_display()}: {versions_text(up.from_versions)} → {versions_text(up.to_versions)}"
        if up.dry_run:
            summary = f"preflight only ({up.get_status_display().lower()}): nothing was changed"
    return {"summary": summary, "links": links, "steps": steps_document(up)}
