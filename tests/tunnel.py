"""Hosts behind NAT for tests: a bastion sshd and a reverse tunnel opened with the shipped unit's own command.

The bastion is a second OpenSSH sshd in the root namespace (the worker's machine), on a free port of a simulated
host's veth (the root namespace's end: what the host reaches of the outside), with its own host key, the shipped
Match block (deploy/bastion/kasa-tunnel.conf) and the shipped authorized_keys line for the tunnel key. The tunnel
is deploy/systemd/kasa-tunnel.service's ExecStart, its ${VARIABLES} taken from an env file with the example's
keys and its /etc/kasa-tunnel/ files in a folder of the test's, run inside the host's namespace as an
unprivileged user (the unit's User=), exactly as systemd would start it.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port, port_open, require, wait_until
from tests.sftp import SSHD, _keypair

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "kasa-tunnel.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "kasa-tunnel.env.example"
BASTION_CONF = ROOT / "deploy" / "bastion" / "kasa-tunnel.conf"
AUTHORIZED_EXAMPLE = ROOT / "deploy" / "bastion" / "authorized_keys.example"
UNIT_FILES = "/etc/kasa-tunnel/"
SHIPPED_USER = "kasa-tunnel"
# The tunnel's user in tests, on both sides (the filesystem is shared). Its shell is /bin/sh, not nologin, so
# the security tests show sshd's restrictions at work, not a shell that refuses.
TUNNEL_USER = "kasa-t-tunnel"


def unit_setting(path: Path, key: str) -> list[str]:
    """Every value of `key` in a unit file, continuation lines joined (as systemd reads them)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith(f"{key}=")]


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def exec_start(env: dict[str, str], files: Path) -> list[str]:
    """The unit's ExecStart as systemd runs it: words split, ${NAME} replaced by the env file's value (each a part
    of one word), the unit's /etc/kasa-tunnel/ files read from `files`."""
    (line,) = unit_setting(UNIT, "ExecStart")
    assert "%" not in line and not line.startswith(("-", "@", ":", "+", "!")), "no specifiers or prefixes to emulate"
    words = shlex.split(line)
    used = {m for w in words for m in re.findall(r"\$\{(\w+)\}", w)}
    assert used == set(env_file(ENV_EXAMPLE)), "the env example names exactly the unit's variables"
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w).replace(UNIT_FILES, f"{files}/") for w in words]


def ensure_tunnel_user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(TUNNEL_USER)
    except KeyError:
        require(os.geteuid() == 0 and bool(shutil.which("useradd")), "root and useradd (the tunnel's user)")
        # "*": no password, but not a locked account (sshd without PAM refuses a "!" one outright).
        done = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/bin/sh", "--password", "*", TUNNEL_USER], capture_output=True, text=True,
                              check=False)
        assert done.returncode in (0, 9), done.stderr  # 9: created meanwhile by another test session
        entry = pwd.getpwnam(TUNNEL_USER)
    return entry.pw_uid, entry.pw_gid


@dataclass
class Bastion:
    """A bastion sshd on `address`:`port`; `files` holds the host side's /etc/kasa-tunnel (env, key, known_hosts)."""

    address: str
    port: int
    dir: Path
    files: Path
    host_public: str
    tunnel_private: str
    tunnel_public: str
    tunnel_listen: str = "127.0.0.1"
    tunnel_port: int = 0
    popen: subprocess.Popen | None = None
    tunnels: list = field(default_factory=list)
    extra_dirs: list = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {**env_file(ENV_EXAMPLE), "KASA_BASTION_ADDRESS": self.address, "KASA_BASTION_PORT": str(self.port),
                "KASA_BASTION_USER": TUNNEL_USER, "KASA_TUNNEL_LISTEN": self.tunnel_listen,
                "KASA_TUNNEL_PORT": str(self.tunnel_port), "KASA_HOST_SSH_PORT": "22"}

    def client(self, *args: str) -> list[str]:
        """An ssh client holding the tunnel key, pointed at the bastion (what a thief of the key could run)."""
        return ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", "HostKeyAlias=kasa-bastion", "-o", f"UserKnownHostsFile={self.files}/known_hosts",
                "-o", "IdentitiesOnly=yes", "-o", f"IdentityFile={self.files}/id_ed25519", "-o", "ConnectTimeout=5",
                "-p", str(self.port), "-l", TUNNEL_USER, *args, "--", self.address]

    def stop(self) -> None:
        for tunnel in self.tunnels:
            tunnel.kill()
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=10)
        for folder in (self.files, *self.extra_dirs):
            shutil.rmtree(folder, ignore_errors=True)


