"""What every database restore shares (engines.dbrestore and its engine modules, engines.scratchdb): where a
database lives (DbTarget), side names, row-count comparison, the cleanup after a failed load. It imports none
of them, so they import it without a circle."""

from __future__ import annotations

import dataclasses
import re
import secrets
import time

from .dberrors import RestoreError
from .feed import oneline as _oneline


@dataclasses.dataclass
class DbTarget:
    """Where a database lives. engine: postgresql, mysql or sqlite (sqlite uses sqlite_path only)."""

    engine: str
    host: str = ""
    port: int = 0
    user: str = ""
    password: str = dataclasses.field(default="", repr=False)  # never in a repr, hence never in a log
    dbname: str = ""
    sqlite_path: str = ""
    # The customer's root (or a copy's) that sqlite_path lies in: its folder is reached from there without
    # following a link (engines.beneath), since the customer's user may change it meanwhile. "": as it is.
    sqlite_root: str = ""
    # An administrative login to the same server (a maintenance connection), or None: when set, databases are
    # created, renamed and dropped through it, while the dump still loads as `user` into a database it owns.
    maint: DbTarget | None = dataclasses.field(default=None, repr=False, compare=False)
    tls: bool = False  # redis only (rediss://)
    tls_ca: str = ""  # redis only: a CA bundle for the server's certificate ("": the system's CAs)

    @classmethod
    def from_url(cls, url) -> DbTarget:
        """From an engines.dburl.DatabaseURL."""
        return cls(engine=url.engine, host=url.host, port=url.port or 0, user=url.user, password=url.password,
                   dbname=url.name, sqlite_path=url.path, tls=getattr(url, "tls", False))

    def display(self) -> str:
        if self.engine == "sqlite":
            return self.sqlite_path
        if self.engine == "redis":
            return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.dbname or 0}"
        return f"{self.engine}://{self.user}@{self.host}:{self.port}/{self.dbname}"


# --- names -------------------------------------------------------------------------
def new_tag() -> str:
    """UTC time plus 4 hex digits: sorts by time, and two restores in one second still differ."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "_" + secrets.token_hex(2)


def side_name(live: str, kind: str, tag: str | None = None, *, engine: str = "postgresql") -> str:
    """`<live>__kasa_<kind>_<tag>` within the server's name limit (PostgreSQL 63 bytes, MySQL 64 characters).

    The live part is shortened, never the suffix, and never in the middle of a
    UTF-8 character (PostgreSQL would cut the name itself, and could cut it there).
    """
    suffix = f"__kasa_{kind}_{tag or new_tag()}"
    if engine == "mysql":
        return live[: 64 - len(suffix)] + suffix
    room = 63 - len(suffix.encode())
    return live.encode()[:room].decode("utf-8", "ignore") + suffix


def compare_counts(expected: dict[str, int], got: dict[str, int]) -> list[str]:
    """Human lines for every table whose row count differs; empty when the counts are equal."""
    lines = []
    for table in sorted(set(expected) | set(got)):
        if table not in got:
            lines.append(f"table {table} is in the backup ({expected[table]} rows) but missing from the restore")
        elif table not in expected:
            lines.append(f"table {table} was restored ({got[table]} rows) but is not in the backup's manifest")
        elif expected[table] != got[table]:
            lines.append(f"table {table}: the backup has {expected[table]} rows, the restore {got[table]}")
    return lines


def drop_after_failure(drop, exc: BaseException, new_dbname: str, live: str) -> None:
    """Drop the half-restored database and raise RestoreError saying so (other BaseExceptions pass through)."""
    try:
        drop()
        left = f"database {new_dbname} was dropped"
    except Exception as drop_exc:
        left = f"dropping database {new_dbname} failed too ({_oneline(drop_exc)}): drop it by hand"
    if not isinstance(exc, Exception):
        return  # KeyboardInterrupt and friends: the caller re-raises them as they are
    why = str(exc) if isinstance(exc, RestoreError) else f"reading the backup failed: {_oneline(exc)}"
    raise RestoreError(f"{why}; {left} and {live or 'the live database'} was not touched") from exc


# An ALTER TABLE … ALTER COLUMN … SET (…) line of pg_restore's script: its pg_attver= option is dropped on the
# way in (engines.dbrestore, engines.dbrestore_pginplace).
PG_ATTVER = re.compile(rb"(ALTER (?:FOREIGN )?TABLE ONLY .+ ALTER COLUMN .+ SET \()(.*)(\);\n)", re.S)
