"""What Kasa backs up, it restores (issue 15, point 7): random trees through a real backup and a real restore.

Seeded `random` (hypothesis is not a dependency): each seed builds a small tree of what real instances hold
and copies make (`cp -al` hard links, hard-linked symlinks, sparse files, 200-byte and non-UTF-8 names, empty
and read-only folders, odd modes, a log folder the backup leaves out), backs it up with `backup`, changes it,
restores it with `restore` (in place, or with --to-root into a new folder; every third seed as the customer's
own OS user; every fourth changed after a full and restored from a differential on it; a few seeds on a simulated
remote host) and requires the same digest: path bytes, type, mode, size,
content, link target, hard-link groups and each file's mtime to the second. A failing seed is printed with the
tree's listing, to be replayed alone.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from operations.models import Run
from tests.restore_helpers import command_json

pytestmark = pytest.mark.django_db(transaction=True)

SEEDS = range(20)
FILE_MODES = (0o644, 0o600, 0o444, 0o640, 0o755, 0o750, 0o700, 0o400)
DIR_MODES = (0o755, 0o700, 0o750, 0o775, 0o711, 0o555, 0o500)
ODD_NAMES = (b"caf\xe9", b"\xff\xfe", b"na\xefve-\x80.txt", "été".encode(), b"sp ace", b"-dash", b"q'uote\"",
             b"new\nline", b"back\\slash", b"*star?", b"[brackets]", b"tab\there")


def _name(rng: random.Random, taken: set[bytes]) -> bytes:
    while True:
        roll = rng.random()
        if roll < 0.15:
            name = rng.choice(ODD_NAMES) + b"%d" % rng.randrange(100)
        elif roll < 0.25:
            name = b"L" * rng.randrange(200, 250)  # a long component (ext4 allows 255 bytes)
        else:
            name = b"n%d" % rng.randrange(10_000)
        # The backup leaves out log folders (logs, log, *.log) on purpose; those are tested elsewhere.
        if name not in taken and name not in (b"logs", b"log") and not name.endswith(b".log"):
            taken.add(name)
            return name


def build_tree(top: bytes, rng: random.Random, *, logs: bool = True) -> None:
    """A random tree under `top` (which exists): folders first, then files, links and modes last."""
    dirs, taken = [top], {}
    for _ in range(rng.randrange(1, 6)):
        parent = rng.choice(dirs)
        d = os.path.join(parent, _name(rng, taken.setdefault(parent, set())))
        os.mkdir(d)
        dirs.append(d)
    files: list[bytes] = []
    for _ in range(rng.randrange(1, 9)):
        parent = rng.choice(dirs)
        path = os.path.join(parent, _name(rng, taken.setdefault(parent, set())))
        with open(path, "wb") as fh:
            if rng.random() < 0.25:  # sparse: holes between a few small writes, maybe a trailing hole
                size = rng.randrange(64 << 10, 3 << 20)
                for _ in range(rng.randrange(0, 4)):
                    fh.seek(rng.randrange(size))
                    fh.write(rng.randbytes(rng.randrange(1, 3000)))
                fh.truncate(size)
            else:
                fh.write(rng.randbytes(rng.choice((0, 1, 511, 512, 513, rng.randrange(5000)))))
        files.append(path)
    links: list[bytes] = []
    for _ in range(rng.randrange(0, 4)):  # symlinks that stay inside the service folder (some dangling)
        parent = rng.choice(dirs)
        roll = rng.random()
        target = os.path.relpath(rng.choice(files + dirs), parent) if roll < 0.6 else b"missing" if roll < 0.7 else \
            _detour(rng, parent, dirs, files + dirs)
        path = os.path.join(parent, _name(rng, taken.setdefault(parent, set())))
        os.symlink(target, path)
        links.append(path)
    for _ in range(rng.randrange(0, 4)):  # hard links, as cp -al makes: to files, and to symlinks
        if links and rng.random() < 0.5:
            src, parent = rng.choice(links), rng.choice(dirs)
            # The new name reads the same target from its own folder: elsewhere only where it stays inside.
            if _climbs_out(os.path.relpath(os.path.join(parent, b"x"), top), os.readlink(src)):
                parent = os.path.dirname(src)
        else:
            src, parent = rng.choice(files), rng.choice(dirs)
        os.link(src, os.path.join(parent, _name(rng, taken.setdefault(parent, set()))), follow_symlinks=False)
    if logs and rng.random() < 0.3:  # a log folder: left out of the backup, carried over by an in-place restore
        os.makedirs(os.path.join(top, b"logs", rng.choice(ODD_NAMES)))
        with open(os.path.join(top, b"logs", rng.choice(ODD_NAMES) + b".log"), "wb") as fh:
            fh.write(b"log line\n")
    for path in files:
        os.utime(path, (1_600_000_000, rng.randrange(1_000_000_000, 1_700_000_000)))
        os.chmod(path, rng.choice(FILE_MODES))
    for d in reversed(dirs[1:]):  # deepest last-made first: a 0o711 folder still lets tar reach its children
        os.chmod(d, rng.choice(DIR_MODES))


def _detour(rng: random.Random, parent: bytes, dirs: list[bytes], targets: list[bytes]) -> bytes:
    """A target that goes down into a folder and climbs back out with '..' (`sub/../x`): it stays inside, and
    tar may archive the link before or after `sub`."""
    via = rng.choice(dirs)
    down = os.path.relpath(via, parent)
    back = os.path.relpath(rng.choice(targets), via)
    return down + b"/" + back


def _climbs_out(rel: bytes, target: bytes) -> bool:
    depth = rel.count(b"/") + 1  # the service folder itself is one level below the extraction folder
    for part in target.split(b"/"):
        depth += -1 if part == b".." else 0 if part in (b"", b".") else 1
        if depth < 0:
            return True
    return False


def digest(top: bytes) -> dict:
    """path bytes → (type, mode, size, sha256 | link target, mtime) and the hard-link groups (sets of paths)."""
    entries, groups = {}, {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                assert stat.S_ISREG(st.st_mode), rel
                with open(path, "rb") as fh:
                    sha = hashlib.sha256(fh.read()).hexdigest()
                entries[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, sha, int(st.st_mtime))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                groups.setdefault(st.st_ino, set()).add(rel)
    return {"entries": entries, "hardlinks": sorted(sorted(g) for g in groups.values())}


def _listing(d: dict) -> str:
    return "\n".join(f"  {k!r}: {v}" for k, v in sorted(d["entries"].items())) + f"\n  links: {d['hardlinks']}"


def _spoil(top: bytes, rng: random.Random) -> None:
    """What happens after a backup: the folder's content replaced by something else."""
    for name in os.listdir(top):
        if name == b"logs":
            continue  # not in the backup: an in-place restore keeps the live one
        path = os.path.join(top, name)
        if os.path.isdir(path) and not os.path.islink(path):
            for dirpath, dirnames, _ in os.walk(path):
                for d in dirnames:
                    os.chmod(os.path.join(dirpath, d), 0o755)
            shutil.rmtree(path)
        else:
            os.unlink(path)
    with open(os.path.join(top, b"after-the-backup"), "wb") as fh:
        fh.write(rng.randbytes(100))


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_tree_comes_back_identical(make_customer, customer_users, seed):
    rng = random.Random(seed)
    customer = make_customer(services=("app",))
    top = os.fsencode(customer.root_path() / "app")
    build_tree(top, rng)
    if seed % 3 == 0:  # restored as the customer's own OS user, as in production (tar is then not root)
        import pwd

        customer.run_as = customer_users[0]
        customer.save()
        pw = pwd.getpwnam(customer.run_as)
        for dirpath, dirnames, filenames in os.walk(customer.root_path()):
            for name in [*dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)
    before = digest(top)
    backup = _backed_up(customer, seed, "--full")
    if seed % 4 == 1:  # then changed, and a differential on that full: the chain restores the changed tree
        _change(top, rng)
        before = digest(top)
        backup = _backed_up(customer, seed, "--differential")
        assert backup["kind"] == "differential", backup

    in_place = seed % 2 == 0
    if in_place:
        _spoil(top, rng)
        code, run = command_json("restore", str(backup["id"]), "--yes", "--no-safety-backup")
        restored = top
    else:
        copy = Path(settings.KASA_CUSTOMERS_ROOT) / f"copy-{uuid.uuid4().hex[:8]}"
        code, run = command_json("restore", str(backup["id"]), "--yes", "--to-root", str(copy))
        restored = os.fsencode(copy / "app")
    try:
        assert code == 0 and run["status"] == "succeeded", f"seed {seed}: {run}\n{_listing(before)}"
        after = digest(restored)
        if not in_place:  # a copy has no logs: the backup left them out
            before["entries"] = {k: v for k, v in before["entries"].items() if not k.startswith(b"logs")}
        assert after == before, f"seed {seed} differs after the restore; before:\n{_listing(before)}\n" \
                                f"after:\n{_listing(after)}"
    finally:
        if not in_place:
            shutil.rmtree(copy, ignore_errors=True)


