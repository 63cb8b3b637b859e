"""Database connection URLs: parse and format, never leaking the password.

Forms: postgresql://user:pass@host:port/db (also postgres://),
mysql://user:pass@host:port/db (also mariadb://), sqlite:////abs/path.db,
redis://[user][:pass]@host:port[/db] (rediss:// for TLS; db is the logical database number, 0 by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

ENGINES = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "pgsql": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "sqlite": "sqlite",
    "redis": "redis",
    "rediss": "redis",
}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "redis": 6379}


class DatabaseURLError(ValueError):
    pass


def port_problem(port) -> str | None:
    """Why `port` is not a TCP port a server listens on, or None. The one rule for every port Kasa is given (a
    --database URL here, the admin's and the CLI's fields through customers.validators)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return f"port {port} is not a TCP port (1-65535)"
    return None


def _port_of(netloc: str) -> int | None:
    """The port written in a URL's netloc (urllib refuses to return one out of range: its message is not ours)."""
    host = netloc.rpartition("@")[2]
    if host.startswith("["):  # [IPv6]:port
        host = host.partition("]")[2]
    _, sep, text = host.rpartition(":")
    if not sep or not text:
        return None
    if not text.isdigit():
        raise DatabaseURLError("malformed database URL: the port is not a number")
    port = int(text)
    if problem := port_problem(port):
        raise DatabaseURLError(problem)
    return port


@dataclass(frozen=True)
class DatabaseURL:
    engine: str
    host: str = ""
    port: int | None = None
    name: str = ""
    user: str = ""
    password: str = ""
    path: str = ""  # sqlite only
    tls: bool = False  # redis only (rediss://)

    def display(self) -> str:
        """The URL with the password masked: safe for logs and output."""
        if self.engine == "sqlite":
            return f"sqlite:///{self.path}"
        if self.engine == "redis":
            return redis_display(user=self.user, password=bool(self.password), host=self.host, port=self.port,
                                 db=self.name, tls=self.tls)
        auth = self.user + (":********" if self.password else "")
        return f"{self.engine}://{auth}@{self.host}:{self.port}/{self.name}"


def parse(url: str) -> DatabaseURL:
    if "://" not in url:
        raise DatabaseURLError("database URL must look like engine://user:pass@host:port/name")
    try:
        parts = urlsplit(url)
        port = _port_of(parts.netloc)
    except DatabaseURLError:
        raise
    except ValueError as exc:
        # The message of a urllib error can quote the URL; never echo it.
        raise DatabaseURLError(f"malformed database URL ({type(exc).__name__}: invalid port or host)") from None
    scheme = parts.scheme.lower().split("+", 1)[0]
    engine = ENGINES.get(scheme)
    if engine is None:
        raise DatabaseURLError(
            f"unknown database engine {scheme!r}: use postgresql://, mysql://, mariadb://, redis://, rediss:// or "
            "sqlite:///"
        )
    if engine == "sqlite":
        if parts.netloc:
            raise DatabaseURLError("sqlite URL must be sqlite:////absolute/path.db (no host)")
        # sqlite:////abs/path.db: the path part is "//abs/path.db"; one slash
        # belongs to the URL syntax, the rest must be an absolute path.
        path = unquote(parts.path)[1:]
        if not path.startswith("/") or path == "/":
            raise DatabaseURLError("sqlite URL must name an absolute file path: sqlite:////abs/path.db")
        return DatabaseURL(engine="sqlite", path=path)
    name = unquote(parts.path.lstrip("/"))
    if engine == "redis":
        return _redis(parts, port, name, tls=scheme == "rediss")
    if not parts.hostname:
        raise DatabaseURLError(f"{engine} URL has no host")
    if not name or "/" in name:
        raise DatabaseURLError(f"{engine} URL must name exactly one database after the host")
    return DatabaseURL(
        engine=engine,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[engine],
        name=name,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


def redis_display(*, user: str, password: bool, host: str, port, db: str, tls: bool) -> str:
    auth = user + (":********" if password else "")
    return f"{'rediss' if tls else 'redis'}://{auth + '@' if auth else ''}{host}:{port}/{db or '0'}"


def redis_db_problem(db: str) -> str | None:
    """Why `db` is not a Redis logical database number, or None."""
    if not db.isdigit() or len(db) > 5:
        return f"a Redis database is a number (0, 1, …), not {db!r}"
    return None


def _redis(parts, port: int | None, name: str, *, tls: bool) -> DatabaseURL:
    """redis://[user][:password]@host[:port][/db]: the password alone is Redis's requirepass (user "default")."""
    if not parts.hostname:
        raise DatabaseURLError("redis URL has no host")
    name = name or "0"
    if problem := redis_db_problem(name):
        raise DatabaseURLError(problem)
    if parts.query:
        raise DatabaseURLError("redis URL takes no options after '?' (TLS: rediss://)")
    return DatabaseURL(engine="redis", host=parts.hostname, port=port or DEFAULT_PORTS["redis"], name=str(int(name)),
                       user=unquote(parts.username or ""), password=unquote(parts.password or ""), tls=tls)
