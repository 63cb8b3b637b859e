"""Shared pieces of the benchmarks: helpers, the generated instance, the PostgreSQL database."""


from __future__ import annotations

import glob
import json
import math
import os
import random
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
if not PYTHON.exists():  # run with another interpreter: use it for manage.py too
    PYTHON = Path(sys.executable)
MANAGE = REPO / "manage.py"

GENERATOR_VERSION = 1
DOMAIN = "bench.example.com"
MEMORY_DOMAIN = "memory.example.com"
SERVICES = {"backend": 0.45, "admin": 0.25, "store": 0.30}  # share of the small files
DEFAULT_DB_NAME = DB_NAME = DB_ROLE = "kasa_bench"
DB_PASSWORD = "bench-Pw-7c41e9"  # URL-safe on purpose
MB_PER_SCALE = 15  # pgbench -i -s 1 is about 15 MB on disk (tables and indexes)
LOG_EXCLUDES = ("logs", "log", "*.log")  # Kasa's defaults (engines.sources.DEFAULT_EXCLUDES)

KASA_PACKAGES = ("config", "core", "customers", "backups", "releases", "upgrades", "operations", "audit", "engines")


def compile_kasa() -> None:
    """Kasa as installed: `make install` and the Docker image compile its bytecode. Without this, a shell
    with PYTHONDONTWRITEBYTECODE=1 makes every timed manage.py compile Kasa's modules again (~0.1 s)."""
    subprocess.run([str(PYTHON), "-m", "compileall", "-q", "-j", "0", *KASA_PACKAGES, "manage.py"],
                   cwd=REPO, check=True)
GOAL_VS_HAND = 0.20
GOAL_VS_PLAIN = 1.25
GOAL_RSS = 200e6  # bytes


class BenchError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def sh(script: str, *, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """bash -c with pipefail; output captured (stderr shown when it fails)."""
    res = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise BenchError(f"command failed ({res.returncode}): {script.strip()}\n{res.stderr.strip()[-2000:]}")
    return res


def timed(script: str, **kw) -> float:
    t = time.monotonic()
    sh(script, **kw)
    return time.monotonic() - t


def q(path: Path | str) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def tree_bytes(root: Path, *, skip_logs: bool = False) -> tuple[int, int]:
    files = total = 0
    for dirpath, dirs, names in os.walk(root):
        if skip_logs:
            dirs[:] = [d for d in dirs if d not in ("logs", "log")]
            names = [n for n in names if not n.endswith(".log")]
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            total += st.st_size
    return files, total


# --- the instance ------------------------------------------------------------------------------------
_JS_WORDS = ("const", "let", "return", "function", "async", "await", "import", "export", "from", "if", "else",
             "for", "of", "new", "this", "null", "undefined", "true", "false", "=>", "===", "!==", "&&", "||",
             "(", ")", "{", "}", "[", "]", ";", ",", ".", "=", "+", "?", ":", "req", "res", "next", "ctx",
             "props", "state", "err", "data", "items", "user", "order", "config", "logger", "router", "db")


def _text_pool(rng: random.Random, size: int) -> bytes:
    """Pseudo source code: indented lines of keywords and a large vocabulary of identifiers."""
    idents = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(6000)]
    idents += [a + b.capitalize() for a, b in zip(idents[:3000], idents[3000:], strict=True)]
    words = list(_JS_WORDS) * 40 + idents
    lines, n = [], 0
    while n < size:
        if rng.random() < 0.04:
            line = "// " + " ".join(rng.choices(idents, k=rng.randint(3, 12)))
        else:
            line = " ".join(rng.choices(words, k=rng.randint(2, 11)))
            if rng.random() < 0.1:
                line += f" '{rng.choice(idents)}/{rng.randint(0, 99999)}'"
        line = "  " * rng.randint(0, 5) + line + "\n"
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()


