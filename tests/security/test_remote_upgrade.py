"""A release hook on a remote host (issue 14, point 2) runs through engines.hostupgrade.HOOK_LAUNCHER: as the
customer's user (never root, no supplementary groups), in a folder reached without following a link, with a clean
environment whose own part (the merged .env: secrets) comes on stdin, never in argv. The launcher is plain
`python3 -c`: run here as the host would run it (the simulated hosts share this machine's filesystem)."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys

from engines.hostupgrade import HOOK_LAUNCHER

PROBE = ("import json, os; print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(), "
         "'cwd': os.getcwd(), 'env': dict(os.environ), 'umask': os.umask(0)}))")


def _launch(root, rel, user, env, argv=None, limit=30):
    return subprocess.run([sys.executable, "-I", "-c", HOOK_LAUNCHER, str(root), rel, user, str(limit),
                           *(argv or ["/usr/bin/python3", "-c", PROBE])],
                          input=json.dumps({"env": env}).encode() + b"\n", capture_output=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "KASA_SECRET_KEYS": "worker-secret", "LANG": "C.UTF-8"})


def test_a_hook_runs_as_the_customers_user_in_its_folder_with_the_env_from_stdin_and_nothing_of_kasas(
        tmp_path, customer_users):
    user = customer_users[0]
    who = pwd.getpwnam(user)
    root = tmp_path / "shop"
    (root / "releases" / "2.0.0" / "backend").mkdir(parents=True)
    for p in (tmp_path, root, root / "releases", root / "releases" / "2.0.0", root / "releases" / "2.0.0" / "backend"):
        p.chmod(0o755)
    res = _launch(root, "releases/2.0.0/backend", user, {"API_SECRET": "s3cr3t-value", "PORT": "8080"})
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert (seen["uid"], seen["gid"]) == (who.pw_uid, who.pw_gid) and set(seen["groups"]) <= {who.pw_gid}
    assert seen["cwd"] == str(root / "releases" / "2.0.0" / "backend")
    assert seen["umask"] == 0o027
    assert seen["env"]["API_SECRET"] == "s3cr3t-value" and seen["env"]["USER"] == user
    assert "KASA_SECRET_KEYS" not in seen["env"]  # the login session's environment stays out, but for PATH/locale
    assert set(seen["env"]) <= {"API_SECRET", "PORT", "PATH", "LANG", "HOME", "USER", "LOGNAME", "LC_CTYPE"}


def test_a_hook_folder_reached_through_a_link_or_a_root_user_is_refused_before_anything_runs(tmp_path, customer_users):
    root = tmp_path / "shop"
    (root / "releases" / "2.0.0").mkdir(parents=True)
    os.symlink("/etc", root / "releases" / "2.0.0" / "backend")  # the customer's user swapped the folder for a link
    marker = tmp_path / "ran"
    argv = ["/usr/bin/touch", str(marker)]
    res = _launch(root, "releases/2.0.0/backend", customer_users[0], {}, argv)
    assert res.returncode != 0 and not marker.exists()
    (root / "releases" / "2.0.0" / "backend").unlink()
    (root / "releases" / "2.0.0" / "backend").mkdir()
    res = _launch(root, "releases/2.0.0/backend", "root", {}, argv)
    assert res.returncode != 0 and b"refused user root" in res.stderr and not marker.exists()
    res = _launch(root, "../etc", customer_users[0], {}, argv)
    assert res.returncode != 0 and b"refused folder" in res.stderr and not marker.exists()


def test_a_hook_that_outlives_its_timeout_is_killed_on_the_host_with_its_children(tmp_path, customer_users):
    import time

    root = tmp_path / "shop"
    (root / "app").mkdir(parents=True)
    for p in (tmp_path, root, root / "app"):
        p.chmod(0o777)
    marker = root / "app" / "child-pid"
    # A hook that leaves a child behind and hangs: both go when the launcher's timeout passes.
    script = "import subprocess, time; p = subprocess.Popen(['sleep', '60']); open('child-pid', 'w').write(" \
             "str(p.pid)); time.sleep(60)"
    started = time.monotonic()
    res = _launch(root, "app", customer_users[0], {}, ["/usr/bin/python3", "-c", script], limit=1)
    assert res.returncode == 124 and b"did not finish within 1 s" in res.stderr
    assert time.monotonic() - started < 10
    child = int(marker.read_text())
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]


def test_what_a_hook_leaves_running_is_killed_when_it_exits(tmp_path, customer_users):
    import time

    root = tmp_path / "shop"
    (root / "app").mkdir(parents=True)
    for p in (tmp_path, root, root / "app"):
        p.chmod(0o777)
    script = "import subprocess; p = subprocess.Popen(['sleep', '60']); open('child-pid', 'w').write(str(p.pid))"
    res = _launch(root, "app", customer_users[0], {}, ["/usr/bin/python3", "-c", script])
    assert res.returncode == 0, res.stderr
    child = int((root / "app" / "child-pid").read_text())
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]
