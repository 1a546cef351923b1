"""Predict a whole volume: GridSampler -> model -> GridAggregator, in the input's own geometry.

The steps of :func:`predict_volume`:

1. Read the CT in HU at its stored dtype (int16 stays int16; no float64 copy;
   :func:`liverseg.io.read_volume`); refuse NaN/Inf or int8 voxels and log a warning for
   implausible HU, with the data doctor's rules (:mod:`liverseg.data.intensities`).
2. Bring the scan to the grid the model was trained at: a model trained at a target spacing
   (``settings.spacing_mm``) gets it resampled to that spacing
   (:func:`liverseg.resampling.resample_image`); a model trained on data reduced by
   ``settings.factor`` > 1 gets it reduced exactly as ``liverseg prepare`` reduced the training
   data (:func:`liverseg.data.downsampling.downsample_image`: antialiased, block-centre grid).
3. Reorient to canonical RAS and apply the training HU window, as the training cache did
   (:mod:`liverseg.preprocessing`).
4. Patches of a ``tio.GridSampler`` go through the model, or each model of an ensemble, in
   batches (mixed precision as ``settings.amp`` says, :mod:`liverseg.devices`); their
   PROBABILITIES (not logits) are averaged and blended by a ``tio.GridAggregator`` (Hann window
   by default); windows of nothing but air are not run, and their voxels are background
   (:mod:`liverseg.inference.windows`).
5. The probabilities go back to the stored orientation and, on another grid, are interpolated
   linearly onto the input grid, slab by slab, and decoded by :func:`liverseg.labels.to_labels`
   (:func:`liverseg.inference.upsampling.upsample_and_decode`).
6. Optional post-processing (:func:`liverseg.inference.postprocess.postprocess_labels`).

The label map has exactly the input's shape and affine. The model and its
:class:`~liverseg.inference.settings.InferenceSettings` come from a checkpoint with
:func:`liverseg.checkpoints.load_model`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio

from liverseg.data.downsampling import downsample_image, downsampled_affine
from liverseg.data.intensities import check_ct_values
from liverseg.devices import autocast_dtype, resolve_device, uses_channels_last
from liverseg.errors import LiversegError
from liverseg.geometry import spacing_mm
from liverseg.inference.postprocess import postprocess_labels
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.upsampling import block_centres, upsample_and_decode
from liverseg.inference.windows import Blended, blend_windows
from liverseg.io import read_volume, source_name
from liverseg.preprocessing import from_canonical, scale_hu, to_canonical
from liverseg.resampling import grid_centres, resample_image, stored_target

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """A predicted volume in the input's geometry.

    Attributes:
        labels: uint8 ``(W, H, D)`` in {BACKGROUND, LIVER, TUMOR}, the input's shape.
        affine: 4 x 4 voxel-to-world matrix (mm), the input's.
        probabilities: float32 ``(C, W, H, D)`` (see :mod:`liverseg.labels` for the channels),
            before post-processing; only when asked for (``keep_probabilities=True``).
        warnings: Why the input's values look implausible for CT in HU (a constant volume, no
            air or no tissue: :func:`liverseg.data.intensities.check_ct_values`); empty if none.
        skipped_share: Fraction of the sliding windows over the whole volume that were not run
            because they held only air (``settings.skip_air_windows``); 0.0 when none was.
        regions: uint8 ``(2, W, H, D)``: the probabilities of the liver region (incl. tumor) and
            of the tumor region, ``round(255 p)``, before post-processing; only when asked for
            (``keep_regions=True``; what :func:`liverseg.evaluation.qc.case_qc` reads).
    """

    labels: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)
    skipped_share: float = 0.0
    regions: np.ndarray | None = field(default=None, repr=False)


def predict_volume(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    image: str | Path | tio.ScalarImage | nib.Nifti1Image,
    settings: InferenceSettings,
    *,
    prepared: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    keep_probabilities: bool = False,
    keep_regions: bool = False,
) -> Prediction:
    """Segment a whole CT volume in its own geometry.

    Args:
        model: Maps ``(B, 1, p, p, p)`` to logits ``(B, C, p, p, p)``; needs ``size_multiple``
            (1 assumed when absent). Its train/eval mode and device are restored afterwards.
            Several models (an ensemble, e.g. the folds of a cross-validation): their
            probabilities are averaged per window, with any mirrored passes; they must share
            ``settings`` (:func:`liverseg.checkpoints.load_models` checks their checkpoints).
        image: HU volume: a NIfTI path, a ``tio.ScalarImage`` or a nibabel image; any shape,
            orientation and spacing.
        settings: How to predict (:func:`liverseg.checkpoints.load_model` gives the
            checkpoint's).
        prepared: ``image`` is already on the model's grid (reduced by ``liverseg prepare`` by
            ``settings.factor``, or at ``settings.spacing_mm``): predict it at its own
            resolution. False: it is an original scan, resampled to ``settings.spacing_mm`` or
            reduced by ``settings.factor`` first (nothing to do when neither applies).
        device: Where to run; None: the (first) model's device.
        progress: Show a tqdm bar over patches.
        keep_probabilities: Also return the probabilities on the input grid (float32, C times
            the volume's voxels: large).
        keep_regions: Also return the two region probabilities on the input grid as uint8 (two
            bytes per voxel), for quality control and lesion confidences.

    Returns:
        The prediction; ``labels`` has the input's shape and ``affine`` is the input's.

    Raises:
        DataError: Unreadable image, or voxels that cannot be segmented (NaN/Inf, int8 HU:
            :func:`liverseg.data.intensities.check_ct_values`); implausible HU (a constant
            volume, no air or no tissue) are logged and returned in ``warnings``.
        LiversegError: No model, or a patch size that is not a multiple of a model's size
            multiple.
    """
    models = [model] if isinstance(model, torch.nn.Module) else list(model)
    if not models:
        raise LiversegError("predict_volume needs a model or a non-empty sequence of models")
    for each in models:
        _check_patch_size(each, settings.patch_size)
    hu, affine = read_volume(image)
    warnings = check_ct_values(hu, source_name(image))
    for warning in warnings:
        log.warning("%s: %s", source_name(image), warning)
    device = _target_device(models[0], device)
    dtype = autocast_dtype(settings.amp, device, inference=True)
    channels_last = uses_channels_last(device, dtype)
    reduced, reduced_affine, centres = _model_grid(hu, affine, settings, prepared)
    with contextlib.ExitStack() as stack:
        for each in models:
            stack.enter_context(_inference_state(each, device, channels_last=channels_last))
        blended = _sliding_window(
            models, reduced, reduced_affine, settings, device, dtype, channels_last, progress
        )
    labels, full_probabilities, regions = upsample_and_decode(
        blended.probabilities, hu.shape, settings.head, keep_probabilities, centres, keep_regions
    )
    if settings.postprocess is not None:
        labels = postprocess_labels(labels, spacing_mm(affine), settings.postprocess)
    return Prediction(
        labels=labels,
        affine=affine.copy(),
        probabilities=full_probabilities,
        warnings=warnings,
        skipped_share=blended.skipped_share,
        regions=regions,
    )


def _model_grid(hu: np.ndarray, affine: np.ndarray, settings: InferenceSettings, prepared: bool):
    """The CT on the grid the model was trained at: ``(volume, affine, centres)``.

    ``centres`` (per axis, that grid's voxel centres in the input's index coordinates) is None
    when the input is predicted on its own grid: ``prepared``, or neither a target spacing nor a
    reduction factor applies.
    """
    if prepared:
        return hu, affine, None
    if settings.spacing_mm is not None:
        target = stored_target(affine, settings.spacing_mm)
        resampled, new_affine = resample_image(hu, affine, target)
        if resampled is hu:
            return hu, affine, None
        return (
            resampled,
            new_affine,
            [grid_centres(n, m) for n, m in zip(hu.shape, resampled.shape)],
        )
    if settings.factor > 1:
        return (
            downsample_image(hu, settings.factor),
            downsampled_affine(affine, settings.factor),
            [block_centres(n, settings.factor) for n in hu.shape],
        )
    return hu, affine, None


def _target_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` resolved; None: the model's own (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def _inference_state(model: torch.nn.Module, device: torch.device, channels_last: bool):
    """Eval mode on ``device`` (channels-last 3D weights if asked); restore all on exit.

    See :func:`liverseg.devices.uses_channels_last` for when channels-last is used. Every 5D
    weight not yet channels-last is converted; the first conv's (in_channels=1) counts as
    channels-last already, so it says nothing about the others. The converted parameters get
    their original tensors (same storage and strides) back on exit.
    """
    param = next(model.parameters(), None)
    was_training = model.training
    old_device = param.device if param is not None else device
    converted: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    model.eval()
    try:
        if old_device != device:
            model.to(device)
        if channels_last:
            for weight in model.parameters():
                if weight.ndim == 5 and not weight.is_contiguous(
                    memory_format=torch.channels_last_3d
                ):
                    converted.append((weight, weight.data))
                    weight.data = weight.data.contiguous(memory_format=torch.channels_last_3d)
        yield
    finally:
        for weight, original in converted:
            weight.data = original
        if old_device != device:
            model.to(old_device)
        model.train(was_training)


def _check_patch_size(model: torch.nn.Module, patch_size: int) -> None:
    multiple = int(getattr(model, "size_multiple", 1))
    if patch_size % multiple:
        lower = max(multiple, patch_size // multiple * multiple)
        raise LiversegError(
            f"patch_size {patch_size} must be a positive multiple of the model's size multiple "
            f"{multiple}; use {lower} or {lower + multiple}"
        )


def _sliding_window(
    models: Sequence[torch.nn.Module],
    hu: np.ndarray,
    affine: np.ndarray,
    settings: InferenceSettings,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    progress: bool,
) -> Blended:
    """Blended probabilities ``(C, W, H, D)`` float32 on the grid and orientation of ``hu``."""
    canonical, _ = to_canonical(hu, affine)
    scaled = torch.from_numpy(scale_hu(canonical, settings.hu_min, settings.hu_max))[None]
    blended = blend_windows(models, scaled, settings, device, dtype, channels_last, progress)
    # Back to the stored orientation; channels last for nibabel, then first again.
    stored = from_canonical(blended.probabilities.permute(1, 2, 3, 0).numpy(), affine)
    probabilities = torch.from_numpy(np.ascontiguousarray(np.moveaxis(stored, -1, 0)))
    return dataclasses.replace(blended, probabilities=probabilities)
