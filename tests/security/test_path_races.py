"""Attack: a customer's user swaps a folder for a link while Kasa's worker, as root, works in its tree.

The worker renames, moves, chmods, chowns and deletes below each customer's root; the customer's OS user owns
what its code runs in there and can change it at any moment. Before the fix those operations went by path: a
folder on the path swapped for a link, between Kasa's check and its use, made root act outside the customer's
tree (carrying `app/logs` with `app` swapped for a link to /var moved /var/logs; a swap of `x/system` with `x`
swapped for a link to /etc/systemd put customer-owned unit files into /etc/systemd/system).

Each test plays the customer's user at the worst moment — through a hook on the journal (a step is written just
before it is made), on the prune plan, or on the rename that sends a folder to the trash — and swaps a folder on
the path for a link of that user's to a folder outside the root (`outside`). Then nothing outside the root may
have been renamed, moved, chmodded, chowned or deleted (inode, type, mode, owner and content of every entry are
compared), and the run either failed cleanly — its refusal names the link, and the customer is as it was but
for the swap the attacker made — or succeeded without touching the outside. Real restores and upgrades, in this
process, with the local storage target; the customer's files belong to a real OS user (kasa-t-alpha).

The roots here are handed to the customer's user whole, as roots were before Kasa kept them its own (README,
"Security model"; customer_check reports such a root): the user may then rename anything in them, releases/
included when it made that folder itself. The worker must not be fooled even there.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from customers.models import Customer
from engines import runas
from operations.journal import RunJournal
from tests.restore_helpers import command_json, tree_state
from tests.upgrade_fixtures import one_component_release

pytestmark = [pytest.mark.smoke, pytest.mark.django_db(transaction=True)]


# --- what the attacker does, and what must not change --------------------------------------------------------
def snapshot(top: Path) -> dict:
    """Every entry under `top` (itself included): type, mode, owner, inode and content or link text."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for path in [dirpath] if dirpath == str(top) else []:
            state["."] = _entry(Path(path))
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            state[str(path.relative_to(top))] = _entry(path)
    return state


def _entry(path: Path) -> tuple:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        kind, body = "link", os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        kind, body = "dir", None
    else:
        kind, body = "file", hashlib.sha256(path.read_bytes()).hexdigest()
    return kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_ino, body


def swap_for_link(folder: Path, target: Path, user: runas.Identity) -> Path:
    """What the customer's user can do to a folder whose parent it may write: rename it away and put its own
    link in its place. Returns where the folder went."""
    moved = folder.with_name(folder.name + ".moved")
    os.rename(folder, moved)
    os.symlink(target, folder)
    os.lchown(folder, user.uid, user.gid)
    return moved


def hook_journal(monkeypatch, kind: str, attack) -> list:
    """Run `attack(step)` once, right after the first journal step of `kind` is written (just before it is made)."""
    done: list = []
    add = RunJournal.add

    def add_then_attack(self, step):
        step = add(self, step)
        if step.get("type") == kind and not done:
            done.append(step)
            attack(step)
        return step

    monkeypatch.setattr(RunJournal, "add", add_then_attack)
    return done


@pytest.fixture
def alpha(customer_users) -> runas.Identity:
    return runas.lookup(customer_users[0])


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside every customer's root, with something worth taking (root's, 0755 and 0644)."""
    top = tmp_path / "outside"
    for rel in ("logs", "system", "web", "precious"):
        (top / rel).mkdir(parents=True)
        (top / rel / "keep.txt").write_text(f"{rel}: root's own, outside the customer's root\n")
    (top / "system" / "kasa-canary.service").write_text("[Service]\nExecStart=/bin/true\n")
    (top / "secret.conf").write_text("root's secret\n")
    (top / "secret.conf").chmod(0o640)
    return top


def hand_over(customer: Customer, user: runas.Identity) -> None:
    """The whole root given to the customer's user (see the module docstring)."""
    runas.give(customer.root_path(), user, recursive=True)
    customer.run_as = user.user
    customer.full_clean()
    customer.save()


def customer_with(make_customer, user, files: dict[str, str], *, services=("backend",), paths=None,
                  releases=False) -> Customer:
    customer = make_customer(services=services)
    root = customer.root_path()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for name, path in (paths or {}).items():
        customer.services.filter(name=name).update(path=path)
        (root / name).rmdir()  # made by make_customer at the service's name
    if releases:
        (root / "releases").mkdir()  # the user's own folder, made before Kasa's first upgrade
    hand_over(customer, user)
    return customer


