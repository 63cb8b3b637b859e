"""Issue 14 point 9: a host whose SSH login user is not root, Kasa's commands going through `sudo -n` under the rule
shipped in deploy/sudoers/kasa — that rule exactly (only the user name and the customers root are put in), checked
by `visudo`, on a real sshd in a network namespace (tests/hosts.py) with this machine's real sudo."""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from backups.models import Backup
from engines import ssh
from engines.procbase import REPO_ROOT
from tests.conftest import require
from tests.remote_fixtures import remote_customer, run_backup
from tests.restore_helpers import tree_state

pytestmark = pytest.mark.django_db(transaction=True)

LOGIN = "kasassh"  # tests/hosts.py's sshd allows it; the rule's `kasa` becomes this user


def _login_user() -> str:
    """A system user that may log in (a shell; no password, no home: the host's authorized_keys file is sshd's)."""
    try:
        pwd.getpwnam(LOGIN)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                               "/nonexistent", "--shell", "/bin/sh", LOGIN], capture_output=True, text=True,
                              check=False)
        assert done.returncode in (0, 9), done.stderr
    # No password, but not a locked account ("!"): sshd refuses a locked one even a key login.
    subprocess.run(["usermod", "--password", "*", LOGIN], check=True)
    return LOGIN


@pytest.fixture(scope="module")
def sudo_host(netns_hosts):
    """A simulated host, and the shipped sudo rule installed for LOGIN and that host's customers root."""
    require(bool(shutil.which("sudo")) and bool(shutil.which("visudo")), "sudo (Debian's package)")
    _login_user()
    h = netns_hosts.make()
    # sshd reads a user's authorized_keys as that user: the host's file sits in pytest's root-only folders, so the
    # login user gets a copy it can read.
    keys = Path(f"/tmp/kasassh-keys-{os.getpid()}")
    keys.mkdir(exist_ok=True)
    keys.chmod(0o755)  # (the tests' umask would make it 0700)
    (keys / "authorized_keys").write_text(h.client_public + "\n")
    (keys / "authorized_keys").chmod(0o644)
    with open(h.dir / "sshd_config", "a") as config:
        config.write(f"Match User {LOGIN}\n    AuthorizedKeysFile {keys}/authorized_keys\n")
    h.stop()
    h.start()
    # The probe looks at the customers root as the login user (unprivileged): on a host its parents let others
    # through (/srv/kasa/customers), pytest's are root's alone until the module ends.
    opened = {p: p.stat().st_mode & 0o7777 for p in h.customers_root.parents
              if p not in (Path("/"), Path("/tmp"))}
    for p in opened:
        p.chmod(opened[p] | 0o001)
    rule = (REPO_ROOT / "deploy" / "sudoers" / "kasa").read_text()
    rule = rule.replace("/srv/kasa/customers", str(h.customers_root))
    rule = rule.replace("Defaults:kasa ", f"Defaults:{LOGIN} ").replace("\nkasa ALL=", f"\n{LOGIN} ALL=")
    path = Path(f"/etc/sudoers.d/kasa-test-{os.getpid()}")
    staged = path.with_name(f".{path.name}.new")  # sudo reads no file whose name holds a dot: staged, checked, moved
    staged.write_text(rule)
    staged.chmod(0o440)
    check = subprocess.run(["visudo", "-cf", str(staged)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    os.replace(staged, path)
    try:
        yield h, path, rule
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(keys, ignore_errors=True)
        for p, mode in opened.items():
            p.chmod(mode)


def _host(h, name: str):
    from hosts.models import Host

    return Host.objects.create(name=name, ssh_user=LOGIN, sudo=True, address=h.address, port=h.port,
                               host_key=h.host_public, private_key=h.client_private,
                               customers_root=str(h.customers_root))


def test_a_host_reached_as_a_sudo_user_is_backed_up_and_restored_in_place_through_the_shipped_rule_alone(
        sudo_host, team, customer_users, parents_open):
    from backups.services import restore_start
    from customers.models import Customer
    from hosts.services import host_probe
    from operations.services import run_execute

    h, _path, _rule = sudo_host
    host = _host(h, "web-sudo")
    host_probe(host)
    assert host.reachable and not host.last_error, host.last_error
    customer = remote_customer(h, host, team)
    root = Path(customer.root)
    parents_open(root)
    who = pwd.getpwnam(customer_users[0])
    subprocess.run(["chown", "-R", f"{who.pw_uid}:{who.pw_gid}", str(root)], check=True)
    Customer.objects.filter(pk=customer.pk).update(run_as=customer_users[0])
    customer.refresh_from_db()
    cache = root / "data" / "cache.sqlite3"

    run = run_backup(customer)
    assert run.status == "succeeded", run.error
    bk = Backup.objects.get(run=run)
    before = tree_state(root)
    (root / "backend" / "src" / "app.js").write_text("console.log('changed')\n")
    (root / "backend" / "new.txt").write_text("new\n")
    with sqlite3.connect(cache) as con:
        con.execute("DELETE FROM hits WHERE id > 5")

    restore = restore_start(bk, confirmed=True, via="cli", enqueue=False)
    run_execute(restore.pk)
    restore.refresh_from_db()
    assert restore.status == "succeeded", restore.error
    assert tree_state(root) == before
    with sqlite3.connect(cache) as con:
        assert con.execute("SELECT count(*) FROM hits").fetchone()[0] == 37
    assert (root / "backend" / "src" / "app.js").stat().st_uid == who.pw_uid  # unpacked as the customer's user


def test_the_sudo_rule_lets_nothing_else_run_as_root_and_a_host_without_it_is_named_clearly(
        sudo_host, team, settings):
    from hosts.models import Host
    from hosts.services import host_probe, runtime_dir

    h, path, rule = sudo_host
    host = _host(h, "web-sudo-rule")
    with ssh.Session(host.target(), runtime_dir()) as session:
        assert session.run(["id", "-u"], privileged=False).text.strip() == str(pwd.getpwnam(LOGIN).pw_uid)
        for argv in (["sh", "-c", "id -u"], ["tar", "--extract", "--file=-", "--directory", "/etc"],
                     ["cat", "--", "/etc/shadow"], ["rm", "-rf", "--", "/var/lib/kasa"]):
            refused = session.run(argv)
            assert refused.rc != 0 and "password is required" in refused.stderr, (argv, refused)
        assert session.run(["python3", "-I", "-c", "import os; print(os.geteuid())"]).text.strip() == "0"

    path.unlink()  # the host lost the rule (or never had it): the probe says so, a backup fails naming the host
    try:
        host_probe(host)
        host = Host.objects.get(pk=host.pk)
        assert host.reachable and "sudo refused Kasa's helper for kasassh" in host.last_error
        customer = remote_customer(h, host, team)
        run = run_backup(customer)
        assert run.status == "failed"
        assert "web-sudo-rule" in run.error and "password is required" in run.error, run.error
    finally:
        path.write_text(rule)
        path.chmod(0o440)