def start_bastion(host, top: Path) -> Bastion:
    """A bastion for `host` (a NetnsHost) on its veth's root end, its tunnel key allowed 127.0.0.1:<free port>."""
    require(os.access(SSHD, os.X_OK), "OpenSSH server (/usr/sbin/sshd)")
    uid, gid = ensure_tunnel_user()
    d = top / "bastion"
    d.mkdir()
    host_private, host_public = _keypair()
    (d / "host_ed25519").write_text(host_private)
    (d / "host_ed25519").chmod(0o600)
    tunnel_private, tunnel_public = _keypair()
    # The host side's files, readable by the tunnel's user only (pytest's own temporary folders are root's 0700).
    files = Path(tempfile.mkdtemp(prefix="kasa-tunnel-"))
    os.chown(files, 0, gid)
    files.chmod(0o750)
    (files / "id_ed25519").write_text(tunnel_private)
    os.chown(files / "id_ed25519", uid, gid)
    (files / "id_ed25519").chmod(0o600)
    (files / "known_hosts").write_text(f"kasa-bastion {host_public}\n")
    os.chown(files / "known_hosts", 0, gid)
    (files / "known_hosts").chmod(0o640)
    b = Bastion(address=host.gateway, port=free_port(), dir=d, files=files, host_public=host_public,
                tunnel_private=tunnel_private, tunnel_public=tunnel_public, tunnel_port=free_port())
    # The shipped authorized_keys line, for this key and this port.
    line = next(x for x in AUTHORIZED_EXAMPLE.read_text().splitlines() if x.strip() and not x.startswith("#"))
    options = line.split(" ssh-ed25519 ")[0].replace('permitlisten="127.0.0.1:2201"',
                                                      f'permitlisten="{b.tunnel_listen}:{b.tunnel_port}"')
    assert f"{b.tunnel_port}" in options
    # Root's file, world-readable as shipped (sshd reads it as the user), in a folder the user may traverse.
    keys = Path(tempfile.mkdtemp(prefix="kasa-bastion-", dir=files.parent))
    keys.chmod(0o755)
    b.extra_dirs.append(keys)
    (keys / "authorized_keys").write_text(f"{options} {tunnel_public}\n")
    (keys / "authorized_keys").chmod(0o644)
    match = BASTION_CONF.read_text()
    assert f"Match User {SHIPPED_USER}\n" in match and "/etc/ssh/kasa-tunnel/authorized_keys" in match
    match = match.replace(f"Match User {SHIPPED_USER}\n", f"Match User {TUNNEL_USER}\n").replace(
        "/etc/ssh/kasa-tunnel/authorized_keys", str(keys / "authorized_keys"))
    (d / "sshd_config").write_text(textwrap.dedent(f"""\
        ListenAddress {b.address}:{b.port}
        HostKey {d}/host_ed25519
        PidFile {d}/sshd.pid
        AuthorizedKeysFile /nonexistent
        AllowUsers {TUNNEL_USER}
        StrictModes no
        UsePAM no
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        LogLevel VERBOSE
        """) + match)
    log = d / "sshd.log"
    with open(log, "ab") as out:
        b.popen = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: port_open(b.address, b.port, 0.3) or b.popen.poll() is not None, 20, interval=0.05,
               what="the bastion's sshd")
    assert b.popen.poll() is None, f"the bastion's sshd exited: {log.read_text()}"
    return b


class Tunnel:
    """The unit's ExecStart inside the host's namespace, as the unit's unprivileged user."""

    def __init__(self, host, bastion: Bastion):
        self.host, self.bastion, self.popen = host, bastion, None
        self.log = bastion.dir / f"tunnel-{len(bastion.tunnels)}.log"
        bastion.tunnels.append(self)

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.host.name, "setpriv", f"--reuid={TUNNEL_USER}",
                f"--regid={TUNNEL_USER}", "--clear-groups", "--no-new-privs", "--",
                *exec_start(self.bastion.env(), self.bastion.files)]

    def start(self) -> Tunnel:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        b = self.bastion
        wait_until(lambda: port_open(b.tunnel_listen, b.tunnel_port, 0.3) or self.popen.poll() is not None, 20,
                   interval=0.05, what="the tunnel's listen on the bastion")
        assert self.popen.poll() is None, f"the tunnel exited: {self.log.read_text()}"
        return self

    def kill(self) -> None:
        """What a crash, an OOM kill or a reboot of the host does to it (SIGKILL: no goodbye to the bastion)."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
