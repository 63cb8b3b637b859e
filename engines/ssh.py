"""Commands on a remote host over the system OpenSSH client (`ssh`), multiplexed, with a pinned host key.

Why the system `ssh` and not paramiko (which Kasa uses for SFTP targets): measured by `bench/ssh_bench` on this
machine (2 vCPU AMD EPYC with AES-NI) against OpenSSH 9.2's sshd in a network namespace, reading zeros from a
remote `head -c` (docs/PERFORMANCE.md, "SSH layer"): the system client moves 1 GiB at 380 MB/s with its default
cipher (chacha20-poly1305) and 615 MB/s with aes128-gcm (preferred below: 1.05 s of the ssh process's CPU per
GiB), its crypto in a process of its own; paramiko's exec channel 330-340 MB/s over 256 MiB, every byte through
the worker's interpreter (2.65 s of its CPU per GiB), and three of four 1 GiB reads died at its re-key
("Key-exchange timed out waiting for key negotiation"). The system client also brings what later work needs
without code of ours: multiplexing (ControlMaster), port forwards (`-L`, for database dumps), `known_hosts`
checking, every key type and cipher the host's sshd offers, keepalives, and the behaviour operators know from
`ssh -v`.

Rules kept here:
- argv lists only; the remote command is one string (ssh joins its arguments with spaces and the host's login
  shell splits them again), so each word is quoted with `shlex.quote` — never a caller's shell string.
- `StrictHostKeyChecking=yes` against a known_hosts file Kasa writes from the pinned key, under a fixed alias
  (`HostKeyAlias`): nothing is ever learnt or replaced silently; without a pinned key nothing connects.
- The private key is a 0600 file in a 0700 folder of Kasa's, written for one session from the decrypted secret
  and removed when it closes (or the key file configured on the workers): only its path is on argv, and the
  key's text never reaches an argv, a log line or an exception.
- One control master per session (per operation), in the session's own folder, never shared between operations:
  a reset of a shared master kills every command riding on it (Coolify's deploys died of that).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .secretbox import Secret

SSH = "ssh"
SSH_KEYSCAN = "ssh-keyscan"
ALIAS = "kasa-host"  # the name the pinned key is filed under in the session's known_hosts
CONTROL_PERSIST = 30  # seconds the master outlives its last command (a session closes it sooner)
KEY_PREFERENCE = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
_SOCKET_MAX = 100  # sun_path is 108 bytes; ssh appends a random suffix while it sets the socket up
_UNREACHABLE = re.compile(r"Connection timed out|No route to host|Connection refused|Network is unreachable|"
                          r"Could not resolve hostname|Connection closed by|closed by remote host|Connection reset|"
                          r"timed out|Host is down|Broken pipe|Control socket connect|mux_client", re.IGNORECASE)


class SSHError(Exception):
    """A failure to reach or use a host, as a sentence naming it. Never carries a key."""


class HostKeyUnknown(SSHError):
    pass


class HostKeyChanged(SSHError):
    pass


class Unreachable(SSHError):
    pass


class AuthFailed(SSHError):
    pass


@dataclass(frozen=True)
class ScannedKey:
    line: str  # "ssh-ed25519 AAAA…" (type and base64, no host name)
    fingerprint: str  # SHA256:… as `ssh-keygen -lf` prints it

    @property
    def type(self) -> str:
        return self.line.split()[0]


@dataclass(frozen=True)
class Target:
    """How to reach one host. `host_key` is the pinned OpenSSH public key line; `private_key` the decrypted key
    (a Secret, revealed only into the session's key file) or `key_file` a path on the workers."""

    name: str
    user: str
    address: str
    port: int = 22
    host_key: str = ""
    private_key: Secret | None = None
    key_file: str = ""
    connect_timeout: int = 10
    tunnel: bool = False  # address:port is a bastion's end of the host's reverse tunnel (README "Hosts behind NAT")
    sudo: bool = False  # a non-root login user: every command goes through `sudo -n` (deploy/sudoers/kasa)

    def where(self) -> str:
        return f"host {self.name} ({self.user}@{self.address}:{self.port})"


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


# --- host keys ------------------------------------------------------------------------------------------------
def fingerprint(key_line: str) -> str:
    """SHA256:… of an OpenSSH public key line ("type base64 [comment]")."""
    fields = key_line.split()
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (IndexError, binascii.Error, ValueError):
        raise SSHError(f"not an OpenSSH public key line: {key_line[:60]!r}") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def normalize_key_line(key_line: str) -> str:
    """"type base64" (a comment or host name in front of it dropped); SSHError when it is no key line."""
    fields = key_line.split()
    for i, word in enumerate(fields[:-1]):
        if word.startswith(("ssh-", "ecdsa-", "sk-")):
            line = f"{word} {fields[i + 1]}"
            fingerprint(line)
            return line
    raise SSHError(f"not an OpenSSH public key line: {key_line[:60]!r}")


def keyscan(address: str, port: int = 22, *, timeout: int = 5) -> list[ScannedKey]:
    """The host keys a server offers now, preferred type first (what first contact shows before a trust)."""
    argv = [SSH_KEYSCAN, "-T", str(timeout), "-p", str(int(port)), "--", address]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout * 3 + 5, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Unreachable(f"{address}:{port}: ssh-keyscan got no answer within {timeout * 3 + 5} s") from None
    keys = []
    for line in done.stdout.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        fields = line.split()
        if len(fields) >= 3:
            key = f"{fields[1]} {fields[2]}"
            keys.append(ScannedKey(key, fingerprint(key)))
    if not keys:
        reason = " ".join(done.stderr.split())[-200:] or "no answer"
        raise Unreachable(f"{address}:{port}: no SSH host key offered ({reason})")
    rank = {t: i for i, t in enumerate(KEY_PREFERENCE)}
    return sorted(keys, key=lambda k: rank.get(k.type, len(rank)))


# --- sessions -------------------------------------------------------------------------------------------------
def _write_private(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(content.strip() + "\n")  # OpenSSH refuses a key file without its final newline


def quote(argv: Sequence[str]) -> str:
    """The remote command line: each word quoted for the host's login shell."""
    if not argv:
        raise ValueError("empty remote command")
    return " ".join(shlex.quote(str(a)) for a in argv)


class Session:
    """One multiplexed connection to a host for the length of an operation; use as a context manager.

    Its folder (0700, under `runtime_dir`) holds the known_hosts file, the key file and the control socket;
    close() stops the master (`ssh -O exit`) and removes the folder, key file included."""

    def __init__(self, target: Target, runtime_dir: str | os.PathLike):
        if not target.host_key:
            raise HostKeyUnknown(f"{target.where()}: no host key is trusted yet: check its fingerprint and trust it "
                                 "(host_add --trust-host-key, host_trust, or the admin's \"Trust this host key\")")
        if not (target.private_key or target.key_file):
            raise AuthFailed(f"{target.where()}: no private key or key file is set")
        self.target = target
        top = Path(runtime_dir)
        top.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(top, 0o700)
        self.dir = Path(tempfile.mkdtemp(prefix="s-", dir=top))  # 0700
        try:
            self.control = self.dir / "cm"
            if len(str(self.control)) > _SOCKET_MAX - 20:
                raise SSHError(f"SSH runtime folder {top} is too deep for a control socket (keep its path under "
                               f"{_SOCKET_MAX - 30} characters)")
            (self.dir / "known_hosts").write_text(f"{ALIAS} {normalize_key_line(target.host_key)}\n")
            if target.private_key:
                self.key_path = self.dir / "id"
                _write_private(self.key_path, target.private_key.reveal())
            else:
                self.key_path = Path(target.key_file)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.closed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def options(self) -> list[str]:
        t = self.target
        opts = {
            "BatchMode": "yes", "StrictHostKeyChecking": "yes", "UserKnownHostsFile": str(self.dir / "known_hosts"),
            "GlobalKnownHostsFile": "/dev/null", "HostKeyAlias": ALIAS, "UpdateHostKeys": "no",
            "CheckHostIP": "no", "IdentitiesOnly": "yes", "IdentityAgent": "none",
            "IdentityFile": str(self.key_path), "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
            "ForwardAgent": "no", "ForwardX11": "no", "ControlMaster": "auto", "ControlPath": str(self.control),
            "ControlPersist": str(CONTROL_PERSIST), "ConnectTimeout": str(t.connect_timeout),
            "ServerAliveInterval": "10", "ServerAliveCountMax": "3", "LogLevel": "ERROR",
            # Database forwards (forward()) listen on a Unix socket in this 0700 folder, created 0600 (OpenSSH's
            # default bind mask): only Kasa's user can reach the host's database through them.
            "StreamLocalBindUnlink": "yes", "StreamLocalBindMask": "0177",
            # AES-GCM first (1.6x chacha20's throughput with AES-NI, measured above); the defaults follow.
            "Ciphers": "^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
        }
        argv = ["-F", "/dev/null"]  # no ~/.ssh/config or /etc/ssh/ssh_config of the worker's user changes a host
        for key, value in opts.items():
            argv += ["-o", f"{key}={value}"]
        return argv

    def argv(self, remote: Sequence[str], *, ssh_args: Sequence[str] = (), privileged: bool = True) -> list[str]:
        """ssh's argv running `remote` on the host. With a sudo login (Target.sudo) a privileged command runs as
        `sudo -n -- …`: never a password prompt (-n: a missing rule fails at once, with sudo's message on stderr),
        and the host's sudo rule names exactly these commands (deploy/sudoers/kasa). The probe asks unprivileged."""
        t = self.target
        if t.sudo and privileged:
            remote = ["sudo", "-n", "--", *remote]
        return [SSH, *self.options(), "-T", *ssh_args, "-p", str(int(t.port)), "-l", t.user, "--", t.address,
                quote(remote)]

    def check(self, result_rc: int, stderr: str) -> None:
        """Raise the SSHError an ssh exit status 255 with one of ssh's own messages means."""
        if result_rc != 255:
            return
        t = self.target
        text = " ".join(stderr.split())
        if "Host key verification failed" in text or "HOST IDENTIFICATION HAS CHANGED" in text:
            pinned = fingerprint(t.host_key)
            try:
                offered = ", ".join(k.fingerprint for k in keyscan(t.address, t.port)) or "none"
            except SSHError:
                offered = "unknown (no answer to a key scan)"
            raise HostKeyChanged(
                f"{t.where()}: its host key does not match the pinned one: pinned {pinned}, offered {offered}. "
                "Refusing to connect (possible man-in-the-middle). If the host was reinstalled, check the new "
                f"fingerprint and trust it explicitly (host_trust {t.name} --fingerprint …)")
        if "Permission denied" in text or "Too many authentication failures" in text:
            raise AuthFailed(f"{t.where()}: the login was refused (key not accepted for {t.user})")
        # A session whose connection dies (its sshd child killed, the link gone) ends with 255 and, at LogLevel
        # ERROR, no message at all. So, as Ansible does, 255 is ssh's own: Kasa's remote commands never exit 255.
        if _UNREACHABLE.search(text) or not text:
            raise Unreachable(f"{t.where()} is unreachable: {_tunnel_hint(t, text)}"
                              f"{text[-300:] or 'the connection ended (ssh exit status 255)'}")

    def run(self, remote: Sequence[str], *, input: bytes | None = None, timeout: float = 60,
            privileged: bool = True) -> Result:
        """Run `remote` (an argv) on the host; rc/stdout/stderr. SSHError when ssh itself failed (exit 255
        with ssh's own message): unreachable, host key changed, login refused."""
        argv = self.argv(remote, privileged=privileged)
        try:
            done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise Unreachable(f"{self.target.where()}: {remote[0]} got no answer within {timeout:g} s") from None
        stderr = done.stderr.decode(errors="replace")
        self.check(done.returncode, stderr)
        return Result(done.returncode, done.stdout, stderr)

    def stream(self, remote: Sequence[str], *, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE) -> subprocess.Popen:
        """Start `remote` with its stdout as a pipe (tar streams): the caller reads, waits, and calls check()
        with the exit status and stderr."""
        return subprocess.Popen(self.argv(remote), stdin=stdin, stdout=subprocess.PIPE, stderr=stderr)

    def forward(self, remote_host: str, remote_port: int | None, *, name: str) -> str:
        """A forward on this session's master from a Unix socket in the session's 0700 folder to
        `remote_host:remote_port` as the host sees it (or to `remote_host` itself when it is a socket path there,
        `-L local:/path`); returns the local socket's path. Database clients on the worker connect to it.

        Why a Unix socket and not 127.0.0.1:PORT: a loopback port is open to every user of the worker for as long
        as the dump runs (a customer's code on `local` included); a socket in a 0700 folder only to Kasa's user.
        It rides on the master (`ssh -O forward`), so no process of its own and no second login; cancel_forward()
        or close() end it."""
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) \
                or len(str(self.dir / name)) > _SOCKET_MAX:
            raise SSHError(f"forward socket name {name!r} is not usable under {self.dir}")
        local = str(self.dir / name)
        os.makedirs(os.path.dirname(local), mode=0o700, exist_ok=True)
        if remote_host.startswith("/"):
            spec = f"{local}:{remote_host}"
        else:
            if not remote_port or not 1 <= int(remote_port) <= 65535:
                raise SSHError(f"{self.target.where()}: forward to {remote_host!r}: no valid port")
            spec = f"{local}:{remote_host}:{int(remote_port)}"
        if not self.control.exists():
            self.run(["true"], timeout=self.target.connect_timeout + 20)  # the master the forward rides on
        self._mux("forward", spec)
        return local

    def cancel_forward(self, local: str, remote_host: str, remote_port: int | None) -> None:
        spec = f"{local}:{remote_host}" if remote_host.startswith("/") else f"{local}:{remote_host}:{int(remote_port)}"
        try:
            self._mux("cancel", spec)
        except SSHError:
            pass  # the master is gone (the host was lost): its forwards went with it
        with contextlib.suppress(OSError):
            os.unlink(local)  # the master leaves its socket file behind; close() removes the folder anyway

    def _mux(self, command: str, spec: str) -> None:
        t = self.target
        argv = [SSH, *self.options(), "-O", command, "-L", spec, "-p", str(int(t.port)), "-l", t.user, "--",
                t.address]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise Unreachable(f"{t.where()}: ssh -O {command} got no answer within 30 s") from None
        if done.returncode != 0:
            text = " ".join(done.stderr.split())[-300:]
            if "forwarding request failed" not in text:
                self.check(255, text)  # the master is gone: Unreachable, naming the host
            raise SSHError(f"{t.where()}: could not {command} a forward ({text or f'exit {done.returncode}'})")

    def close(self) -> None:
        """Stop the master (if one runs) and remove the folder with the key file. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.control.exists():
                t = self.target
                subprocess.run([SSH, *self.options(), "-O", "exit", "-p", str(int(t.port)), "-l", t.user, "--",
                                t.address], capture_output=True, timeout=10, check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _tunnel_hint(target: Target, text: str) -> str:
    """What an unreachable tunnel port means: Kasa sees only the bastion's end, so say which side to look at."""
    if not target.tunnel:
        return ""
    if "Connection refused" in text:
        return (f"its reverse tunnel is down (nothing listens on {target.address}:{target.port}: check "
                "kasa-tunnel.service on the host and the bastion's sshd): ")
    return ("through its reverse tunnel (the tunnel is down, or the host's sshd does not answer behind it: check "
            "kasa-tunnel.service on the host): ")


def run(target: Target, remote: Sequence[str], *, runtime_dir, input: bytes | None = None,
        timeout: float = 60) -> Result:
    """One command in a session of its own (opened and closed here)."""
    with Session(target, runtime_dir) as session:
        return session.run(remote, input=input, timeout=timeout)
