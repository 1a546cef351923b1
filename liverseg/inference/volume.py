"""Predict a whole volume: GridSampler -> model -> GridAggregator, in the input's own geometry.

The steps of :func:`predict_volume`:

1. Read the CT in HU at its stored dtype (int16 stays int16; no float64 copy;
   :func:`liverseg.io.read_volume`); refuse NaN/Inf or int8 voxels and log a warning for
   implausible HU, with the data doctor's rules (:mod:`liverseg.data.intensities`).
2. An original-resolution scan and a model trained on data reduced by ``settings.factor`` > 1:
   reduce it exactly as ``liverseg prepare`` reduced the training data
   (:func:`liverseg.data.downsampling.downsample_image`: antialiased, block-centre grid).
3. Reorient to canonical RAS and apply the training HU window, as the training cache did
   (:mod:`liverseg.preprocessing`), then pad to at least one patch.
4. Patches of a ``tio.GridSampler`` go through the model in batches (mixed precision as
   ``settings.amp`` says, :mod:`liverseg.devices`); their PROBABILITIES (not logits) are blended
   by a ``tio.GridAggregator`` (Hann window by default).
5. The probabilities go back to the stored orientation and, after a reduction, are interpolated
   linearly onto the input grid, slab by slab, and decoded by :func:`liverseg.labels.to_labels`
   (:func:`liverseg.inference.upsampling.upsample_and_decode`).
6. Optional post-processing (:func:`liverseg.inference.postprocess.postprocess_labels`).

The label map has exactly the input's shape and affine. The model and its
:class:`~liverseg.inference.settings.InferenceSettings` come from a checkpoint with
:func:`liverseg.checkpoints.load_model`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from tqdm import tqdm

from liverseg.data.downsampling import downsample_image, downsampled_affine
from liverseg.data.intensities import check_ct_values
from liverseg.devices import autocast_dtype, resolve_device, uses_channels_last
from liverseg.errors import LiversegError
from liverseg.geometry import spacing_mm
from liverseg.inference.postprocess import postprocess_labels
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.upsampling import upsample_and_decode
from liverseg.io import read_volume, source_name
from liverseg.labels import to_probabilities
from liverseg.preprocessing import from_canonical, scale_hu, to_canonical

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
    """

    labels: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)


def predict_volume(
    model: torch.nn.Module,
    image: str | Path | tio.ScalarImage | nib.Nifti1Image,
    settings: InferenceSettings,
    *,
    prepared: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    keep_probabilities: bool = False,
) -> Prediction:
    """Segment a whole CT volume in its own geometry.

    Args:
        model: Maps ``(B, 1, p, p, p)`` to logits ``(B, C, p, p, p)``; needs ``size_multiple``
            (1 assumed when absent). Its train/eval mode and device are restored afterwards.
        image: HU volume: a NIfTI path, a ``tio.ScalarImage`` or a nibabel image; any shape,
            orientation and spacing.
        settings: How to predict (:func:`liverseg.checkpoints.load_model` gives the
            checkpoint's).
        prepared: ``image`` was already reduced by ``liverseg prepare`` (by ``settings.factor``):
            predict it at its own resolution. False: it is an original-resolution scan, reduced
            by ``settings.factor`` first (nothing to do when the factor is 1).
        device: Where to run; None: the model's device.
        progress: Show a tqdm bar over patches.
        keep_probabilities: Also return the probabilities on the input grid (float32, C times
            the volume's voxels: large).

    Returns:
        The prediction; ``labels`` has the input's shape and ``affine`` is the input's.

    Raises:
        DataError: Unreadable image, or voxels that cannot be segmented (NaN/Inf, int8 HU:
            :func:`liverseg.data.intensities.check_ct_values`); implausible HU (a constant
            volume, no air or no tissue) are logged and returned in ``warnings``.
        LiversegError: A patch size that is not a multiple of the model's size multiple.
    """
    _check_patch_size(model, settings.patch_size)
    factor = 1 if prepared else settings.factor
    hu, affine = read_volume(image)
    warnings = check_ct_values(hu, source_name(image))
    for warning in warnings:
        log.warning("%s: %s", source_name(image), warning)
    device = _target_device(model, device)
    dtype = autocast_dtype(settings.amp, device)
    channels_last = uses_channels_last(device, dtype)
    with _inference_state(model, device, channels_last=channels_last):
        if factor > 1:
            reduced, reduced_affine = (
                downsample_image(hu, factor),
                downsampled_affine(affine, factor),
            )
        else:
            reduced, reduced_affine = hu, affine
        probabilities = _sliding_window(
            model, reduced, reduced_affine, settings, device, dtype, channels_last, progress
        )
    labels, full_probabilities = upsample_and_decode(
        probabilities, hu.shape, factor, settings.head, keep_probabilities
    )
    if settings.postprocess is not None:
        labels = postprocess_labels(labels, spacing_mm(affine), settings.postprocess)
    return Prediction(
        labels=labels, affine=affine.copy(), probabilities=full_probabilities, warnings=warnings
    )


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


