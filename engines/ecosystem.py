"""PM2 ecosystem files that Kasa writes for a customer (pure Python, no Django).

After an upgrade Kasa regenerates one file for all of a customer's PM2 services and starts each app
from it with `pm2 delete` + `pm2 start <file> --only <app>` (engines.procman): `pm2 restart
--update-env` would keep environment keys that the new .env no longer has.

Each app runs in its service path (the symlink to the live release, so a later switch needs no edit),
with the service's .env as its environment. What to run comes, in this order, from the service's start
command (an argv, run as is), the release's package.json (`main`, else a `node X` start script), or a
conventional file name (server.js, index.js, app.js, main.js).

The file belongs to the customer's OS user (PM2 runs as that user and reads it); Kasa reads it back only
as a regular file of that user's (engines.runas.read_owned): the user may have replaced it.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from . import beneath, runas

FILE_NAME = "ecosystem.kasa.config.js"  # matches procman's ecosystem*.config.js search at the customer's root
DEFAULT_SCRIPTS = ("server.js", "index.js", "app.js", "main.js")
HEADER = "// Written by Kasa after each upgrade: edits here are replaced. Holds the services' .env values.\n"


class EcosystemError(ValueError):
    """Kasa cannot tell how to start a service; the message names it and what was looked at."""


def script_for(folder: str | os.PathLike, start_command: Sequence[str] = ()) -> dict:
    """{"script", "args", "interpreter"?} for the app whose files are in `folder` (a staged release)."""
    folder = Path(folder)

    def read(name: str) -> bytes | None:
        path = folder / name
        try:
            return path.read_bytes() if path.is_file() else None
        except OSError as exc:
            raise EcosystemError(f"{path} cannot be read ({exc})") from None

    return _script(read, lambda name: (folder / name).is_file(), start_command, where=str(folder))


def script_in_zip(names: Iterable[str], read: Callable[[str], bytes | None], *, top: str = "",
                  start_command: Sequence[str] = (), where: str = "") -> dict:
    """The same answer as `script_for`, from a release zip's member names (`top`: the component's folder in the
    zip, "" when its files are at the top) before anything is unpacked: what an upgrade's preflight asks."""
    prefix = f"{top}/" if top else ""
    files = {n[len(prefix):] for n in names if n.startswith(prefix) and not n.endswith("/")}
    return _script(lambda name: read(prefix + name) if name in files else None,
                   lambda name: os.path.normpath(name) in files, start_command, where=where or "the release")


def _script(read: Callable[[str], bytes | None], is_file: Callable[[str], bool], start_command: Sequence[str],
            *, where: str) -> dict:
    if start_command:
        return {"script": start_command[0], "args": list(start_command[1:]), "interpreter": "none"}
    raw = read("package.json")
    if raw is not None:
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise EcosystemError(f"{where}/package.json cannot be read as JSON ({exc})") from None
        main = data.get("main") if isinstance(data, dict) else None
        if isinstance(main, str) and main.strip() and is_file(main):
            return {"script": main, "args": []}
        start = ((data.get("scripts") or {}).get("start") if isinstance(data, dict) else None) or ""
        try:
            words = shlex.split(start) if isinstance(start, str) else []
        except ValueError:
            words = []
        if len(words) >= 2 and words[0] == "node" and is_file(words[1]):
            return {"script": words[1], "args": words[2:]}
    for name in DEFAULT_SCRIPTS:
        if is_file(name):
            return {"script": name, "args": []}
    raise EcosystemError(f"cannot tell how to start the app in {where}: give the service a start command, or "
                         f"ship a package.json with \"main\" (or a \"node FILE\" start script), or one of "
                         f"{', '.join(DEFAULT_SCRIPTS)}")


def app(name: str, *, cwd: str | os.PathLike, folder: str | os.PathLike, start_command: Sequence[str] = (),
        env: Mapping[str, str] | None = None) -> dict:
    """One PM2 app: runs in `cwd` (the service path), its script found in `folder` (the release's files)."""
    how = script_for(folder, start_command)
    script = how["script"]
    if not start_command and not os.path.isabs(script):
        script = os.path.join(os.fspath(cwd), script)  # absolute: PM2 resolves relative scripts elsewhere
    entry = {"name": name, "cwd": os.fspath(cwd), "script": script, "args": how["args"],
             "env": {str(k): str(v) for k, v in (env or {}).items()},
             "autorestart": True, "merge_logs": True}
    if how.get("interpreter"):
        entry["interpreter"] = how["interpreter"]
    return entry


def render(apps: Sequence[Mapping]) -> str:
    """The file's text: JSON inside `module.exports = …;` (valid JavaScript, and no code of ours runs)."""
    return HEADER + "module.exports = " + json.dumps({"apps": list(apps)}, indent=2, sort_keys=False) + ";\n"


def write(path: str | os.PathLike, apps: Sequence[Mapping], *, owner: runas.Identity | None = None,
          root: str | os.PathLike | None = None) -> None:
    """Write atomically, 0600 (it holds .env values), owned by `owner` (the customer's user, who runs PM2).
    With `root` (the customer's root, where the file lives), through descriptors (engines.beneath)."""
    path = os.fspath(path)
    if root is not None:
        beneath.write_file(root, path, render(apps).encode(), mode=0o600,
                           owner=(owner.uid, owner.gid) if owner is not None else None)
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".ecosystem.kasa-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render(apps))
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), 0o600)
            runas.give_fd(fh.fileno(), owner)  # before the rename: never a chown by name in the user's folder
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_apps(path: str | os.PathLike, *, owner: runas.Identity | None = None) -> list[dict]:
    """The apps of a file Kasa wrote ([] when there is none, or when it is no longer a regular file of `owner`'s
    holding what Kasa writes: the customer's user may have changed it)."""
    try:
        text = runas.read_owned(path, owner, limit=16 << 20).decode("utf-8", "replace")
    except OSError:
        return []
    body = text.split("module.exports = ", 1)[-1].rstrip().rstrip(";")
    try:
        data = json.loads(body)
    except ValueError:
        return []
    apps = data.get("apps") if isinstance(data, dict) else None
    return [a for a in apps if isinstance(a, dict)] if isinstance(apps, list) else []
