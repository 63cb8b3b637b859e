"""Scratch database servers a killed worker left running are stopped and removed by the next drill
(engines.scratchsweep), and a forged owner file in a scratch folder never gets another process killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from engines import scratchsweep
from tests.conftest import BASE_DIR, require, wait_until

HOLDER = """
import sys, time
from engines.{module} import {cls}
with {cls}(base_dir=sys.argv[1]):
    print("up", flush=True)
    time.sleep(600)
"""
KINDS = {"pg": ("scratchdb", "ScratchPostgres", "kasa-scratch-pg-"),
         "mariadb": ("scratchmysql", "ScratchMariaDB", "kasa-scratch-my-")}


@pytest.fixture
def base():
    folder = tempfile.mkdtemp(prefix="kasa-sweep-", dir="/tmp")
    os.chmod(folder, 0o711)  # the scratch user (nobody) must pass through it
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    return scratchsweep._starttime(pid) is not None


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_scratch_server_left_by_a_killed_worker_is_stopped_and_removed_by_the_next_drill(base, kind):
    module, cls, prefix = KINDS[kind]
    if kind == "mariadb":
        require(os.path.exists("/usr/sbin/mariadbd"), "MariaDB server binaries (mariadb-server)")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(module=module, cls=cls), base], cwd=BASE_DIR,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        [folder] = [p for p in Path(base).iterdir() if p.name.startswith(prefix)]
        server = json.loads((folder / scratchsweep.OWNER_FILE).read_text())["server"]
        os.killpg(holder.pid, signal.SIGKILL)  # the worker dies mid-drill; its server lives on (own session)
        holder.wait()
        assert _alive(server)
        scratch = getattr(__import__(f"engines.{module}", fromlist=[cls]), cls)(base_dir=base)
        with scratch:  # the next drill's server sweeps first
            assert not folder.exists()
            wait_until(lambda: not _alive(server), 10, what="the left server to be gone")
            assert [p.name[: len(prefix)] for p in Path(base).iterdir()] == [prefix]  # only its own
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)


@pytest.mark.smoke
def test_a_forged_owner_file_neither_kills_another_process_nor_counts(base):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        folder = Path(base) / "kasa-scratch-pg-forged"
        folder.mkdir()
        # As Kasa would write it, but naming a process that is not a server of this folder: never killed.
        scratchsweep._write(str(folder), {"pid": 999999, "start": 1, "server": victim.pid,
                                          "server_start": scratchsweep._starttime(victim.pid)})
        assert scratchsweep.sweep(base, "kasa-scratch-pg-") == [str(folder)]
        assert victim.poll() is None
        # One the scratch user wrote (not Kasa's user): not trusted, the folder is left alone.
        other = Path(base) / "kasa-scratch-pg-other"
        other.mkdir()
        scratchsweep._write(str(other), {"pid": 999999, "start": 1})
        os.chown(other / scratchsweep.OWNER_FILE, 65534, 65534)
        assert scratchsweep.sweep(base, "kasa-scratch-pg-") == [] and other.exists()
    finally:
        victim.kill()
        victim.wait()
