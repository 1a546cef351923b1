"""Training: ``fit()`` reads top to bottom: data, model, resume, epochs, validation, checkpoints.

The run folder holds the resolved ``config.yaml``, ``split.json``, ``metrics.csv`` (one row per
epoch), ``curves.png`` and ``checkpoints/{last,best}.pt``.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from tqdm import tqdm

from liverseg.cache import build_cache
from liverseg.cases import Case, check_dataset, find_cases, raise_for_errors
from liverseg.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from liverseg.config import Config, diff_configs, save_config, to_dict
from liverseg.constants import CASE_ID, DICE_CLASSES, IMAGE, LABEL
from liverseg.data import PatchSettings, build_loader, load_or_create_split
from liverseg.errors import CheckpointError, ConfigError, DataError, LiversegError
from liverseg.files import atomic_path
from liverseg.inference import AMP_MODES, autocast_dtype, predict_volume, resolve_device
from liverseg.losses import LOSSES, compute_loss, head_for_loss, out_channels
from liverseg.metrics import case_dice
from liverseg.model import NORMS, UNet3D
from liverseg.postprocess import Postprocess
from liverseg.transforms import preprocessing_settings

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["epoch", "train_loss", "lr", *(f"dice_{c}" for c in DICE_CLASSES), "seconds"]


class TrainingError(LiversegError):
    """The run cannot go on (non-finite losses, incompatible resume)."""


def build_model(config: Config) -> UNet3D:
    """The UNet3D of ``config.model``; output channels follow from the loss's head."""
    return UNet3D(
        in_channels=1,
        out_channels=out_channels(head_for_loss(config.train.loss)),
        features=config.model.features,
        norm=config.model.norm,
        dropout=config.model.dropout,
        deep_supervision=config.model.deep_supervision,
    )


def training_layout(device: torch.device, dtype: torch.dtype | None) -> torch.memory_format:
    """Channels-last 3D under autocast on CUDA (cuDNN's tensor-core kernels), else contiguous.

    On our 2-core CPU a bf16 training step (forward, backward, Adam) of the demo model on
    2 x 48^3 was faster contiguous: 0.177 s vs 0.206 s (``benchmarks/layouts.py``; inference is
    the other way round, see liverseg.inference.uses_channels_last).
    """
    if device.type == "cuda" and dtype is not None:
        return torch.channels_last_3d
    return torch.contiguous_format


def training_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``: "auto" is mixed precision on CUDA only (None: fp32)."""
    if amp not in AMP_MODES:
        raise LiversegError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto" and device.type != "cuda":
        return None
    return autocast_dtype(amp, device)


def find_training_cases(config: Config) -> list[Case]:
    """Find and check the dataset at ``data.root`` (creating phantoms if the config asks)."""
    root = Path(config.data.root)
    if config.phantoms.cases > 0 and not (root / "imagesTr").is_dir():
        from liverseg.phantoms import write_dataset

        log.info("creating %d phantom cases at %s", config.phantoms.cases, root)
        write_dataset(
            root,
            cases=config.phantoms.cases,
            shape=config.phantoms.shape,
            seed=config.phantoms.seed,
            test_cases=0,
        )
    if not (root / "imagesTr").is_dir():
        raise DataError(
            f"no dataset at data.root={root} (looked for {root / 'imagesTr'}). Get "
            "Task03_Liver.tar from the Medical Segmentation Decathlon, unpack it, halve it "
            f"with `liverseg prepare Task03_Liver {root}`, or point data.root=... at your copy. "
            "To try liverseg on synthetic data instead: python main.py --config configs/demo.yaml"
        )
    cases = find_cases(root, split="training")
    raise_for_errors(
        check_dataset(
            root,
            cases=cases,
            affine_tolerance_mm=config.data.affine_tolerance_mm,
            copy_label_geometry=config.data.copy_label_geometry,
        ),
        root,
    )
    return cases


# Data keys that may change between a run and its resume: where the data are and how fast they
# are served, not what the model learns from.
RESUMABLE_CHANGES = ("root", "cache_dir", "num_workers", "queue_length")


def _without(section: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in section.items() if k not in keys}


LR_SCHEDULES = ("constant", "poly")


def learning_rate(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (1-based): constant, or nnU-Net's polynomial decay.

    A function of the epoch alone, so a resumed run continues on the same curve.
    """
    if schedule == "poly":
        return lr * (1 - (epoch - 1) / epochs) ** 0.9
    return lr


