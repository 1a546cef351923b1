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


class WorkerError(LiversegError):
    """A worker process of ``liverseg predict --workers`` died or stopped outside its cases.

    The cases that every worker finished are kept; the message names the worker and its case.

    Attributes:
        results: What each worker returned, in worker order; None for those that failed.
        failures: The inputs that failed in the workers that finished, and those refused before
            (``(path, message)``, as ``predict_paths`` returns them), for the CLI to list.
    """

    def __init__(self, message: str, results: list | None = None):
        super().__init__(message)
        self.results = results or []
        self.failures: list = []
