"""Clean a predicted label map: largest liver component, tumor inside the liver, minimum size.

Plain numpy/scipy on a label map and its voxel size, so it runs on any segmentation, not only
liverseg's (``liverseg.inference.volume.predict_volume`` applies it by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from liverseg.constants import BACKGROUND, LIVER, TUMOR

# 26-connectivity for every connected-component step.
_STRUCTURE = ndimage.generate_binary_structure(3, 3)


@dataclass(frozen=True)
class Postprocess:
    """Which post-processing steps :func:`postprocess_labels` applies (all on by default).

    Attributes:
        keep_largest_liver: Keep only the largest 26-connected component of the liver including
            tumor; every voxel of the other components (liver and tumor) becomes BACKGROUND.
        tumor_inside_liver: Tumor components that do not touch the liver dilated by one voxel
            become BACKGROUND: a lesion floating outside the liver is a false positive.
        min_tumor_mm3: Tumor components (26-connected) with a volume below this (mm^3) are
            relabelled LIVER, not removed: the voxels stay in the liver, only the tumor label
            goes. 0 keeps every tumor component.
    """

    keep_largest_liver: bool = True
    tumor_inside_liver: bool = True
    min_tumor_mm3: float = 10.0


def postprocess_labels(
    labels: np.ndarray, spacing_mm: tuple[float, float, float], options: Postprocess
) -> np.ndarray:
    """Clean a predicted label map; each step is switched by ``options`` (see :class:`Postprocess`).

    Order: keep the largest liver component (the rest becomes BACKGROUND), set tumor outside the
    liver to BACKGROUND, then relabel tumor components below ``min_tumor_mm3`` as LIVER (they are
    not removed: with the regions head they were inside the liver region anyway, so the liver
    volume keeps them).

    Args:
        labels: uint8 ``(W, H, D)`` in {BACKGROUND, LIVER, TUMOR}; not modified.
        spacing_mm: Voxel size along W, H, D in mm (for the tumor volume threshold).
        options: The steps to apply.

    Returns:
        A new uint8 label map of the same shape.
    """
    out = np.array(labels, dtype=np.uint8, copy=True)
    box = _foreground_box(out)
    if box is None:
        return out
    # Work on the bounding box of the foreground (a view): connected-component maps are int32,
    # four times the labels' size, so keep them small.
    crop = out[box]
    if options.keep_largest_liver:
        components, count = ndimage.label(crop != BACKGROUND, structure=_STRUCTURE)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            crop[(components != 0) & (components != sizes.argmax())] = BACKGROUND
        del components
    if options.tumor_inside_liver:
        components, count = ndimage.label(crop == TUMOR, structure=_STRUCTURE)
        if count:
            near_liver = ndimage.binary_dilation(crop == LIVER, structure=_STRUCTURE)
            touching = np.unique(components[near_liver & (components > 0)])
            outside = np.setdiff1d(np.arange(1, count + 1), touching)
            crop[np.isin(components, outside)] = BACKGROUND
    if options.min_tumor_mm3 > 0:
        components, count = ndimage.label(crop == TUMOR, structure=_STRUCTURE)
        if count:
            voxel_mm3 = float(np.prod(spacing_mm))
            volumes = np.bincount(components.ravel()) * voxel_mm3
            small = np.flatnonzero(volumes < options.min_tumor_mm3)
            small = small[small > 0]
            crop[np.isin(components, small)] = LIVER
    return out


def _foreground_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the non-background voxels, one voxel wider (for the dilation)."""
    foreground = labels != BACKGROUND
    box = []
    for axis in range(labels.ndim):
        other = tuple(a for a in range(labels.ndim) if a != axis)
        present = np.flatnonzero(foreground.any(axis=other))
        if present.size == 0:
            return None
        box.append(slice(max(present[0] - 1, 0), present[-1] + 2))
    return tuple(box)
