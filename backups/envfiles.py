"""The .env side of a restore: what it would change (masked), and pointing a copy at its new database."""

from __future__ import annotations

import os
from pathlib import Path

from engines import beneath, dburl, envfile

# Keys apps commonly split a database connection into, by what they hold.
_SPLIT_KEYS = {
    "host": ("DB_HOST", "DATABASE_HOST", "PGHOST", "MYSQL_HOST", "POSTGRES_HOST"),
    "port": ("DB_PORT", "DATABASE_PORT", "PGPORT", "MYSQL_PORT", "POSTGRES_PORT"),
    "name": ("DB_NAME", "DB_DATABASE", "DATABASE_NAME", "PGDATABASE", "MYSQL_DATABASE", "POSTGRES_DB"),
    "user": ("DB_USER", "DB_USERNAME", "DATABASE_USER", "PGUSER", "MYSQL_USER", "POSTGRES_USER"),
    "password": ("DB_PASSWORD", "DATABASE_PASSWORD", "PGPASSWORD", "MYSQL_PASSWORD", "POSTGRES_PASSWORD"),
}


def env_files(root: Path) -> list[Path]:
    """The .env files of an instance: at the root and one level down (each service folder)."""
    found = []
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".kasa"))]:
        path = base / ".env"
        if path.is_file() and not path.is_symlink():
            found.append(path)
    return found


def rewrite_clone(ctx, plan) -> None:
    """In the copy's .env files, point each database setting of the source at the copy's database."""
    originals = {db.name: db for db in plan.customer.databases.all()}
    for path in env_files(plan.root):
        try:  # read and written through descriptors from the copy's root (the customer's user owns its folders)
            data = beneath.read_file(plan.root, path)
        except beneath.BeneathError as exc:
            ctx.warning(f"{os.path.relpath(path, plan.root)} was left as it is: {exc}")
            continue
        if data is None:
            continue
        text = data.decode("utf-8", errors="replace")
        values = envfile.parse(text)
        updates: dict[str, str] = {}
        for name, url in plan.to_databases.items():
            src, dst = originals.get(name), dburl.parse(url)
            if src is None or dst.engine == "sqlite":
                continue
            for key, value in values.items():
                if "://" in value:
                    try:
                        cur = dburl.parse(value)
                    except dburl.DatabaseURLError:
                        continue
                    if cur.host == src.host and cur.name == src.database and (cur.port or src.port) == src.port:
                        updates[key] = url
            for field, keys in _SPLIT_KEYS.items():
                old = {"host": src.host, "port": str(src.port), "name": src.database, "user": src.user}.get(field)
                new = {"host": dst.host, "port": str(dst.port), "name": dst.name, "user": dst.user,
                       "password": dst.password}[field]
                for key in keys:
                    if key in values and (field == "password" or values[key] == old):
                        updates[key] = new
        if updates:
            st = beneath.lstat(plan.root, path)  # the file keeps its mode and owner (the customer's user)
            beneath.write_file(plan.root, path, envfile.replace_values(text, updates).encode("utf-8"),
                               mode=st.st_mode & 0o7777 if st else 0o600, owner=(st.st_uid, st.st_gid) if st else None)
            ctx.info(f"{os.path.relpath(path, plan.root)}: pointed {', '.join(sorted(updates))} at the copy's "
                     "database")
