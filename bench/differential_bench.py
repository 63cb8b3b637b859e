"""Differential backups against full ones (issue 15, point 4): `bench/backup_bench --unchanged` / `--churn 1%`.

On the benchmark's cached instance (≈1 GB, ≈40,000 files, bench/common.generate_instance), copied once per run
into a folder of its own so the cache stays pristine, each round

1. registers the copy as a customer (service folders only: databases are dumped whole in every backup, so
   they play no part in what a differential saves) in a fresh control database;
2. times Kasa's full backup (`backup --scope files --full`) and, for comparison, GNU tar's own level-0
   `--listed-incremental` archive piped through zstd;
3. `--unchanged`: times a differential of the unchanged tree (`--differential`) and tar's level-1 incremental;
   `--churn P%`: rewrites P % of the files (new bytes, same sizes, chosen at random with a fixed seed), then
   times the differential and tar's level-1 incremental;
4. restores (a clone, `restore --to-root`) the full and the differential (full + differential applied as one
   stream) and times both, with their user and kernel CPU.

Times are the backup/restore run's own duration (started → finished, as stored by Kasa); the wall time of
`manage.py` (which adds ~1 s of Python and Django start-up to every command) is printed beside it. Goals:
unchanged differential ≤ 0.15× the full's time and ≤ 1 % of the file bytes stored; 1 % churn ≤ 0.3× the
time; restore of full + differential ≤ 1.15× the restore of the full.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import common
from backup_bench import Kasa, machine, median
from common import (
    DOMAIN,
    LOG_EXCLUDES,
    SERVICES,
    BenchError,
    ensure_tree,
    mb,
    q,
    say,
    settle,
    sh,
)
from restore_bench import kasa_command

GOALS = {"unchanged_time": 0.15, "unchanged_bytes": 0.01, "churn_time": 0.30, "restore": 1.15}


def churn(root: Path, share: float, seed: int) -> tuple[int, int]:
    """Rewrite `share` of the files (outside log folders) with new bytes of the same size."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                   and not any(part in ("logs", "log") for part in p.parts) and p.suffix != ".log")
    rng = random.Random(seed)
    chosen = rng.sample(files, max(1, round(len(files) * share)))
    written = 0
    for p in chosen:
        size = p.stat().st_size
        p.write_bytes(rng.randbytes(size))
        written += size
    return len(chosen), written


def plain_incremental(root: Path, out: Path, snap: Path, level: int) -> dict:
    """GNU tar's own incremental archive (the plain tool), through zstd like Kasa's archives."""
    excl = " ".join(f"--exclude={q(p)}" for p in LOG_EXCLUDES)
    work_snap = snap.with_suffix(f".{level}")
    shutil.copy(snap, work_snap) if level else work_snap.unlink(missing_ok=True)
    target = out / f"plain-level{level}.tar.zst"
    t = time.monotonic()
    sh(f"tar --create --file=- --listed-incremental={q(work_snap)} {excl} -C {q(root.parent)} {q(root.name)} "
       f"| zstd -3 -T0 -q -c > {q(target)}")
    seconds = time.monotonic() - t
    if level == 0:
        shutil.copy(work_snap, snap)
    return {"seconds": seconds, "size": target.stat().st_size}


def _timed(kasa: Kasa, argv: list[str], log: Path) -> dict:
    r = kasa_command(kasa, argv, log)
    doc = r["doc"]
    return {"wall": r["wall"], "run": doc["duration"], "size": doc.get("size"), "kind": doc.get("kind"),
            "id": doc["id"], "cpu_user": r["cpu_user"], "cpu_sys": r["cpu_sys"],
            "python_peak_rss": r["python_peak_rss"]}


def one_round(args, work: Path, source: Path, info: dict, i: int) -> dict:
    base = work / "differential"
    customers = base / "customers"
    root = customers / "bench"
    out = base / "out"
    for p in (customers, out):
        shutil.rmtree(p, ignore_errors=True)
    settle(args.settle)
    out.mkdir(parents=True)
    customers.mkdir(parents=True)
    say(f"copying the instance to {root}")
    sh(f"cp -a {q(source)} {q(root)}")
    kasa = Kasa(base, customers)
    kasa.reset()
    kasa.manage("customer_add", DOMAIN, "--root", str(root), *sum((["--service", s] for s in SERVICES), []))
    sh(f"tar cf - -C {q(customers)} bench | cat > /dev/null; sync")  # warm cache, as bench/backup_bench does

    r: dict = {}
    snap = out / "tar.snar"
    say("plain: tar --listed-incremental level 0 | zstd")
    r["plain_full"] = plain_incremental(root, out, snap, 0)
    say("Kasa: backup --scope files --full")
    r["full"] = _timed(kasa, ["backup", DOMAIN, "--scope", "files", "--full"], base / "full.log")
    if args.unchanged:
        say("plain: tar --listed-incremental level 1 of the unchanged tree")
        r["plain_diff"] = plain_incremental(root, out, snap, 1)
    else:
        n, written = churn(root, args.churn, seed=1000 + i)
        r["churned"] = {"files": n, "bytes": written}
        say(f"churn: rewrote {n} files ({mb(written)}); plain: tar --listed-incremental level 1")
        r["plain_diff"] = plain_incremental(root, out, snap, 1)
    say("Kasa: backup --scope files --differential")
    r["diff"] = _timed(kasa, ["backup", DOMAIN, "--scope", "files", "--differential"], base / "diff.log")
    if r["diff"]["kind"] != "differential":
        raise BenchError(f"the second backup was not differential: {r['diff']}")
    sh("sync")
    # Nothing is deleted between the two restores (see settle()), and their order alternates by round.
    for what in (("full", "diff") if i % 2 == 0 else ("diff", "full")):
        dest = customers / f"restored-{what}"
        say(f"Kasa: restore {what} --to-root {dest}")
        r[f"restore_{what}"] = _timed(kasa, ["restore", str(r[what]["id"]), "--to-root", str(dest), "--yes"],
                                      base / f"restore-{what}.log")
        sh("sync")
    return r


