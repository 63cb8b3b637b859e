"""Kasa restore benchmark (issue 4, point 10): Kasa's verified in-place restore against the hand-run restore.

Run it as `bench/restore_bench` (the checkout's .venv). On the same cached data set as bench/backup_bench
(≈1 GB instance, ≈1 GB pgbench database), it

1. registers the instance in a fresh control database and makes, untimed, Kasa's full encrypted backup and
   the hand-run archives (`tar czf`, `pg_dump -Fc` with the server's own client);
2. warms the page cache, then times in one run
   (a) the hand-run restore: `tar xzf` into a fresh folder, then `createdb` + `pg_restore` into a fresh
       database (what an operator types; no verification, no swap, no safety net);
   (b) Kasa: `manage.py restore ID --yes --no-safety-backup --json` in place — every artifact verified
       (checksum, decryption, every tar member) first, folders staged and swapped, the database restored
       into a fresh database, row counts checked, then swapped in;
   (c) Kasa with its default safety backup of the current state first (reported, not the goal's contender);
3. prints times, the ratio against the goal (≤ 1.0× hand-run) and Kasa's peak RSS (goal < 200 MB).

Exit status: 0 whatever the goals say, 1 when a step failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from backup_bench import Kasa, RssWatcher, ensure_data, machine  # noqa: E402
from common import (  # noqa: E402
    DEFAULT_DB_NAME,
    DOMAIN,
    GOAL_RSS,
    LOG_EXCLUDES,
    MANAGE,
    PYTHON,
    REPO,
    SERVICES,
    BenchError,
    Postgres,
    mb,
    pg_binary,
    q,
    say,
    settle,
    sh,
    timed,
)

GOAL_VS_HAND_RESTORE = 1.0


def kasa_command(kasa: Kasa, args: list[str], log_path: Path) -> dict:
    """Run a manage.py command with --json, measured like the backup benchmark (wall, peak RSS, CPU)."""
    argv = [str(PYTHON), str(MANAGE), *args, "--json"]
    with open(log_path, "w") as log, open(log_path.with_suffix(".json"), "w+") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=kasa.env, cwd=REPO, stdout=out, stderr=log)
        watch = RssWatcher(proc.pid)
        watch.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        watch.stop()
        out.seek(0)
        text = out.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise BenchError(f"manage.py {' '.join(args)} exited {code}; {log_path} ends:\n"
                         f"{log_path.read_text()[-2500:]}\n{text[-1000:]}")
    return {"wall": wall, "doc": json.loads(text), "python_peak_rss": watch.python_hwm,
            "children_peak_rss": watch.children, "cpu_user": usage.ru_utime, "cpu_sys": usage.ru_stime}


def run(args, work: Path) -> dict:
    pg = Postgres(args.pg_admin_url, args.pg_host, args.pg_port)
    root, info = ensure_data(args, work, pg)
    out = work / "restore-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    penv = pg.env()
    major = pg.server_major()
    # The hand-run uses the server's own client tools, as an operator on that box would.
    dump, restore = (f"/usr/lib/postgresql/{major}/bin/{t}" for t in ("pg_dump", "pg_restore"))
    if not os.path.exists(restore):
        dump, restore = pg_binary("pg_dump"), pg_binary("pg_restore")
    createdb, dropdb = pg_binary("createdb"), pg_binary("dropdb")

    common.compile_kasa()
    say("registering the customer in a fresh control database; the role may create the fresh database")
    kasa = Kasa(work, work / "customers")
    kasa.reset()
    kasa.manage("customer_add", DOMAIN, "--root", str(root), *sum((["--service", s] for s in SERVICES), []),
                "--database", f"main={pg.url}")
    pg.admin(f'ALTER ROLE "{common.DB_ROLE}" CREATEDB')

    say("untimed: Kasa's full backup, and the hand-run tar czf + pg_dump -Fc")
    backup = kasa_command(kasa, ["backup", DOMAIN], work / "restore-bench-backup.log")["doc"]
    excl = " ".join(f"--exclude={q(p)}" for p in LOG_EXCLUDES)
    sh(f"tar czf {q(out / 'instance.tar.gz')} {excl} -C {q(root.parent)} {q(root.name)}")
    sh(f"{q(dump)} -Fc -f {q(out / 'db.dump')}", env=penv)

    say("warming the page cache (archives and the Kasa backup)")
    sh(f"cat {q(out)}/* {q(Path(backup['location']))}/* > /dev/null")
    sh("sync")

    r: dict = {"machine": machine(), "data": info, "server_major": major, "backup_id": backup["id"],
               "backup_size": backup["size"], "hand_tools": [dump, restore]}
    rounds = []
    for i in range(args.repeat):
        if args.repeat > 1:
            say(f"round {i + 1} of {args.repeat}")
        rounds.append(one_round(work, out, kasa, backup, penv, dump_tools=(createdb, dropdb, restore),
                                settle_seconds=args.settle))
        wait_for_trash(root)
        settle(args.settle)  # the previous trees Kasa just removed: the next round's hand-run would pay for them
    # Medians: one round on this shared VM can be off by +-20 % or more (docs/PERFORMANCE.md).
    r["rounds"] = [{"hand": x["hand"]["total"], "kasa": x["kasa"]["wall"]} for x in rounds]
    r["hand"] = {key: median([x["hand"][key] for x in rounds]) for key in ("files", "db", "total", "sync_after")}
    by_kasa = sorted(rounds, key=lambda x: x["kasa"]["wall"])
    r["kasa"] = dict(by_kasa[(len(by_kasa) - 1) // 2]["kasa"])
    r["kasa"]["wall"] = median([x["kasa"]["wall"] for x in rounds])
    r["kasa"]["python_peak_rss"] = max(x["kasa"]["python_peak_rss"] for x in rounds)

    if not args.no_safety:
        say("(c) Kasa: restore --yes (with the default safety backup first)")
        c = kasa_command(kasa, ["restore", str(backup["id"]), "--yes"], work / "kasa-restore-safety.log")
        r["kasa_safety"] = {key: v for key, v in c.items() if key != "doc"}
    shutil.rmtree(out)
    shutil.rmtree(kasa.var / "backups", ignore_errors=True)
    return r


def one_round(work: Path, out: Path, kasa, backup: dict, penv: dict, *, dump_tools, settle_seconds: float) -> dict:
    createdb, dropdb, restore = dump_tools
    say("(a) hand-run: tar xzf into a fresh folder, createdb + pg_restore into a fresh database")
    target = out / "hand-restored"
    target.mkdir()
    fresh = "kasa_bench_hand_restore"
    sh(f"{q(dropdb)} --if-exists {fresh}", env=penv)
    a_files = timed(f"tar xzf {q(out / 'instance.tar.gz')} -C {q(target)}")
    a_db = timed(f"{q(createdb)} {fresh} && {q(restore)} --no-owner -d {fresh} {q(out / 'db.dump')}", env=penv)
    a_sync = timed("sync")
    hand = {"files": a_files, "db": a_db, "total": a_files + a_db, "sync_after": a_sync}
    sh(f"{q(dropdb)} --if-exists {fresh}", env=penv)
    shutil.rmtree(target)
    settle(settle_seconds)  # else (b) pays for the 40,000 inodes (a)'s cleanup just freed (common.settle)

    say("(b) Kasa: restore --yes --no-safety-backup (verify, stage, fresh database, swap)")
    k = kasa_command(kasa, ["restore", str(backup["id"]), "--yes", "--no-safety-backup"],
                     work / "kasa-restore.log")
    res = {key: v for key, v in k.items() if key != "doc"}
    res["log"] = [f"{ts:%H:%M:%S.%f} {text}" for ts, text in kasa.log_lines(k["doc"]["id"])]
    return {"hand": hand, "kasa": res}


def wait_for_trash(root: Path, timeout: float = 300) -> None:
    """Kasa removes the previous trees with a detached `rm -rf` after the restore holds; let it finish, so it
    does not slow the next round's hand-run (nor the commands that follow)."""
    deadline = time.monotonic() + timeout
    while any(p.name.startswith(".kasa-trash-") for p in root.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)


