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
"""

from __future__ import annotations

import contextlib
import logging
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
        settings: Patch size, overlap, batch size, blending, head, mirroring, air skipping.
        device: Where the models run.
        dtype: Autocast dtype, or None for fp32.
        channels_last: Feed the patches channels-last 3D.
        progress: Show a tqdm bar over the windows run.
    """
    shape, patch_size = tuple(scaled.shape[1:]), settings.patch_size
    # Pad to at least one patch with the window's lowest value (air), centred.
    pads = []
    for n in reversed(shape):
        extra = max(patch_size - n, 0)
        pads += [extra // 2, extra - extra // 2]
    tensor = F.pad(scaled, pads, value=AIR) if any(pads) else scaled
    subject = tio.Subject(image=tio.ScalarImage(tensor=tensor))
    sampler = tio.GridSampler(
        subject, patch_size, patch_overlap_voxels(patch_size, settings.overlap)
    )
    locations = torch.as_tensor(np.asarray(sampler.locations), dtype=torch.int64)
    total = len(locations)
    if settings.skip_air_windows:
        keep = [not _all_air(tensor, box) for box in locations.tolist()]
        locations = locations[torch.tensor(keep, dtype=torch.bool)]
    log.info(
        "%d of %d sliding windows run (%.0f%% skipped: air)",
        len(locations), total, 100 * (1 - len(locations) / total),
    )  # fmt: skip
    if not len(locations):
        return Blended(_background(settings.head, shape), 0, total)
    aggregator = tio.GridAggregator(sampler, overlap_mode=settings.blending)
    _run_windows(
        models, tensor, locations, aggregator, settings, device, dtype, channels_last, progress
    )
    output = aggregator.get_output_tensor()
    if len(locations) < total:
        _fill_uncovered(output, locations, settings.head)
    w0, h0, d0 = pads[4], pads[2], pads[0]
    output = output[:, w0 : w0 + shape[0], h0 : h0 + shape[1], d0 : d0 + shape[2]]
    return Blended(output, len(locations), total)


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
