"""The config's schema: one frozen dataclass per section, each field with its default.

A key is a field's dotted path from :class:`Config`, e.g. ``data.patch_size``. This module knows
no YAML and no checks; it names the keys (:func:`all_keys`), reads one (:func:`get_value`) and
turns values into the plain lists and dicts that YAML and checkpoints hold (:func:`plain_value`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from liverseg.constants import BACKGROUND, LIVER, TUMOR

# Names the source of a key that no YAML file, override or checkpoint set.
DEFAULT_SOURCE = "default"


@dataclass(frozen=True)
class DataConfig:
    """Where the cases are and how patches are drawn from them."""

    root: str = "data/Task03_Liver_half"
    num_train: int = 105
    split_file: str | None = None
    split_seed: int = 0
    # k-fold cross-validation (nnU-Net): null keeps the num_train split; K splits the cases into
    # K folds, drawn once from split_seed into <root>/splits_<K>fold_seed<S>.json, and trains
    # fold `fold` (0 to K-1; `liverseg cv` trains them all).
    folds: int | None = None
    fold: int = 0
    # How much the volumes under `root` were reduced by `liverseg prepare` (1: originals).
    # Inference on an original-resolution volume predicts at 1/factor and resamples back.
    factor: int = 2
    # A target spacing in mm (x, y, z in RAS order): every training case is resampled to it in
    # the cache, every scan to predict before the sliding window (nnU-Net's one physical scale).
    # null keeps the data's own spacing (and `factor`); set it with factor 1.
    spacing_mm: tuple[float, float, float] | None = None
    shape: tuple[int, int, int] = (256, 256, 200)
    # Fixed HU window mapped linearly to (-1, 1); values outside are clipped.
    hu_min: float = -150.0
    hu_max: float = 250.0
    patch_size: int = 96
    label_probabilities: dict[int, float] = field(
        default_factory=lambda: {BACKGROUND: 0.2, LIVER: 0.3, TUMOR: 0.5}
    )
    samples_per_volume: int = 5
    queue_length: int = 40
    batch_size: int = 2
    num_workers: int = 2
    augment: bool = True
    scales: tuple[float, float] = (0.9, 1.1)
    degrees: tuple[float, float] = (-10.0, 10.0)
    # Mirroring augmentation: each patch is flipped along each of these canonical RAS axes
    # (0 left-right, 1 anterior-posterior, 2 inferior-superior) with probability 0.5, as
    # nnU-Net trains. Empty (the seed): none. Mirroring TTA (inference.tta_flips) needs it.
    mirror_axes: tuple[int, ...] = ()
    # Preprocessed arrays are cached here (default: <run.dir>/cache).
    cache_dir: str | None = None
    # Label affines that differ from the image's by more than this (mm) are an error,
    # unless copy_label_geometry is true.
    affine_tolerance_mm: float = 0.01
    copy_label_geometry: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """UNet3D shape. Output channels follow from the loss (see liverseg.training.losses)."""

    features: tuple[int, ...] = (32, 64, 128, 256)
    norm: str = "instance"
    dropout: float = 0.0
    # Extra low-resolution logit heads trained with a weighted loss (nnU-Net); 0: off (the seed).
    deep_supervision: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run control."""

    epochs: int = 100
    lr: float = 1e-4
    # "constant" (the seed) or "poly": lr * (1 - (epoch - 1) / epochs) ** 0.9, nnU-Net's decay.
    lr_schedule: str = "constant"
    loss: str = "bce"
    # "auto" (CUDA, MPS, CPU), "cpu", "cuda", "cuda:N" or "mps".
    device: str = "auto"
    # Resolved by liverseg.devices.autocast_dtype: "auto" is bf16 autocast on CUDA (fp16 without
    # bf16), fp32 on CPU and MPS; "bf16", "fp16", "off" force it.
    amp: str = "auto"
    seed: int = 0
    val_every: int = 5
    # "auto": continue from <run.dir>/checkpoints/last.pt when present; "never": start afresh.
    resume: str = "auto"
    max_nonfinite: int = 5
    # 0: one pass over the queue (the seed); N: exactly N iterations, the queue refilled as often
    # as needed (nnU-Net: 250).
    iterations_per_epoch: int = 0


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window prediction, used by validation and `liverseg predict`."""

    overlap: float = 0.5
    batch_size: int = 2
    blending: str = "hann"
    # As train.amp, except that "auto" is also bf16 on a CPU that runs it natively (AVX512-BF16,
    # AMX): bf16/fp16 autocast on CUDA, bf16 on such CPUs, fp32 on other CPUs and MPS.
    amp: str = "auto"
    keep_largest_liver: bool = True
    tumor_inside_liver: bool = True
    min_tumor_mm3: float = 10.0
    # Test-time mirroring: 1 (none), 2, 4 or 8 flipped passes averaged (liverseg.constants).
    tta_flips: int = 1
    # Windows of nothing but air (HU <= data.hu_min) are not run; their voxels are background.
    skip_air_windows: bool = True
    # The windows are laid over the box holding every voxel above data.hu_min (the body), not the
    # whole field of view; voxels outside it are background.
    crop_to_body: bool = True


@dataclass(frozen=True)
class PhantomConfig:
    """Synthetic cases created at data.root when it holds no dataset (cases: 0 never creates)."""

    cases: int = 0
    shape: tuple[int, int, int] = (128, 128, 96)
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    """The run folder and what is written at the end of training."""

    dir: str = "runs/default"
    # After training: predict the validation cases and animate one of them.
    final_predictions: bool = False


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    phantoms: PhantomConfig = field(default_factory=PhantomConfig)
    run: RunConfig = field(default_factory=RunConfig)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass, e.g. ``data.patch_size``."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def get_value(config: Config, key: str) -> Any:
    """The value of the dotted ``key`` in ``config``, e.g. ``get_value(c, "data.patch_size")``."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def plain_value(value: Any) -> Any:
    """``value`` with every tuple turned into a list, as YAML and checkpoints hold it."""
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    return value