def median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def report(r: dict) -> str:
    h, k = r["hand"], r["kasa"]
    d = r["data"]
    ratio = k["wall"] / h["total"]
    children = ", ".join(f"{n} {mb(v)}" for n, v in sorted(k["children_peak_rss"].items()))
    lines = [
        "",
        f"Data: instance {d['files']:,} files, {mb(d['bytes'])}; database pgbench -s {d['db_scale']}, "
        f"{mb(d['db_bytes'])}; Kasa backup #{r['backup_id']} {mb(r['backup_size'])}",
        f"Machine: {r['machine']['nproc']} CPUs ({r['machine']['cpu']}); hand-run tools {', '.join(r['hand_tools'])}",
        "",
        f"Medians of {len(r['rounds'])} round(s); each round, Kasa / hand-run: "
        + " ".join(f"{x['kasa'] / x['hand']:.2f}x" for x in r["rounds"]),
        f"{'contender':<58}{'files s':>9}{'db s':>8}{'total s':>9}",
        f"{'(a) hand-run: tar xzf + createdb + pg_restore':<58}{h['files']:>9.1f}{h['db']:>8.1f}{h['total']:>9.1f}",
        f"{'(b) Kasa restore in place (verified, staged, swapped)':<58}{'':>9}{'':>8}{k['wall']:>9.1f}",
    ]
    if "kasa_safety" in r:
        lines.append(f"{'(c) Kasa restore with the default safety backup first':<58}{'':>9}{'':>8}"
                     f"{r['kasa_safety']['wall']:>9.1f}")
    lines += [
        f"Kasa CPU (process tree): user {k['cpu_user']:.1f} s, sys {k['cpu_sys']:.1f} s; peak RSS: Python "
        f"{mb(k['python_peak_rss'])}; children: {children or 'none seen'}",
        "",
        "Goals (issue 4, point 10):",
        f"  Kasa / hand-run = {k['wall']:.1f} / {h['total']:.1f} = {ratio:.2f}x   goal <= {GOAL_VS_HAND_RESTORE}x   "
        f"{'PASS' if ratio <= GOAL_VS_HAND_RESTORE else 'MISS'}",
        f"  Kasa peak RSS   = {mb(k['python_peak_rss'])}          goal < {mb(GOAL_RSS)}  "
        f"{'PASS' if k['python_peak_rss'] < GOAL_RSS else 'MISS'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/restore_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--workdir", default=str(REPO / "var" / "bench"))
    ap.add_argument("--skip-generate", action="store_true", help="use the cached data set; fail if it is missing")
    ap.add_argument("--no-safety", action="store_true", help="skip contender (c)")
    ap.add_argument("--settle", type=float, default=65,
                    help="seconds to wait after each cleanup before timing (ext4 without a journal skips recently "
                         "freed inodes, common.settle; default 65, 0 to skip)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of (a) and (b); medians are reported (default 3)")
    ap.add_argument("--pg-admin-url", default=os.environ.get("KASA_BENCH_PG_ADMIN_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--db-name", default=DEFAULT_DB_NAME)
    ap.add_argument("--pg-host", default="127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--results", help="JSON results (default <workdir>/results-restore.json)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    import backup_bench

    backup_bench.DB_NAME = common.DB_NAME = args.db_name
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = run(args, work)
    except BenchError as exc:
        print(f"restore_bench: {exc}", file=sys.stderr)
        return 1
    path = Path(args.results or work / "results-restore.json")
    path.write_text(json.dumps(res, indent=2, default=str))
    print(report(res))
    say(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
