"""The exception the CLI turns into one line on stderr and exit code 2."""


class LiversegError(Exception):
    """A problem with the user's input: data, config, checkpoint or command line.

    The message says what was expected, what was found, in which file, and how to fix it.
    """


class DataError(LiversegError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class ConfigError(LiversegError):
    """A config file or override is invalid."""


class CheckpointError(LiversegError):
    """A checkpoint is missing, corrupted or incompatible."""


class TrainingError(LiversegError):
    """The run cannot go on (non-finite losses, incompatible resume)."""