def mirror_dims(tta_flips: int) -> list[tuple[int, ...]]:
    """The batch dims to flip for each pass of test-time mirroring (``()``: the plain pass).

    Patches are ``(B, C, W, H, D)`` in canonical RAS order, so dim 2 is left-right, 3
    anterior-posterior and 4 inferior-superior; ``tta_flips`` = 2 ** (number of those axes).
    """
    axes = (2, 3, 4)[: {1: 0, 2: 1, 4: 2, 8: 3}[tta_flips]]
    return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(tta_flips)]


def _mirrored_probabilities(model, patches, settings: InferenceSettings, autocast) -> torch.Tensor:
    """Probabilities of a batch, averaged over the mirrored passes (accumulated, not stacked)."""
    total = None
    for dims in mirror_dims(settings.tta_flips):
        inputs = patches.flip(dims) if dims else patches
        with autocast:
            logits = model(inputs)
        probabilities = to_probabilities(logits.float(), settings.head)
        if dims:
            probabilities = probabilities.flip(dims)
        total = probabilities if total is None else total.add_(probabilities)
    return total / settings.tta_flips if settings.tta_flips > 1 else total


def _check_patch_size(model: torch.nn.Module, patch_size: int) -> None:
    multiple = int(getattr(model, "size_multiple", 1))
    if patch_size % multiple:
        lower = max(multiple, patch_size // multiple * multiple)
        raise LiversegError(
            f"patch_size {patch_size} must be a positive multiple of the model's size multiple "
            f"{multiple}; use {lower} or {lower + multiple}"
        )


def patch_overlap_voxels(patch_size: int, overlap: float) -> int:
    """The overlap fraction as an even voxel count below ``patch_size`` (GridSampler needs even)."""
    voxels = 2 * int(round(overlap * patch_size / 2))
    return min(voxels, (patch_size - 1) // 2 * 2)


def _sliding_window(
    model: torch.nn.Module,
    hu: np.ndarray,
    affine: np.ndarray,
    settings: InferenceSettings,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    progress: bool,
) -> torch.Tensor:
    """Blended probabilities ``(C, W, H, D)`` float32 on the grid and orientation of ``hu``."""
    canonical, ras_affine = to_canonical(hu, affine)
    tensor = torch.from_numpy(scale_hu(canonical, settings.hu_min, settings.hu_max))[None]
    shape, patch_size = tensor.shape[1:], settings.patch_size
    # Pad to at least one patch with the window's lowest value (air), centred.
    pads = []
    for n in reversed(shape):
        extra = max(patch_size - n, 0)
        pads += [extra // 2, extra - extra // 2]
    if any(pads):
        tensor = F.pad(tensor, pads, value=-1.0)
    subject = tio.Subject(image=tio.ScalarImage(tensor=tensor, affine=ras_affine))
    sampler = tio.GridSampler(
        subject, patch_size, patch_overlap_voxels(patch_size, settings.overlap)
    )
    aggregator = tio.GridAggregator(sampler, overlap_mode=settings.blending)
    locations = torch.as_tensor(np.asarray(sampler.locations), dtype=torch.int64)
    _run_patches(
        model, tensor, locations, aggregator, settings, device, dtype, channels_last, progress
    )
    output = aggregator.get_output_tensor()
    w0, h0, d0 = pads[4], pads[2], pads[0]
    output = output[:, w0 : w0 + shape[0], h0 : h0 + shape[1], d0 : d0 + shape[2]]
    # Back to the stored orientation; channels last for nibabel, then first again.
    stored = from_canonical(output.permute(1, 2, 3, 0).numpy(), affine)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(stored, -1, 0)))


def _run_patches(
    model, tensor, locations, aggregator, settings, device, dtype, channels_last, progress
) -> None:
    """Every patch at ``locations`` through the model; probabilities into ``aggregator``."""
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    bar = tqdm(
        total=len(locations), desc="patches", unit="patch", leave=False, disable=not progress
    )
    with torch.inference_mode(), bar:
        for start in range(0, len(locations), settings.batch_size):
            batch_locations = locations[start : start + settings.batch_size]
            patches = torch.stack(
                [
                    tensor[:, i0:i1, j0:j1, k0:k1]
                    for i0, j0, k0, i1, j1, k1 in batch_locations.tolist()
                ]
            )
            patches = patches.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            probabilities = _mirrored_probabilities(model, patches, settings, autocast)
            aggregator.add_batch(probabilities, batch_locations)
            bar.update(len(batch_locations))
