"""The import graph (docs/ARCHITECTURE.md, "Import graph"): the contracts `make lint` checks hold, and what the
customer page gets from backups and upgrades comes through customers.page, not from imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ["config", "console", "rollouts", "upgrades", "backups", "releases", "customers", "hosts", "operations", "audit",
        "core", "engines"]


def lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return exe


@pytest.mark.smoke
def test_the_import_contracts_hold():
    result = subprocess.run([lint_imports()], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.smoke
def test_customers_imports_neither_backups_nor_upgrades_nor_console():
    graph = grimp.build_graph(*APPS)
    for above in ("backups", "upgrades", "console", "releases", "rollouts"):
        chains = graph.find_shortest_chains(importer="customers", imported=above)
        assert not chains, f"customers reaches {above}: {sorted(chains)}"


@pytest.mark.smoke
def test_the_customer_page_gets_cards_pages_and_actions_from_the_apps_above():
    from customers import page

    card_names = [f"{c.__module__}.{c.__name__}" for c in page.cards()]
    assert card_names == ["backups.customer_page.backups_card", "backups.customer_page.recovery_card",
                          "upgrades.customer_page.versions"]
    assert [p.route for p in page.pages()] == ["backup", "move", "move_confirm", "upgrade", "rollback"]
    assert [(a.function, a.permission) for a in page.actions()] == [
        ("backups.customer_page.backup_action", "backups.add_backup"),
        ("rollouts.views.rollout_action", "rollouts.add_rollout")]