def _backed_up(customer, seed: int, kind: str) -> dict:
    code, backup = command_json("backup", customer.domain, "--scope", "files", kind)
    assert code == 0 and backup["status"] == "succeeded", backup
    warned = Run.objects.get(backup__pk=backup["id"]).log_lines.filter(level="warning")
    assert not [w.text for w in warned if "restore" in w.text], f"seed {seed}: warned {[w.text for w in warned]}"
    return backup


def _change(top: bytes, rng: random.Random) -> None:
    """What a day does to a tree between a full and a differential: files rewritten, removed, re-moded and
    hard-linked anew, a folder removed, a new subtree of every kind."""
    def entries(kind):
        found = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not (dirpath == top and d == b"logs")]
            found += [os.path.join(dirpath, n) for n in (dirnames if kind == "dir" else filenames)
                      if not os.path.islink(os.path.join(dirpath, n))
                      and (kind == "dir" or os.path.isfile(os.path.join(dirpath, n)))]
        return found

    for _ in range(rng.randrange(2, 7)):
        files, dirs = entries("file"), entries("dir")
        op = rng.choice(("rewrite", "remove", "mode", "link", "rmtree", "grow"))
        if op == "rewrite" and files:
            path = rng.choice(files)
            with open(path, "r+b") as fh:
                fh.write(rng.randbytes(rng.randrange(1, 700)))
            os.utime(path, (1_600_000_000, rng.randrange(1_000_000_000, 1_700_000_000)))
        elif op == "remove" and files:
            os.unlink(rng.choice(files))
        elif op == "mode" and files:
            os.chmod(rng.choice(files), rng.choice(FILE_MODES))
        elif op == "link" and files:
            src = rng.choice(files)
            os.link(src, os.path.join(rng.choice([top, *dirs]), b"hl%d" % rng.randrange(10_000)))
        elif op == "rmtree" and dirs:
            gone = rng.choice(dirs)
            for dirpath, dirnames, _ in os.walk(gone):
                for d in dirnames:
                    os.chmod(os.path.join(dirpath, d), 0o755)
            shutil.rmtree(gone)
        else:
            new = os.path.join(rng.choice([top, *dirs]), b"new%d" % rng.randrange(10_000))
            os.mkdir(new)
            build_tree(new, rng, logs=False)  # a log folder below is left out of backups too


