"""The start of a training run: what every rank holds before the first epoch.

Rank 0 checks and cleans the run folder, checks the dataset, writes ``split.json`` and
``config.yaml`` and reads the checkpoint to resume; the other ranks wait and receive the split and
the checkpoint (or rank 0's error) through :func:`liverseg.training.distributed.run_on_main`.
Every rank then seeds, builds the model, optimizer and grad scaler, restores the checkpoint's
states and wraps the model for DistributedDataParallel: :func:`start_run` returns the
:class:`Run` that :func:`liverseg.training.fit.fit` carries from epoch to epoch.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from liverseg.checkpoints import (
    build_model,
    restore_training_state,
    saved_history,
    saved_world_size,
)
from liverseg.config import Config, save_config
from liverseg.data.cases import Case
from liverseg.data.splits import load_or_create_fold_split, load_or_create_split
from liverseg.devices import autocast_dtype, training_layout
from liverseg.training import distributed
from liverseg.training.history import resume_history
from liverseg.training.preflight import (
    check_run_writable,
    check_world_size,
    find_training_cases,
    resume_state,
)
from liverseg.training.run_folder import remove_stale_temps

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What a training run carries from one epoch to the next.

    ``model`` is the plain model (validated, checkpointed); ``trained`` is what the optimizer
    steps through: ``model`` itself, or its DistributedDataParallel wrapper under torchrun.
    """

    config: Config
    dir: Path
    train_cases: list[Case]
    val_cases: list[Case]
    device: torch.device
    dtype: torch.dtype | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start_epoch: int = 1
    best_metric: float = -math.inf
    rows: list[dict] = field(default_factory=list)
    trained: torch.nn.Module | None = None

    @property
    def last(self) -> Path:
        return self.dir / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "checkpoints" / "best.pt"


def start_run(config: Config, device: torch.device) -> Run:
    """Prepare the run (rank 0), seed, then build or resume model and optimizer on every rank."""
    start = distributed.run_on_main(lambda: _prepare_run(config))
    check_world_size(len(start.train_cases), distributed.world_size())
    seed_everything(config.train.seed)
    dtype = autocast_dtype(config.train.amp, device)
    model, optimizer, scaler = build_training_state(config, device, dtype)
    run = Run(
        config, Path(config.run.dir), start.train_cases, start.val_cases, device, dtype,
        model, optimizer, scaler,
    )  # fmt: skip
    if start.checkpoint is not None:
        _resume(run, start.checkpoint, start.rows)
    if distributed.world_size() > 1:
        # The same model on every rank, but each rank its own patches and augmentations.
        seed_everything(int(torch.randint(2**31, ())) + distributed.rank())
        distributed.log_global_batch(config.data.batch_size)
    run.trained = distributed.wrap_model(model, device)
    return run


@dataclass
class _Start:
    """What rank 0 prepares for every rank: the split, and the checkpoint and rows to resume."""

    train_cases: list[Case]
    val_cases: list[Case]
    checkpoint: dict | None
    rows: list[dict]


def _prepare_run(config: Config) -> _Start:
    """Rank 0's part of the start: check and clean the run folder, split, check the resume, save
    the config, and read back (or repair) the metrics rows of the run it resumes."""
    check_run_writable(config)
    remove_stale_temps(config)
    run_dir = Path(config.run.dir)
    train_cases, val_cases = split_cases(config, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    checkpoint = resume_state(config, last)
    save_config(config, run_dir / "config.yaml")
    rows = []
    if checkpoint is not None:
        rows = resume_history(
            run_dir / "metrics.csv", checkpoint["epoch"], saved_history(checkpoint), last
        )
    return _Start(train_cases, val_cases, checkpoint, rows)


def split_cases(config: Config, run_dir: Path) -> tuple[list[Case], list[Case]]:
    """The run's training and validation cases: the dataset found and checked, then split.

    The split is written once to ``<run_dir>/split.json`` (or read from ``data.split_file``) and
    read back on every later run; with ``data.folds`` it is fold ``data.fold`` of the dataset's
    k-fold splits file.
    """
    cases = find_training_cases(config)
    by_id, data = {case.case_id: case for case in cases}, config.data
    if data.folds is not None:
        split = load_or_create_fold_split(
            run_dir / "split.json", data.root, list(by_id), data.folds, data.fold, data.split_seed
        )
    else:
        split = load_or_create_split(
            run_dir / "split.json", list(by_id), data.num_train, data.split_seed, data.split_file
        )
    return [by_id[i] for i in split["train"]], [by_id[i] for i in split["val"]]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_training_state(config: Config, device: torch.device, dtype: torch.dtype | None):
    """A fresh model (in the training layout), its Adam optimizer and grad scaler on ``device``."""
    model = build_model(config).to(device)
    model = model.to(memory_format=training_layout(device, dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return model, optimizer, scaler


def _resume(run: Run, checkpoint: dict, rows: list[dict]) -> None:
    """Continue ``run`` from ``checkpoint``: states, epoch, best metric and metrics rows."""
    restore_training_state(checkpoint, run.model, run.optimizer, run.scaler)
    run.start_epoch, run.best_metric = checkpoint["epoch"] + 1, checkpoint["best_metric"]
    run.rows = rows
    log.info("resuming %s at epoch %d", run.last, run.start_epoch)
    before, now = saved_world_size(checkpoint), distributed.world_size()
    if before != now:
        batch = run.config.data.batch_size
        log.info(
            "%s was trained by %d process(es), this run has %d: the global batch goes from "
            "%d to %d (data.batch_size=%d per process)",
            run.last, before, now, batch * before, batch * now, batch,
        )  # fmt: skip
