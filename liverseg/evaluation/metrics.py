"""Overlap and surface-distance metrics of label volumes; numpy/scipy only.

Conventions (shared with nnU-Net, LiTS and MONAI):

- A metric of a class that is absent from both prediction and truth is NaN: there is nothing to
  get right or wrong, and averages must skip it.
- Surfaces are the mask voxels removed by one binary erosion with the 6-neighbourhood (voxels on
  the array border count as surface), as in MONAI's ``get_mask_edges``.
- Distances are Euclidean between voxel centres, in mm, on the real (anisotropic) voxel size.

Lesion-level metrics (components, diameters, detection) are in :mod:`liverseg.evaluation.lesions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from liverseg.constants import DICE_CLASSES, LIVER, TUMOR
from liverseg.geometry import checked_spacing


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2 |A n B| / (|A| + |B|)`` of two masks.

    Args:
        pred: Predicted mask, any shape, bool (non-zero is foreground).
        truth: True mask, same shape.

    Returns:
        Dice in [0, 1]; NaN when both masks are empty.
    """
    pred, truth = as_masks(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def class_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The masks of the evaluated classes, keyed by :data:`liverseg.constants.DICE_CLASSES`.

    Args:
        labels: Integer label volume, values BACKGROUND, LIVER, TUMOR.

    Returns:
        ``liver_excl_tumor`` (label == LIVER), ``liver_incl_tumor`` (LIVER or TUMOR) and
        ``tumor`` (label == TUMOR), bool arrays of the labels' shape.
    """
    labels = np.asarray(labels)
    liver = labels == LIVER
    tumor = labels == TUMOR
    masks = {"liver_excl_tumor": liver, "liver_incl_tumor": liver | tumor, "tumor": tumor}
    assert tuple(masks) == DICE_CLASSES
    return masks


def case_dice(pred_labels: np.ndarray, truth_labels: np.ndarray) -> dict[str, float]:
    """Dice of each class of :data:`~liverseg.constants.DICE_CLASSES` (NaN where absent in both).

    Args:
        pred_labels: Predicted label volume, shape ``(W, H, D)``.
        truth_labels: True label volume, same shape.

    Returns:
        Class name -> Dice.
    """
    pred, truth = class_masks(pred_labels), class_masks(truth_labels)
    return {name: dice_score(pred[name], truth[name]) for name in DICE_CLASSES}


def volume_overlap_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Volume overlap error ``VOE = 1 - |A n B| / |A u B|`` (1 - Jaccard).

    Args:
        pred: Predicted mask.
        truth: True mask, same shape.

    Returns:
        VOE in [0, 1] (0 is perfect); NaN when both masks are empty.
    """
    pred, truth = as_masks(pred, truth)
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return float("nan")
    return 1.0 - int(np.logical_and(pred, truth).sum()) / union


def relative_volume_difference(pred: np.ndarray, truth: np.ndarray) -> float:
    """Relative volume difference ``RVD = (|A| - |B|) / |B|``, A predicted, B true.

    Positive means the prediction is too large (over-segmentation), negative too small.

    Args:
        pred: Predicted mask.
        truth: True mask, same shape.

    Returns:
        RVD as a fraction (0.1 = 10 % too large); NaN when the true mask is empty.
    """
    pred, truth = as_masks(pred, truth)
    truth_count = int(truth.sum())
    if truth_count == 0:
        return float("nan")
    return (int(pred.sum()) - truth_count) / truth_count


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[float, float]:
    """Average symmetric surface distance and 95th-percentile Hausdorff distance, in mm.

    ASSD is the mean of the distances of every surface voxel of either mask to the other mask's
    surface (both directed sets pooled, as in LiTS and MONAI ``symmetric=True``). HD95 is the
    larger of the two directed 95th percentiles (linear interpolation), as in MONAI
    ``compute_hausdorff_distance(percentile=95)`` and medpy ``hd95``.

    Args:
        pred: Predicted mask, shape ``(W, H, D)``.
        truth: True mask, same shape.
        spacing_mm: Voxel size along each axis, mm.

    Returns:
        ``(assd_mm, hd95_mm)``; both NaN when both masks are empty, both ``inf`` when exactly
        one is empty (no surface to measure to).
    """
    pred, truth = as_masks(pred, truth)
    spacing = checked_spacing(spacing_mm, pred.ndim)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return float("nan"), float("nan")
    if has_pred != has_truth:
        return float("inf"), float("inf")
    # Every surface voxel lies inside the union's bounding box: crop there (one voxel of margin)
    # so a small tumor in a 500-slice CT costs a small distance transform.
    box = bounding_box(pred | truth, margin=1)
    pred_surface, truth_surface = _surface(pred[box]), _surface(truth[box])
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[truth_surface]
    assd = float(np.concatenate([to_truth, to_pred]).mean())
    hd95 = float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))
    return assd, hd95


def as_masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two arrays as bool masks of one shape.

    Raises:
        ValueError: The shapes differ.
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    return pred, truth


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the smallest box holding a non-empty mask's voxels.

    Args:
        mask: Bool array, any number of dimensions, at least one voxel set.
        margin: Voxels to add on each side, clipped to the array.

    Returns:
        One slice per axis.
    """
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)