def check_config(config: Config) -> None:
    """Refuse settings that would only fail after the dataset check and cache build.

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    data, model = config.data, config.model
    problems = []
    if not data.hu_max > data.hu_min:
        problems.append(f"data.hu_max ({data.hu_max}) must exceed data.hu_min ({data.hu_min})")
    if config.train.loss not in LOSSES:
        problems.append(f"train.loss={config.train.loss!r}: choose one of {', '.join(LOSSES)}")
    if model.norm not in NORMS:
        problems.append(f"model.norm={model.norm!r}: choose one of {', '.join(NORMS)}")
    if config.train.lr_schedule not in LR_SCHEDULES:
        problems.append(
            f"train.lr_schedule={config.train.lr_schedule!r}: choose one of "
            + ", ".join(LR_SCHEDULES)
        )
    if config.train.amp not in AMP_MODES:
        problems.append(f"train.amp={config.train.amp!r}: choose one of {', '.join(AMP_MODES)}")
    if not 0 <= model.deep_supervision <= len(model.features) - 2:
        problems.append(
            f"model.deep_supervision={model.deep_supervision} must be in "
            f"[0, {max(len(model.features) - 2, 0)}] for model.features={list(model.features)}"
        )
    multiple = 2 ** (len(model.features) - 1)
    if len(model.features) < 2 or data.patch_size % multiple:
        problems.append(
            f"data.patch_size={data.patch_size} must be a multiple of {multiple} for "
            f"model.features={list(model.features)}"
        )
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def resume_state(config: Config, last: Path) -> dict | None:
    """The checkpoint to continue from, or None; refuses a model/data config that changed."""
    if config.train.resume == "never" or not last.exists():
        return None
    if config.train.resume != "auto":
        raise LiversegError(f"train.resume must be auto or never, got {config.train.resume!r}")
    checkpoint = load_checkpoint(last)
    saved, current = checkpoint["config"], to_dict(config)
    changes = [
        line
        for section in ("model", "data")
        for line in diff_configs(
            _without(saved[section], RESUMABLE_CHANGES),
            _without(current[section], RESUMABLE_CHANGES),
            f"{section}.",
        )
    ]
    if saved["train"]["loss"] != current["train"]["loss"]:
        changes.append(f"train.loss: {saved['train']['loss']!r} -> {current['train']['loss']!r}")
    if changes:
        raise TrainingError(
            f"cannot resume from {last}: the model/data config differs from the checkpoint's:\n  "
            + "\n  ".join(changes)
            + "\nuse the same config, set train.resume=never, or choose another run.dir"
        )
    return checkpoint


def train_one_epoch(model, loader, optimizer, scaler, *, epoch, config, device, dtype) -> float:
    """One pass over the queue; returns the mean finite loss. Non-finite losses skip the step."""
    model.train()
    total, count, bad_in_row = 0.0, 0, 0
    limit = config.train.iterations_per_epoch or len(loader)
    bar = tqdm(loader, total=limit, desc=f"epoch {epoch}", unit="it", leave=False)
    layout = training_layout(device, dtype)
    for iteration, batch in enumerate(bar, start=1):
        image = batch[IMAGE][tio.DATA].to(device, non_blocking=True, memory_format=layout)
        label = batch[LABEL][tio.DATA].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            logits = model(image)
        loss = compute_loss(logits, label, config.train.loss)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            bad_in_row += 1
            log.warning("epoch %d iteration %d: non-finite loss, step skipped", epoch, iteration)
            if bad_in_row >= config.train.max_nonfinite:
                raise TrainingError(
                    f"{bad_in_row} non-finite losses in a row at epoch {epoch}, iteration "
                    f"{iteration} (cases in the batch: {', '.join(batch[CASE_ID])}); lower "
                    "train.lr, check those cases with `liverseg check`, or set train.amp=off"
                )
            if iteration >= limit:
                break
            continue
        bad_in_row = 0
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total, count = total + loss.item(), count + 1
        bar.set_postfix(loss=f"{total / count:.4f}")
        if iteration >= limit:
            break
    return total / count if count else math.nan


def validate(model, cases: list[Case], config: Config, device) -> dict[str, float]:
    """Predict whole validation volumes with the users' inference routine; mean Dice per class."""
    scores = {c: [] for c in DICE_CLASSES}
    inference = config.inference
    for case in tqdm(cases, desc="validate", unit="case", leave=False):
        prediction = predict_volume(
            model,
            case.image,
            hu_min=config.data.hu_min,
            hu_max=config.data.hu_max,
            head=head_for_loss(config.train.loss),
            patch_size=config.data.patch_size,
            overlap=inference.overlap,
            batch_size=inference.batch_size,
            blending=inference.blending,
            device=device,
            amp=inference.amp,
            postprocess=Postprocess(
                inference.keep_largest_liver, inference.tumor_inside_liver, inference.min_tumor_mm3
            ),
        )
        truth = np.asarray(nib.load(str(case.label)).dataobj).astype(np.uint8)
        for name, value in case_dice(prediction.labels, truth).items():
            scores[name].append(value)
        log.info("validation %s: %s", case.case_id, {k: round(v[-1], 4) for k, v in scores.items()})
    return {
        name: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
        for name, v in scores.items()
    }


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite metrics.csv atomically with ``rows``."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    """Rows of metrics.csv up to ``up_to_epoch``, so a resumed run adds no duplicate."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= up_to_epoch]


