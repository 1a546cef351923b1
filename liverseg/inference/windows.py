"""The sliding window over a scaled CT: which windows run, through which models, how they blend.

The input is a CT in canonical RAS order, scaled to [-1, 1] by the training HU window
(:func:`liverseg.preprocessing.scale_hu`): ``(1, W, H, D)``. Cubic windows of a
``tio.GridSampler`` go through every model of an ensemble and, with test-time mirroring, through
each mirrored pass; their probabilities (not logits) are accumulated per batch, so memory does
not grow with the number of models or passes, averaged, and blended by a ``tio.GridAggregator``
(Hann window or plain average).

Windows of nothing but air are not run (``settings.skip_air_windows``, on by default). Air is a
voxel at the bottom of the HU window, scaled to -1 (HU <= ``hu_min``): the model sees the same
constant there whatever lay below the window (air near -1000 HU, outside-field padding of -1024,
-2048 or -3024, lung, fat below a narrow window), so a window of nothing but air tells it nothing
about liver or tumor, yet costs a full forward pass. Its voxels get background probabilities
(:func:`liverseg.labels.background_probabilities`). The grid itself does not move, so every
voxel that is not air is covered by the same windows with the same weights as without skipping,
and gets the same probabilities. Where skipped and run windows overlap (air voxels only), only
the run windows are blended: ``GridAggregator`` divides the weighted sum by the weights actually
added, in ``"hann"`` and ``"average"`` mode alike (the Hann weights are positive everywhere in a
window); a voxel that no run window covers, whose quotient would be 0/0, is filled with
background instead.

Before that, the grid is laid over the body, not the field of view (``settings.crop_to_body``,
on by default): over the smallest box holding every voxel that is not air, widened to at least
one patch where the volume allows. Everything outside the box is air and gets background, as a
skipped window's voxels do. TotalSegmentator's ``--body_seg`` crops to the body for the same
reason: a CT's field of view is mostly air around the body, and on the benchmark's 256 x 256 x 200
phantom the box needs 48 windows where the whole volume needs 100. Unlike skipping, this moves the
windows, so the probabilities inside the body change slightly (other windows blend there); the
labels agree with the whole grid's at Dice >= 0.99 (``tests/inference/test_windows.py``,
``benchmarks/inference.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from tqdm import tqdm

from liverseg.inference.settings import InferenceSettings
from liverseg.labels import background_probabilities, out_channels, to_probabilities

log = logging.getLogger(__name__)

# The scaled value of every HU at or below the window's lower end: what the model sees of air.
AIR = -1.0


@dataclass(frozen=True)
class Blended:
    """The blended probabilities of a volume and how many windows were run to get them.

    Attributes:
        probabilities: float32 ``(C, W, H, D)``, the input's grid and order.
        windows_run: Windows that went through the models.
        windows_total: Windows of the grid (all of them run when air is not skipped).
    """

    probabilities: torch.Tensor
    windows_run: int
    windows_total: int

    @property
    def skipped_share(self) -> float:
        """Fraction of the grid's windows that were not run (air)."""
        return 1.0 - self.windows_run / self.windows_total


def patch_overlap_voxels(patch_size: int, overlap: float) -> int:
    """The overlap fraction as an even voxel count below ``patch_size`` (GridSampler needs even)."""
    voxels = 2 * int(round(overlap * patch_size / 2))
    return min(voxels, (patch_size - 1) // 2 * 2)


def mirror_dims(tta_flips: int) -> list[tuple[int, ...]]:
    """The batch dims to flip for each pass of test-time mirroring (``()``: the plain pass).

    Patches are ``(B, C, W, H, D)`` in canonical RAS order, so dim 2 is left-right, 3
    anterior-posterior and 4 inferior-superior; ``tta_flips`` = 2 ** (number of those axes).
    """
    axes = (2, 3, 4)[: {1: 0, 2: 1, 4: 2, 8: 3}[tta_flips]]
    return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(tta_flips)]


def blend_windows(
    models: Sequence[torch.nn.Module],
    scaled: torch.Tensor,
    settings: InferenceSettings,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    progress: bool = False,
) -> Blended:
    """Probabilities of a scaled CT from the sliding window, averaged over models and mirrorings.

    Args:
        models: One or more networks in eval mode on ``device``, each mapping ``(B, 1, p, p, p)``
            to logits ``(B, C, p, p, p)`` of ``settings.head``.
        scaled: float32 ``(1, W, H, D)`` in [-1, 1], canonical RAS; any size (padded with air to
            at least one patch).
        settings: Patch size, overlap, batch size, blending, head, mirroring, air skipping,
            cropping to the body.
        device: Where the models run.
        dtype: Autocast dtype, or None for fp32.
        channels_last: Feed the patches channels-last 3D.
        progress: Show a tqdm bar over the windows run.
    """
    shape, patch_size = tuple(scaled.shape[1:]), settings.patch_size
    total = len(_grid(scaled, settings).locations)
    step = patch_size - patch_overlap_voxels(patch_size, settings.overlap)
    box = body_box(scaled, patch_size, step) if settings.crop_to_body else None
    if box is None and settings.crop_to_body:  # nothing but air: no window to run
        log.info("0 of %d sliding windows run (100%% skipped: air)", total)
        return Blended(_background(settings.head, shape), 0, total)
    if box is None or box == tuple(slice(0, n) for n in shape):
        probabilities, run = _blend_grid(
            models, scaled, settings, device, dtype, channels_last, progress
        )
    else:
        inside, run = _blend_grid(
            models, scaled[(slice(None), *box)], settings, device, dtype, channels_last, progress
        )
        probabilities = _background(settings.head, shape)
        probabilities[(slice(None), *box)] = inside
    log.info(
        "%d of %d sliding windows run (%.0f%% skipped: air)", run, total, 100 * (1 - run / total)
    )
    return Blended(probabilities, run, total)


