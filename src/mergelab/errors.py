"""The one exception type users see.

A ``MergelabError`` carries a message that says what was wrong, where (file, field or
tensor) and what to do. The CLI prints it without a traceback and exits with code 2.
"""


class MergelabError(Exception):
    """A problem with the user's input or environment, explained for the user."""


class ConfigError(MergelabError):
    """A configuration file or option is invalid."""


class InputError(MergelabError):
    """A model, adapter or data file is missing, malformed or incompatible."""


class ComputeError(MergelabError):
    """A computation produced something unusable (e.g. non-finite values)."""