def plot_curves(rows: list[dict], path: Path) -> None:
    """Loss and validation Dice per epoch, to ``curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def column(name):
        return [float(r[name]) if r.get(name) not in ("", None) else math.nan for r in rows]

    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, column("train_loss"), marker=".")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    for name in DICE_CLASSES:
        values = column(f"dice_{name}")
        points = [(e, v) for e, v in zip(epochs, values) if not math.isnan(v)]
        if points:
            ax_dice.plot(*zip(*points), marker="o", label=name)
    ax_dice.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice")
    if ax_dice.lines:
        ax_dice.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


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
    }
    cached = build_cache(cases, cache_dir, cache_settings, workers=data.num_workers)
    patches = PatchSettings(
        data.patch_size, data.label_probabilities, data.samples_per_volume, data.augment,
        data.scales, data.degrees,
    )  # fmt: skip
    return build_loader(
        cached, patches, queue_length=data.queue_length, batch_size=data.batch_size,
        num_workers=data.num_workers, seed=config.train.seed, pin_memory=pin_memory,
    )  # fmt: skip


def seed_everything(seed: int) -> None:
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


def restore_training_state(checkpoint: dict, model, optimizer, scaler) -> None:
    """Load a resumed run's model, optimizer, scaler and RNG states from its checkpoint."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])


def training_state(
    model, optimizer, scaler, epoch: int, best_metric: float, config: Config, preprocessing: dict
) -> dict:
    """What a checkpoint holds: tensors and plain values only."""
    return dict(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        epoch=epoch,
        best_metric=best_metric,
        rng=rng_state(),
        config=to_dict(config),
        preprocessing=preprocessing,
    )


def metrics_row(epoch: int, loss: float, lr: float, scores: dict, started: float) -> dict:
    """One ``metrics.csv`` row: epoch, train loss, lr, validation Dice (if any), seconds."""
    row = {
        "epoch": epoch,
        "train_loss": f"{loss:.6f}",
        "lr": lr,
        "seconds": f"{time.perf_counter() - started:.1f}",
    }
    row.update({f"dice_{k}": f"{v:.4f}" for k, v in scores.items()})
    return row


