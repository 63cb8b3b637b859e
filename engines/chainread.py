"""Reading a differential's service artifact back: the full's archive and the differential's, as one stream.

open_plain() hands back a ChainStream when the catalogue names a chain (`chain=`): three artifacts are read
(the full's tar, the differential's change list and tar), each checked as open_plain checks any artifact
(size and sha256 against the catalogue, decryption to the last chunk, the decompressor's exit), and
engines.tarmerge turns them into the plaintext of one archive. Consumers (verification, extraction, the
remote restore's stream) see one artifact: a full and a differential restore the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import fileindex, tarmerge
from .plainread import PlainStream, Progress
from .tarcheck import ArtifactError


class ChainStream:
    def __init__(self, store, name: str, *, sha256: str, size: int, encrypted: bool, keyring, compression: str,
                 on_progress: Progress | None, chain: dict):
        self.name = name
        self.label = chain.get("label") or "the full backup"
        done = {"base": 0, "changes": 0, "diff": 0}

        def counter(part: str):
            if on_progress is None:
                return None

            def update(n: int) -> None:
                done[part] = n
                on_progress(sum(done.values()))
            return update

        def part(spec: dict, what: str) -> PlainStream:
            return PlainStream(store, spec["name"], sha256=spec["sha256"], size=spec["size"],
                               encrypted=spec.get("encrypted", encrypted), keyring=keyring,
                               compression=spec.get("compression", compression), on_progress=counter(what))

        self.base = part(chain["base"], "base")
        self.changes = part(chain["changes"], "changes")
        self.diff = PlainStream(store, name, sha256=sha256, size=size, encrypted=encrypted, keyring=keyring,
                                compression=compression, on_progress=counter("diff"))
        self._entered: list[PlainStream] = []

    def __enter__(self) -> Iterator:
        try:
            pieces = []
            for stream in (self.base, self.changes, self.diff):
                try:
                    pieces.append(stream.__enter__())
                except ArtifactError as exc:
                    raise self._named(stream, exc) from None
                self._entered.append(stream)
        except BaseException:
            self._abort_all()
            raise
        base, changes, diff = pieces
        return self._merged(base, changes, diff)

    def _merged(self, base, changes, diff) -> Iterator:
        try:
            yield from tarmerge.merge(base, fileindex.read_changes(changes), diff)
        except (tarmerge.MergeError, fileindex.IndexError_) as exc:
            raise ArtifactError(f"{self.name}: cannot combine it with {self.label} ({exc}); the chain is "
                                "corrupt") from None

    def _named(self, stream: PlainStream, exc: ArtifactError) -> ArtifactError:
        if stream is self.base:
            return ArtifactError(f"{self.label} this differential needs: {exc}")
        return exc

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            streams, self._entered = self._entered, []
            for i, stream in enumerate(streams):
                try:
                    stream.__exit__(None, None, None)
                except ArtifactError as err:
                    for rest in streams[i + 1:]:
                        rest._abort()
                    raise self._named(stream, err) from None
                except BaseException:
                    for rest in streams[i + 1:]:
                        rest._abort()
                    raise
            return
        problem = None
        for stream in self._entered:
            stream._abort()
            if problem is None and issubclass(exc_type, Exception):
                found = stream._diagnose()
                if found is not None:
                    problem = self._named(stream, found)
        self._entered = []
        if problem is not None:
            raise problem from exc

    def _abort_all(self) -> None:
        for stream in self._entered:
            stream._abort()
        self._entered = []
