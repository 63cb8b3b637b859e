"""Issue 14, point 4: hosts behind NAT. The host opens `ssh -N -R` to a Kasa bastion and Kasa's `Host` points at
the tunnel's port there.

All real: the host is a network namespace whose sshd listens on its own 127.0.0.1 only (nothing reaches it from
outside, as behind NAT), the bastion a second sshd in the root namespace with the shipped restrictions, and the
tunnel the shipped unit's ExecStart run in the host's namespace as an unprivileged user (tests/tunnel.py)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from engines import ssh
from hosts.models import Host
from tests.conftest import port_open, require, wait_until
from tests.tunnel import UNIT, Tunnel, start_bastion, unit_setting

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def behind_nat(netns_hosts, tmp_path_factory):
    host = netns_hosts.make(loopback_only=True)
    bastion = start_bastion(host, tmp_path_factory.mktemp("tunnel"))
    try:
        yield host, bastion
    finally:
        bastion.stop()


def _command(*args, stdin: str | None = None, monkeypatch=None):
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        call_command(*args, stdout=out, stderr=err)
        code = 0
    except CommandError as exc:
        code, err = exc.returncode, io.StringIO(err.getvalue() + str(exc))
    return code, out.getvalue(), err.getvalue()


def test_the_shipped_tunnel_unit_passes_systemd_analyze_verify_and_restarts_forever():
    require(bool(shutil.which("systemd-analyze")), "systemd-analyze (systemd), to verify the shipped unit")
    # As tests/test_deploy_files.py does for Kasa's own units: a bad setting is only a warning, hence no output at
    # all. (systemd is not PID 1 here: the unit's hardening is verified, not exercised; its command is, below.)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(UNIT)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
    assert unit_setting(UNIT, "Restart") == ["always"] and unit_setting(UNIT, "StartLimitIntervalSec") == ["0"]
    assert unit_setting(UNIT, "User") == ["kasa-tunnel"] and unit_setting(UNIT, "RestartSec")
    (command,) = unit_setting(UNIT, "ExecStart")
    for option in ("ExitOnForwardFailure=yes", "BatchMode=yes", "StrictHostKeyChecking=yes", "ServerAliveInterval=",
                   "ServerAliveCountMax="):
        assert option in command


def test_a_host_behind_nat_is_checked_through_its_tunnel_named_when_the_tunnel_dies_and_back_once_it_restarts(
        behind_nat, monkeypatch, client, admin_user):
    host, bastion = behind_nat
    # Nothing reaches the host's sshd from outside: only the tunnel it opens itself.
    assert not port_open(host.address, 22, 1) and not port_open(bastion.tunnel_listen, bastion.tunnel_port, 0.3)
    tunnel = Tunnel(host, bastion).start()
    spec = f"root@{bastion.tunnel_listen}:{bastion.tunnel_port}"
    code, out, err = _command("host_add", "nat1", "--ssh", spec, "--key-stdin", "--trust-host-key", "--label",
                              "tunnel=yes", "--customers-root", str(host.customers_root), "--json",
                              stdin=host.client_private, monkeypatch=monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    # First contact through the tunnel shows (and here pins) the host's own sshd key, not the bastion's.
    assert doc["host_key"] == ssh.fingerprint(host.host_public) != ssh.fingerprint(bastion.host_public)
    assert doc["tunnel"] is True and doc["ssh"] == spec
    code, out, err = _command("host_check", "nat1", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["reachable"] is True and doc["os"].startswith("Debian") and doc["tools"]["python3"] != "missing"
    code, out, _err = _command("host_list")
    assert "nat1" in out and "via tunnel" in out
    client.force_login(admin_user)
    assert f"{spec} (tunnel)" in client.get("/hosts/host/").content.decode()

    tunnel.kill()  # the tunnel's ssh dies: the bastion's session ends and its listen goes with it
    wait_until(lambda: not port_open(bastion.tunnel_listen, bastion.tunnel_port, 0.3), 10, interval=0.05,
               what="the bastion to drop the dead tunnel's listen")
    code, _out, err = _command("host_check", "nat1")
    assert code == 1
    for text in (err, Host.objects.get(name="nat1").last_error):
        assert f"host nat1 ({spec}) is unreachable: its reverse tunnel is down" in text, text
        assert "kasa-tunnel.service" in text

    Tunnel(host, bastion).start()  # what Restart=always does: the same command again
    code, out, err = _command("host_check", "nat1", "--json")
    assert code == 0, err
    assert json.loads(out)["reachable"] is True and Host.objects.get(name="nat1").last_error == ""

    # The tunnel up but nothing behind it (the host's sshd stopped): the bastion accepts, then closes.
    host.stop()
    try:
        code, _out, err = _command("host_check", "nat1")
        assert code == 1 and "the tunnel is down, or the host's sshd does not answer behind it" in err, err
    finally:
        host.start()
