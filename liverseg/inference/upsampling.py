"""Probabilities predicted on a reduced grid, brought back to the input grid and decoded to labels.

The inverse of :func:`liverseg.data.downsampling.downsample_image` for the model's output: linear
interpolation between the centres of the reduced voxels (its block-centre grid), slab by slab, so
the float32 full-resolution probabilities never exist for more than a few slices at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from liverseg.labels import to_labels

# Output slices interpolated and decoded at a time after a reduction (factor > 1): bounds the
# float32 memory of the full-resolution probabilities to a few slices.
_SLAB = 16


def upsample_and_decode(
    probabilities: torch.Tensor, shape: tuple, factor: int, head: str, keep: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (and optionally probabilities) on the input grid from reduced probabilities.

    Args:
        probabilities: float32 ``(C, w, h, d)`` on the grid reduced by ``factor``, in the input's
            stored orientation.
        shape: The input's ``(W, H, D)`` in voxels.
        factor: The integer reduction of the input (1: none, the probabilities are decoded as they
            are).
        head: ``"regions"`` or ``"softmax"`` (see :mod:`liverseg.labels`).
        keep: Also return the probabilities on the input grid.

    Returns:
        ``(labels, full)``: uint8 labels of ``shape``, and float32 ``(C, W, H, D)`` probabilities
        when ``keep``, else None.
    """
    if factor == 1:
        labels = to_labels(probabilities, head).numpy()
        return labels, probabilities.numpy() if keep else None
    labels = np.empty(shape, dtype=np.uint8)
    full = np.empty((probabilities.shape[0], *shape), dtype=np.float32) if keep else None
    along = [_linear_weights(n, factor) for n in shape]
    for z0 in range(0, shape[2], _SLAB):
        z1 = min(z0 + _SLAB, shape[2])
        slab_weights = tuple(t[z0:z1] for t in along[2])
        slab = _interpolate_axis(probabilities, 3, slab_weights)
        slab = _interpolate_axis(_interpolate_axis(slab, 2, along[1]), 1, along[0])
        labels[:, :, z0:z1] = to_labels(slab, head).numpy()
        if full is not None:
            full[..., z0:z1] = slab.numpy()
    return labels, full


def _linear_weights(n: int, factor: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input voxel along one axis: reduced neighbours (i0, i1) and weight of i1.

    Reduced voxel ``i`` has its centre at input coordinate ``min(i*factor + (factor-1)/2, n-1)``
    (:mod:`liverseg.data.downsampling`'s block-centre grid); outside the first/last centre the
    value is held.
    """
    centres = np.minimum(np.arange(-(-n // factor)) * factor + (factor - 1) / 2, n - 1)
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
