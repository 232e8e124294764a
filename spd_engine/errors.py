"""User-facing errors: the CLI prints these as one line and exits non-zero, never with a traceback."""


class UserError(ValueError):
    """A mistake in what the user asked for (paths, flags, files), as opposed to a bug."""


class CapacityError(UserError):
    """A sequence would grow past a static cache's capacity."""
