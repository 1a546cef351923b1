"""torchrun's ranks sharing the cases of ``liverseg predict``: one share per rank.

``torchrun --nproc_per_node=N -m liverseg predict ...`` starts N processes; each joins a gloo
process group (:func:`join_ranks`, on GPU ``LOCAL_RANK`` with CUDA, else the CPU), rank 0 plans
the run and every rank gets the plan (:func:`from_rank0`), each predicts its share, and rank 0
gets every rank's failures (:func:`gather_ranks`) and merges the summary parts. The waits (for
rank 0's plan, for the slowest share) time out after ``LIVERSEG_DIST_SETUP_TIMEOUT_S`` (default
3600 s). A rank that dies is torchrun's to report: it stops the others and exits non-zero,
naming the rank; the cases already written stay valid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from liverseg.errors import LiversegError, WorkerError
from liverseg.inference.workers import Worker, transportable
from liverseg.torchrun import (
    DEFAULT_SETUP_TIMEOUT_S,
    SETUP_TIMEOUT_ENV,
    join_failure,
    rank_env,
    timeout_s,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def join_ranks(device: str) -> Worker:
    """Join torchrun's ranks in a gloo process group; this rank as a :class:`Worker`.

    Args:
        device: ``auto`` or ``cuda`` (GPU ``LOCAL_RANK`` with CUDA, else the CPU) or ``cpu``.

    Raises:
        LiversegError: Another device name (each rank takes its own), more ranks on a node than
            it has GPUs, or a process group that cannot be joined.
        ConfigError: A torchrun variable or ``LIVERSEG_DIST_SETUP_TIMEOUT_S`` that is not valid.
    """
    env = rank_env()
    own = _rank_device(device, env.local_rank)
    timeout = timedelta(seconds=timeout_s(SETUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S))
    try:
        dist.init_process_group("gloo", timeout=timeout)
    except (ValueError, RuntimeError) as exc:
        raise LiversegError(
            f"cannot join the gloo process group {join_failure(exc)}; start with "
            "`torchrun --nproc_per_node=N -m liverseg predict ...`, or unset WORLD_SIZE"
        ) from None
    if own.startswith("cuda"):
        torch.cuda.set_device(torch.device(own))
    log.info("rank %d of %d predicts on %s", env.rank, env.world_size, own)
    return Worker(env.rank, env.world_size, own)


def _rank_device(device: str, local_rank: int) -> str:
    if device not in ("auto", "cuda", "cpu"):
        raise LiversegError(
            f"--device {device} under torchrun: each rank takes its own device; use --device "
            "auto or cuda (GPU LOCAL_RANK of its node) or cpu"
        )
    if device == "cpu" or not torch.cuda.is_available():
        if device == "cuda":
            raise LiversegError("--device cuda requested but CUDA is not available; use cpu")
        return "cpu"
    if local_rank >= torch.cuda.device_count():
        raise LiversegError(
            f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
            "give torchrun --nproc_per_node at most the node's GPU count, or --device cpu"
        )
    return f"cuda:{local_rank}"


def leave_ranks() -> None:
    """Leave the process group of :func:`join_ranks` (nothing when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def from_rank0(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 alone; every rank gets its result, or raises its error."""
    message: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            message[0] = ("result", work())
        except Exception as exc:
            message[0] = ("error", transportable(exc))
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    kind, value = message[0]
    if kind == "error":
        raise value if isinstance(value, Exception) else WorkerError(f"rank 0 {value}")
    return value


def gather_ranks(value: T) -> list[T]:
    """Every rank's ``value`` in rank order, on every rank (waits for the slowest)."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
