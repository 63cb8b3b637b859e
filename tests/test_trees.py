"""Removing trees that hold read-only folders, as the unprivileged user Kasa's worker is in production."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engines import trees
from tests.conftest import NOBODY, as_unprivileged, wait_until

pytestmark = pytest.mark.smoke


def read_only_tree(top: Path) -> Path:
    """A tree owned by uid 65534 whose folders that user may not write (0555) or even read (0000, 0100)."""
    tree = top / "svc"
    for rel in ("ro/deeper", "locked", "search-only/inside"):
        (tree / rel).mkdir(parents=True)
    (tree / "ro" / "deeper" / "file.txt").write_text("x")
    (tree / "locked" / "secret.txt").write_text("y")
    (tree / "search-only" / "inside" / "z.txt").write_text("z")
    (tree / "ro" / "link").symlink_to("/etc")  # never followed, never changed
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), NOBODY, NOBODY, follow_symlinks=False)
    os.chown(tree, NOBODY, NOBODY)
    for rel, mode in (("ro/deeper", 0o555), ("ro", 0o555), ("locked", 0o000), ("search-only", 0o100)):
        (tree / rel).chmod(mode)
    return tree


def test_plain_rmtree_cannot_remove_read_only_folders_as_an_unprivileged_user(unprivileged_dir):
    import shutil

    tree = read_only_tree(unprivileged_dir)

    def attempt():
        with pytest.raises(PermissionError):
            shutil.rmtree(tree)

    as_unprivileged(attempt)  # why engines.trees exists
    assert tree.exists()


def test_remove_tree_removes_read_only_folders_as_an_unprivileged_user(unprivileged_dir):
    tree = read_only_tree(unprivileged_dir)
    as_unprivileged(trees.remove_tree, tree)
    assert not tree.exists()
    assert Path("/etc").is_dir() and oct(Path("/etc").stat().st_mode)[-3:] == "755"


@pytest.mark.parametrize("background", [False, True], ids=["at-once", "detached-rm"])
def test_discard_removes_read_only_folders_as_an_unprivileged_user(unprivileged_dir, background):
    tree = read_only_tree(unprivileged_dir)
    as_unprivileged(trees.discard, tree, background=background)
    assert not tree.exists()
    wait_until(lambda: list(unprivileged_dir.iterdir()) == [], 30, what="the trash folder to be removed")
