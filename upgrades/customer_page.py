"""What upgrades add to the customer's admin page (registered in UpgradesConfig.ready() with customers.page):
the Versions card and the upgrade history; the "Upgrade to…" and "Roll back" pages are upgrades.views'."""

from __future__ import annotations

from .admin_selectors import upgrade_history, versions_card


def versions(request, customer) -> dict:
    return {"versions_card": versions_card(customer), "upgrades": upgrade_history(customer)}
