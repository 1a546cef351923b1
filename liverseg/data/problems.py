"""The problems a data check finds: one record per file, a table, and the error training raises.

Checks return :class:`Problem` records instead of raising, so a whole dataset's problems are
gathered before they are reported (:func:`liverseg.data.checks.check_dataset`,
:func:`liverseg.data.checks.check_case`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from liverseg.errors import DataError

log = logging.getLogger(__name__)

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Problem:
    """One problem of one file.

    Attributes:
        severity: ``"error"`` (training refuses the dataset) or ``"warning"``.
        path: The file concerned.
        message: What was expected, what was found, and how to fix it.
    """

    severity: str
    path: Path
    message: str


class Problems(list):
    """The problems of a dataset check; ``n_cases`` is how many cases were checked."""

    def __init__(self, problems=(), n_cases: int | None = None):
        super().__init__(problems)
        self.n_cases = n_cases


def has_errors(problems: list[Problem]) -> bool:
    """Whether any problem is an error."""
    return any(problem.severity == ERROR for problem in problems)


def format_problems(problems: list[Problem], n_cases: int | None = None) -> str:
    """A table, one row per problem (severity, file, message), and a summary line.

    Args:
        problems: From :func:`liverseg.data.checks.check_dataset` (which carries ``n_cases``) or
            :func:`liverseg.data.checks.check_case`.
        n_cases: Number of cases checked; default ``problems.n_cases`` where present.

    Returns:
        The table; a single line saying so when there are no problems.
    """
    if n_cases is None:
        n_cases = getattr(problems, "n_cases", None)
    errors = sum(problem.severity == ERROR for problem in problems)
    cases = f"{n_cases} cases, " if n_cases is not None else ""
    summary = f"{cases}{errors} errors, {len(problems) - errors} warnings"
    if not problems:
        return f"no problems found ({summary})"
    width = max(len(str(problem.path)) for problem in problems)
    rows = [f"{'severity':<8}  {'file':<{width}}  problem"]
    rows += [f"{p.severity:<8}  {str(p.path):<{width}}  {p.message}" for p in problems]
    return "\n".join([*rows, summary])


def raise_for_errors(problems: list[Problem], root: str | Path) -> None:
    """Log the warnings; raise if any problem is an error.

    Args:
        problems: From :func:`liverseg.data.checks.check_dataset`.
        root: The dataset folder, named in the message.

    Raises:
        DataError: With the same table ``liverseg check`` prints, when there are errors.
    """
    for problem in problems:
        if problem.severity == WARNING:
            log.warning("%s: %s", problem.path, problem.message)
    if has_errors(problems):
        raise DataError(
            f"the dataset at {root} has problems; fix the errors below (`liverseg check {root}` "
            f"shows this table again):\n{format_problems(problems)}"
        )
