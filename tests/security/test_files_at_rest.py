"""Kasa's own files at rest: the var folder is 0700, its control database (with WAL and SHM), keys and local
backup artifacts 0600, so that no other local user — a customer's code above all — can read sessions, encrypted
credentials or keys."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_settings import BASE_DIR, base_env

# Runs in a fresh process with a fresh KASA_VAR_DIR: migrate, keep a connection open with a write (so the WAL and
# SHM files exist), write one local backup artifact, and report the modes.
PROBE = r"""
import json, os, stat, sys
import django
django.setup()
from django.conf import settings
from django.core.management import call_command
from django.db import connection
call_command("migrate", verbosity=0)
from django.contrib.sessions.models import Session
from django.utils import timezone
Session.objects.create(session_key="k" * 32, session_data="secret", expire_date=timezone.now())
from engines.stores.local import LocalStore
store = LocalStore(str(settings.KASA_BACKUP_DIR))
from engines.artifact import write_bytes
write_bytes(store, "shop/1/backup.json", b"{}")
var = settings.KASA_VAR_DIR
paths = {"var": var, "db": var / "kasa.sqlite3", "wal": var / "kasa.sqlite3-wal", "shm": var / "kasa.sqlite3-shm",
         "secret_keys": var / "kasa_secret_keys", "backup_keys": var / "kasa_backup_keys",
         "django_key": var / "django_secret_key", "artifact": settings.KASA_BACKUP_DIR / "shop/1/backup.json"}
print(json.dumps({k: stat.S_IMODE(os.stat(p).st_mode) for k, p in paths.items()}))
"""


@pytest.fixture
def open_parent():
    """A folder any local user may enter (pytest's tmp_path lies under a 0700 folder of root, which would hide
    Kasa's files for the wrong reason)."""
    top = Path(tempfile.mkdtemp(prefix="kasa-at-rest-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top)


def test_control_database_keys_and_artifacts_are_private_to_kasa(open_parent, customer_users):
    var = open_parent / "var"
    env = base_env(var, KASA_CUSTOMERS_ROOT=str(open_parent / "customers"))
    env.pop("DATABASE_URL", None)  # the default: SQLite in the var folder
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=BASE_DIR, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    modes = json.loads(done.stdout.strip().splitlines()[-1])
    assert modes.pop("var") == 0o700
    assert modes == dict.fromkeys(modes, 0o600), {k: oct(v) for k, v in modes.items()}

    # A customer's user (what its start command runs as) reads none of it.
    for name in ("kasa.sqlite3", "kasa.sqlite3-wal", "kasa_backup_keys", "kasa_secret_keys"):
        read = subprocess.run(["cat", str(var / name)], capture_output=True, user=customer_users[0],
                              group=customer_users[0], extra_groups=[], timeout=30)
        assert read.returncode != 0 and b"Permission denied" in read.stderr, name
    listing = subprocess.run(["ls", str(var)], capture_output=True, user=customer_users[0], timeout=30)
    assert listing.returncode != 0


def test_an_existing_var_folder_open_to_others_is_tightened(open_parent):
    var = open_parent / "var"
    var.mkdir(mode=0o755)
    var.chmod(0o755)
    env = base_env(var, KASA_CUSTOMERS_ROOT=str(open_parent / "customers"))
    done = subprocess.run([sys.executable, "manage.py", "check"], cwd=BASE_DIR, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert stat.S_IMODE(os.stat(var).st_mode) == 0o700
    # The customers' folder stays reachable (not listable) by customer users.
    assert stat.S_IMODE(os.stat(open_parent / "customers").st_mode) == 0o711


def test_giving_a_tree_to_a_customer_never_follows_a_link_out_of_it(tmp_path, customer_users):
    """runas.give walks by directory descriptors: a link inside the tree (which the customer may plant or swap
    in at any moment) is given itself, never what it points at."""
    import pwd

    from engines import runas

    outside = tmp_path / "kasa-own"
    outside.mkdir()
    (outside / "secret").write_text("root's")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text("x")
    (tree / "link").symlink_to(outside)
    (tree / "sub" / "file-link").symlink_to(outside / "secret")
    who = runas.lookup(customer_users[0])
    runas.give(tree, who, recursive=True)
    uid = pwd.getpwnam(customer_users[0]).pw_uid
    for p in (tree, tree / "sub", tree / "sub" / "file", tree / "link", tree / "sub" / "file-link"):
        assert os.lstat(p).st_uid == uid, p
    assert os.lstat(outside).st_uid == 0 and os.lstat(outside / "secret").st_uid == 0


def test_artifacts_a_root_worker_writes_are_kasas_users_and_nobody_elses(open_parent):
    """Deployed with the worker as root (it switches to each customer's user) and the web process as Kasa's own
    user, who owns KASA_VAR_DIR: what the worker writes into a local storage target belongs to Kasa's user
    (the web process streams it for downloads), 0600 in 0700 folders, still closed to everybody else."""
    from tests.conftest import NOBODY, as_unprivileged

    var = open_parent / "var"
    var.mkdir(mode=0o700)
    os.chown(var, NOBODY, NOBODY)  # Kasa's user owns its var folder; this worker is root
    probe = r"""
import json, os, stat
import django
django.setup()
from django.conf import settings
from backups.models import StorageTarget
from engines.artifact import write_bytes
target = StorageTarget(name="local", kind="local", path=str(settings.KASA_BACKUP_DIR))
write_bytes(target.store(), "shop/1/db-main.sql.zst.enc", b"artifact")
found = {}
for p in [settings.KASA_BACKUP_DIR, settings.KASA_BACKUP_DIR / "shop", settings.KASA_BACKUP_DIR / "shop/1",
          settings.KASA_BACKUP_DIR / "shop/1/db-main.sql.zst.enc"]:
    st = os.stat(p)
    found[str(p)] = [st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)]
print(json.dumps({"owner": settings.KASA_FILES_OWNER, "found": found}))
"""
    env = base_env(var, KASA_CUSTOMERS_ROOT=str(open_parent / "customers"))
    done = subprocess.run([sys.executable, "-c", probe], cwd=BASE_DIR, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["owner"] == [NOBODY, NOBODY]
    for path, (uid, gid, mode) in doc["found"].items():
        assert (uid, gid) == (NOBODY, NOBODY), path
        assert mode == (0o600 if path.endswith(".enc") else 0o700), (path, oct(mode))

    artifact = var / "backups" / "shop" / "1" / "db-main.sql.zst.enc"

    def read_as_kasas_user():
        from engines.stores.local import LocalStore

        with LocalStore(str(var / "backups")).open_read("shop/1/db-main.sql.zst.enc") as fh:
            assert fh.read() == b"artifact"

    as_unprivileged(read_as_kasas_user)
    assert stat.S_IMODE(os.stat(artifact).st_mode) == 0o600
