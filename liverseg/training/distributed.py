"""Training in several processes under torchrun: the process group and what the ranks share.

``torchrun --nproc_per_node=N main.py ...`` starts N processes with ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` set; :func:`init_from_env` joins them into one process group (NCCL on CUDA, one GPU
per rank; gloo on CPU). Without ``WORLD_SIZE`` there is no group and every helper here is what one
process needs: rank 0 of 1, waits that return at once, reductions that return their input.

Two groups, two timeouts. Training's collectives (the gradients, the non-finite flag, the epoch's
loss) run on the default group with ``LIVERSEG_DIST_TIMEOUT_S`` (default 300 s): a rank that
hangs ends the run in minutes. The waits for slow work of other ranks (rank 0 checking the
dataset, each rank preprocessing its share of the cache, validation) run on a gloo group with
``LIVERSEG_DIST_SETUP_TIMEOUT_S`` (default 3600 s). A rank that dies is torchrun's to report: it
stops the other ranks and exits non-zero.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from liverseg.devices import resolve_device
from liverseg.errors import ConfigError, LiversegError, TrainingError
from liverseg.torchrun import (  # noqa: F401 - also this module's names
    DEFAULT_SETUP_TIMEOUT_S,
    SETUP_TIMEOUT_ENV,
    join_failure,
    launched,
    rank_env,
    timeout_s,
)

log = logging.getLogger(__name__)

TIMEOUT_ENV = "LIVERSEG_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0

T = TypeVar("T")
_waits: dist.ProcessGroup | None = None  # the gloo group of the long waits


def is_distributed() -> bool:
    """Whether this process is in a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 to ``world_size() - 1``; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes train together; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes the run folder."""
    return rank() == 0


def _rank_device(name: str, local_rank: int) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` with CUDA, else CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"train.device={name!r} under torchrun: each rank takes its own device, so use "
            "train.device=auto or cuda (GPU LOCAL_RANK of its node) or cpu"
        )
    device = resolve_device("cpu" if name == "auto" and not torch.cuda.is_available() else name)
    if device.type != "cuda":
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
            "give torchrun --nproc_per_node at most the node's GPU count"
        )
    return torch.device("cuda", local_rank)


def init_from_env(device_name: str, init_method: str | None = None) -> torch.device:
    """Join torchrun's process group (once per process) and return this rank's device.

    Without ``WORLD_SIZE`` in the environment nothing is started: the device of ``device_name``
    (:func:`liverseg.devices.resolve_device`). Ranks other than 0 log warnings only.

    Args:
        device_name: ``train.device``; under torchrun ``auto``, ``cuda`` or ``cpu``.
        init_method: Where the ranks meet. None: torchrun's ``MASTER_ADDR`` and ``MASTER_PORT``
            (``env://``). ``"file:///path"``: a file none of them has created yet, on a file
            system they all see, with ``RANK`` and ``WORLD_SIZE`` from the environment; no port
            to pick, so nothing another process can take in between (what the tests use).

    Raises:
        ConfigError: A device that names one GPU (``cuda:1``) or MPS under torchrun, more ranks
            on a node than it has GPUs, or a timeout variable that is not a positive number.
        TrainingError: The process group cannot be joined (``WORLD_SIZE`` set without torchrun,
            a rendezvous that failed).
    """
    global _waits
    if not launched():
        return resolve_device(device_name)
    local_rank = os.environ.get("LOCAL_RANK", "0")
    if not local_rank.isdigit():
        raise ConfigError(f"LOCAL_RANK={local_rank!r}: expected a whole number (torchrun sets it)")
    device = _rank_device(device_name, int(local_rank))
    if not is_distributed():
        timeout = timedelta(seconds=timeout_s(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        setup = timedelta(seconds=timeout_s(SETUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _join("nccl" if device.type == "cuda" else "gloo", timeout, init_method)
        _waits = dist.new_group(backend="gloo", timeout=setup)
        atexit.register(_leave)
        log.info(
            "rank %d of %d (local rank %d) on %s, %s backend, collective timeout %.0f s",
            rank(), world_size(), int(local_rank), device, dist.get_backend(),
            timeout.total_seconds(),
        )  # fmt: skip
        if not is_main():
            logging.getLogger("liverseg").setLevel(logging.WARNING)
    return device


def log_global_batch(batch_size: int) -> None:
    """Say how many processes train and the global batch they make together (rank 0 only)."""
    log.info(
        "distributed training: %d processes, data.batch_size=%d per process, global batch %d "
        "(%d x %d); queue and iterations per epoch are per process",
        world_size(), batch_size, batch_size * world_size(), batch_size, world_size(),
    )  # fmt: skip


def _join(backend: str, timeout: timedelta, init_method: str | None = None) -> None:
    """``init_process_group`` from torchrun's variables, its failures as one clear error."""
    try:
        if init_method is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            env = rank_env()
            dist.init_process_group(
                backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                timeout=timeout,
            )  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        raise TrainingError(
            f"cannot join the {backend} process group {join_failure(exc)}; start training with "
            "`torchrun --nproc_per_node=N main.py ...`, or unset WORLD_SIZE to train in one "
            "process"
        ) from None


def _leave() -> None:
    if is_distributed():
        dist.destroy_process_group()


def wait_for_all() -> None:
    """Wait until every rank gets here (the long-timeout group); at once in one process."""
    if is_distributed():
        dist.barrier(group=_waits)


def run_on_main(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 alone; every rank gets its result, or raises its error.

    The other ranks wait (the long-timeout group) while rank 0 works: checking the dataset,
    writing phantoms or the run folder's first files. When rank 0 fails, every other rank raises
    its :class:`LiversegError` too (a :class:`TrainingError` naming any other error), so each
    exits with a one-line error instead of waiting.
    """
    if not is_distributed():
        return work()
    message: list[Any] = [None]
    if is_main():
        try:
            message[0] = ("result", work())
        except Exception as exc:
            message[0] = ("error", _transportable(exc))
            dist.broadcast_object_list(message, src=0, group=_waits)
            raise
    dist.broadcast_object_list(message, src=0, group=_waits)
    kind, value = message[0]
    if kind == "error":
        raise value
    return value


def _transportable(error: Exception) -> LiversegError:
    """Rank 0's error for the other ranks to raise: the same class and message where it can."""
    if isinstance(error, LiversegError):
        try:
            return pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - an error class whose arguments do not round-trip
            pass
    return TrainingError(f"rank 0 stopped the run: {error}")


def gather(value: T) -> list[T]:
    """Every rank's ``value`` in rank order (the long-timeout group); ``[value]`` in one process."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value, group=_waits)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank: every rank gets the same answer."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed element-wise over the ranks (float64); themselves in one process."""
    if not is_distributed():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is summed over the ranks too (nnU-Net's batch Dice)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(grad)


def sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, differentiably; ``tensor`` itself in one process.

    Every rank computes a loss of the global sums. DDP averages the ranks' gradients, and the
    gradient of the sum reaches each rank summed over the ranks, so the averaged gradient is
    exactly that of one process computing the loss on the global batch.
    """
    return _SumOverRanks.apply(tensor) if is_distributed() else tensor


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when distributed; ``model`` itself otherwise.

    On CUDA its BatchNorm layers (``model.norm=batch``) become SyncBatchNorm in place, as
    nnU-Net does: statistics over the global batch, the same parameters and state-dict names.
    SyncBatchNorm needs CUDA: on CPU each process keeps its own batch statistics.
    """
    if not is_distributed():
        return model
    if device.type != "cuda":
        return torch.nn.parallel.DistributedDataParallel(model)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a DistributedDataParallel wrapper (what checkpoints hold)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def share(items: list[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size()``-th one from index ``rank()``."""
    return items[rank() :: world_size()]
