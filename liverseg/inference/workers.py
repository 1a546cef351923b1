"""Spawned worker processes that share the cases of ``liverseg predict`` (``--workers N``).

:func:`run_workers` starts N processes of the ``spawn`` context, each given one share of the
cases (:func:`split_shares`: balanced by bytes on disk), each loading the checkpoints once. The
CPU threads of torch are divided between them (``torch.get_num_threads() // N``, at least 1);
with ``--device auto`` or ``cuda`` they go round-robin over the visible GPUs
(:func:`worker_devices`). Each tells the parent through its own pipe which case it starts and
finishes: the parent shows one progress bar, and when a worker dies (a signal, the
out-of-memory killer) or stops with an error outside its cases, the others finish their shares
and :class:`~liverseg.errors.WorkerError` then names it, its exit code and its case. The parent
watches each worker's process sentinel, so nothing waits on a dead process.

Under torchrun the ranks share the cases instead (:mod:`liverseg.inference.ranks`), each as a
:class:`Worker` too."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any, TypeVar

import torch

from liverseg.errors import LiversegError, WorkerError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Worker:
    """One process predicting one share of the cases.

    Attributes:
        index: Its worker index (``--workers``) or rank (torchrun), 0 first.
        count: How many share the cases.
        device: Where it predicts: ``"cpu"``, ``"cuda:1"``, ...
        threads: Torch CPU threads it sets at start; None: leave them as they are.
    """

    index: int
    count: int
    device: str
    threads: int | None = None

    @property
    def label(self) -> str:
        """``<index>/<device>``, e.g. ``1/cuda:1``: the ``worker`` column of ``summary.csv``."""
        return f"{self.index}/{self.device}"


# A target's way to tell the parent which case it starts ("start", id) or finished ("done", id).
Report = Callable[[str, str], None]


def split_shares(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Deal item indices into ``count`` shares of about equal total size, deterministically.

    Largest first, each to the share with the smallest total so far (ties: the earlier item,
    the lower share), then each share back in item order. Prediction time grows with a scan's
    voxels, and a folder's CTs differ several-fold in slices (74 to 987 in LiTS): a round-robin
    split by index can give one worker most of the work, a split by size cannot.

    Args:
        sizes: A size per item (bytes on disk: :func:`liverseg.inference.inputs.input_bytes`).
        count: Shares, >= 1.

    Returns:
        ``count`` lists of indices into ``sizes`` (some empty when there are fewer items).
    """
    shares: list[list[int]] = [[] for _ in range(count)]
    totals = [0] * count
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = min(range(count), key=lambda k: (totals[k], k))
        shares[lightest].append(index)
        totals[lightest] += sizes[index]
    return [sorted(share) for share in shares]


def worker_devices(device: str, count: int) -> list[str]:
    """The device of each of ``count`` workers.

    ``auto`` or ``cuda`` with CUDA: round-robin over the visible GPUs (``cuda:0``, ``cuda:1``,
    ..., ``cuda:0``, ...); ``auto`` without CUDA: ``cpu`` (never MPS: one GPU for several
    processes); any other name (``cpu``, ``cuda:1``, ``mps``): that device for every worker.

    Raises:
        LiversegError: An unknown device, or CUDA/MPS asked for where it is absent.
    """
    from liverseg.devices import resolve_device

    if device in ("auto", "cuda") and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return [f"cuda:{k % gpus}" for k in range(count)]
    if device == "auto":
        return ["cpu"] * count
    return [str(resolve_device(device))] * count


def worker_threads(count: int) -> int:
    """Torch CPU threads per worker: this process's ``torch.get_num_threads() // count``, >= 1.

    Divided on every device: a GPU worker still resamples, decodes and reports on the CPU.
    """
    return max(1, torch.get_num_threads() // count)


@dataclass
class _Watch:
    """What the parent knows of each worker: its result or failure, its case, its progress."""

    workers: list[Worker]
    totals: list[int]
    results: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, Any] = field(default_factory=dict)  # an exception or a description
    current: dict[int, str] = field(default_factory=dict)
    done: dict[int, int] = field(default_factory=dict)

    def pending(self) -> list[int]:
        return [k for k in range(len(self.workers)) if k not in self.results | self.failures]

    def handle(self, message: tuple, bar) -> None:
        kind, index, value = message
        if kind == "start":
            self.current[index] = value
        elif kind == "done":
            self.done[index] = self.done.get(index, 0) + 1
            self.current.pop(index, None)
            bar.update(1)
        elif kind == "result":
            self.results[index] = value
        else:  # "error": an exception outside a case (loading the checkpoints, the part file)
            self.failures[index] = value

    def died(self, index: int, exitcode: int | None) -> None:
        self.failures[index] = f"died ({_exit_reason(exitcode)})"

    def describe(self, index: int) -> str:
        failure = self.failures[index]
        where = (
            f"while predicting {self.current[index]}" if index in self.current else "between cases"
        )
        if index not in self.done and index not in self.current:
            where = "before its first case"
        what = failure if isinstance(failure, str) else f"stopped: {failure}"
        finished = self.done.get(index, 0)
        return (
            f"worker {self.workers[index].label} {what} {where} "
            f"({finished} of its {self.totals[index]} cases finished)"
        )

    def raise_failures(self) -> None:
        """Raise the workers' failures as one error (the same class when all share one)."""
        if not self.failures:
            return
        errors = list(self.failures.values())
        first = errors[0]
        if isinstance(first, LiversegError) and all(str(e) == str(first) for e in errors):
            labels = ", ".join(self.workers[k].label for k in sorted(self.failures))
            raise _prefixed(first, f"worker{'s' if len(errors) > 1 else ''} {labels}")
        described = "; ".join(self.describe(k) for k in sorted(self.failures))
        raise WorkerError(
            f"{described}. The cases every worker finished are kept (outputs and summary.csv); "
            "run the same command again to predict the rest",
            [self.results.get(k) for k in range(len(self.workers))],
        )


