"""`bench/backup_bench --remote` (issue 14, point 3): Kasa's backup of a customer on a remote host against
`ssh host tar cf - … | zstd -3 -T0 | cat > file` on the same data.

The host is the test suite's simulated one (tests/hosts.py): OpenSSH's sshd in a network namespace of this
machine, reached through a veth pair, so every byte crosses a real SSH connection (encryption, windows, the
kernel's network stack) with no network latency. The namespaces share the filesystem: the host's customers root
is the benchmark's cached instance folder (bench/common.generate_instance), so no data is copied. As root.

Both contenders read the instance's three service folders, log folders excluded, from a warm page cache, with
the same SSH cipher (aes128-gcm, engines.ssh's first choice: the stricter comparison, the plain pipeline gets it
too) and zstd -3 -T0. Kasa's backup is `manage.py backup bench.example.com --scope files --json`: encrypted, three
artifacts in two lanes, each read back (size) before the manifest. Its Python's peak RSS (VmHWM) is reported.
The goal: Kasa's throughput ≥ 0.85× the plain pipeline's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from common import DOMAIN, LOG_EXCLUDES, REPO, SERVICES, BenchError, generate_instance, mb, q, say, sh, tree_bytes

GOAL_REMOTE = 0.85  # Kasa's throughput over the plain ssh | zstd pipeline's
CIPHER = "aes128-gcm@openssh.com"


def _ensure_instance(args, work: Path) -> Path:
    root = work / "customers" / "bench"
    marker = work / "instance.json"
    info = json.loads(marker.read_text()) if marker.exists() else {}
    if info.get("size_gb") == args.size_gb and root.is_dir():
        say(f"instance cached in {root} ({info['files']:,} files, {mb(info['bytes'])})")
        return root
    if args.skip_generate:
        raise BenchError(f"--skip-generate: no instance of {args.size_gb} GB cached in {work}")
    from common import GENERATOR_VERSION

    t = time.monotonic()
    info = {"generator": GENERATOR_VERSION, "size_gb": args.size_gb,
            **generate_instance(root, int(args.size_gb * 1e9), max(600, round(40_000 * args.size_gb)))}
    marker.write_text(json.dumps(info, indent=2))
    say(f"instance generated in {time.monotonic() - t:.0f} s: {info['files']:,} files, {mb(info['bytes'])}")
    return root


def run_remote(args, work: Path, kasa_class) -> dict:
    sys.path.insert(0, str(REPO))
    import tests.conftest  # noqa: F401  (first: tests.hosts is imported from it)
    from tests.hosts import NetnsHosts, remove_leftovers

    root = _ensure_instance(args, work)
    files, data_bytes = tree_bytes(root, skip_logs=True)
    remove_leftovers()
    top = work / "remote"
    sh(f"rm -rf {q(top)}")
    top.mkdir(parents=True)
    hosts = NetnsHosts(top / "hosts")
    try:
        host = hosts.make()
        key = top / "id"
        key.write_text(host.client_private)
        key.chmod(0o600)
        known = top / "known_hosts"
        known.write_text(f"{host.address} {host.host_public}\n")
        kasa = kasa_class(work, work / "customers")
        kasa.reset()
        kasa.manage("host_add", "bench", "--ssh", f"root@{host.address}:{host.port}", "--key-file", str(key),
                    "--trust-host-key", "--customers-root", str(root.parent))
        kasa.manage("customer_add", DOMAIN, "--root", str(root), "--host", "bench",
                    *[a for s in SERVICES for a in ("--service", s)])
        excludes = " ".join(f"--exclude={q(p)}" for p in LOG_EXCLUDES)
        ssh = (f"ssh -F /dev/null -o BatchMode=yes -o UserKnownHostsFile={q(known)} -o StrictHostKeyChecking=yes "
               f"-o IdentitiesOnly=yes -i {q(key)} -c {CIPHER} root@{host.address}")
        out = top / "plain.tar.zst"
        remote_tar = f"tar cf - -C {q(root)} {excludes} {' '.join(SERVICES)}"
        say("warming the page cache (tar of the instance through ssh, to /dev/null)")
        sh(f"{ssh} {q(remote_tar)} | cat > /dev/null")
        rounds = []
        for i in range(args.repeat):
            say(f"round {i + 1} of {args.repeat}: plain `ssh host tar | zstd | cat > file`")
            t = time.monotonic()
            sh(f"{ssh} {q(remote_tar)} | zstd -3 -T0 -q | cat > {q(out)}")
            plain = time.monotonic() - t
            plain_size = out.stat().st_size
            out.unlink()
            say(f"round {i + 1} of {args.repeat}: Kasa's backup of the remote customer")
            k = kasa.backup(DOMAIN, "--scope", "files", log_path=top / f"kasa-{i}.log")
            sh(f"rm -rf {q(kasa.var / 'backups')}")
            rounds.append({"plain": plain, "plain_size": plain_size, "kasa": k["wall"], "kasa_size": k["doc"]["size"],
                           "python_peak_rss": k["python_peak_rss"], "children": k["children_peak_rss"]})
    finally:
        hosts.close()
    plain = statistics.median(r["plain"] for r in rounds)
    wall = statistics.median(r["kasa"] for r in rounds)
    return {"data": {"files": files, "bytes": data_bytes, "size_gb": args.size_gb}, "cipher": CIPHER,
            "rounds": rounds, "plain": plain, "kasa": wall, "ratio": plain / wall,
            "python_peak_rss": max(r["python_peak_rss"] for r in rounds)}


def report_remote(r: dict) -> str:
    d = r["data"]
    rate = d["bytes"] / 1e6
    lines = [
        f"remote backup of {d['files']:,} files, {mb(d['bytes'])} (logs excluded), over SSH ({r['cipher']}) to a "
        "simulated host (sshd in a network namespace), medians of "
        f"{len(r['rounds'])} round(s):",
        f"  plain  ssh host tar cf - | zstd -3 -T0 | cat > file   {r['plain']:7.2f} s  {rate / r['plain']:7.0f} MB/s",
        f"  Kasa   backup --scope files (encrypted, 3 artifacts)  {r['kasa']:7.2f} s  {rate / r['kasa']:7.0f} MB/s",
        f"  Kasa's throughput / plain: {r['ratio']:.2f}x (goal >= {GOAL_REMOTE}x: "
        f"{'PASS' if r['ratio'] >= GOAL_REMOTE else 'MISS'})",
        f"  Kasa's Python peak RSS: {mb(r['python_peak_rss'])}",
        "  rounds (plain s, Kasa s): " + ", ".join(f"({x['plain']:.2f}, {x['kasa']:.2f})" for x in r["rounds"]),
    ]
    return "\n".join(lines)
