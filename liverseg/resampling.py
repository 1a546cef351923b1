"""The one resampling to a target spacing (mm), for the training cache AND inference.

nnU-Net's "one physical scale": with ``data.spacing_mm`` set, every training case is resampled to
that spacing in the cache (:mod:`liverseg.training.cache`) and every scan to predict is resampled
to it before the sliding window (:mod:`liverseg.inference.volume`), its probabilities brought back
to the scan's own grid by :func:`liverseg.inference.upsampling.upsample_and_decode`. The model
therefore sees a liver of the same size in voxels whatever the scanner's spacing.

The grid: along an axis of ``n`` voxels of spacing ``s``, the resampled axis has
``m = max(1, round(n * s / t))`` voxels of spacing ``n * s / m`` (the target ``t`` up to rounding,
so that the field of view is kept exactly), and resampled voxel ``i`` has its centre at input
index ``(i + 0.5) * n / m - 0.5`` (torch's ``align_corners=False``). :func:`grid_centres` gives
those centres, :func:`resampled_affine` the affine.

Images are low-pass filtered along axes that get coarser (Gaussian, sigma ``(r - 1) / 2`` input
voxels for a ratio ``r = t / s``, as scikit-image's antialiasing) and interpolated linearly;
labels are interpolated linearly as regions (liver incl. tumor, tumor) and thresholded at 0.5, so
thin structures do not vanish or grow as nearest-neighbour does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import io_orientation
from scipy.ndimage import gaussian_filter1d

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.geometry import spacing_mm


def stored_target(affine: np.ndarray, target_ras: Sequence[float]) -> tuple[float, float, float]:
    """A target spacing given in canonical RAS axis order, in the stored axis order of ``affine``.

    ``data.spacing_mm`` is in RAS order (x: left-right, y: anterior-posterior, z: slices), the
    order the model sees; a scan stored in another axis order (LPS, sagittal...) gets each of its
    stored axes the target of the RAS axis it maps to.
    """
    ornt = io_orientation(affine)
    return tuple(float(target_ras[int(ornt[axis, 0])]) for axis in range(3))


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, int, int]:
    """``max(1, round(n * s / t))`` per axis: the voxel counts at the target spacing."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def grid_centres(n: int, m: int) -> np.ndarray:
    """Input index coordinates of the ``m`` resampled voxels' centres along an axis of ``n``."""
    return (np.arange(m, dtype=np.float64) + 0.5) * (n / m) - 0.5


def resampled_affine(
    affine: np.ndarray, shape: Sequence[int], new_shape: Sequence[int]
) -> np.ndarray:
    """The affine of the resampled grid: columns scaled by ``n / m``, origin at voxel 0's centre."""
    ratio = np.array([n / m for n, m in zip(shape, new_shape)], dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(ratio)
    index_map[:3, 3] = 0.5 * ratio - 0.5
    return np.asarray(affine, dtype=np.float64) @ index_map


def needs_resampling(shape: Sequence[int], new_shape: Sequence[int], spacing, target) -> bool:
    """False when the grid would not change.

    That is when each axis already holds the voxel count that resampling gives: the same
    counts and spacing within 1%, or a field of view ``n * s`` within half a target voxel of
    ``n * t`` (a grid written by this resampling, whose spacing ``n0 * s0 / n`` differs from
    the target by up to half a voxel over the axis; read back from a float32 NIfTI header a
    rounding tie such as 18.5 must not flip to 19 and resample it again).
    """
    same_shape = tuple(shape) == tuple(new_shape)
    if same_shape and all(abs(s - t) <= 0.01 * t for s, t in zip(spacing, target)):
        return False
    return not all(abs(n * s / t - n) <= 0.5 + 1e-6 * n for n, s, t in zip(shape, spacing, target))


def resample_image(
    volume: np.ndarray, affine: np.ndarray, target: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """A CT resampled to ``target`` spacing (stored axis order): float32 and its new affine.

    Args:
        volume: ``(W, H, D)`` HU in the stored order of ``affine``, any numeric dtype.
        affine: 4 x 4 voxel-to-scanner matrix, mm.
        target: Spacing in mm per STORED axis (:func:`stored_target` converts from RAS).

    Returns:
        ``(resampled, new_affine)``; the input itself (as float32 only if needed) when the grid
        would not change.
    """
    new_shape = _new_grid(volume.shape, affine, target)
    if new_shape is None:
        return volume, np.asarray(affine, dtype=np.float64)
    smoothed = np.asarray(volume, dtype=np.float32)
    for axis, (n, m) in enumerate(zip(volume.shape, new_shape)):
        ratio = n / m
        if ratio > 1:
            smoothed = gaussian_filter1d(smoothed, sigma=(ratio - 1) / 2, axis=axis, mode="nearest")
    resampled = _interpolate(np.ascontiguousarray(smoothed, dtype=np.float32), new_shape)
    return resampled, resampled_affine(affine, volume.shape, new_shape)


def resample_labels(
    labels: np.ndarray, affine: np.ndarray, target: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """A label map resampled to ``target`` spacing (stored axis order): uint8, new affine.

    Liver-incl.-tumor and tumor are interpolated linearly as two regions and thresholded at 0.5
    (tumor wins), one region at a time to bound memory.
    """
    new_shape = _new_grid(labels.shape, affine, target)
    if new_shape is None:
        return labels, np.asarray(affine, dtype=np.float64)
    out = np.full(new_shape, BACKGROUND, dtype=np.uint8)
    for value, region in ((LIVER, labels != BACKGROUND), (TUMOR, labels == TUMOR)):
        inside = _interpolate(region.astype(np.float32), new_shape) >= 0.5
        out[inside] = value
    return out, resampled_affine(affine, labels.shape, new_shape)


def _new_grid(shape, affine: np.ndarray, target) -> tuple[int, int, int] | None:
    """The resampled voxel counts, or None when the grid would not change."""
    spacing = spacing_mm(affine)
    new_shape = resampled_shape(shape, spacing, target)
    return new_shape if needs_resampling(shape, new_shape, spacing, target) else None


def _interpolate(volume: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Trilinear interpolation onto :func:`grid_centres` (torch, ``align_corners=False``)."""
    tensor = torch.from_numpy(volume)[None, None]
    out = F.interpolate(tensor, size=tuple(new_shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()
