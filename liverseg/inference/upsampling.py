"""Probabilities predicted on another grid, brought back to the input grid and decoded to labels.

The inverse, for the model's output, of :func:`liverseg.data.downsampling.downsample_image` (an
integer reduction: :func:`block_centres`) and of :func:`liverseg.resampling.resample_image` (a
target spacing: :func:`liverseg.resampling.grid_centres`): linear interpolation between the
centres of the predicted grid's voxels, slab by slab, so the float32 full-resolution
probabilities never exist for more than a few slices at a time.

Quality control (:mod:`liverseg.evaluation.qc`) reads the probabilities of the two nested
regions on the input grid; they are kept as uint8, ``round(255 p)``: one byte per voxel and
region (a quarter of float32), 1/510 from the float value at most.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from liverseg.labels import region_probabilities, to_labels

# Output slices interpolated and decoded at a time on another grid: bounds the
# float32 memory of the full-resolution probabilities to a few slices.
_SLAB = 16


def upsample_and_decode(
    probabilities: torch.Tensor,
    shape: tuple,
    head: str,
    keep: bool,
    centres: Sequence[np.ndarray] | None = None,
    regions: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Labels (and optionally probabilities) on the input grid from probabilities on another.

    Args:
        probabilities: float32 ``(C, w, h, d)`` on the predicted grid, in the input's stored
            orientation.
        shape: The input's ``(W, H, D)`` in voxels.
        head: ``"regions"`` or ``"softmax"`` (see :mod:`liverseg.labels`).
        keep: Also return the probabilities on the input grid.
        centres: Per axis, the input index coordinates of the predicted grid's voxel centres
            (increasing; :func:`block_centres` or :func:`liverseg.resampling.grid_centres`).
            None: the probabilities are on the input grid already and are decoded as they are.
        regions: Also return the two region probabilities on the input grid, quantised.

    Returns:
        ``(labels, full, quantised)``: uint8 labels of ``shape``; float32 ``(C, W, H, D)``
        probabilities when ``keep``, else None; uint8 ``(2, W, H, D)`` region probabilities
        (liver incl. tumor, tumor; :func:`quantise`) when ``regions``, else None.
    """
    if centres is None:
        labels = to_labels(probabilities, head).numpy()
        quantised = quantise(region_probabilities(probabilities, head)) if regions else None
        return labels, probabilities.numpy() if keep else None, quantised
    labels = np.empty(shape, dtype=np.uint8)
    full = np.empty((probabilities.shape[0], *shape), dtype=np.float32) if keep else None
    quantised = np.empty((2, *shape), dtype=np.uint8) if regions else None
    along = [_linear_weights(n, c) for n, c in zip(shape, centres)]
    for z0 in range(0, shape[2], _SLAB):
        z1 = min(z0 + _SLAB, shape[2])
        slab_weights = tuple(t[z0:z1] for t in along[2])
        slab = _interpolate_axis(probabilities, 3, slab_weights)
        slab = _interpolate_axis(_interpolate_axis(slab, 2, along[1]), 1, along[0])
        labels[:, :, z0:z1] = to_labels(slab, head).numpy()
        if full is not None:
            full[..., z0:z1] = slab.numpy()
        if quantised is not None:
            quantised[..., z0:z1] = quantise(region_probabilities(slab, head))
    return labels, full, quantised


def quantise(probabilities: torch.Tensor) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 ``round(255 p)`` (read back as ``q / 255``)."""
    return (probabilities.clamp(0, 1) * 255).round_().to(torch.uint8).numpy()


def block_centres(n: int, factor: int) -> np.ndarray:
    """Centres of an axis of ``n`` reduced by an integer ``factor``, in input index coordinates.

    Reduced voxel ``i`` has its centre at ``min(i*factor + (factor-1)/2, n-1)``
    (:mod:`liverseg.data.downsampling`'s block-centre grid).
    """
    return np.minimum(np.arange(-(-n // factor)) * factor + (factor - 1) / 2, n - 1)


def _linear_weights(n: int, centres: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input voxel along one axis: predicted-grid neighbours (i0, i1) and weight of i1.

    Outside the first/last centre the value is held.
    """
    x = np.arange(n, dtype=np.float64)
    i0 = np.clip(np.searchsorted(centres, x, side="right") - 1, 0, len(centres) - 1)
    i1 = np.minimum(i0 + 1, len(centres) - 1)
    gap = centres[i1] - centres[i0]
    weight = np.where(gap > 0, (x - centres[i0]) / np.where(gap > 0, gap, 1), 0.0)
    weight = np.clip(weight, 0.0, 1.0)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(weight.astype(np.float32))


def _interpolate_axis(values: torch.Tensor, axis: int, weights: tuple) -> torch.Tensor:
    i0, i1, w = weights
    shape = [1] * values.ndim
    shape[axis] = -1
    w = w.view(shape)
    return values.index_select(axis, i0) * (1 - w) + values.index_select(axis, i1) * w
