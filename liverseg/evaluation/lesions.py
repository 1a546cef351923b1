"""Lesion-level metrics of tumor masks: components, axial diameters, detection; numpy/scipy only.

Conventions, besides those of :mod:`liverseg.evaluation.metrics` (NaN where undefined, mm on
the real voxel geometry):

- Lesions are 26-connected components; a volume is a voxel count times ``|det(affine)|``.
- Diameters come from :func:`liverseg.geometry.axial_diameters`, the same measure as the report's
  lesion table, so a lesion's size class and its reported long axis always agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from liverseg.evaluation.metrics import as_masks, bounding_box
from liverseg.geometry import axial_diameters, checked_affine, voxel_volume_mm3

SIZE_CLASSES = ("<10mm", "10-20mm", ">20mm")
"""Lesion size classes on the longest axial diameter: d < 10, 10 <= d <= 20, d > 20 mm."""

DETECTION_RULE = (
    "lesions are 26-connected components; a true lesion is found when any predicted lesion "
    "overlaps it by >= 1 voxel; a predicted lesion is a true positive when it overlaps any true "
    "lesion by >= 1 voxel"
)


def lesions(
    mask: np.ndarray, voxel_mm3: float, min_volume_mm3: float = 0.0
) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of a mask, keeping those of at least a volume.

    Args:
        mask: Tumor mask, shape ``(W, H, D)``.
        voxel_mm3: Volume of one voxel, mm^3 (:func:`liverseg.geometry.voxel_volume_mm3`).
        min_volume_mm3: Components smaller than this are dropped (set to 0).

    Returns:
        ``(labeled, count)``: int32 array of the mask's shape, 0 outside lesions and
        1..count inside, numbered in scan order; and the number of lesions kept.
    """
    mask = np.asarray(mask, dtype=bool)
    labeled, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    labeled = labeled.astype(np.int32, copy=False)
    if count == 0 or min_volume_mm3 <= 0:
        return labeled, int(count)
    sizes = np.bincount(labeled.ravel(), minlength=count + 1)
    keep = sizes * voxel_mm3 >= min_volume_mm3
    keep[0] = False
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return relabel[labeled], int(keep.sum())


def ranked_lesions(
    mask: np.ndarray, voxel_mm3: float, min_volume_mm3: float = 0.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Label the 26-connected components of a mask by size: lesion 1 is the largest.

    The numbering of the report's lesion table and of the QC block's lesion ids; equal sizes
    keep scan order.

    Args:
        mask: Tumor mask, shape ``(W, H, D)``.
        voxel_mm3: Volume of one voxel, mm^3.
        min_volume_mm3: Components smaller than this are not lesions (set to 0, counted apart).

    Returns:
        ``(labeled, voxels, small)``: int32 array of the mask's shape, 0 outside lesions and
        1..n inside; int64 ``(n,)`` voxel counts, ``voxels[k - 1]`` that of lesion ``k``
        (non-increasing); and how many components were smaller than ``min_volume_mm3``.
    """
    mask = np.asarray(mask, dtype=bool)
    labeled, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(labeled.ravel(), minlength=count + 1)
    # Threshold on voxel count times |det| so the cut agrees with the reported volumes.
    kept = np.flatnonzero(sizes[1:] * voxel_mm3 >= min_volume_mm3) + 1
    order = kept[np.argsort(-sizes[kept], kind="stable")]
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return relabel[labeled], sizes[order].astype(np.int64), int(count - order.size)


def lesion_detection(
    pred_tumor: np.ndarray,
    truth_tumor: np.ndarray,
    affine: np.ndarray,
    min_volume_mm3: float = 0.0,
) -> dict:
    """Lesion-wise detection counts, recall, precision and F1, overall and by lesion size.

    Rule: see :data:`DETECTION_RULE`. Size classes (:data:`SIZE_CLASSES`) use each true lesion's
    longest axial diameter, in the axial slice where it is largest; recall is given per class
    (precision has no true size for a false positive).

    Args:
        pred_tumor: Predicted tumor mask, shape ``(W, H, D)``.
        truth_tumor: True tumor mask, same shape.
        affine: 4 x 4 voxel-to-scanner matrix of the truth, mm (voxel volume, axial axis and
            diameters come from it).
        min_volume_mm3: Lesions (predicted and true) below this volume are ignored.

    Returns:
        ``true_lesions``, ``found`` (true lesions found), ``pred_lesions``, ``true_positive``
        (predicted lesions that hit one), ``recall``, ``precision``, ``f1`` (NaN when undefined)
        and ``by_size``: class -> ``{"found", "total", "recall"}``. :func:`pool_detection`
        combines several cases' results.
    """
    pred_tumor, truth_tumor = as_masks(pred_tumor, truth_tumor)
    affine = checked_affine(affine)
    voxel_mm3 = voxel_volume_mm3(affine)
    counts = _empty_detection()
    if pred_tumor.any() or truth_tumor.any():
        box = bounding_box(pred_tumor | truth_tumor, margin=0)
        pred_labeled, counts["pred_lesions"] = lesions(pred_tumor[box], voxel_mm3, min_volume_mm3)
        truth_labeled, counts["true_lesions"] = lesions(truth_tumor[box], voxel_mm3, min_volume_mm3)
        found_ids = np.unique(truth_labeled[pred_labeled > 0])
        found_ids = set(found_ids[found_ids > 0].tolist())
        hit_ids = np.unique(pred_labeled[truth_labeled > 0])
        counts["found"] = len(found_ids)
        counts["true_positive"] = int((hit_ids > 0).sum())
        for index, region in enumerate(ndimage.find_objects(truth_labeled), start=1):
            if region is None:
                continue
            long_mm, _, _ = axial_diameters(truth_labeled[region] == index, affine)
            size = counts["by_size"][size_class(long_mm)]
            size["total"] += 1
            size["found"] += int(index in found_ids)
    return _with_rates(counts)


def size_class(diameter_mm: float) -> str:
    """The :data:`SIZE_CLASSES` entry of a longest axial diameter in mm."""
    if diameter_mm < 10.0:
        return SIZE_CLASSES[0]
    if diameter_mm <= 20.0:
        return SIZE_CLASSES[1]
    return SIZE_CLASSES[2]


def pool_detection(results: Sequence[dict]) -> dict:
    """Sum the counts of several :func:`lesion_detection` results and recompute the rates.

    Args:
        results: Per-case detection dicts.

    Returns:
        A detection dict of the same form, pooled over all lesions of all cases.
    """
    pooled = _empty_detection()
    for result in results:
        for key in ("true_lesions", "found", "pred_lesions", "true_positive"):
            pooled[key] += result[key]
        for name in SIZE_CLASSES:
            for key in ("found", "total"):
                pooled["by_size"][name][key] += result["by_size"][name][key]
    return _with_rates(pooled)


def _empty_detection() -> dict:
    return {
        "true_lesions": 0,
        "found": 0,
        "pred_lesions": 0,
        "true_positive": 0,
        "by_size": {name: {"found": 0, "total": 0} for name in SIZE_CLASSES},
    }


def _with_rates(counts: dict) -> dict:
    recall = _ratio(counts["found"], counts["true_lesions"])
    precision = _ratio(counts["true_positive"], counts["pred_lesions"])
    if np.isnan(recall) or np.isnan(precision):
        f1 = float("nan")
    elif recall + precision == 0:
        f1 = 0.0
    else:
        f1 = 2 * recall * precision / (recall + precision)
    counts.update(recall=recall, precision=precision, f1=f1)
    for size in counts["by_size"].values():
        size["recall"] = _ratio(size["found"], size["total"])
    return counts


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")
