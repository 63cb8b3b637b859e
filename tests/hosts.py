"""Simulated remote hosts for tests: a network namespace each, with a real OpenSSH sshd inside.

A host is `ip netns add kasa-<pid>-<n>` plus a veth pair: the root namespace's end holds 10.231.N.1/30, the
namespace's end (renamed eth0) 10.231.N.2/30, and sshd listens on 10.231.N.2:22 inside the namespace with its own
generated host key, accepting one generated client key for root (and for a `kasa` login user, for later); a host
made `loopback_only` has its sshd on the namespace's own 127.0.0.1 instead (nothing outside reaches it: a host
behind NAT, reached through a reverse tunnel, tests/tunnel.py). The filesystem is shared by namespaces, so each
host gets its own customers root folder. A host can be cut off (`cut()`: its veth down) and restored, its sshd
restarted with a new host key (`rekey()`), and the sshd children serving sessions killed (`kill_sessions()`).

Names carry the pytest process's pid, so two runs never clash, and the namespaces of a run that was killed
(its pid gone) are removed, with the processes left in them, when the next session starts. Everything this
session made is torn down at its end, also when a test failed.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import port_open, processes, require, wait_until
from tests.sftp import SSHD, _keypair

PREFIX = "kasa-"
NETNS_RE = re.compile(r"^kasa-(\d+)-(\d+)$")
SUBNET = "10.231"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _netns_list() -> list[str]:
    done = _ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _kill_netns(name: str) -> None:
    """Kill every process left in the namespace (sshd and its sessions), then delete it (its veth pair goes too)."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "delete", name, check=False)


def remove_leftovers() -> list[str]:
    """Namespaces of earlier runs whose pytest process is gone."""
    removed = []
    for name in _netns_list():
        m = NETNS_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not Path(f"/proc/{m.group(1)}").exists():
            _kill_netns(name)
            removed.append(name)
    return removed


def _used_subnets() -> set[int]:
    out = _ip("-o", "-4", "addr", "show", check=False).stdout
    return {int(m.group(1)) for m in re.finditer(rf"inet {re.escape(SUBNET)}\.(\d+)\.", out)}


@dataclass
class NetnsHost:
    """One simulated host. `address`/`port` is where its sshd answers from the root namespace."""

    name: str  # the namespace, kasa-<pid>-<n>
    index: int
    subnet: int
    dir: Path
    customers_root: Path
    client_private: str  # the key Kasa logs in with (OpenSSH PEM text)
    client_public: str
    host_public: str = ""  # the host key sshd presents now
    popen: subprocess.Popen | None = None
    port: int = 22
    loopback_only: bool = False  # sshd on the namespace's own 127.0.0.1: unreachable from outside (behind NAT)
    path: str = ""  # the PATH of its sessions (sshd's SetEnv), when not sshd's own default: a host lacking a tool
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.subnet}.2"

    @property
    def gateway(self) -> str:
        """The root namespace's end of the veth: what the host reaches of the outside world (a bastion's address)."""
        return f"{SUBNET}.{self.subnet}.1"

    @property
    def listen(self) -> str:
        return "127.0.0.1" if self.loopback_only else self.address

    def answers(self) -> bool:
        """Whether sshd accepts connections where it listens (from inside the namespace when only on loopback)."""
        if not self.loopback_only:
            return port_open(self.address, self.port, 0.3)
        done = subprocess.run(["ip", "netns", "exec", self.name, "bash", "-c",
                               f"exec 3<>/dev/tcp/127.0.0.1/{int(self.port)}"], capture_output=True, timeout=10)
        return done.returncode == 0

    @property
    def veth(self) -> str:  # the root namespace's end (interface names: 15 characters at most)
        return f"kh{os.getpid() % 100000}x{self.index}"

    # --- sshd ---------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        d = self.dir
        (d / "sshd_config").write_text(textwrap.dedent(f"""\
            ListenAddress {self.listen}:{self.port}
            HostKey {d}/host_ed25519
            PidFile {d}/sshd.pid
            AuthorizedKeysFile {d}/authorized_keys
            AllowUsers root kasa kasassh
            StrictModes no
            UsePAM no
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            MaxSessions 32
            MaxStartups 32:30:64
            LogLevel ERROR
            """) + (f"SetEnv PATH={self.path}\n" if self.path else ""))

    def new_host_key(self) -> str:
        private, public = _keypair()
        key = self.dir / "host_ed25519"
        key.write_text(private)
        key.chmod(0o600)
        self.host_public = public
        return public

    def start(self) -> None:
        log = self.dir / "sshd.log"
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(["ip", "netns", "exec", self.name, SSHD, "-D", "-e", "-f",
                                           str(self.dir / "sshd_config")],
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.answers() or self.popen.poll() is not None, 20,
                   interval=0.05, what=f"sshd in {self.name}")
        assert self.popen.poll() is None, f"sshd in {self.name} exited: {log.read_text()}"

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.kill_sessions()
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self.popen = None

    def rekey(self) -> str:
        """Restart sshd with a new host key (what a reinstalled host, or a man in the middle, presents)."""
        self.stop()
        public = self.new_host_key()
        self.start()
        return public

    def sessions(self) -> list[int]:
        """The sshd children serving connections (the listener's children)."""
        if self.popen is None:
            return []
        return [pid for pid, (_state, ppid, _pgrp) in processes().items() if ppid == self.popen.pid]

    def kill_sessions(self) -> list[int]:
        killed = []
        for pid in self.sessions():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        return killed

    # --- network ------------------------------------------------------------------------------------------
    def cut(self) -> None:
        """The host drops off the network: its link goes down (sshd keeps running, unreachable)."""
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self.veth, "up")
        wait_until(lambda: port_open(self.address, self.port, 0.3), 10, interval=0.05,
                   what=f"{self.name} reachable again")

    def ssh_spec(self, user: str = "root") -> str:
        return f"{user}@{self.address}:{self.port}"


