"""Kasa backup benchmark (issue 3, point 12): Kasa's full encrypted backup against the commands it replaces.

Run it as `bench/backup_bench` (a wrapper that uses the checkout's .venv). It

1. generates, once, a realistic instance in the work dir (three services, backend/admin/store, with
   ~40,000 small source-like and JSON files, incompressible "media", `.env` files, an ecosystem file and
   logs) of about --size-gb, and a PostgreSQL database `kasa_bench` of about the same size made with
   `pgbench -i -s N`, owned by a role with a password; both are cached between runs;
2. registers the instance as a customer in a control database of its own (SQLite in <workdir>/kasa,
   recreated on every run so that earlier runs and retention play no part);
3. warms the page cache (every contender reads from a warm cache: dropping it is not reliable here),
   then times in one run
   (a) the hand-run baseline:  tar czf of the instance folder, then pg_dump -Fc;
   (b) the plain pipeline:     tar cf - | zstd -3 -T0, then pg_dump -Fc -Z0 | zstd -3 -T0 (no encryption);
   (c) Kasa:                   manage.py backup DOMAIN --json (full scope, encrypted, zstd, local target),
   with Kasa's peak RSS read from /proc (VmHWM of the Python process; its tar/zstd/pg_dump children are
   separate processes and are reported apart);
4. prints the times, the ratios, the sizes and the issue's goals with PASS/MISS.

`--memory-only` instead backs up a single incompressible file (2 GB by default) with `--compression none`
and reports Kasa's peak RSS: memory must not grow with the data.

Every contender archives the same bytes: log folders are excluded from (a) and (b) exactly as Kasa's
defaults exclude them (logs, log, *.log). Exit status: 0 whatever the goals say (this is a benchmark, not
a test), 1 when a step failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import (  # noqa: E402  (bench/ is on sys.path when run as a script)
    DEFAULT_DB_NAME,
    DOMAIN,
    GOAL_RSS,
    GOAL_VS_HAND,
    GOAL_VS_PLAIN,
    LOG_EXCLUDES,
    MANAGE,
    MB_PER_SCALE,
    MEMORY_DOMAIN,
    PYTHON,
    REPO,
    SERVICES,
    BenchError,
    Postgres,
    ensure_tree,
    kasa_pg_dump,
    mb,
    q,
    say,
    sh,
    timed,
)


# --- Kasa ----------------------------------------------------------------------------------------------
class Kasa:
    """manage.py against a control database of the benchmark's own (never the developer's var/)."""

    def __init__(self, workdir: Path, customers_root: Path):
        self.var = workdir / "kasa"
        self.customers_root = customers_root
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "SENTRY_DSN")}
        env.update({"KASA_ENV": "development", "KASA_VAR_DIR": str(self.var),
                    "KASA_CUSTOMERS_ROOT": str(customers_root),
                    "KASA_BACKUP_DIR": str(self.var / "backups"), "KASA_SCRATCH_DIR": str(self.var / "scratch"),
                    "DATABASE_URL": f"sqlite:///{self.var / 'kasa.sqlite3'}", "PYTHONUNBUFFERED": "1"})
        self.env = env

    def reset(self) -> None:
        if self.var.exists():
            shutil.rmtree(self.var)
        self.var.mkdir(parents=True)
        self.manage("migrate", "--no-input", "-v", "0")

    def manage(self, *args: str) -> str:
        res = subprocess.run([str(PYTHON), str(MANAGE), *args], env=self.env, cwd=REPO, capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise BenchError(f"manage.py {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        return res.stdout

    def backup(self, domain: str, *extra: str, log_path: Path, prefix: list[str] | None = None) -> dict:
        """Run `manage.py backup DOMAIN --json` and measure it: wall time, peak RSS of Python and of children."""
        argv = [*(prefix or []), str(PYTHON), str(MANAGE), "backup", domain, "--json", *extra]
        with open(log_path, "w") as log, open(log_path.with_suffix(".json"), "w+") as out:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=out, stderr=log)
            watch = RssWatcher(proc.pid, python_name="python" if not prefix else None)
            watch.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.monotonic() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            watch.stop()
            out.seek(0)
            text = out.read()
        if proc.returncode != 0:
            tail = log_path.read_text()[-2500:]
            raise BenchError(f"Kasa backup exited {proc.returncode}; its log ({log_path}) ends:\n{tail}")
        try:  # a profiler may print its own lines around Kasa's JSON document
            doc = json.loads(text[text.index("{"):text.rindex("}") + 1])
        except ValueError:
            raise BenchError(f"Kasa backup printed no JSON document: {text[:500]!r}") from None
        if doc.get("status") != "succeeded":
            raise BenchError(f"Kasa backup did not succeed: {doc}")
        return {"wall": wall, "doc": doc, "python_peak_rss": watch.python_hwm, "children_peak_rss": watch.children,
                "tree_maxrss": usage.ru_maxrss * 1024, "cpu_user": usage.ru_utime, "cpu_sys": usage.ru_stime}

    def log_lines(self, run_id: int) -> list[tuple[dt.datetime, str]]:
        con = sqlite3.connect(self.var / "kasa.sqlite3")
        try:
            rows = con.execute("SELECT ts, text FROM operations_runlogline WHERE run_id = ? ORDER BY seq",
                               [run_id]).fetchall()
        finally:
            con.close()
        return [(dt.datetime.fromisoformat(ts), text) for ts, text in rows]


class RssWatcher(threading.Thread):
    """Polls /proc: VmHWM (peak RSS, kept by the kernel) of the Kasa process and of each child it starts.

    VmHWM is a high-water mark, so polling cannot miss a peak, only a rise in the last poll interval
    before a process exits (20 ms here)."""

    def __init__(self, pid: int, python_name: str | None = "python", interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.python_name = python_name
        self.python_hwm = 0
        self.children: dict[str, int] = {}  # command name -> max VmHWM
        self._halt = threading.Event()

    @staticmethod
    def _status(pid: int) -> tuple[str, int]:
        name, hwm = "", 0
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("Name:"):
                        name = line.split()[1]
                    elif line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
        return name, hwm

    @staticmethod
    def _children(pid: int) -> list[int]:
        kids = []
        for task in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                with open(task) as fh:
                    kids += [int(x) for x in fh.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass
        return kids

    def _poll(self) -> None:
        # Under a profiler (prefix argv) the Kasa process is the first python descendant.
        todo, seen = [self.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            name, hwm = self._status(pid)
            if not name:
                continue
            is_kasa = (pid == self.pid and self.python_name) or (self.python_name is None and
                                                                   name.startswith("python"))
            if is_kasa:
                self.python_hwm = max(self.python_hwm, hwm)
            elif pid != self.pid and not name.startswith("python"):  # a fork not yet exec'd shares Kasa's pages
                if hwm:  # a zombie has no memory left to report
                    self.children[name] = max(self.children.get(name, 0), hwm)
            todo += self._children(pid)

    def run(self) -> None:
        while not self._halt.is_set():
            self._poll()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def artifact_times(lines: list[tuple[dt.datetime, str]], names: list[str]) -> dict[str, float]:
    """Seconds per artifact, from the run's log: `NAME: kind source` to `NAME: … stored` (includes the
    opener — snapshot and row counts for a database —, the chain, encryption, fsync and the verification)."""
    start: dict[str, dt.datetime] = {}
    out: dict[str, float] = {}
    for ts, text in lines:
        for n in names:
            if text.startswith(f"{n}: ") and n not in start and " stored" not in text:
                start[n] = ts
            elif text.startswith(f"{n}: ") and " stored, sha256" in text and n in start:
                out[n] = (ts - start[n]).total_seconds()
    if lines:
        out["(whole run, first to last log line)"] = (lines[-1][0] - lines[0][0]).total_seconds()
    return out


def reread_seconds(folder: Path) -> tuple[float, int]:
    """What Kasa's verification (re-read + sha256 of each stored artifact) costs on a warm cache."""
    t, n = time.monotonic(), 0
    for p in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
    return time.monotonic() - t, n