def _json_doc(rng: random.Random, size: int) -> bytes:
    rows, n = [], 0
    while n < size:
        row = {"id": rng.randint(1, 10**7), "sku": f"SKU-{rng.randint(0, 99999):05d}",
               "name": rng.choice(("Blue mug", "Red shirt", "Desk lamp", "Notebook", "Sofa", "Bike light")),
               "price": round(rng.uniform(1, 500), 2), "stock": rng.randint(0, 500),
               "active": rng.random() < 0.8, "tags": rng.sample(["new", "sale", "eco", "gift", "top"], 2),
               "updated_at": f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:{rng.randint(0, 59):02d}Z"}
        rows.append(row)
        n += 190
    return json.dumps(rows, indent=2).encode()[:max(size, 2)]


def generate_instance(root: Path, size_bytes: int, n_files: int, seed: int = 42) -> dict:
    """Small files ≈ 30 % of the bytes, media (random) ≈ 69 %, logs ≈ 1 % (excluded from every backup)."""
    rng = random.Random(seed)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    small_budget = int(size_bytes * 0.30)
    log_budget = int(size_bytes * 0.01)
    media_budget = size_bytes - small_budget - log_budget

    say(f"generating {n_files:,} small files (≈ {mb(small_budget)}) under {root}")
    pool = _text_pool(rng, 24 << 20)
    sizes = [min(max(int(rng.lognormvariate(math.log(3500), 1.1)), 80), 400_000) for _ in range(n_files)]
    scale = small_budget / sum(sizes)
    sizes = [max(40, int(s * scale)) for s in sizes]
    names = [n for n in pool[:200_000].decode().split() if n.isalpha() and 3 <= len(n) <= 12][:3000]

    dirs_by_service: dict[str, list[Path]] = {}
    for svc in SERVICES:
        base = root / svc
        n_dirs = max(4, int(n_files * SERVICES[svc] / 14))
        dirs = []
        for i in range(n_dirs):
            top = "src" if i % 3 == 0 else f"node_modules/{rng.choice(names)}-{i % 997}"
            parts = [rng.choice(names) for _ in range(rng.randint(0, 4))]
            dirs.append(base / top / Path(*parts) if parts else base / top)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        dirs_by_service[svc] = dirs
    services, weights = list(SERVICES), list(SERVICES.values())
    for i, size in enumerate(sizes):
        svc = rng.choices(services, weights)[0]
        folder = rng.choice(dirs_by_service[svc])
        if rng.random() < 0.15:
            path, data = folder / f"{rng.choice(names)}-{i}.json", _json_doc(rng, size)
        else:
            ext = rng.choice((".js", ".js", ".js", ".ts", ".css", ".html", ".md", ".map"))
            off = rng.randrange(0, len(pool) - size - 1)
            header = f"/* {svc} module {i} — generated by bench/backup_bench */\n".encode()
            path, data = folder / f"{rng.choice(names)}-{i}{ext}", header + pool[off:off + size]
        path.write_bytes(data)

    say(f"generating media (random bytes, ≈ {mb(media_budget)})")
    media_dirs = [root / "backend" / "uploads", root / "store" / "public" / "media", root / "admin" / "static" / "img"]
    for d in media_dirs:
        d.mkdir(parents=True, exist_ok=True)
    left, k = media_budget, 0
    while left > 0:
        size = min(left, min(max(int(rng.lognormvariate(math.log(1.5e6), 1.0)), 20_000), 40_000_000))
        with open(rng.choice(media_dirs) / f"upload-{k:05d}.{rng.choice(('jpg', 'png', 'webp', 'mp4', 'pdf'))}",
                  "wb") as fh:
            todo = size
            while todo:
                n = min(todo, 4 << 20)
                fh.write(os.urandom(n))
                todo -= n
        left -= size
        k += 1

    for svc in SERVICES:
        (root / svc / ".env").write_text(f"NODE_ENV=production\nPORT={3000 + len(svc)}\n"
                                         f"DATABASE_URL=postgresql://{DB_ROLE}:{DB_PASSWORD}@127.0.0.1/{DB_NAME}\n"
                                         f"API_SECRET={rng.getrandbits(128):032x}\n")
        (root / svc / ".env.example").write_text("NODE_ENV=\nPORT=\nDATABASE_URL=\nAPI_SECRET=\n")
        (root / svc / "package.json").write_text(json.dumps({"name": svc, "version": "1.4.2"}, indent=2))
        (root / svc / "current").symlink_to("src")
        logs = root / svc / "logs"
        logs.mkdir()
        with open(logs / "app.log", "w") as fh:
            written = 0
            while written < log_budget // 3:
                line = f"2025-06-01T12:00:{written % 60:02d}Z INFO {svc} GET /api/items/{written} 200 12ms\n"
                fh.write(line)
                written += len(line)
    (root / ".env").write_text("KASA_INSTANCE=bench\n")
    (root / "ecosystem.config.js").write_text(
        "module.exports = {apps: [" + ", ".join(f"{{name: '{s}', cwd: './{s}', script: 'server.js'}}"
                                                 for s in SERVICES) + "]};\n")
    files, total = tree_bytes(root)
    kept_files, kept = tree_bytes(root, skip_logs=True)
    return {"files": files, "bytes": total, "backed_up_files": kept_files, "backed_up_bytes": kept,
            "media_files": k, "small_files": n_files}


# --- PostgreSQL ----------------------------------------------------------------------------------------
def pg_binary(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), key=lambda p: int(p.split("/")[4]))
    path = found[-1] if found else shutil.which(tool)
    if not path:
        raise BenchError(f"{tool} not found (Debian package postgresql-client / postgresql-contrib)")
    return path