def run_workers(
    target: Callable[[Worker, list, Any, Report], T],
    shares: Sequence[list],
    job: Any,
    devices: Sequence[str],
    threads: int | None,
    desc: str = "predict",
) -> list[T]:
    """Run ``target(worker, share, job, report)`` in one spawned process per share; wait for all.

    Args:
        target: A module-level function (spawn imports it by name); ``report("start", case)``
            and ``report("done", case)`` move the parent's progress bar.
        shares: One list of items per worker (picklable).
        job: What every worker needs (picklable).
        devices: The device of each worker (:func:`worker_devices`).
        threads: Torch CPU threads per worker (:func:`worker_threads`); None: torch's default.
        desc: The progress bar's label.

    Returns:
        Each worker's return value, in worker order.

    Raises:
        WorkerError: A worker died or raised outside its cases; raised after the others have
            finished their shares, naming each worker, its exit code and its case.
        LiversegError: Every failed worker raised the same error (a checkpoint that cannot be
            loaded): that error, naming the workers.
    """
    from tqdm import tqdm

    context = multiprocessing.get_context("spawn")
    workers = [Worker(k, len(shares), devices[k], threads) for k in range(len(shares))]
    level = logging.getLogger().getEffectiveLevel()
    # One pipe per worker: a worker killed while writing can break only its own.
    pipes = [context.Pipe(duplex=False) for _ in workers]
    processes = [
        context.Process(
            target=_child,
            args=(target, worker, share, job, sender, level),
            name=f"liverseg-worker-{worker.index}",
            daemon=True,
        )
        for worker, share, (_, sender) in zip(workers, shares, pipes)
    ]
    watch = _Watch(workers, [len(share) for share in shares])
    try:
        for process, (_, sender) in zip(processes, pipes):
            process.start()
            sender.close()  # the worker holds it now
        with tqdm(total=sum(watch.totals), desc=desc, unit="case") as bar:
            _wait(processes, [receiver for receiver, _ in pipes], watch, bar)
    finally:
        for process in processes:
            if process.pid is not None:
                if process.is_alive():
                    process.terminate()
                process.join()
    watch.raise_failures()
    return [watch.results[k] for k in range(len(workers))]


def _wait(processes: list, receivers: list, watch: _Watch, bar) -> None:
    """Handle messages until every worker has sent its result or failure, or has ended."""
    while pending := watch.pending():
        waited = {receivers[k]: k for k in pending} | {processes[k].sentinel: k for k in pending}
        for ready in connection.wait(list(waited)):
            index = waited[ready]
            if ready is receivers[index]:
                _receive(receivers[index], watch, bar)
                continue
            while _receive(receivers[index], watch, bar):  # what it sent before it ended
                pass
            processes[index].join()
            if index in watch.pending():
                watch.died(index, processes[index].exitcode)
                log.warning("%s; the other workers go on", watch.describe(index))


def _receive(receiver, watch: _Watch, bar) -> bool:
    """Handle one message if one is waiting; False when none is (or the pipe is closed)."""
    try:
        if not receiver.poll():
            return False
        watch.handle(receiver.recv(), bar)
    except (EOFError, OSError):
        return False
    return True


def _child(target, worker: Worker, share: list, job, sender, level: int) -> None:
    """A worker process: set threads and device, run ``target``, send its result or error."""
    logging.basicConfig(
        level=level, format=f"%(levelname)s worker {worker.index} %(name)s: %(message)s"
    )
    if worker.threads is not None:
        torch.set_num_threads(worker.threads)
    if worker.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(worker.device))

    def report(kind: str, case: str) -> None:
        sender.send((kind, worker.index, case))

    try:
        result = target(worker, share, job, report)
    except Exception as exc:  # sent to the parent, which raises it once the others are done
        if not isinstance(exc, LiversegError):
            traceback.print_exc()
        sender.send(("error", worker.index, transportable(exc)))
        return
    sender.send(("result", worker.index, result))


def transportable(error: Exception) -> Exception | str:
    """``error`` if it survives pickling and is a :class:`LiversegError`, else one line of it."""
    if isinstance(error, LiversegError):
        try:
            return pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - an error class whose arguments do not round-trip
            pass
    message = str(error).splitlines()[0] if str(error) else ""
    return f"raised {type(error).__name__}: {message}" if message else type(error).__name__


def _prefixed(error: LiversegError, prefix: str) -> LiversegError:
    if len(error.args) == 1:
        error.args = (f"{prefix}: {error.args[0]}",)
    return error


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
