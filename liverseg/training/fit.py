"""Training: ``fit()`` reads top to bottom: start, data, epochs (train, validate, record), finish.

The run folder holds the resolved ``config.yaml``, ``split.json``, ``metrics.csv`` (one row per
epoch), ``curves.png`` and ``checkpoints/{last,best}.pt``. What is checked before training starts
lives in :mod:`liverseg.training.preflight`, the run's start (what rank 0 prepares and shares,
the model built or resumed on every rank) in :mod:`liverseg.training.run_start`, the epoch record
in :mod:`liverseg.training.history`, what a checkpoint holds in :mod:`liverseg.checkpoints`. Under
torchrun every rank runs ``fit()`` in DistributedDataParallel
(:mod:`liverseg.training.distributed`): rank 0 alone prepares and writes the run folder, each rank
trains on its share of the cases and validates its share.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from tqdm import tqdm

from liverseg.checkpoints import inference_settings, preprocessing_record, training_state
from liverseg.config import Config, check_config
from liverseg.constants import CASE_ID, DICE_CLASSES, IMAGE, LABEL
from liverseg.data.cases import Case
from liverseg.devices import training_layout
from liverseg.errors import TrainingError
from liverseg.evaluation.metrics import case_dice
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.volume import predict_volume
from liverseg.io import read_labels
from liverseg.labels import head_for_loss
from liverseg.training import distributed
from liverseg.training.cache import build_shared_cache
from liverseg.training.history import metrics_row
from liverseg.training.loader import PatchSettings, build_loader, set_loader_epoch
from liverseg.training.losses import compute_loss
from liverseg.training.lr_schedules import learning_rate
from liverseg.training.run_folder import record_epoch, write_final_predictions
from liverseg.training.run_start import Run, start_run

log = logging.getLogger(__name__)


def _batches(loader, count: int):
    """Yield exactly ``count`` batches of ``loader``, starting a new pass whenever one ends.

    Each new pass is a new ``iter(loader)``: the ``tio.Queue`` refills from the subjects. The last
    pass stops as soon as ``count`` is reached, without drawing a batch more.
    """
    yielded = 0
    while yielded < count:
        before = yielded
        for batch in loader:
            yield batch
            yielded += 1
            if yielded == count:
                return
        assert yielded > before, "the training loader yielded no batch"


def train_one_epoch(model, loader, optimizer, scaler, *, epoch, config, device, dtype) -> float:
    """``train.iterations_per_epoch`` iterations (0: one pass over the queue); the mean finite loss.

    A non-finite loss skips its optimizer step but still counts as an iteration. Under torchrun
    ``model`` is the DistributedDataParallel one and ``loader`` the rank's: a non-finite loss on
    any rank skips the step on every rank, and the mean is over every rank's finite losses.
    """
    model.train()
    total, count, bad_in_row = 0.0, 0, 0
    limit = config.train.iterations_per_epoch or len(loader)
    bar = tqdm(
        _batches(loader, limit), total=limit, desc=f"epoch {epoch}", unit="it", leave=False,
        disable=not distributed.is_main(),
    )  # fmt: skip
    layout = training_layout(device, dtype)
    for iteration, batch in enumerate(bar, start=1):
        image = batch[IMAGE][tio.DATA].to(device, non_blocking=True, memory_format=layout)
        label = batch[LABEL][tio.DATA].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            logits = model(image)
        loss = compute_loss(logits, label, config.train.loss)
        optimizer.zero_grad(set_to_none=True)
        here = not torch.isfinite(loss)
        if distributed.any_rank(here, device):
            bad_in_row += 1
            _warn_non_finite(epoch, iteration, here)
            if bad_in_row >= config.train.max_nonfinite:
                raise _non_finite_error(bad_in_row, epoch, iteration, batch[CASE_ID])
            continue
        bad_in_row = 0
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total, count = total + loss.item(), count + 1
        bar.set_postfix(loss=f"{total / count:.4f}")
    total, count = distributed.sum_over_ranks([total, count], device)
    return total / count if count else math.nan


def _warn_non_finite(epoch: int, iteration: int, here: bool) -> None:
    """Say that a step is skipped: in one process, or on each rank whose loss was not finite."""
    if distributed.world_size() == 1:
        log.warning("epoch %d iteration %d: non-finite loss, step skipped", epoch, iteration)
    elif here:
        log.warning(
            "epoch %d iteration %d: non-finite loss on rank %d, step skipped on every rank",
            epoch, iteration, distributed.rank(),
        )  # fmt: skip


def _non_finite_error(bad_in_row: int, epoch: int, iteration: int, cases) -> TrainingError:
    ranked = f" of rank {distributed.rank()}" if distributed.world_size() > 1 else ""
    return TrainingError(
        f"{bad_in_row} non-finite losses in a row at epoch {epoch}, iteration {iteration} "
        f"(cases in the batch{ranked}: {', '.join(cases)}); lower train.lr, check those cases "
        "with `liverseg check`, or set train.amp=off"
    )


def validate(model, cases: list[Case], settings: InferenceSettings, device) -> dict[str, float]:
    """Predict whole validation volumes with the users' inference routine; mean Dice per class.

    The cases are at the training resolution (reduced by ``data.factor``), so they are predicted
    as ``prepared``: exactly what ``liverseg predict --prepared`` and ``liverseg evaluate`` compute
    from ``settings``; with a target spacing they are resampled to it, as the cache did. Under
    torchrun each rank predicts its share of the cases and the Dice values are gathered, in the
    cases' order, so the means are those of one process.
    """
    mine = {}
    for index, case in tqdm(
        distributed.share(list(enumerate(cases))), desc="validate", unit="case", leave=False,
        disable=not distributed.is_main(),
    ):  # fmt: skip
        prediction = predict_volume(
            model, case.image, settings, prepared=settings.spacing_mm is None, device=device
        )
        truth, _ = read_labels(case.label)
        mine[index] = case_dice(prediction.labels, truth)
        rounded = {k: round(v, 4) for k, v in mine[index].items()}
        log.info("validation %s: %s", case.case_id, rounded)
    found = {index: values for part in distributed.gather(mine) for index, values in part.items()}
    scores = {c: [found[i][c] for i in range(len(cases)) if c in found[i]] for c in DICE_CLASSES}
    return {
        name: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
        for name, v in scores.items()
    }


def selection_score(scores: dict[str, float]) -> float:
    """Mean of liver-including-tumor and tumor Dice over those that are finite (NaN if none)."""
    values = [scores.get(k, math.nan) for k in ("liver_incl_tumor", "tumor")]
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def build_training_loader(
    config: Config, cases: list[Case], cache_dir: Path, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """Preprocess ``cases`` into ``cache_dir`` and build the patch loader of ``config.data``."""
    data = config.data
    cache_settings = {
        "hu_min": data.hu_min,
        "hu_max": data.hu_max,
        "shape": list(data.shape),
        "min_size": data.patch_size,
        "affine_tolerance_mm": data.affine_tolerance_mm,
        "copy_label_geometry": data.copy_label_geometry,
        "spacing_mm": None if data.spacing_mm is None else list(data.spacing_mm),
    }
    cached = build_shared_cache(cases, cache_dir, cache_settings, workers=data.num_workers)
    patches = PatchSettings(
        data.patch_size, data.label_probabilities, data.samples_per_volume, data.augment,
        data.scales, data.degrees, tuple(data.mirror_axes),
    )  # fmt: skip
    return build_loader(
        cached, patches, queue_length=data.queue_length, batch_size=data.batch_size,
        num_workers=data.num_workers, seed=config.train.seed, pin_memory=pin_memory,
        rank=distributed.rank(), world_size=distributed.world_size(),
    )  # fmt: skip


def _preprocessing(config: Config) -> dict:
    """The preprocessing every checkpoint records, from which validation predicts as users will."""
    data = config.data
    return preprocessing_record(
        data.hu_min, data.hu_max, data.factor, head_for_loss(config.train.loss), data.spacing_mm
    )


def _run_epoch(
    run: Run, epoch: int, loader, settings: InferenceSettings, preprocessing: dict
) -> dict[str, float]:
    """Set the epoch's lr, train, validate when due, record the epoch; its validation Dice."""
    config, started = run.config, time.perf_counter()
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(
            config.train.lr, config.train.lr_schedule, epoch, config.train.epochs
        )
    set_loader_epoch(loader, epoch)
    loss = train_one_epoch(
        run.trained, loader, run.optimizer, run.scaler,
        epoch=epoch, config=config, device=run.device, dtype=run.dtype,
    )  # fmt: skip
    validating = run.val_cases and (
        epoch % config.train.val_every == 0 or epoch == config.train.epochs
    )
    scores = validate(run.model, run.val_cases, settings, run.device) if validating else {}
    lr = run.optimizer.param_groups[0]["lr"]
    run.rows.append(metrics_row(epoch, loss, lr, scores, started))
    score = selection_score(scores)
    improved = math.isfinite(loss) and math.isfinite(score) and score > run.best_metric
    run.best_metric = score if improved else run.best_metric
    if distributed.is_main():
        _record(run, epoch, loss, improved, preprocessing)
    log.info(
        "epoch %d: loss %.4f%s (%.0f s)",
        epoch,
        loss,
        "".join(f", {k} {v:.3f}" for k, v in scores.items()),
        time.perf_counter() - started,
    )
    return scores


