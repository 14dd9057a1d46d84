"""User-facing errors: each names the input at fault and says the fix."""


class UniRefError(ValueError):
    """Bad input or a bad model folder. The message is meant for the artist or trainer as is."""


class UniRefCancelled(RuntimeError):
    """Raised when the caller asked to stop: before the next network block runs (`uniref_core.cancel`)."""
