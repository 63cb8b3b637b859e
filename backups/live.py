"""What a run page shows of a backup, restore or verify run (operations.registry.register_details): a summary a
person reads and links to the backups involved, read from the database while the run goes on and after."""

from __future__ import annotations

from django.urls import reverse

from engines.humanize import human_duration, human_size

from .models import Backup


def _link(label: str, backup_id) -> dict:
    return {"label": label, "url": reverse("admin:backups_backup_change", args=[backup_id])}


def backup_details(run) -> dict:
    bk = Backup.objects.filter(run_id=run.pk).only("pk", "status", "size").first()
    if bk is None:
        return {}
    summary = ""
    if bk.status == Backup.Status.SUCCEEDED:
        count = len((run.result or {}).get("artifacts") or []) or bk.artifacts.count()
        summary = f"backup #{bk.pk}: {count} artifact(s), {human_size(bk.size)}"
        if run.duration is not None:
            summary += f", in {human_duration(run.duration)}"
    return {"summary": summary, "links": [_link(f"backup #{bk.pk}", bk.pk)]}


def _safety_of(run) -> int | None:
    """The safety backup a restore took: from its result, or (while it runs) the backup pinned for it."""
    safety = (run.result or {}).get("safety_backup")
    if safety:
        return safety
    return (Backup.objects.filter(customer_id=run.customer_id, trigger=Backup.Trigger.RESTORE,
                                  pin_reason__endswith=f"run #{run.pk}").values_list("pk", flat=True).first())


def restore_details(run) -> dict:
    source = (run.params or {}).get("backup")
    links = [_link(f"restored from backup #{source}", source)] if source else []
    safety = _safety_of(run)
    if safety:
        links.append(_link(f"safety backup #{safety}", safety))
    summary = ""
    res = run.result or {}
    if run.status == run.Status.SUCCEEDED and res.get("backup"):
        what = ", ".join(res.get("artifacts") or []) or "everything"
        where = (f"copied to {res.get('root')}" if res.get("clone") else
                 f"moved to host {res.get('host')} ({res.get('root')}); the old copy "
                 f"{'stopped' if res.get('old_stopped') else 'NOT stopped'} on host {res.get('from_host')} at "
                 f"{res.get('old_root')} until the move is confirmed" if res.get("moved") else "restored in place")
        summary = f"backup #{res['backup']} {where} ({what})"
        if res.get("seconds") is not None:
            summary += f" in {human_duration(res['seconds'])}"
        if safety and not res.get("clone"):
            summary += f"; safety backup #{safety} keeps the previous state"
    return {"summary": summary, "links": links}


def verify_details(run) -> dict:
    source = (run.params or {}).get("backup")
    links = [_link(f"backup #{source}", source)] if source else []
    res = run.result or {}
    summary = ""
    if run.status == run.Status.SUCCEEDED and res.get("verified"):
        parts = []
        for c in res.get("checks") or []:
            if "tables" in c:
                parts.append(f"{c['artifact']}: {c['tables']} tables, {c['rows']} rows")
            else:
                parts.append(f"{c['artifact']}: {c.get('files', 0)} files, {human_size(c.get('bytes'))}")
        summary = f"backup #{res['backup']} restores"
        if res.get("seconds") is not None:
            summary += f" (drill of {human_duration(res['seconds'])})"
        if parts:
            summary += ": " + "; ".join(parts)
    return {"summary": summary, "links": links}