def run(args, work: Path) -> dict:
    source, info = ensure_tree(args, work)
    common.compile_kasa()
    file_bytes = info["bytes"]
    rounds = [one_round(args, work, source, info, i) for i in range(args.repeat)]
    shutil.rmtree(work / "differential", ignore_errors=True)

    def med(path: tuple[str, str]) -> float:
        return median([x[path[0]][path[1]] for x in rounds])

    r = {"machine": machine(), "data": info, "mode": "unchanged" if args.unchanged else f"churn {args.churn:.0%}",
         "rounds": rounds}
    r["full_run"], r["diff_run"] = med(("full", "run")), med(("diff", "run"))
    r["full_wall"], r["diff_wall"] = med(("full", "wall")), med(("diff", "wall"))
    r["diff_size"] = med(("diff", "size"))
    r["full_size"] = med(("full", "size"))
    r["plain_full"], r["plain_diff"] = med(("plain_full", "seconds")), med(("plain_diff", "seconds"))
    r["plain_diff_size"] = med(("plain_diff", "size"))
    r["restore_full"], r["restore_diff"] = med(("restore_full", "run")), med(("restore_diff", "run"))
    for k in ("cpu_user", "cpu_sys"):
        r[f"restore_full_{k}"] = med(("restore_full", k))
        r[f"restore_diff_{k}"] = med(("restore_diff", k))
    # Ratios are of each round's own pair, then the median: both sides of a pair ran on the same copy minutes
    # apart, while the machine's state (other VMs, the filesystem's recently freed inodes) differs between rounds.
    r["time_ratio"] = median([x["diff"]["run"] / x["full"]["run"] for x in rounds])
    r["bytes_ratio"] = r["diff_size"] / file_bytes
    r["restore_ratio"] = median([x["restore_diff"]["run"] / x["restore_full"]["run"] for x in rounds])
    r["restore_ratios"] = [round(x["restore_diff"]["run"] / x["restore_full"]["run"], 3) for x in rounds]
    return r


def report(r: dict) -> str:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    unchanged = r["mode"] == "unchanged"
    goal = GOALS["unchanged_time"] if unchanged else GOALS["churn_time"]
    lines = [
        f"Differential backups, {r['mode']}: {r['data']['files']:,} files, {mb(r['data']['bytes'])} "
        f"(median of {len(r['rounds'])} round(s); times are the runs' own durations, manage.py wall time in brackets)",
        "",
        f"  full backup (files)          {r['full_run']:6.2f} s  [{r['full_wall']:.2f} s]  stored {mb(r['full_size'])}",
        f"  differential                 {r['diff_run']:6.2f} s  [{r['diff_wall']:.2f} s]  stored {mb(r['diff_size'])}",
        f"  plain tar -g level 0 | zstd  {r['plain_full']:6.2f} s",
        f"  plain tar -g level 1 | zstd  {r['plain_diff']:6.2f} s              stored {mb(r['plain_diff_size'])}",
        f"  restore of the full          {r['restore_full']:6.2f} s  (CPU user {r['restore_full_cpu_user']:.2f} s, "
        f"kernel {r['restore_full_cpu_sys']:.2f} s)",
        f"  restore of full+differential {r['restore_diff']:6.2f} s  (CPU user {r['restore_diff_cpu_user']:.2f} s, "
        f"kernel {r['restore_diff_cpu_sys']:.2f} s)",
        "",
        f"  differential / full time     {r['time_ratio']:.3f}×  (goal ≤ {goal}×)  {verdict(r['time_ratio'] <= goal)}",
    ]
    if unchanged:
        lines.append(f"  stored / file bytes          {r['bytes_ratio']:.4%}  (goal ≤ 1 %)  "
                     f"{verdict(r['bytes_ratio'] <= GOALS['unchanged_bytes'])}")
    lines.append(f"  restore full+diff / full     {r['restore_ratio']:.3f}×  (goal ≤ {GOALS['restore']}×)  "
                 f"{verdict(r['restore_ratio'] <= GOALS['restore'])}  (rounds: "
                 f"{', '.join(f'{x:.2f}×' for x in r['restore_ratios'])})")
    lines.append("  (ratios: median of each round's own pair)")
    return "\n".join(lines)


def parse_churn(text: str) -> float:
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 < value <= 1:
        raise ValueError(f"--churn {text}: give a share of the files, e.g. 1%")
    return value


def main(args) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    r = run(args, work)
    text = report(r)
    print(text)
    results = Path(args.results) if args.results else work / f"results-differential-{r['mode'].split()[0]}.json"
    results.write_text(json.dumps(r, indent=2, default=str))
    print(f"\nresults: {results}")
    os.sync()
    return 0