# --- the benchmark -----------------------------------------------------------------------------------------
def machine() -> dict:
    def first(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "mem_total": first(["bash", "-c", "free -h | awk '/^Mem:/ {print $2}'"]),
            "tar": first(["tar", "--version"]).splitlines()[0] if shutil.which("tar") else "",
            "zstd": first(["zstd", "--version"]), "python": sys.version.split()[0]}


def ensure_data(args, work: Path, pg: Postgres) -> tuple[Path, dict]:
    """The cached instance and the pgbench database (both generated when missing)."""
    root, info = ensure_tree(args, work)
    scale = max(1, round(args.size_gb * 1e9 / 1e6 / MB_PER_SCALE))
    have = pg.scale_present()
    if have == scale:
        say(f"database {DB_NAME} cached (pgbench scale {scale}, {mb(pg.size())})")
    elif args.skip_generate:
        raise BenchError(f"--skip-generate: database {DB_NAME} has scale {have}, not {scale}")
    else:
        t = time.monotonic()
        pg.generate(scale)
        say(f"database generated in {time.monotonic() - t:.0f} s: {mb(pg.size())}")
    info["db_scale"] = scale
    info["db_bytes"] = pg.size()
    return root, info


def steal_seconds() -> float:
    """CPU time this VM's vCPUs waited for the host (/proc/stat 'steal'): how noisy the neighbours were."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def stolen(fn):
    """Run fn(); return (its result, seconds of steal time across all vCPUs meanwhile)."""
    s0 = steal_seconds()
    res = fn()
    return res, steal_seconds() - s0


def run_full(args, work: Path) -> dict:
    pg = Postgres(args.pg_admin_url, args.pg_host, args.pg_port)
    root, info = ensure_data(args, work, pg)
    server_major = pg.server_major()
    pg_dump, pg_dump_version = kasa_pg_dump(server_major)
    penv = pg.env()
    kasa = Kasa(work, work / "customers")

    common.compile_kasa()
    say("warming the page cache: tar cf - | cat > /dev/null (GNU tar skips reading files for -f /dev/null), "
        "pg_dump > /dev/null")
    sh(f"tar cf - -C {q(root.parent)} {q(root.name)} | cat > /dev/null")
    sh(f"{q(pg_dump)} -Fc -Z0 > /dev/null", env=penv)
    sh("sync")

    r: dict = {"machine": machine(), "data": info, "pg_dump": pg_dump_version, "server_major": server_major,
               "rounds": []}
    for i in range(args.repeat):
        if args.repeat > 1:
            say(f"round {i + 1} of {args.repeat}")
        keep = args.keep and i == args.repeat - 1
        r["rounds"].append(one_round(args, work, root, pg, pg_dump, penv, kasa, keep=keep))
    # The table shows each contender's median over the rounds; the per-artifact details come from the round
    # whose Kasa time is the median one. One round on a shared VM can be off by +-20 %: see docs/PERFORMANCE.md.
    rounds = r["rounds"]
    r["hand"] = {key: median([x["hand"][key] for x in rounds]) for key in ("files", "db", "total", "sync_after",
                                                                         "size", "steal")}
    r["plain"] = {key: median([x["plain"][key] for x in rounds]) for key in ("files", "db", "total", "sync_after",
                                                                           "size", "steal")}
    by_kasa = sorted(rounds, key=lambda x: x["kasa"]["wall"])
    r["kasa"] = dict(by_kasa[(len(by_kasa) - 1) // 2]["kasa"])
    r["kasa"]["wall"] = median([x["kasa"]["wall"] for x in rounds])
    r["kasa"]["python_peak_rss"] = max(x["kasa"]["python_peak_rss"] for x in rounds)

    if args.profile:
        r["profile"] = profile_kasa(args, kasa, work)
    if not args.keep:
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(kasa.var / "backups", ignore_errors=True)
    return r


def median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def one_round(args, work: Path, root: Path, pg: Postgres, pg_dump: str, penv: dict, kasa: Kasa, *,
              keep: bool) -> dict:
    """(a), (b) and (c) once, each from a clean output folder and Kasa from a fresh control database."""
    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    (out / "hand").mkdir(parents=True)
    (out / "plain").mkdir(parents=True)
    excl = " ".join(f"--exclude={q(p)}" for p in LOG_EXCLUDES)

    say("registering the customer in a fresh control database")
    kasa.reset()
    kasa.manage("customer_add", DOMAIN, "--root", str(root), *sum((["--service", s] for s in SERVICES), []),
                "--database", f"main={pg.url}")
    sh("sync")

    r: dict = {}
    say("(a) hand-run: tar czf, then pg_dump -Fc")
    (a_files, a_db), a_steal = stolen(lambda: (
        timed(f"tar czf {q(out / 'hand' / 'instance.tar.gz')} {excl} -C {q(root.parent)} {q(root.name)}"),
        timed(f"{q(pg_dump)} -Fc -f {q(out / 'hand' / 'db.dump')}", env=penv)))
    a_sync = timed("sync")
    r["hand"] = {"files": a_files, "db": a_db, "total": a_files + a_db, "sync_after": a_sync, "steal": a_steal,
                 "size": sum(p.stat().st_size for p in (out / "hand").iterdir())}

    say("(b) plain pipeline: tar | zstd -3 -T0, then pg_dump -Fc -Z0 | zstd -3 -T0")
    (b_files, b_db), b_steal = stolen(lambda: (
        timed(f"tar cf - {excl} -C {q(root.parent)} {q(root.name)} | zstd -3 -T0 -q -c "
              f"> {q(out / 'plain' / 'instance.tar.zst')}"),
        timed(f"{q(pg_dump)} -Fc -Z0 | zstd -3 -T0 -q -c > {q(out / 'plain' / 'db.dump.zst')}", env=penv)))
    b_sync = timed("sync")
    r["plain"] = {"files": b_files, "db": b_db, "total": b_files + b_db, "sync_after": b_sync, "steal": b_steal,
                  "size": sum(p.stat().st_size for p in (out / "plain").iterdir())}

    say("(c) Kasa: manage.py backup --json (full, encrypted, zstd, local target)")
    k, k_steal = stolen(lambda: kasa.backup(DOMAIN, log_path=work / "kasa-backup.log"))
    k["steal"] = k_steal
    lines = kasa.log_lines(k["doc"]["run"])
    names = [a["name"] for a in k["doc"]["artifacts"]]
    k["artifacts"] = artifact_times(lines, names)
    k["artifact_sizes"] = {a["name"]: a["size"] for a in k["doc"]["artifacts"]}
    folder = Path(k["doc"]["location"])
    k["reread_seconds"], k["reread_bytes"] = reread_seconds(folder)
    k["size"] = k["doc"]["size"]
    k["log"] = [f"{ts:%H:%M:%S.%f} {text}" for ts, text in lines]
    r["kasa"] = {key: v for key, v in k.items() if key != "doc"}
    r["kasa"]["location"] = str(folder)
    if not keep:  # the next round writes into memory this one gave back, as the first did
        shutil.rmtree(out)
        shutil.rmtree(folder, ignore_errors=True)
    r["vs_hand"] = r["kasa"]["wall"] / r["hand"]["total"]
    r["vs_plain"] = r["kasa"]["wall"] / r["plain"]["total"]
    return r


def profile_kasa(args, kasa: Kasa, work: Path) -> dict:
    """A second Kasa run under py-spy (not timed against the others): where Python spends its time."""
    spy = args.profile
    raw = work / "kasa-profile.txt"
    say(f"profiling a second Kasa backup with {spy} record --format raw (collapsed stacks) → {raw}")
    k = kasa.backup(DOMAIN, log_path=work / "kasa-profile.log",
                    prefix=[spy, "record", "--format", "raw", "--rate", "200", "--nonblocking",
                            "--output", str(raw), "--"])
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # by function, not by line
        total += n
        leaf = frames[-1]
        self_t[leaf] = self_t.get(leaf, 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    top_self = sorted(self_t.items(), key=lambda kv: -kv[1])[:15]
    top_incl = sorted(incl.items(), key=lambda kv: -kv[1])[:25]
    return {"wall": k["wall"], "samples": total, "rate": 200,
            "self": [(f, n / 200) for f, n in top_self], "inclusive": [(f, n / 200) for f, n in top_incl]}


def run_memory(args, work: Path) -> dict:
    size = int(args.memory_gb * 1e9)
    root = work / "customers" / "memory"
    blob = root / "media" / "big.bin"
    if not (blob.exists() and blob.stat().st_size == size):
        say(f"writing {mb(size)} of random bytes to {blob}")
        blob.parent.mkdir(parents=True, exist_ok=True)
        with open(blob, "wb") as fh:
            left = size
            while left:
                n = min(left, 8 << 20)
                fh.write(os.urandom(n))
                left -= n
    kasa = Kasa(work / "memory", work / "customers")
    kasa.reset()
    kasa.manage("customer_add", MEMORY_DOMAIN, "--root", str(root), "--service", "media")
    sh(f"tar cf - -C {q(root)} media | cat > /dev/null")
    say("Kasa: manage.py backup --json --compression none (encrypted) of one incompressible file")
    k = kasa.backup(MEMORY_DOMAIN, "--compression", "none", log_path=work / "memory" / "kasa-backup.log")
    res = {"input_bytes": size, "wall": k["wall"], "python_peak_rss": k["python_peak_rss"],
           "children_peak_rss": k["children_peak_rss"], "tree_maxrss": k["tree_maxrss"], "size": k["doc"]["size"],
           "machine": machine()}
    if not args.keep:
        shutil.rmtree(kasa.var / "backups", ignore_errors=True)
    return res


# --- report ------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report_full(r: dict) -> str:
    h, p, k = r["hand"], r["plain"], r["kasa"]
    d = r["data"]
    lines = [
        "",
        f"Data: instance {d['files']:,} files, {mb(d['bytes'])} ({d['backed_up_files']:,} files, "
        f"{mb(d['backed_up_bytes'])} without logs); database pgbench -s {d['db_scale']}, {mb(d['db_bytes'])}",
        f"Machine: {r['machine']['nproc']} CPUs ({r['machine']['cpu']}), {r['machine']['mem_total']} RAM; "
        f"{r['pg_dump']}; warm page cache for every contender",
        "",
        f"Medians of {len(r['rounds'])} round(s); 'stolen' is CPU time the host gave other VMs meanwhile",
        f"{'contender':<44}{'files s':>9}{'db s':>8}{'total s':>9}{'output':>13}{'sync after':>12}{'stolen':>8}",
        f"{'(a) hand-run: tar czf + pg_dump -Fc':<44}{h['files']:>9.1f}{h['db']:>8.1f}{h['total']:>9.1f}"
        f"{mb(h['size']):>13}{h['sync_after']:>11.1f}s{h['steal']:>7.1f}s",
        f"{'(b) plain: tar|zstd -3 -T0 + pg_dump|zstd':<44}{p['files']:>9.1f}{p['db']:>8.1f}{p['total']:>9.1f}"
        f"{mb(p['size']):>13}{p['sync_after']:>11.1f}s{p['steal']:>7.1f}s",
        f"{'(c) Kasa backup (full, zstd, encrypted)':<44}{'':>9}{'':>8}{k['wall']:>9.1f}{mb(k['size']):>13}"
        f"{'(fsyncs)':>12}{k['steal']:>7.1f}s",
        "",
        "Kasa per artifact (from its log; includes opening, chain, encryption, fsync and verification):",
    ]
    for name, secs in k["artifacts"].items():
        size = k["artifact_sizes"].get(name)
        lines.append(f"  {name:<40}{secs:>8.1f} s" + (f"{mb(size):>14}" if size else ""))
    lines.append(f"  re-read + sha256 of the stored artifacts alone (after the run): {k['reread_seconds']:.1f} s "
                 f"for {mb(k['reread_bytes'])}")
    children = ", ".join(f"{n} {mb(v)}" for n, v in sorted(k["children_peak_rss"].items()))
    lines.append(f"Kasa CPU (process tree): user {k['cpu_user']:.1f} s, sys {k['cpu_sys']:.1f} s; peak RSS: "
                 f"Python {mb(k['python_peak_rss'])}; children: {children or 'none seen'}")
    vs_hand, vs_plain = k["wall"] / h["total"], k["wall"] / p["total"]
    if len(r["rounds"]) > 1:
        lines += ["", "Each round: Kasa / hand-run " + " ".join(f"{x['vs_hand']:.2f}x" for x in r["rounds"])
                  + ";  Kasa / plain " + " ".join(f"{x['vs_plain']:.2f}x" for x in r["rounds"])]
    lines += [
        "",
        "Goals (issue 3, point 12; ratios of the medians):",
        f"  Kasa / hand-run  = {k['wall']:.1f} / {h['total']:.1f} = {vs_hand:.2f}x   goal <= {GOAL_VS_HAND}x   "
        f"{verdict(vs_hand <= GOAL_VS_HAND)}",
        f"  Kasa / plain     = {k['wall']:.1f} / {p['total']:.1f} = {vs_plain:.2f}x   goal <= {GOAL_VS_PLAIN}x  "
        f"{verdict(vs_plain <= GOAL_VS_PLAIN)}",
        f"  Kasa peak RSS    = {mb(k['python_peak_rss'])}          goal < {mb(GOAL_RSS)}  "
        f"{verdict(k['python_peak_rss'] < GOAL_RSS)}",
    ]
    if "profile" in r:
        pr = r["profile"]
        lines += ["", f"py-spy profile of a second Kasa run ({pr['wall']:.1f} s wall, {pr['samples']} samples of "
                      f"non-idle threads at {pr['rate']} Hz); top self time:"]
        lines += [f"  {secs:>7.1f} s  {frame}" for frame, secs in pr["self"][:12]]
    return "\n".join(lines)


def report_memory(m: dict) -> str:
    children = ", ".join(f"{n} {mb(v)}" for n, v in sorted(m["children_peak_rss"].items()))
    return "\n".join([
        "",
        f"Memory flatness: one {mb(m['input_bytes'])} incompressible file, --compression none, encrypted",
        f"  Kasa wall time {m['wall']:.1f} s ({m['input_bytes'] / 1e6 / m['wall']:.0f} MB/s), stored {mb(m['size'])}",
        f"  peak RSS: Python {mb(m['python_peak_rss'])}; children: {children or 'none seen'}; "
        f"whole tree (wait4 maxrss) {mb(m['tree_maxrss'])}",
        f"  goal < {mb(GOAL_RSS)}: {verdict(m['python_peak_rss'] < GOAL_RSS)}",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/backup_bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="instance size, and database size (default 1.0)")
    ap.add_argument("--workdir", default=str(REPO / "var" / "bench"),
                    help="where the data set is cached and outputs go (default var/bench)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the outputs (archives, Kasa's backup) in the work dir; the data set is always kept")
    ap.add_argument("--skip-generate", action="store_true", help="use the cached data set; fail if it is missing")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the memory test: back up one incompressible file with --compression none")
    ap.add_argument("--memory-gb", type=float, default=2.0, help="size of that file (default 2.0)")
    ap.add_argument("--remote", action="store_true",
                    help="a customer on a simulated remote host over SSH against ssh host tar | zstd (as root; "
                         "bench/remote_bench.py)")
    ap.add_argument("--unchanged", action="store_true",
                    help="differential backups: full, then a differential of the unchanged tree, and restores of "
                         "both (bench/differential_bench.py)")
    ap.add_argument("--churn", metavar="PERCENT",
                    help="differential backups: full, then PERCENT of the files rewritten (e.g. 1%%), the "
                         "differential, and restores of both (bench/differential_bench.py)")
    ap.add_argument("--settle", type=float, default=65,
                    help="with --unchanged/--churn: seconds to wait after each round's cleanup before timing "
                         "(ext4 without a journal skips recently freed inodes; default 65, 0 to skip)")
    ap.add_argument("--profile", metavar="PY_SPY", nargs="?", const=shutil.which("py-spy") or "py-spy",
                    help="also profile a second Kasa run with py-spy (path to py-spy; default: from PATH)")
    ap.add_argument("--pg-admin-url", default=os.environ.get("KASA_BENCH_PG_ADMIN_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"),
                    help="superuser connection used to create the role and database")
    ap.add_argument("--db-name", default=DEFAULT_DB_NAME,
                    help=f"database to create and back up (default {DEFAULT_DB_NAME})")
    ap.add_argument("--pg-host", default="127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of (a), (b), (c); the report shows medians (default 3; 1 for a quick look)")
    ap.add_argument("--results", help="also write the results as JSON here (default <workdir>/results*.json)")
    args = ap.parse_args(argv)
    if args.size_gb <= 0 or args.memory_gb <= 0:
        ap.error("sizes must be positive")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    global DB_NAME
    DB_NAME = common.DB_NAME = args.db_name  # common's instance generator writes it into the .env
    for tool in ("tar", "zstd", "gzip", "sync"):
        if not shutil.which(tool):
            print(f"backup_bench: {tool} is not installed", file=sys.stderr)
            return 1
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.unchanged or args.churn:
        import differential_bench

        if args.unchanged and args.churn:
            ap.error("--unchanged and --churn are two modes: give one")
        try:
            args.churn = differential_bench.parse_churn(args.churn) if args.churn else None
            return differential_bench.main(args)
        except (BenchError, ValueError) as exc:
            print(f"backup_bench: {exc}", file=sys.stderr)
            return 1
    try:
        if args.remote:
            import remote_bench

            res = remote_bench.run_remote(args, work, Kasa)
            text = remote_bench.report_remote(res)
            default_results = work / "results-remote.json"
        elif args.memory_only:
            res = run_memory(args, work)
            text = report_memory(res)
            default_results = work / "results-memory.json"
        else:
            res = run_full(args, work)
            text = report_full(res)
            default_results = work / "results.json"
    except BenchError as exc:
        print(f"backup_bench: {exc}", file=sys.stderr)
        return 1
    Path(args.results or default_results).write_text(json.dumps(res, indent=2, default=str))
    print(text)
    say(f"results written to {args.results or default_results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
