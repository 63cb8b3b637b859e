"""Replay Kasa's write_artifact on the benchmark's three service folders with parts switched off.

Evidence for docs/PERFORMANCE.md ("Where Kasa's time goes"): drives Kasa's own classes
(engines.streams.ProcessChain, engines.backupcrypto.EncryptingWriter, engines.stores.local.LocalStore)
the way backups/operations.py does — chain → encrypt → sha256 → store, commit (fsync), re-read — and
times variants: without the verification, without fsync, without encryption, zstd thread counts,
chunk sizes, tar format. Needs the data set of `bench/backup_bench` (run it first).

    .venv/bin/python bench/stream_variants.py [--workdir var/bench] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engines import sources, streams  # noqa: E402
from engines.backupcrypto import EncryptingWriter, KeyRing  # noqa: E402
from engines.stores.local import LocalStore  # noqa: E402
from engines.streams import HashingWriter, ProcessChain, Stage  # noqa: E402

SERVICES = ("admin", "backend", "store")
EXCL = [f"--exclude={p}" for p in sources.DEFAULT_EXCLUDES]


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def replay(root: str, out: str, label: str, *, zstd=("-3", "-T0"), encrypt=True, fsync=True, verify=True,
           chunk=streams.CHUNK, discard=False, tar_argv=None) -> None:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    store, ring = LocalStore(out), KeyRing("bench-key-" + "k" * 40)
    t0, c0 = time.monotonic(), _cpu()
    t_commit = t_verify = 0.0
    for svc in SERVICES:
        tar = sources.tar_stage(root, [svc], excludes=sources.DEFAULT_EXCLUDES)
        if tar_argv is not None:
            tar = Stage(["tar", "--create", "--file=-", "--directory", root, *tar_argv, *EXCL, "--", svc], name="tar")
        chain = ProcessChain([tar, Stage(["zstd", *zstd, "-q", "-c"], name="zstd")])
        if discard:
            with chain:
                for _ in chain.chunks(chunk):
                    pass
                chain.finish()
            continue
        name = f"replay/{svc}"
        w = store.open_write(name)
        if not fsync:
            def commit_without_fsync(w=w):
                w._fh.close()
                os.replace(w._tmp, w._final)
            w._commit = commit_without_fsync
        hashing = HashingWriter(w)
        top = EncryptingWriter(hashing, ring) if encrypt else hashing
        with chain:
            for data in chain.chunks(chunk):
                top.write(data)
            chain.finish()
        if encrypt:
            top.close()
        t = time.monotonic()
        w.commit()
        t_commit += time.monotonic() - t
        if verify:
            t = time.monotonic()
            with store.open_read(name) as fh:
                streams.sha256_of(fh)
            t_verify += time.monotonic() - t
    wall, c1 = time.monotonic() - t0, _cpu()
    print(f"{label:<62}{wall:6.2f} s  (commit {t_commit:4.2f} s, verify {t_verify:4.2f} s; CPU Python "
          f"{c1[0] - c0[0]:4.1f} s, children {c1[1] - c0[1]:4.1f} s)", flush=True)


def shell(root: str, label: str, script: str) -> None:
    os.sync()
    t = time.monotonic()
    subprocess.run(["bash", "-c", f"set -euo pipefail; cd '{root}'; {script}"], check=True)
    print(f"{label:<62}{time.monotonic() - t:6.2f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(REPO / "var" / "bench"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    root, out = str(work / "customers" / "bench"), str(work / "replay-out")
    if not Path(root).is_dir():
        print(f"no data set in {work}: run bench/backup_bench first", file=sys.stderr)
        return 1
    x = " ".join(EXCL)
    junk = f"'{out}.zst'"
    for rep in range(args.repeat):
        print(f"--- repetition {rep + 1}", flush=True)
        shell(root, "shell: whole tree tar | zstd -3 -T0 > file",
              f"tar cf - {x} -C .. bench | zstd -3 -T0 -q -c > {junk}")
        shell(root, "shell: Kasa's tar argv per service | zstd -3 -T0 > file",
              f"for s in {' '.join(SERVICES)}; do tar --create --file=- --format=posix --sparse {x} -- $s "
              f"| zstd -3 -T0 -q -c > {junk}; done")
        replay(root, out, "Kasa's stack: chain → encrypt → sha256 → fsync → verify")
        replay(root, out, "  without verify", verify=False)
        replay(root, out, "  without verify, fsync", verify=False, fsync=False)
        replay(root, out, "  without verify, fsync, encryption", verify=False, fsync=False, encrypt=False)
        replay(root, out, "  Python only reads the chains (1 MiB chunks)", discard=True)
        replay(root, out, "Kasa's stack, zstd -T1", zstd=("-3", "-T1"))
        replay(root, out, "Kasa's stack, zstd --single-thread", zstd=("-3", "--single-thread"))
        replay(root, out, "Kasa's stack, GNU tar format, no --sparse", tar_argv=[])
        replay(root, out, "Kasa's stack, 4 MiB chunks", chunk=4 << 20)
    shutil.rmtree(out, ignore_errors=True)
    Path(f"{out}.zst").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