class NetnsHosts:
    """Makes hosts for one test session and removes them all at its end."""

    def __init__(self, top: Path):
        self.top = top
        self.hosts: list[NetnsHost] = []

    def make(self, *, loopback_only: bool = False, path: str = "") -> NetnsHost:
        index = len(self.hosts) + 1
        name = f"{PREFIX}{os.getpid()}-{index}"
        # Chosen and taken under a machine-wide lock: two test sessions at once (CI runs one; developers and
        # helpers sometimes more) would otherwise pick the same free subnet and meet each other's sshd.
        lock = os.open(os.path.join("/run/lock" if os.path.isdir("/run/lock") else "/tmp", "kasa-test-netns.lock"),
                       os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            subnet = next(n for n in range(1, 255) if n not in _used_subnets())
            return self._make(index, name, subnet, loopback_only, path)
        finally:
            os.close(lock)

    def _make(self, index: int, name: str, subnet: int, loopback_only: bool, path: str = "") -> NetnsHost:
        d = self.top / name
        d.mkdir(parents=True)
        customers = d / "customers"
        customers.mkdir(mode=0o711)
        client_private, client_public = _keypair()
        host = NetnsHost(name=name, index=index, subnet=subnet, dir=d, customers_root=customers,
                         client_private=client_private, client_public=client_public, loopback_only=loopback_only,
                         path=path)
        (d / "authorized_keys").write_text(client_public + "\n")
        self.hosts.append(host)  # before anything exists in the system: teardown removes what was made
        inner = f"kn{os.getpid() % 100000}x{index}"
        _ip("netns", "add", name)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", name)
        _ip("addr", "add", f"{SUBNET}.{subnet}.1/30", "dev", host.veth)
        _ip("link", "set", host.veth, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "set", inner, "name", "eth0")
        _ip("-n", name, "addr", "add", f"{SUBNET}.{subnet}.2/30", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        host._write_config()
        host.new_host_key()
        host.start()
        return host

    def close(self) -> None:
        for host in self.hosts:
            try:
                host.stop()
            finally:
                _kill_netns(host.name)
                _ip("link", "delete", host.veth, check=False)  # gone with the namespace; a half-made one is not
        self.hosts.clear()


@pytest.fixture(scope="session")
def netns_hosts(tmp_path_factory):
    """Factory of simulated hosts (`netns_hosts.make()`), torn down at the end of the session."""
    require(os.geteuid() == 0 and bool(shutil.which("ip")) and os.access(SSHD, os.X_OK),
            "root, iproute2 and OpenSSH's sshd (simulated hosts in network namespaces)")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation needs it as root
    remove_leftovers()
    hosts = NetnsHosts(tmp_path_factory.mktemp("netns-hosts"))
    try:
        yield hosts
    finally:
        hosts.close()