def as_swapped(was: dict, folder: str, link: Path) -> dict:
    """`was` after the attacker renamed `folder` to `folder.moved` and put a link to `link` in its place."""
    out = {}
    for rel, state in was.items():
        if rel == folder or rel.startswith(folder + "/"):
            rel = folder + ".moved" + rel[len(folder):]
        out[rel] = state
    return {**out, folder: ("link", str(link))}


def backup(customer) -> int:
    code, doc = command_json("backup", customer.domain)
    assert code == 0, doc
    return doc["id"]


# --- restores -------------------------------------------------------------------------------------------------
def test_carrying_a_log_folder_never_moves_a_folder_from_outside_the_root(make_customer, alpha, outside,
                                                                          monkeypatch):
    customer = customer_with(make_customer, alpha, {"backend/app/main.js": "v1\n",
                                                    "backend/app/logs/today.log": "today\n"})
    root = customer.root_path()
    bk = backup(customer)  # logs are not in backups: the restore carries them over instead
    (root / "backend" / "app" / "main.js").write_text("broken\n")
    before, was = snapshot(outside), tree_state(root)
    swapped = []
    # Right before root moves backend/app/logs into the restored tree: `app` becomes a link to the outside,
    # which has a `logs` folder too.
    hook_journal(monkeypatch, "carry", lambda step: swapped.append(swap_for_link(root / "backend" / "app", outside,
                                                                               alpha)))
    code, run = command_json("restore", str(bk), "--yes")
    assert swapped, "the restore never carried the log folder"
    assert snapshot(outside) == before, "root moved a folder from outside the customer's root"
    assert code == 1 and "backend/app is a symbolic link" in run["error"], run
    assert "the pre-restore state was put back" in run["error"], run["error"]
    # As it was, but for the attacker's own swap: the live tree is where the attacker moved it, logs included.
    assert tree_state(root) == as_swapped(was, "backend/app", outside)


def test_a_restore_never_swaps_a_folder_outside_the_root_in(make_customer, alpha, outside, monkeypatch):
    """Between staging and the swap (the services just stopped), `x` of the service path `x/system` becomes a
    link to a folder that has a `system` folder of its own, as /etc/systemd has."""
    customer = customer_with(make_customer, alpha, {"x/system/unit.service": "[Service]\nExecStart=/evil\n"},
                             services=("system",), paths={"system": "x/system"})
    root = customer.root_path()
    bk = backup(customer)
    before, was = snapshot(outside), tree_state(root)
    swapped = []
    hook_journal(monkeypatch, "services_stopped", lambda step: swapped.append(swap_for_link(root / "x", outside,
                                                                                         alpha)))
    code, run = command_json("restore", str(bk), "--yes")
    assert swapped
    assert snapshot(outside) == before, "root swapped the customer's files into a folder outside its root"
    assert code == 1 and "/x is a symbolic link" in run["error"], run
    assert tree_state(root) == as_swapped(was, "x", outside)
    assert not [p for p in root.iterdir() if p.name.startswith(".kasa-")]  # staging and trash gone


# --- upgrades -------------------------------------------------------------------------------------------------
def _release(tmp_path, version="1.0.0", release="1.0", hooks=None):
    return one_component_release(tmp_path / f"pkg-{version}", "web", {"index.html": f"web {version}\n"},
                                 version=version, release=release, hooks=hooks)


def test_a_release_switch_never_moves_or_replaces_a_folder_outside_the_root(make_customer, alpha, outside,
                                                                            monkeypatch, tmp_path):
    """The switch's step is journalled; then `apps` of the service path `apps/web` becomes a link to a folder
    that has a `web` folder (a plain folder: the switch moves it into releases/ and puts a link in its place)."""
    customer = customer_with(make_customer, alpha, {"apps/web/index.html": "web 0.9\n"}, services=("web",),
                             paths={"web": "apps/web"})
    root = customer.root_path()
    _release(tmp_path)
    before, was = snapshot(outside), tree_state(root)
    swapped = []
    hook_journal(monkeypatch, "switch", lambda step: swapped.append(swap_for_link(root / "apps", outside, alpha)))
    code, doc = command_json("upgrade", customer.domain, "--to", "1.0")
    assert swapped
    assert snapshot(outside) == before, "root moved or replaced a folder outside the customer's root"
    assert code == 1 and doc["status"] == "rolled_back", doc
    assert "/apps is a symbolic link" in doc["error"], doc["error"]
    now = {k: v for k, v in tree_state(root).items() if not k.startswith("releases")}
    assert now == as_swapped(was, "apps", outside)
    assert Customer.objects.get(pk=customer.pk).versions == {}


