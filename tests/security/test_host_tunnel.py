"""A host's tunnel key, stolen or misused, buys nothing on the bastion but the one listen it was given (issue 14,
point 4): no shell, no command, no other port or address to listen on, no forward from the bastion onwards.
The bastion runs the shipped Match block and authorized_keys line (tests/tunnel.py); its user has a real shell
(/bin/sh), so what refuses is sshd's configuration, not a nologin shell."""

from __future__ import annotations

import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import free_port, port_open, wait_until
from tests.tunnel import start_bastion


@pytest.fixture(scope="module")
def bastion(netns_hosts, tmp_path_factory):
    b = start_bastion(netns_hosts.make(loopback_only=True), tmp_path_factory.mktemp("tunnel-sec"))
    try:
        yield b
    finally:
        b.stop()


def _run(argv: list[str], *, input: bytes = b"", timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)


def _background(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_the_tunnel_key_opens_no_shell_runs_no_command_and_no_sftp_on_the_bastion(bastion):
    command = "id"  # its output (uid=…) would show that anything ran as the tunnel's user
    attempts = {
        "command": bastion.client("-T", "-o", "ExitOnForwardFailure=yes") + [command],
        "shell with a TTY": bastion.client("-tt"),
        "shell without a TTY": bastion.client("-T"),
        "sftp subsystem": bastion.client("-T", "-s") + ["sftp"],
    }
    for what, argv in attempts.items():
        done = _run(argv, input=f"{command}\nexit\n".encode())
        assert done.returncode != 0, what
        assert b"uid=" not in done.stdout, (what, done.stdout, done.stderr)
        assert b"Permission denied" not in done.stderr, f"{what}: the key must log in (the refusal is sshd's)"


def test_the_tunnel_key_listens_only_on_its_own_address_and_port(bastion):
    listen, port = bastion.tunnel_listen, bastion.tunnel_port
    other = free_port()
    sock = Path(tempfile.gettempdir()) / f"kasa-tunnel-test-{other}.sock"  # a folder the tunnel's user may write
    refused = {
        "another port": f"127.0.0.1:{other}:127.0.0.1:22",
        "every address": f"0.0.0.0:{port}:127.0.0.1:22",
        "every address, another port": f"0.0.0.0:{other}:127.0.0.1:22",
        "the bastion's own address": f"{bastion.address}:{port}:127.0.0.1:22",
        "no address (the default)": f"{port}:127.0.0.1:22",
        "a Unix socket": f"{sock}:127.0.0.1:22",
    }
    try:
        for what, spec in refused.items():
            done = _run(bastion.client("-N", "-o", "ExitOnForwardFailure=yes", "-R", spec))
            assert done.returncode == 255 and b"forwarding failed" in done.stderr, (what, done.stderr)
            assert not port_open("127.0.0.1", other, 0.2) and not port_open(bastion.address, port, 0.2), what
            assert not sock.exists(), what
    finally:
        sock.unlink(missing_ok=True)  # made by the bastion's sshd if a Unix socket forward ever got through
    # The key does get its own listen (so the refusals above are the restrictions, not a key refused outright).
    mine = f"{listen}:{port}:127.0.0.1:9"
    proc = _background(bastion.client("-N", "-o", "ExitOnForwardFailure=yes", "-R", mine))
    try:
        wait_until(lambda: port_open(listen, port, 0.2) or proc.poll() is not None, 10, interval=0.05,
                   what="the permitted listen")
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_the_tunnel_key_opens_no_forward_through_the_bastion(bastion):
    # The bastion's own sshd as the target: it greets every connection with "SSH-2.0-", so a forward that got
    # through would show at once.
    target = f"{bastion.address}:{bastion.port}"
    done = _run(bastion.client("-W", target))
    assert done.returncode == 255 and b"SSH-2.0-" not in done.stdout, done
    assert b"prohibited" in done.stderr, done.stderr
    local = free_port()
    forward = f"127.0.0.1:{local}:{target}"
    proc = _background(bastion.client("-N", "-o", "ExitOnForwardFailure=yes", "-L", forward))
    try:
        wait_until(lambda: port_open("127.0.0.1", local, 0.2) or proc.poll() is not None, 10, interval=0.05,
                   what="the local end of the -L forward")
        with socket.create_connection(("127.0.0.1", local), timeout=5) as conn:
            conn.settimeout(5)
            assert conn.recv(64) == b""  # the bastion refused the channel: the forward closes, nothing came through
    finally:
        proc.kill()
        proc.wait(timeout=10)
