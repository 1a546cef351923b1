"""How a model predicts a volume: one frozen record, built from a checkpoint in one place.

:func:`liverseg.checkpoints.load_model` (and training's validation, through
:func:`liverseg.checkpoints.inference_settings`) builds an :class:`InferenceSettings` from the
checkpoint's preprocessing and config; :func:`liverseg.inference.volume.predict_volume`, ``liverseg
predict``, the benchmarks and the notebook all take it, so no caller maps config keys to arguments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from liverseg.constants import AMP_MODES, BLENDINGS, HEADS, TTA_FLIPS
from liverseg.errors import LiversegError
from liverseg.inference.postprocess import Postprocess


@dataclass(frozen=True)
class InferenceSettings:
    """Everything :func:`~liverseg.inference.volume.predict_volume` needs besides the model.

    Attributes:
        hu_min: HU mapped to -1 in training (:func:`liverseg.preprocessing.scale_hu`).
        hu_max: HU mapped to +1 in training.
        head: Output decoding, ``"regions"`` or ``"softmax"`` (:mod:`liverseg.labels`).
        factor: Integer reduction of the training data relative to the original scans (1: none;
            the seed halves, 2). An original-resolution scan is reduced by it before predicting
            and the probabilities are brought back to its grid; a volume already reduced by
            ``liverseg prepare`` is predicted as it is (``prepared=True``).
        spacing_mm: The target spacing the model was trained at, mm per canonical RAS axis
            (``data.spacing_mm``), or None (trained at the data's own spacing, or reduced by
            ``factor``). An original scan is resampled to it before predicting and the
            probabilities are brought back to its grid; a prepared one is predicted as it is.
            It and a ``factor`` above 1 exclude each other.
        patch_size: Cubic patch side in voxels; a multiple of the model's ``size_multiple``.
        overlap: Fraction of a patch shared with its neighbour along each axis, in [0, 1).
        batch_size: Patches per forward pass.
        blending: ``"hann"`` or ``"average"`` weighting of overlapping patch probabilities.
        amp: ``"auto"`` (bf16 autocast on CUDA, fp16 where bf16 is unsupported; bf16 on a CPU
            that runs it natively, fp32 on other CPUs and MPS:
            :func:`liverseg.devices.autocast_dtype`), ``"bf16"``/``"fp16"`` (that autocast dtype
            on any device) or ``"off"`` (fp32).
        tta_flips: Test-time mirroring: each window is also predicted mirrored and the
            probabilities averaged: 1 (none), 2 (left-right), 4 (and anterior-posterior), 8 (and
            inferior-superior: nnU-Net's 8). Costs that many forward passes.
        skip_air_windows: Do not run the model on sliding windows of nothing but air (HU <=
            ``hu_min``, what the model sees as one constant); their voxels get background, and
            every other voxel the same probabilities as without skipping
            (:mod:`liverseg.inference.windows`).
        crop_to_body: Lay the windows over the smallest box holding every voxel above
            ``hu_min`` instead of the whole volume (:func:`liverseg.inference.windows.body_box`):
            fewer windows where the field of view is larger than the body; voxels outside the
            box get background. The windows move, so labels agree with the whole grid's to
            Dice >= 0.99 rather than exactly.
        postprocess: Post-processing steps (:class:`Postprocess`), or None for none.
        provenance: Which checkpoint these settings came from (``checkpoint``, ``epoch``,
            ``liverseg_version``; an ensemble's: ``{"ensemble": [one such dict per
            checkpoint]}``); reports record it. None when built by hand.
    """

    hu_min: float
    hu_max: float
    head: str = "regions"
    factor: int = 1
    spacing_mm: tuple[float, float, float] | None = None
    patch_size: int = 96
    overlap: float = 0.5
    batch_size: int = 2
    blending: str = "hann"
    amp: str = "auto"
    tta_flips: int = 1
    skip_air_windows: bool = True
    crop_to_body: bool = True
    postprocess: Postprocess | None = Postprocess()
    provenance: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.spacing_mm is not None and not spacing_problems(self.spacing_mm):
            object.__setattr__(self, "spacing_mm", tuple(float(v) for v in self.spacing_mm))
        problems = [
            f"{name}={getattr(self, name)!r} (expected a finite number of HU)"
            for name in ("hu_min", "hu_max")
            if not math.isfinite(getattr(self, name))
        ]
        if not self.hu_max > self.hu_min:
            problems.append(f"hu_max ({self.hu_max}) must exceed hu_min ({self.hu_min})")
        for name, choices in (("head", HEADS), ("blending", BLENDINGS), ("amp", AMP_MODES)):
            if getattr(self, name) not in choices:
                problems.append(
                    f"{name}={getattr(self, name)!r}: choose one of {', '.join(choices)}"
                )
        for name in ("factor", "patch_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        problems += spacing_problems(self.spacing_mm)
        if self.spacing_mm is not None and self.factor != 1:
            problems.append(f"spacing_mm and factor={self.factor} exclude each other")
        if self.tta_flips not in TTA_FLIPS:
            problems.append(
                f"tta_flips={self.tta_flips!r}: choose one of {', '.join(map(str, TTA_FLIPS))}"
            )
        if not 0 <= self.overlap < 1:
            problems.append(f"overlap must be a fraction in [0, 1), got {self.overlap}")
        for name in ("skip_air_windows", "crop_to_body"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if problems:
            raise LiversegError("invalid inference settings: " + "; ".join(problems))

    @property
    def min_lesion_mm3(self) -> float:
        """Smallest tumor component counted as a lesion in reports (post-processing's cut)."""
        return self.postprocess.min_tumor_mm3 if self.postprocess is not None else 0.0

    def replace(self, **changes) -> InferenceSettings:
        """A copy with some fields changed (checked again), e.g. ``settings.replace(amp="off")``."""
        return dataclasses.replace(self, **changes)

    def model_differences(self, other: InferenceSettings) -> list[tuple[str, object, object]]:
        """Where ``other`` differs in what defines a model's input and output.

        Returns:
            ``(field, this value, other's value)`` for each field outside :data:`RUN_FIELDS`
            that differs (empty when none does): the models of an ensemble must agree on them.
        """
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.name not in RUN_FIELDS and getattr(self, f.name) != getattr(other, f.name)
        ]


# How the sliding window runs and what follows it: these may differ between the checkpoints of
# an ensemble (the first one's are used). Every other field (HU window, head, factor, spacing,
# patch size) defines what a model sees and what it gives, and must be the same for all.
RUN_FIELDS = (
    "overlap",
    "batch_size",
    "blending",
    "amp",
    "tta_flips",
    "skip_air_windows",
    "crop_to_body",
    "postprocess",
    "provenance",
)


def spacing_problems(spacing) -> list[str]:
    """Why ``spacing`` is not None or three finite positive mm (empty when it is)."""
    if spacing is None:
        return []
    try:
        values = [float(v) for v in spacing]
    except (TypeError, ValueError):
        return [f"spacing_mm={spacing!r} (expected 3 numbers in mm)"]
    if len(values) != 3 or any(isinstance(v, bool) for v in spacing):
        return [f"spacing_mm={spacing!r} (expected 3 numbers in mm)"]
    if not all(math.isfinite(v) and v > 0 for v in values):
        return [f"spacing_mm={spacing!r} (expected 3 finite positive numbers in mm)"]
    return []
