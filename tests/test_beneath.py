"""engines.beneath and engines.ownership on real folders: paths below a customer's root are reached without
following a link the customer's user could have made, and a root is checked against the ownership model.

Links "of the customer's user" belong to uid 65534 here (the tests run as root, as the worker does)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from engines import beneath, ownership, runas, trees
from tests.conftest import NOBODY, as_unprivileged, wait_until

pytestmark = pytest.mark.smoke


def users_link(target, path: Path) -> Path:
    path.symlink_to(target)
    os.lchown(path, NOBODY, NOBODY)
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    top = tmp_path / "root"
    (top / "svc" / "logs").mkdir(parents=True)
    (top / "svc" / "logs" / "today.log").write_text("today\n")
    return top


@pytest.fixture
def outside(tmp_path) -> Path:
    top = tmp_path / "outside"
    (top / "logs").mkdir(parents=True)
    (top / "logs" / "keep.log").write_text("root's\n")
    return top


def test_a_link_of_the_customers_user_on_the_path_is_refused_and_nothing_changes(root, outside):
    users_link(outside, root / "a")
    for action in (lambda: beneath.rename(root, root / "a" / "logs", root / "moved"),
                   lambda: beneath.rename(root, root / "svc" / "logs", root / "a" / "logs"),
                   lambda: beneath.makedirs(root, root / "a" / "new"),
                   lambda: beneath.write_file(root, root / "a" / "x.txt", b"x"),
                   lambda: beneath.remove_tree(root, root / "a" / "logs"),
                   lambda: beneath.chown(root, root / "a" / "logs", NOBODY, NOBODY, recursive=True),
                   lambda: beneath.lstat(root, root / "a" / "logs")):
        with pytest.raises(beneath.LinkRefused, match=r"/a is a symbolic link \(of uid 65534\)"):
            action()
    assert sorted(os.listdir(outside)) == ["logs"] and (outside / "logs" / "keep.log").read_text() == "root's\n"
    assert os.stat(outside / "logs").st_uid == 0
    assert (root / "svc" / "logs" / "today.log").exists()


def test_kasas_own_link_is_followed_below_the_root_and_never_out_of_it(root, outside):
    (root / "releases" / "1.0.0" / "web").mkdir(parents=True)
    (root / "web").symlink_to("releases/1.0.0/web")  # a release link: made by Kasa's worker (root here)
    beneath.write_file(root, root / "web" / ".env", b"A=1\n", mode=0o600)
    assert (root / "releases" / "1.0.0" / "web" / ".env").read_text() == "A=1\n"
    assert beneath.is_link(root, root / "web") and not beneath.is_dir(root, root / "web")
    (root / "out").symlink_to(outside)  # the worker's own, but out of the root
    with pytest.raises(beneath.LinkRefused, match="leading out of"):
        beneath.lstat(root, root / "out" / "logs")
    (root / "loop").symlink_to("loop")
    with pytest.raises(beneath.LinkRefused):
        beneath.lstat(root, root / "loop" / "x")


def test_paths_outside_the_root_or_with_dotdot_are_refused(root):
    for bad in ("/etc/passwd", root / ".." / "outside", "svc/../../x"):
        with pytest.raises(beneath.NotBeneath):
            beneath.lstat(root, bad)
    with pytest.raises(beneath.LinkRefused, match="a customer's root must be a folder"):
        beneath.lstat(users_link(root, root.with_name("root-link")), "svc")


def test_removing_a_tree_never_follows_a_link_inside_it(root, outside):
    users_link(outside, root / "svc" / "logs" / "to-outside")
    beneath.remove_tree(root, root / "svc")
    assert not (root / "svc").exists()
    assert (outside / "logs" / "keep.log").read_text() == "root's\n"


def test_discard_renames_and_removes_in_the_same_folder_even_when_a_parent_is_swapped(root, outside, monkeypatch):
    """discard reaches the folder once: a parent swapped for a link between the rename and the removal leaves
    the outside alone (the removal acts on the folder it renamed, wherever that went)."""
    rename, swapped = os.rename, []

    def rename_then_swap(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        if os.path.basename(dst).startswith(trees.TRASH_PREFIX) and not swapped:
            rename(root / "svc", root / "svc.moved")
            users_link(outside, root / "svc")
            swapped.append(dst)

    monkeypatch.setattr(os, "rename", rename_then_swap)
    trees.discard(root / "svc" / "logs", root=root)
    assert swapped and os.listdir(root / "svc.moved") == []
    assert (outside / "logs" / "keep.log").read_text() == "root's\n"


@pytest.mark.parametrize("background", [False, True], ids=["at-once", "detached-rm"])
def test_discard_below_a_root_removes_read_only_folders_as_an_unprivileged_user(unprivileged_dir, background):
    from tests.test_trees import read_only_tree

    tree = read_only_tree(unprivileged_dir)
    as_unprivileged(trees.discard, tree, background=background, root=unprivileged_dir)
    wait_until(lambda: list(unprivileged_dir.iterdir()) == [], 30, what="the trash folder to be removed")


def test_an_atomic_write_replaces_the_file_and_never_follows_a_link_put_in_its_place(root, outside):
    users_link(outside / "logs" / "keep.log", root / "svc" / ".env")
    beneath.write_file(root, root / "svc" / ".env", b"B=2\n", mode=0o640, owner=(NOBODY, NOBODY))
    st = os.lstat(root / "svc" / ".env")
    assert stat.S_ISREG(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o640)
    assert (outside / "logs" / "keep.log").read_text() == "root's\n"
    assert [n for n in os.listdir(root / "svc") if n.startswith(".")] == [".env"]  # no temporary file left


def test_a_swap_exchanges_two_folders_and_its_undo_puts_them_back(root):
    from engines import swap

    (root / ".stage" / "svc").mkdir(parents=True)
    (root / ".stage" / "svc" / "new.txt").write_text("new")
    step = swap.plan(str(root / "svc"), str(root / ".stage" / "svc"), root=root)
    swap.apply(step, root=root)
    assert (root / "svc" / "new.txt").exists() and (root / ".stage" / "svc" / "logs").is_dir()
    assert swap.undo(step, root=root) and not swap.undo(step, root=root)
    assert (root / "svc" / "logs" / "today.log").exists()
    assert swap.undo({**step, "refused": "a link"}, root=root) is False


# --- the ownership model ---------------------------------------------------------------------------------------
def test_customer_check_finds_every_part_of_a_root_the_customers_user_could_change(root, customer_users):
    user = runas.lookup(customer_users[0])
    services = [("svc", "svc"), ("unit", "x/unit")]
    (root / "x" / "unit").mkdir(parents=True)
    (root / "releases" / "1.0.0").mkdir(parents=True)
    runas.give(root, user, recursive=True)  # the whole root handed over: what the model forbids
    root.chmod(0o770)
    found = "\n".join(ownership.problems(root, identity=user, services=services))
    assert f"the root folder {root} belongs to uid {user.uid}, not to Kasa's worker" in found
    assert "may be written by its group or others (mode 0770)" in found
    for kasa_folder in ("x", "releases", "releases/1.0.0"):
        assert f"{root / kasa_folder} belongs to uid {user.uid}" in found, kasa_folder

    ownership.hand_over(root, user, service_paths=[p for _n, p in services])
    assert ownership.problems(root, identity=user, services=services) == []
    assert (root.stat().st_uid, root.stat().st_gid, stat.S_IMODE(root.stat().st_mode)) == (0, user.gid, 0o750)
    assert (root / "x").stat().st_uid == 0 and (root / "x" / "unit").stat().st_uid == user.uid
    assert (root / "svc" / "logs" / "today.log").stat().st_uid == user.uid

    os.chown(root / "svc", 0, 0)
    users_link("/etc", root / "releases" / "2.0.0")
    found = "\n".join(ownership.problems(root, identity=user, services=services))
    assert f"service svc's folder {root / 'svc'} belongs to uid 0, not to {user.user}" in found
    assert f"{root / 'releases' / '2.0.0'} is a symbolic link, where Kasa keeps a folder of its own" in found
