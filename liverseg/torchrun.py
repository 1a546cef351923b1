"""torchrun's environment: whether this process is one rank of several, which one, and the waits.

``torchrun`` (``python -m torch.distributed.run``) starts each process with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` set. Training (:mod:`liverseg.training.distributed`) and prediction
(:mod:`liverseg.inference.workers`) read them here, and the timeouts of their waits from
``LIVERSEG_DIST_*`` variables, without importing torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from liverseg.errors import ConfigError

# The waits for slow work of other ranks (checking a dataset, a share of the cases).
SETUP_TIMEOUT_ENV = "LIVERSEG_DIST_SETUP_TIMEOUT_S"
DEFAULT_SETUP_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class RankEnv:
    """Which process of torchrun's this is.

    Attributes:
        rank: 0 to ``world_size - 1`` over every node (``RANK``).
        world_size: Processes in all (``WORLD_SIZE``).
        local_rank: This process's index on its node (``LOCAL_RANK``): its GPU there.
    """

    rank: int
    world_size: int
    local_rank: int


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one rank of several."""
    return "WORLD_SIZE" in os.environ


def rank_env() -> RankEnv:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` of the environment (0, 1, 0 where unset).

    Raises:
        ConfigError: A variable that is not a whole number, or a rank outside the world size.
    """
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default)
        if not text.isdigit():
            raise ConfigError(f"{name}={text!r}: expected a whole number (torchrun sets it)")
        values[name] = int(text)
    env = RankEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if not 0 <= env.rank < env.world_size:
        raise ConfigError(
            f"RANK={env.rank} with WORLD_SIZE={env.world_size}: expected 0 <= RANK < WORLD_SIZE "
            "(start the command with torchrun, or unset WORLD_SIZE to run in one process)"
        )
    return env


def join_failure(exc: BaseException) -> str:
    """Why joining the process group failed, with the environment torchrun should have set.

    ``"WORLD_SIZE=2, RANK=1, ..., MASTER_PORT=(unset): <the error's first line>"``.
    """
    found = ", ".join(
        f"{name}={os.environ.get(name, '(unset)')}"
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    )
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"({found}): {reason}"


def timeout_s(name: str, default: float) -> float:
    """The seconds in environment variable ``name``, or ``default`` when it is unset.

    Raises:
        ConfigError: The variable is set to something other than a number of seconds > 0.
    """
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ConfigError(
            f"environment variable {name}={text!r}: expected a number of seconds > 0 "
            f"(unset it for the default, {default:.0f} s)"
        )
    return value
