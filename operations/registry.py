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
    # Called with the Run when its worker died mid-way (reaper or redelivery):
    # the place to clean up what the dead handler could not (partial artifacts).
    on_abandon: str | None = None
    # The on_abandon hook touches only what every worker reaches (storage targets): any worker's reaper may run it.
    # Otherwise (an undo in the customer's root) only a worker on the run's host does (operations.services).
    abandon_anywhere: bool = False


_kinds: dict[str, Kind] = {}
# Checks every run passes right before its handler, whatever its kind (dotted paths to fn(ctx), registered by
# the apps that own what they check); one raising OperationError fails the run before it touched anything.
_guards: list[str] = []


def register(name: str, handler: str, *, mutating: bool, on_abandon: str | None = None,
             abandon_anywhere: bool = False) -> None:
    _kinds[name] = Kind(name, handler, mutating, on_abandon, abandon_anywhere)


def unregister(name: str) -> None:
    _kinds.pop(name, None)


def get(name: str) -> Kind:
    try:
        return _kinds[name]
    except KeyError:
        raise LookupError(f"unknown operation kind {name!r}") from None


def handler(name: str):
    return import_string(get(name).handler)


def abandon_anywhere(name: str) -> bool:
    spec = _kinds.get(name)
    return bool(spec and spec.abandon_anywhere)


def abandon_hook(name: str):
    spec = _kinds.get(name)
    return import_string(spec.on_abandon) if spec and spec.on_abandon else None


# Called with every run once it has ended (dotted paths to fn(run), registered by apps above operations that
# wait for runs: a rollout ticks as soon as one of its upgrades ends, not at the next minute).
_end_hooks: list[str] = []


def add_end_hook(path: str) -> None:
    if path not in _end_hooks:
        _end_hooks.append(path)


def end_hooks() -> list:
    return [import_string(p) for p in _end_hooks]


def add_guard(path: str) -> None:
    if path not in _guards:
        _guards.append(path)


def guards() -> list:
    return [import_string(p) for p in _guards]
# Bookkeeping writes an undo could not make while the control database did not answer (RunContext.record), by
# name: operations.reconcile calls `fn(run, payload)` for each, in order. Only registered names are ever called,
# whatever a local journal says.
_replays: dict[str, str] = {}


def register_replay(name: str, function: str) -> None:
    _replays[name] = function


def replay(name: str):
    try:
        return import_string(_replays[name])
    except KeyError:
        raise LookupError(f"no replay registered as {name!r}") from None


# What a run page shows of a run's outcome, per kind (dotted paths to fn(run) -> dict, registered by the app that
# owns the kind): "summary" (a sentence a person reads, not JSON), "links" ([{"label", "url"}]: the backup a run
# produced, the upgrade, the safety backup…) and, optionally, "steps" (a step table's document). Read on every
# change by the live consumer and when the page renders.
_details: dict[str, str] = {}


def register_details(kind: str, function: str) -> None:
    _details[kind] = function


def details(run) -> dict:
    path = _details.get(run.kind)
    return import_string(path)(run) if path else {}
