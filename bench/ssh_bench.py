"""SSH layer benchmark (issue 14): read N bytes of zeros from a remote `head -c` over the system OpenSSH client
(engines.ssh's choice) and over paramiko's exec channel, against OpenSSH's sshd in a network namespace on this
machine (the test suite's simulated host, tests/hosts.py). As root. Results: docs/PERFORMANCE.md, "SSH layer".

    bench/ssh_bench                 # 1 GiB through ssh, 256 MiB through paramiko, three rounds each
    bench/ssh_bench --paramiko-mib 1024   # paramiko over 1 GiB too (it re-keys on the way, and may die there)
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paramiko  # noqa: E402

import tests.conftest  # noqa: E402, F401  (first: tests.hosts is imported from it)
from tests.hosts import NetnsHosts, remove_leftovers  # noqa: E402


def through_ssh(host, key: Path, known: Path, n: int, cipher: str | None) -> tuple[float, float]:
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}", "-o",
            "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-i", str(key),
            *(["-c", cipher] if cipher else []), f"root@{host.address}", f"head -c {n} /dev/zero"]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started, got = time.monotonic(), 0
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
        while chunk := proc.stdout.read(1 << 20):
            got += len(chunk)
    seconds = time.monotonic() - started
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert got == n, f"ssh read {got} of {n} bytes"
    return got / seconds / 1e6, (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) * (1 << 30) / n


def through_paramiko(host, n: int) -> tuple[float, float]:
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(host.client_private))
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # a throwaway host of this benchmark
    client.connect(host.address, username="root", pkey=pkey, allow_agent=False, look_for_keys=False)
    try:
        started, cpu0, got = time.monotonic(), time.process_time(), 0
        _in, out, _err = client.exec_command(f"head -c {n} /dev/zero", bufsize=1 << 20)
        while data := out.channel.recv(1 << 20):
            got += len(data)
        seconds, cpu = time.monotonic() - started, time.process_time() - cpu0
    finally:
        client.close()
    assert got == n, f"paramiko read {got} of {n} bytes"
    return got / seconds / 1e6, cpu * (1 << 30) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ssh-mib", type=int, default=1024)
    parser.add_argument("--paramiko-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    o = parser.parse_args()
    remove_leftovers()
    with tempfile.TemporaryDirectory(prefix="kasa-ssh-bench-") as top:
        hosts = NetnsHosts(Path(top))
        try:
            host = hosts.make()
            key, known = Path(top) / "id", Path(top) / "known_hosts"
            key.write_text(host.client_private)
            key.chmod(0o600)
            known.write_text(f"{host.address} {host.host_public}\n")
            rows = []
            for label, fn in (
                ("system ssh, default cipher (chacha20-poly1305)",
                 lambda: through_ssh(host, key, known, o.ssh_mib << 20, None)),
                ("system ssh, aes128-gcm@openssh.com",
                 lambda: through_ssh(host, key, known, o.ssh_mib << 20, "aes128-gcm@openssh.com")),
                ("paramiko exec channel", lambda: through_paramiko(host, o.paramiko_mib << 20)),
            ):
                runs = []
                for _ in range(o.repeat):
                    try:
                        runs.append(fn())
                    except Exception as exc:  # a benchmark reports what failed and goes on
                        print(f"{label}: failed: {type(exc).__name__}: {exc}")
                if runs:
                    rows.append((label, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)))
            print(f"{'':<50} {'MB/s (median)':>14} {'CPU s per GiB':>14}")
            for label, rate, cpu in rows:
                print(f"{label:<50} {rate:>14.0f} {cpu:>14.2f}")
        finally:
            hosts.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