def fit(config: Config) -> dict:
    """Train as ``config`` says; resume from ``<run.dir>/checkpoints/last.pt`` when present.

    Returns:
        ``{"epoch", "best_metric", "metrics": last validation Dice, "run_dir"}``.
    """
    check_config(config)
    run_dir = Path(config.run.dir)
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    cases = find_training_cases(config)
    by_id = {case.case_id: case for case in cases}
    split = load_or_create_split(
        run_dir / "split.json",
        list(by_id),
        config.data.num_train,
        config.data.split_seed,
        config.data.split_file,
    )
    checkpoint = resume_state(config, last)
    save_config(config, run_dir / "config.yaml")
    seed_everything(config.train.seed)

    device = resolve_device(config.train.device)
    dtype = training_dtype(config.train.amp, device)
    model, optimizer, scaler = build_training_state(config, device, dtype)
    start_epoch, best_metric, rows = 1, -math.inf, []
    if checkpoint is not None:
        restore_training_state(checkpoint, model, optimizer, scaler)
        start_epoch, best_metric = checkpoint["epoch"] + 1, checkpoint["best_metric"]
        rows = read_metrics(run_dir / "metrics.csv", checkpoint["epoch"])
        log.info("resuming %s at epoch %d", last, start_epoch)

    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else run_dir / "cache"
    train_cases = [by_id[i] for i in split["train"]]
    loader = build_training_loader(config, train_cases, cache_dir, device.type == "cuda")
    val_cases = [by_id[i] for i in split["val"]]
    preprocessing = preprocessing_settings(
        config.data.hu_min, config.data.hu_max, config.data.factor, head_for_loss(config.train.loss)
    )
    scores: dict[str, float] = {}
    for epoch in tqdm(
        range(start_epoch, config.train.epochs + 1),
        desc="epochs",
        unit="epoch",
        initial=start_epoch - 1,
        total=config.train.epochs,
    ):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(
                config.train.lr, config.train.lr_schedule, epoch, config.train.epochs
            )
        loss = train_one_epoch(
            model, loader, optimizer, scaler, epoch=epoch, config=config, device=device, dtype=dtype
        )
        validating = val_cases and (
            epoch % config.train.val_every == 0 or epoch == config.train.epochs
        )
        scores = validate(model, val_cases, config, device) if validating else {}
        rows.append(metrics_row(epoch, loss, optimizer.param_groups[0]["lr"], scores, started))
        score = selection_score(scores)
        improved = math.isfinite(loss) and math.isfinite(score) and score > best_metric
        best_metric = score if improved else best_metric
        # metrics.csv before the checkpoint: a kill between the two leaves a row the resumed run
        # drops and redoes (read_metrics), never a checkpointed epoch without its row.
        write_metrics(run_dir / "metrics.csv", rows)
        if math.isfinite(loss):  # NaN is never saved
            state = training_state(
                model, optimizer, scaler, epoch, best_metric, config, preprocessing
            )
            save_checkpoint(last, **state)
            if improved:
                save_checkpoint(best, **state)
        plot_curves(rows, run_dir / "curves.png")
        log.info(
            "epoch %d: loss %.4f%s (%.0f s)",
            epoch,
            loss,
            "".join(f", {k} {v:.3f}" for k, v in scores.items()),
            time.perf_counter() - started,
        )
    if config.run.final_predictions and val_cases:
        write_final_predictions(run_dir, best if best.exists() else last, val_cases, config)
    return {
        "epoch": config.train.epochs,
        "best_metric": best_metric,
        "metrics": scores,
        "run_dir": run_dir,
    }


def write_final_predictions(run_dir: Path, checkpoint: Path, cases: list[Case], config) -> None:
    """Predict the validation cases into ``predictions/`` and animate the first one."""
    from liverseg.predict import predict_paths
    from liverseg.visualize import animate_files

    out = run_dir / "predictions"
    failures = predict_paths(
        checkpoint,
        [c.image for c in cases],
        out,
        overwrite=True,
        prepared=True,
        device=config.train.device,
    )
    if failures:
        raise CheckpointError(f"final predictions failed: {failures}")
    first = cases[0]
    animate_files(
        first.image,
        seg=out / f"{first.case_id}_seg.nii.gz",
        truth=first.label,
        out=run_dir / "animation.html",
    )
    log.info("validation predictions in %s, animation in %s", out, run_dir / "animation.html")