def kasa_pg_dump(server_major: int) -> tuple[str, str]:
    """The pg_dump Kasa itself picks (engines.sources.pg_tool_for), so (a), (b) and (c) run the same binary."""
    sys.path.insert(0, str(REPO))
    try:
        from engines.sources import pg_tool_for

        return pg_tool_for(server_major)
    except Exception as exc:  # noqa: BLE001 — fall back to the newest Debian client
        say(f"cannot ask Kasa which pg_dump it uses ({exc}); using the newest installed one")
        path = pg_binary("pg_dump")
        return path, subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()


class Postgres:
    def __init__(self, admin_url: str, host: str, port: int):
        self.admin_url, self.host, self.port = admin_url, host, port

    def admin(self, sql_text: str, params=(), dbname: str | None = None):
        import psycopg

        url = self.admin_url if dbname is None else self.admin_url.rsplit("/", 1)[0] + "/" + dbname
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as con:
            cur = con.execute(sql_text, params)
            return cur.fetchall() if cur.description else None

    @property
    def url(self) -> str:
        return f"postgresql://{DB_ROLE}:{DB_PASSWORD}@{self.host}:{self.port}/{DB_NAME}"

    def env(self) -> dict:
        return {**os.environ, "PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": DB_ROLE,
                "PGPASSWORD": DB_PASSWORD, "PGDATABASE": DB_NAME}

    def server_major(self) -> int:
        return int(self.admin("SHOW server_version_num")[0][0]) // 10000

    def scale_present(self) -> int | None:
        if not self.admin("SELECT 1 FROM pg_database WHERE datname = %s", [DB_NAME]):
            return None
        try:
            return self.admin("SELECT count(*) FROM pgbench_branches", dbname=DB_NAME)[0][0]
        except Exception:  # noqa: BLE001 — no pgbench tables: regenerate
            return None

    def size(self) -> int:
        return self.admin("SELECT pg_database_size(%s)", [DB_NAME])[0][0]

    def generate(self, scale: int) -> None:
        from psycopg import sql

        say(f"creating database {DB_NAME} with pgbench -i -s {scale} (≈ {scale * MB_PER_SCALE} MB)")
        if not self.admin("SELECT 1 FROM pg_roles WHERE rolname = %s", [DB_ROLE]):
            self.admin(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(DB_ROLE),
                                                                         sql.Literal(DB_PASSWORD)))
        else:
            self.admin(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(DB_ROLE),
                                                                        sql.Literal(DB_PASSWORD)))
        self.admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME)))
        self.admin(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DB_NAME), sql.Identifier(DB_ROLE)))
        res = subprocess.run([pg_binary("pgbench"), "-i", "-q", "-s", str(scale)], env=self.env(),
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError(f"pgbench -i failed: {res.stderr.strip()[-1500:]}")


def settle(seconds: float) -> None:
    """Let the inodes the last round freed age out of ext4's "recently deleted" window before anything is timed.

    On an ext4 without a journal (this VM's root filesystem) the inode allocator skips every inode freed in
    the last 60 s (360 s while its inode-table block is dirty), reading that inode's block for each candidate
    (fs/ext4/ialloc.c, recently_deleted): creating 40,000 files right after 40,000 were deleted cost a restore
    16 s of kernel time here (docs/PERFORMANCE.md, "Differential backups"). A restore timed right after the
    previous round's cleanup measures that, not Kasa; so: sync (clean blocks: the 60 s window), then wait."""
    if seconds > 0:
        say(f"settling {seconds:.0f} s after the cleanup (ext4's recently-deleted inode window)")
        sh("sync")
        time.sleep(seconds)


def ensure_tree(args, work: Path) -> tuple[Path, dict]:
    """The cached instance of bench/backup_bench (generated here when missing, without its database)."""
    root = work / "customers" / "bench"
    marker = work / "instance.json"
    want = {"generator": GENERATOR_VERSION, "size_gb": args.size_gb}
    info = json.loads(marker.read_text()) if marker.exists() else {}
    if all(info.get(k) == v for k, v in want.items()) and root.is_dir():
        say(f"instance cached in {root} ({info['files']:,} files, {mb(info['bytes'])})")
        return root, info
    if args.skip_generate:
        raise BenchError(f"--skip-generate: no instance of {args.size_gb} GB cached in {work}")
    if root.exists():
        shutil.rmtree(root)
    t = time.monotonic()
    info = {**want, **generate_instance(root, int(args.size_gb * 1e9), max(600, round(40_000 * args.size_gb)))}
    marker.write_text(json.dumps(info, indent=2))
    say(f"instance generated in {time.monotonic() - t:.0f} s: {info['files']:,} files, {mb(info['bytes'])}")
    return root, info
