"""`bench/s3_bench.py` (issue 17): Kasa's S3 writer against boto3's own multipart upload, same bytes, same server.

A private SeaweedFS (engines.seaweedfs, data in the work folder) on this machine; a file of incompressible bytes
(os.urandom, cached) read from a warm page cache. Each contender runs in a fresh Python process of its own, so
its peak RSS (VmHWM) is its own:

- raw: boto3's `upload_file` with its defaults (TransferConfig: 8 MiB parts, up to 10 uploading at a time), the
  plain tool;
- raw-1: the same with one part uploading at a time (max_concurrency 1; boto3 reads the next parts meanwhile);
- kasa: `S3Store.open_write` fed 1 MiB reads (engines/stores/s3.py: 8 MiB parts, max_inflight 4 — three parts
  uploading while the next fills, at most 32 MiB buffered), committed; as a backup writes an artifact;
- kasa+lock: the same into a bucket with Object Lock, every object governance-locked for a day.

Rounds alternate the contenders; the table gives the median throughput of each, its ratio to raw, the median of
each round's own ratio (the goal, ≥ 0.9×: paired runs seconds apart)
and the largest peak RSS over the rounds (memory must stay flat: Kasa buffers at most part size × 4).
No test asserts time: run it by hand and record the table in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from engines import seaweedfs  # noqa: E402

MiB = 1 << 20
PART = 8 * MiB
GOAL = 0.90
PLAIN, LOCKED = "kasa-bench", "kasa-bench-locked"


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hwm(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def ensure_data(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    say(f"writing {size / 1e9:.2f} GB of random bytes to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(left, 16 * MiB)
            out.write(os.urandom(n))
            left -= n


# --- one contender, in its own process -------------------------------------------------------------------
def one(which: str, endpoint: str, access: str, secret: str, data: Path, key: str) -> dict:
    started = time.monotonic()
    if which in ("raw", "raw-1"):
        from boto3.s3.transfer import TransferConfig

        s3 = seaweedfs.client(endpoint, access, secret, attempts=3)
        s3.upload_file(str(data), PLAIN, key, Config=TransferConfig(
            multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=1 if which == "raw-1" else 10,
            use_threads=True))
    else:
        from engines.stores.s3 import S3Store

        locked = which == "kasa+lock"
        store = S3Store(LOCKED if locked else PLAIN, endpoint_url=endpoint, access_key=access, secret_key=secret,
                        lock_mode="governance" if locked else None, lock_days=1 if locked else 0)
        writer = store.open_write(key)
        with open(data, "rb") as src:
            while chunk := src.read(MiB):
                writer.write(chunk)
        writer.commit()
    wall = time.monotonic() - started
    return {"which": which, "wall": wall, "bytes": data.stat().st_size, "peak_rss": hwm()}


def run_one(which: str, server: seaweedfs.Server, data: Path, key: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--one", which, "--endpoint", server.endpoint,
                          "--data", str(data), "--key", key],
                         env={**os.environ, "KASA_BENCH_S3_ACCESS": server.access_key,
                              "KASA_BENCH_S3_SECRET": server.secret_key()},
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{which} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    weed = subprocess.run([seaweedfs.weed_binary(), "version"], capture_output=True, text=True).stdout.split("\n")[0]
    import boto3

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 1e9, 1), "kernel": platform.release(),
            "python": platform.python_version(), "boto3": boto3.__version__, "weed": weed.strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/s3_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="bytes uploaded per run (default 1.0 GB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=str(REPO / "var" / "bench" / "s3"))
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.endpoint, os.environ["KASA_BENCH_S3_ACCESS"],
                             os.environ["KASA_BENCH_S3_SECRET"], Path(args.data), args.key)))
        return 0

    work = Path(args.workdir)
    data = work / "data.bin"
    ensure_data(data, int(args.size_gb * 1e9) // MiB * MiB)
    with open(data, "rb") as src:  # warm page cache: both contenders read from memory
        while src.read(16 * MiB):
            pass
    folder = work / "seaweedfs"
    shutil.rmtree(folder, ignore_errors=True)
    say("starting SeaweedFS")
    server = seaweedfs.start(folder, many_buckets=False)  # SeaweedFS's own volume layout, as in production
    results: dict[str, list[dict]] = {"raw": [], "raw-1": [], "kasa": [], "kasa+lock": []}
    weed_peak = 0
    try:
        s3 = seaweedfs.client(server.endpoint, server.access_key, server.secret_key())
        s3.create_bucket(Bucket=PLAIN)
        s3.create_bucket(Bucket=LOCKED, ObjectLockEnabledForBucket=True)
        # The first writes make the server grow its volumes: a warm-up in each bucket, not timed.
        for bucket in (PLAIN, LOCKED):
            s3.put_object(Bucket=bucket, Key="warm-up", Body=os.urandom(64 * MiB))
        for r in range(args.repeat):
            order = list(results) if r % 2 == 0 else list(reversed(results))
            for which in order:
                res = run_one(which, server, data, f"round-{r}/{which.replace('+', '-')}.bin")
                weed_peak = max(weed_peak, rss(server.popen.pid))
                results[which].append(res)
                say(f"round {r + 1}: {which:9} {res['bytes'] / res['wall'] / 1e6:7.1f} MB/s, "
                    f"peak RSS {res['peak_rss'] / 1e6:.0f} MB")
                if which != "kasa+lock":  # keep the disk small: the plain bucket's objects go
                    s3.delete_object(Bucket=PLAIN, Key=f"round-{r}/{which}.bin")
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)

    size = data.stat().st_size
    table = {}
    for which, runs in results.items():
        mbps = statistics.median(size / x["wall"] / 1e6 for x in runs)
        table[which] = {"mb_s": round(mbps, 1), "peak_rss_mb": round(max(x["peak_rss"] for x in runs) / 1e6),
                        "runs_mb_s": [round(size / x["wall"] / 1e6, 1) for x in runs]}
    raw = table["raw"]["mb_s"]
    for which in table:
        table[which]["vs_raw"] = round(table[which]["mb_s"] / raw, 2)
        # Each round's own ratio (the two ran seconds apart), then the median: between rounds the shared machine
        # differs more than the two sides of a pair do.
        table[which]["paired_vs_raw"] = round(statistics.median(
            results["raw"][i]["wall"] / results[which][i]["wall"] for i in range(args.repeat)), 2)
    doc = {"bytes": size, "repeat": args.repeat, "part_size": PART, "results": table,
           "weed_rss_mb": round(weed_peak / 1e6), "machine": machine(), "goal_vs_raw": GOAL}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"\n{size / 1e9:.2f} GB of random bytes, {args.repeat} rounds (median), 8 MiB parts")
        print(f"{'contender':12} {'MB/s':>8} {'vs raw':>7} {'paired':>7} {'peak RSS':>9}   runs (MB/s)")
        for which, row in table.items():
            print(f"{which:12} {row['mb_s']:8.1f} {row['vs_raw']:6.2f}× {row['paired_vs_raw']:6.2f}× "
                  f"{row['peak_rss_mb']:6d} MB   {', '.join(map(str, row['runs_mb_s']))}")
        print(f"SeaweedFS RSS after the runs: {doc['weed_rss_mb']} MB; machine: {json.dumps(doc['machine'])}")
    kasa = table["kasa"]["paired_vs_raw"]
    same = round(table["kasa"]["mb_s"] / table["raw-1"]["mb_s"], 2)
    print(f"goal: Kasa ≥ {GOAL}× raw (median of the rounds' pairs): {'met' if kasa >= GOAL else 'NOT met'} "
          f"({kasa}×; medians {table['kasa']['vs_raw']}×; {same}× raw-1, one part uploading at a time)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
