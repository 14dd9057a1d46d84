"""User-facing errors: each names the input at fault and says the fix."""


class UniRefError(ValueError):
    """Bad input or a bad model folder. The message is meant for the artist or trainer as is."""


class UniRefCancelled(RuntimeError):
    """Raised between denoising steps when the caller asked to stop."""