def test_pruning_old_releases_never_deletes_a_folder_outside_the_root(make_customer, alpha, outside, monkeypatch,
                                                                      tmp_path, settings):
    """Keep no old release: the upgrade from 1.0 to 1.1 prunes the plain folder kept as `unversioned`; once the
    plan is made, releases/unversioned becomes a link to a folder that has a `web` folder."""
    settings.KASA_KEEP_RELEASES = 0
    customer = customer_with(make_customer, alpha, {"web/index.html": "web 0.9\n"}, services=("web",),
                             releases=True)
    root = customer.root_path()
    _release(tmp_path)
    assert command_json("upgrade", customer.domain, "--to", "1.0")[0] == 0
    _release(tmp_path, "1.1.0", "1.1")
    before = snapshot(outside)
    from engines import layout

    plan, swapped = layout.prune_plan, []

    def plan_then_attack(*args, **kwargs):
        doomed = plan(*args, **kwargs)
        if "unversioned" in doomed and not swapped:
            swapped.append(swap_for_link(root / "releases" / "unversioned", outside, alpha))
        return doomed

    monkeypatch.setattr(layout, "prune_plan", plan_then_attack)
    code, doc = command_json("upgrade", customer.domain, "--to", "1.1")
    assert swapped, "nothing was pruned"
    assert snapshot(outside) == before, "root deleted a folder outside the customer's root"
    assert code == 0 and doc["status"] == "succeeded", doc
    assert os.readlink(root / "web") == "releases/1.1.0/web" and (root / "releases" / "1.0.0" / "web").is_dir()


def test_removing_a_failed_releases_trash_never_deletes_a_folder_outside_the_root(make_customer, alpha, outside,
                                                                                  monkeypatch, tmp_path):
    """The release's build hook fails: the upgrade is put back and its staged release thrown away — renamed to
    a trash name, then removed. As root renames it, releases/1.0.0 becomes a link to a folder that has a `web`
    folder."""
    customer = customer_with(make_customer, alpha, {"web/index.html": "web 0.9\n"}, services=("web",),
                             releases=True)
    root = customer.root_path()
    _release(tmp_path, hooks={"build": ["/bin/false"]})
    before, was = snapshot(outside), tree_state(root)
    rename, swapped = os.rename, []

    def attack_then_rename(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)).startswith(".kasa-trash-web") and not swapped:
            swapped.append(swap_for_link(root / "releases" / "1.0.0", outside, alpha))
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", attack_then_rename)
    code, doc = command_json("upgrade", customer.domain, "--to", "1.0")
    assert swapped, "the staged release was never thrown away"
    assert snapshot(outside) == before, "root deleted a folder outside the customer's root"
    assert code == 1 and doc["status"] == "rolled_back" and "build hook" in doc["error"], doc
    assert {k: v for k, v in tree_state(root).items() if not k.startswith("releases")} == {
        k: v for k, v in was.items() if not k.startswith("releases")}


def test_writing_a_releases_env_never_chmods_a_file_outside_the_root(make_customer, alpha, outside, monkeypatch,
                                                                     tmp_path):
    """The merged .env is written into the staged release folder, which belongs to the customer's user: the
    file Kasa writes there is swapped for a link to a file outside before Kasa sets its mode."""
    customer = customer_with(make_customer, alpha, {"web/index.html": "web 0.9\n", "web/.env": "A=1\n"},
                             services=("web",))
    _release(tmp_path)
    before = snapshot(outside)
    chmod, swapped = os.chmod, []

    def attack_then_chmod(path, mode, *args, **kwargs):
        if isinstance(path, (str, Path)) and os.path.basename(path).startswith(".env.kasa-") and not swapped:
            os.unlink(path)
            os.symlink(outside / "secret.conf", path)
            os.lchown(path, alpha.uid, alpha.gid)
            swapped.append(path)
        return chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", attack_then_chmod)
    code, doc = command_json("upgrade", customer.domain, "--to", "1.0")
    assert snapshot(outside) == before, "root chmodded a file outside the customer's root"
    assert code == 0 and doc["status"] == "succeeded", doc
    assert (customer.root_path() / "web" / ".env").read_text() == "A=1\n"
