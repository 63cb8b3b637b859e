"""Which function executes each kind of run, and whether it changes the customer.

Apps register their kinds in AppConfig.ready(); handlers are dotted paths so
that the registry imports nothing until a worker needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.utils.module_loading import import_string


@dataclass(frozen=True)
class Kind:
    name: str
    handler: str
    mutating: bool


_kinds: dict[str, Kind] = {}


def register(name: str, handler: str, *, mutating: bool) -> None:
    _kinds[name] = Kind(name, handler, mutating)


def unregister(name: str) -> None:
    _kinds.pop(name, None)


def get(name: str) -> Kind:
    try:
        return _kinds[name]
    except KeyError:
        raise LookupError(f"unknown operation kind {name!r}") from None


def handler(name: str):
    return import_string(get(name).handler)