def _record(run: Run, epoch: int, loss: float, improved: bool, preprocessing: dict) -> None:
    """Write the epoch's row, its checkpoints (not for a NaN loss) and curves: rank 0's job."""
    state = None
    if math.isfinite(loss):  # NaN is never saved
        state = training_state(
            run.model, run.optimizer, run.scaler, epoch, run.best_metric, run.config,
            preprocessing, history=run.rows, world_size=distributed.world_size(),
        )  # fmt: skip
    record_epoch(run.dir, run.rows, state, [run.last, run.best] if improved else [run.last])


def _finish_run(run: Run, scores: dict[str, float]) -> dict:
    """Write the final validation predictions when asked; the result :func:`fit` returns."""
    if run.config.run.final_predictions and run.val_cases and distributed.is_main():
        # The final model, not best.pt: a best picked on a few validation cases was never
        # clearly better on 40 other phantoms and once much worse (README, "Choosing").
        write_final_predictions(run.dir, run.last, run.val_cases, run.config)
    return {
        "epoch": run.config.train.epochs,
        "best_metric": run.best_metric,
        "metrics": scores,
        "run_dir": run.dir,
    }


def fit(config: Config) -> dict:
    """Train as ``config`` says; resume from ``<run.dir>/checkpoints/last.pt`` when present.

    Under torchrun (``WORLD_SIZE`` set) every rank calls it: they join one process group and
    train the model in DistributedDataParallel; rank 0 alone writes the run folder.

    Returns:
        ``{"epoch", "best_metric", "metrics": last validation Dice, "run_dir"}``.
    """
    check_config(config)
    device = distributed.init_from_env(config.train.device)
    run = start_run(config, device)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else run.dir / "cache"
    loader = build_training_loader(config, run.train_cases, cache_dir, run.device.type == "cuda")
    preprocessing = _preprocessing(config)
    settings = inference_settings(config, preprocessing)
    scores: dict[str, float] = {}
    for epoch in tqdm(
        range(run.start_epoch, config.train.epochs + 1),
        desc="epochs",
        unit="epoch",
        initial=run.start_epoch - 1,
        total=config.train.epochs,
        disable=not distributed.is_main(),
    ):
        scores = _run_epoch(run, epoch, loader, settings, preprocessing)
    return _finish_run(run, scores)