def body_box(scaled: torch.Tensor, patch_size: int, step: int) -> tuple[slice, ...] | None:
    """The box the windows are laid over: the body's, with a margin of air, fitted to the grid.

    Along each axis: the voxels that are not air, widened by a margin of air of
    ``patch_size // 16`` voxels (at least 2) on each side, so that the outermost windows see air
    beyond the body, as they would over the whole field of view, rather than their own padding
    right at the skin; then widened about its centre to the length the windows covering it span
    anyway (``k * step + patch_size``, at least one patch), which costs no window; all within
    the volume (shifted inwards at its borders). Outside the box every voxel is air.

    Args:
        scaled: ``(1, W, H, D)`` scaled CT (air is :data:`AIR`).
        patch_size: Window side in voxels.
        step: Distance between neighbouring windows (the patch less the overlap), voxels.

    Returns:
        One slice per spatial axis, or None when every voxel is air.
    """
    tissue = scaled[0] > AIR
    margin = max(2, patch_size // 16)
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = torch.nonzero(tissue.any(dim=others[1]).any(dim=others[0])).flatten()
        if not len(present):
            return None
        start, stop = int(present[0]) - margin, int(present[-1]) + 1 + margin
        windows = max(math.ceil((stop - start - patch_size) / max(step, 1)), 0) + 1
        span = (windows - 1) * step + patch_size
        start -= (span - (stop - start)) // 2
        n = tissue.shape[axis]
        start = min(max(start, 0), max(n - span, 0))
        box.append(slice(start, min(start + span, n)))
    return tuple(box)


def _grid(tensor: torch.Tensor, settings: InferenceSettings) -> tio.GridSampler:
    """The sliding-window grid over ``tensor``, padded with air to at least one patch."""
    subject = tio.Subject(image=tio.ScalarImage(tensor=_pad_to_patch(tensor, settings)[0]))
    overlap = patch_overlap_voxels(settings.patch_size, settings.overlap)
    return tio.GridSampler(subject, settings.patch_size, overlap)


def _pad_to_patch(
    scaled: torch.Tensor, settings: InferenceSettings
) -> tuple[torch.Tensor, list[int]]:
    """``scaled`` padded with air, centred, to at least one patch; and the ``F.pad`` pads."""
    pads = []
    for n in reversed(scaled.shape[1:]):
        extra = max(settings.patch_size - n, 0)
        pads += [extra // 2, extra - extra // 2]
    return (F.pad(scaled, pads, value=AIR) if any(pads) else scaled), pads


def _blend_grid(models, scaled, settings, device, dtype, channels_last, progress):
    """Blended probabilities over the whole of ``scaled``, and the number of windows run."""
    shape = tuple(scaled.shape[1:])
    tensor, pads = _pad_to_patch(scaled, settings)
    sampler = _grid(tensor, settings)
    locations = torch.as_tensor(np.asarray(sampler.locations), dtype=torch.int64)
    total = len(locations)
    if settings.skip_air_windows:
        keep = [not _all_air(tensor, box) for box in locations.tolist()]
        locations = locations[torch.tensor(keep, dtype=torch.bool)]
    if not len(locations):
        return _background(settings.head, shape), 0
    aggregator = tio.GridAggregator(sampler, overlap_mode=settings.blending)
    _run_windows(
        models, tensor, locations, aggregator, settings, device, dtype, channels_last, progress
    )
    output = aggregator.get_output_tensor()
    if len(locations) < total:
        _fill_uncovered(output, locations, settings.head)
    w0, h0, d0 = pads[4], pads[2], pads[0]
    output = output[:, w0 : w0 + shape[0], h0 : h0 + shape[1], d0 : d0 + shape[2]]
    return output, len(locations)


def _background(head: str, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.tensor(background_probabilities(head), dtype=torch.float32)
    return values.view(-1, 1, 1, 1).expand(out_channels(head), *shape).clone()


def _all_air(tensor: torch.Tensor, box: list[int]) -> bool:
    i0, j0, k0, i1, j1, k1 = box
    return bool(tensor[:, i0:i1, j0:j1, k0:k1].amax() <= AIR)


def _fill_uncovered(output: torch.Tensor, locations: torch.Tensor, head: str) -> None:
    """Background where no run window added a weight (there the aggregator divided 0 by 0)."""
    covered = torch.zeros(output.shape[1:], dtype=torch.bool)
    for i0, j0, k0, i1, j1, k1 in locations.tolist():
        covered[i0:i1, j0:j1, k0:k1] = True
    uncovered = ~covered
    for channel, value in zip(output, background_probabilities(head)):
        channel.masked_fill_(uncovered, value)


def _run_windows(
    models, tensor, locations, aggregator, settings, device, dtype, channels_last, progress
) -> None:
    """Every window at ``locations`` through the models; probabilities into ``aggregator``."""
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
            probabilities = _averaged_probabilities(models, patches, settings, autocast)
            aggregator.add_batch(probabilities, batch_locations)
            bar.update(len(batch_locations))


def _averaged_probabilities(models, patches, settings: InferenceSettings, autocast):
    """Probabilities of a batch, averaged over models and mirrored passes (summed, not stacked)."""
    total = None
    for model in models:
        for dims in mirror_dims(settings.tta_flips):
            inputs = patches.flip(dims) if dims else patches
            with autocast:
                logits = model(inputs)
            probabilities = to_probabilities(logits.float(), settings.head)
            if dims:
                probabilities = probabilities.flip(dims)
            total = probabilities if total is None else total.add_(probabilities)
    passes = len(models) * settings.tta_flips
    return total / passes if passes > 1 else total