REMOTE_SEEDS = range(100, 103)


@pytest.fixture(scope="module")
def tree_host(netns_hosts):
    """One simulated host for the remote seeds (a namespace with sshd takes a second or two to make)."""
    return netns_hosts.make()


@pytest.mark.parametrize("seed", REMOTE_SEEDS)
def test_a_random_tree_on_a_remote_host_comes_back_identical(tree_host, team, customer_users, parents_open, seed):
    """The same through SSH: tar on the host, the archive checked on the worker, then unpacked and checked on the
    host (engines.hostrestore runs the same treecheck there) as the customer's user."""
    import pwd
    import subprocess

    from backups.models import Backup
    from customers.models import Service
    from tests.remote_fixtures import make_host, run_backup
    from tests.test_remote_restore import _customer, _restore

    rng = random.Random(seed)
    h = tree_host
    host = make_host(h, f"web-tree-{seed}")
    customer, _url = _customer(h, host, team, customer_users[0], parents_open, health=False)
    Service.objects.filter(customer=customer).update(process_manager=Service.ProcessManager.NONE)  # files only
    top = os.fsencode(Path(customer.root) / "backend")
    for name in os.listdir(top):  # the fixture's files make way for the random tree
        path = os.path.join(top, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    build_tree(top, rng)
    who = pwd.getpwnam(customer_users[0])
    subprocess.run(["chown", "-hR", f"{who.pw_uid}:{who.pw_gid}", os.fsdecode(top)], check=True)
    before = digest(top)
    run = run_backup(customer, scope="files")
    assert run.status == "succeeded", run.error
    assert not [w for w in run.log_lines.filter(level="warning").values_list("text", flat=True) if "restore" in w]
    _spoil(top, rng)
    run = _restore(Backup.objects.get(run=run), safety_backup=False)
    assert run.status == "succeeded", f"seed {seed}: {run.error}\n{_listing(before)}"
    after = digest(top)
    assert after == before, f"seed {seed} differs after the restore; before:\n{_listing(before)}\nafter:\n" \
                            f"{_listing(after)}"

