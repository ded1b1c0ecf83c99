"""User-facing errors: one line, naming the problem. The CLI prints them without a traceback."""


class DDMError(Exception):
    """A problem with user input (config, flags, files, peer data) that the user can fix or must know."""


class IntegrityError(DDMError):
    """A file or message failed its hash or signature check."""
