"""The one preprocessing of CT intensities and orientation, for the training cache AND inference.

Training (:mod:`liverseg.training.cache`) and inference (:mod:`liverseg.inference.volume`) both call
:func:`scale_hu` and :func:`to_canonical`, so a model sees the same intensities and axis order
at inference as in training; ``tests/training/test_cache.py`` checks it on one case. numpy and
nibabel only.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def scale_hu(hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Clip CT to a fixed HU window and map it linearly to (-1, 1).

    A fixed window (not each volume's min/max) keeps a given tissue at the same value in every
    case, in training and at inference. The arithmetic is torchio's ``Clamp`` followed by
    ``RescaleIntensity(out_min_max=(-1, 1), in_min_max=(hu_min, hu_max))``, in float32.

    Args:
        hu: CT in HU, any shape and numeric dtype; not modified.
        hu_min: HU mapped to -1; lower values are clipped.
        hu_max: HU mapped to +1; higher values are clipped.

    Returns:
        A new C-contiguous float32 array of ``hu``'s shape, values in [-1, 1].

    Raises:
        ValueError: ``hu_max`` is not above ``hu_min``.
    """
    if not hu_max > hu_min:
        raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
    scaled = np.array(hu, dtype=np.float32, order="C", copy=True)
    np.clip(scaled, hu_min, hu_max, out=scaled)
    scaled -= hu_min
    scaled /= hu_max - hu_min
    scaled *= 2.0
    scaled -= 1.0
    return scaled


def to_canonical(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A volume reordered to the closest canonical (RAS+) axis order, as nibabel's
    ``as_closest_canonical`` does: axis permutations and flips only, never resampling.

    Args:
        volume: ``(W, H, D)`` or ``(W, H, D, C)`` voxels in the stored order of ``affine``.
        affine: 4 x 4 voxel-to-scanner matrix, mm.

    Returns:
        ``(canonical, ras_affine)``: a view of ``volume`` in RAS+ order and its affine.
    """
    to_ras = io_orientation(affine)
    ras_affine = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(to_ras, volume.shape[:3])
    return apply_orientation(volume, to_ras), ras_affine


def from_canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical`: a RAS+ ordered volume back in the stored order of ``affine``.

    Args:
        volume: ``(W, H, D)`` or ``(W, H, D, C)`` voxels in RAS+ order.
        affine: The stored (original) 4 x 4 affine.

    Returns:
        A view of ``volume`` in the stored axis order.
    """
    return apply_orientation(volume, ornt_transform(_RAS, io_orientation(affine)))
