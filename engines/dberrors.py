"""The error every database restore step raises (engines.dbrestore, engines.feed and the engine modules)."""


class RestoreError(RuntimeError):
    """A restore, swap or verification step failed; the message says what was left as it was."""
