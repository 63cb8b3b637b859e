"""What a run page shows of a check run (operations.registry.register_details): a one-line summary."""

from __future__ import annotations


def check_details(run) -> dict:
    res = run.result or {}
    if "ok" not in res:
        return {}
    if res["ok"]:
        return {"summary": f"everything reachable: root folder, {len(res.get('databases') or [])} database(s), "
                           f"{len(res.get('services') or [])} service(s)"}
    return {"summary": f"{len(res.get('problems') or [])} problem(s) found"}
