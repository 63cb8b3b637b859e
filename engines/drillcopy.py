"""A deep drill's copy of a customer: which ports its services move to, and its .env values rewritten for it.

A deep drill (backups.deepdrill) starts the services of a backup's scratch copy beside the live customer, so
nothing of the copy may use what the live customer uses: its ports move to free ones, its database settings
point at the scratch databases, and absolute paths into the live root point into the copy's root. The values
are rewritten with engines.envfile (every other line kept as it was). Plain Python, no Django.
"""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit, urlunsplit

from . import envfile

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")  # noqa: S104 — hosts a health URL may name on this host
_PORT_KEY = re.compile(r"(^|_)PORT$", re.I)
DEFAULT_PORTS = {"http": 80, "https": 443}


class CopyError(ValueError):
    """The copy cannot be run apart from the live customer; the message says why, for humans."""


def health_port(url: str) -> int:
    """The port a local health URL names (its scheme's default when it names none); CopyError when it is not an
    http(s) URL on this host: a copy on a free port could not be reached at that address."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise CopyError(f"{url!r} is not a URL") from None
    if parts.scheme not in DEFAULT_PORTS or (parts.hostname or "").lower() not in LOCAL_HOSTS:
        raise CopyError(f"{url} is not an http(s) URL on this host ({', '.join(LOCAL_HOSTS[:3])}): a copy on a free "
                        "port cannot be checked there")
    return port or DEFAULT_PORTS[parts.scheme]


def with_port(url: str, port: int) -> str:
    """The same URL on another port."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}:{port}" if auth else f"{host}:{port}"))


def free_ports(count: int, *, avoid: set[int] = frozenset()) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (the kernel's choice), none of `avoid`."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in ports and port not in avoid:
            ports.append(port)
    return ports


def is_port_key(key: str) -> bool:
    return bool(_PORT_KEY.search(key))


def updates_for(values: dict[str, str], *, ports: dict[int, int], live_root: str, copy_root: str,
                skip: set[str] = frozenset()) -> dict[str, str]:
    """The new values of a copy's .env (parsed `values`): a PORT key (PORT, APP_PORT …) holding a moved port gets
    the new one; an http(s) URL on this host at a moved port gets the new port; an absolute path into the live
    root points into the copy's root. Keys in `skip` (the database settings, already pointed) keep their ports."""
    live_root, copy_root = live_root.rstrip("/"), copy_root.rstrip("/")
    out: dict[str, str] = {}
    for key, value in values.items():
        new = value
        if key in skip:
            pass
        elif is_port_key(key) and value.strip().isdigit() and int(value) in ports:
            new = str(ports[int(value)])
        elif "://" in value:
            try:
                parts = urlsplit(value)
                port = parts.port
            except ValueError:
                port = None
            if (port in ports and parts.scheme in DEFAULT_PORTS
                    and (parts.hostname or "").lower() in LOCAL_HOSTS):
                new = with_port(value, ports[port])
        if live_root and ((live_root + "/") in new or new == live_root):
            new = copy_root if new == live_root else new.replace(live_root + "/", copy_root + "/")
        if new != value:
            out[key] = new
    return out


def rewrite(text: str, updates: dict[str, str]) -> str:
    """The .env text with `updates` applied (envfile.replace_values: comments, order and quoting kept)."""
    return envfile.replace_values(text, updates)


def shown_updates(updates: dict[str, str]) -> str:
    """KEY=value pairs for a run log, secret values masked."""
    return ", ".join(f"{k}={envfile.shown(k, v)}" for k, v in sorted(updates.items()))
