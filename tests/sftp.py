"""A real SFTP server for tests: OpenSSH's sshd on a free port, with generated host and client keys."""

from __future__ import annotations

import getpass
import os
import subprocess
import textwrap

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import free_port, port_open, require, wait_until

SSHD = "/usr/sbin/sshd"


def _keypair() -> tuple[str, str]:
    """(OpenSSH private key text, 'ssh-ed25519 AAAA…' public line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """OpenSSH's sshd on a free port with its own host key, accepting one generated client key."""
    require(os.access(SSHD, os.X_OK), "OpenSSH server (/usr/sbin/sshd, Debian package openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    host_private, host_public = _keypair()
    client_private, client_public = _keypair()
    (d / "host_ed25519").write_text(host_private)
    (d / "host_ed25519").chmod(0o600)
    (d / "authorized_keys").write_text(client_public + "\n")
    user = getpass.getuser()
    (d / "sshd_config").write_text(textwrap.dedent(f"""\
        ListenAddress 127.0.0.1
        HostKey {d}/host_ed25519
        PidFile {d}/sshd.pid
        AuthorizedKeysFile {d}/authorized_keys
        AllowUsers {user}
        StrictModes no
        UsePAM no
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PermitRootLogin prohibit-password
        Subsystem sftp internal-sftp
        LogLevel ERROR
        """))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation needs it when root
    port = free_port()
    log = d / "sshd.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config"), "-p", str(port)],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: port_open("127.0.0.1", port, 0.2) or popen.poll() is not None, 20, what="sshd")
        assert popen.poll() is None, f"sshd exited: {log.read_text()}"
        yield {"host": "127.0.0.1", "port": port, "username": user, "private_key": client_private,
               "host_key": host_public, "dir": d}
    finally:
        popen.terminate()
        popen.wait(timeout=10)
