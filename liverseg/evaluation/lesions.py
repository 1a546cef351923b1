"""Lesion-level metrics of tumor masks: components, axial diameters, detection; numpy/scipy only.

Conventions, besides those of :mod:`liverseg.evaluation.metrics` (NaN where undefined, mm on the real voxel
size):

- Lesions are 26-connected components.
- In-plane diameters are measured between voxel centres: a lesion ``n`` voxels wide along an axis
  of spacing ``s`` measures ``(n - 1) * s`` along it, and a one-voxel lesion measures 0 mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from liverseg.evaluation.metrics import _as_masks, _spacing, bounding_box

SIZE_CLASSES = ("<10mm", "10-20mm", ">20mm")
"""Lesion size classes on the longest axial diameter: d < 10, 10 <= d <= 20, d > 20 mm."""

DETECTION_RULE = (
    "lesions are 26-connected components; a true lesion is found when any predicted lesion "
    "overlaps it by >= 1 voxel; a predicted lesion is a true positive when it overlaps any true "
    "lesion by >= 1 voxel"
)

# Pairs of boundary points are compared in blocks of this many rows to bound memory.
_PAIR_BLOCK = 1024


def lesions(
    mask: np.ndarray, spacing_mm: Sequence[float], min_volume_mm3: float = 0.0
) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of a mask, keeping those of at least a volume.

    Args:
        mask: Tumor mask, shape ``(W, H, D)``.
        spacing_mm: Voxel size along each axis, mm.
        min_volume_mm3: Components smaller than this are dropped (set to 0).

    Returns:
        ``(labeled, count)``: int32 array of the mask's shape, 0 outside lesions and
        1..count inside, numbered in scan order; and the number of lesions kept.
    """
    mask = np.asarray(mask, dtype=bool)
    voxel_mm3 = float(np.prod(_spacing(spacing_mm, mask.ndim)))
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


def chord_diameters(
    points_mm: np.ndarray, tolerance_mm: float | None = None
) -> tuple[float, float]:
    """Longest chord of a set of coplanar points, and the longest chord perpendicular to it.

    The long axis is the largest distance between two points. The short axis is the largest
    extent, measured perpendicular to the long axis, of a pair of points whose offset along the
    long axis is at most ``tolerance_mm``: the discrete version of "the longest chord
    perpendicular to the long axis" (RECIST) on a voxel grid.

    Args:
        points_mm: Point coordinates in the plane, shape ``(N, 2)``, mm (voxel centres of one
            axial slice of a lesion; its boundary voxels suffice).
        tolerance_mm: How far apart along the long axis the two ends of a short-axis chord may
            be; default the smallest distance between two points (one voxel).

    Returns:
        ``(long_mm, short_mm)``; ``(0.0, 0.0)`` for a single point.
    """
    points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 2)
    if len(points) < 2:
        return 0.0, 0.0
    i, j = _farthest_pair(points)
    axis = points[j] - points[i]
    long_mm = float(np.linalg.norm(axis))
    along = axis / long_mm
    across = np.array([-along[1], along[0]])
    u, v = points @ along, points @ across
    step = _min_neighbour_distance(points) if tolerance_mm is None else float(tolerance_mm)
    short_mm = 0.0
    for start in range(0, len(points), _PAIR_BLOCK):
        du = np.abs(u[start : start + _PAIR_BLOCK, None] - u[None, :])
        dv = np.abs(v[start : start + _PAIR_BLOCK, None] - v[None, :])
        dv[du > step + 1e-9] = 0.0
        short_mm = max(short_mm, float(dv.max()))
    return long_mm, short_mm


def axial_diameters(slice_mask: np.ndarray, spacing_mm: Sequence[float]) -> tuple[float, float]:
    """Long and short axis of a lesion in one axial slice (see :func:`chord_diameters`).

    Args:
        slice_mask: Lesion mask of one axial slice, shape ``(A, B)``.
        spacing_mm: In-plane voxel size ``(a, b)``, mm.

    Returns:
        ``(long_mm, short_mm)`` between voxel centres; ``(0.0, 0.0)`` for an empty mask.
    """
    slice_mask = np.asarray(slice_mask, dtype=bool)
    boundary = slice_mask & ~ndimage.binary_erosion(slice_mask)
    spacing = _spacing(spacing_mm, 2)
    return chord_diameters(np.argwhere(boundary) * np.asarray(spacing), min(spacing))


def lesion_detection(
    pred_tumor: np.ndarray,
    truth_tumor: np.ndarray,
    spacing_mm: Sequence[float],
    min_volume_mm3: float = 0.0,
    axial_axis: int = 2,
) -> dict:
    """Lesion-wise detection counts, recall, precision and F1, overall and by lesion size.

    Rule: see :data:`DETECTION_RULE`. Size classes (:data:`SIZE_CLASSES`) use each true lesion's
    longest axial diameter, in the axial slice where it is largest; recall is given per class
    (precision has no true size for a false positive).

    Args:
        pred_tumor: Predicted tumor mask, shape ``(W, H, D)``.
        truth_tumor: True tumor mask, same shape.
        spacing_mm: Voxel size along each axis, mm.
        min_volume_mm3: Lesions (predicted and true) below this volume are ignored.
        axial_axis: The voxel axis closest to the scanner's z axis
            (:func:`liverseg.evaluation.report.axial_axis` finds it from an affine).

    Returns:
        ``true_lesions``, ``found`` (true lesions found), ``pred_lesions``, ``true_positive``
        (predicted lesions that hit one), ``recall``, ``precision``, ``f1`` (NaN when undefined)
        and ``by_size``: class -> ``{"found", "total", "recall"}``. :func:`pool_detection`
        combines several cases' results.
    """
    pred_tumor, truth_tumor = _as_masks(pred_tumor, truth_tumor)
    spacing = _spacing(spacing_mm, truth_tumor.ndim)
    counts = _empty_detection()
    if pred_tumor.any() or truth_tumor.any():
        box = bounding_box(pred_tumor | truth_tumor, margin=0)
        pred_labeled, counts["pred_lesions"] = lesions(pred_tumor[box], spacing, min_volume_mm3)
        truth_labeled, counts["true_lesions"] = lesions(truth_tumor[box], spacing, min_volume_mm3)
        found_ids = np.unique(truth_labeled[pred_labeled > 0])
        found_ids = set(found_ids[found_ids > 0].tolist())
        hit_ids = np.unique(pred_labeled[truth_labeled > 0])
        counts["found"] = len(found_ids)
        counts["true_positive"] = int((hit_ids > 0).sum())
        in_plane = [s for axis, s in enumerate(spacing) if axis != axial_axis]
        for index, region in enumerate(ndimage.find_objects(truth_labeled), start=1):
            if region is None:
                continue
            lesion = np.moveaxis(truth_labeled[region] == index, axial_axis, -1)
            largest = int(np.argmax(lesion.sum(axis=(0, 1))))
            long_mm, _ = axial_diameters(lesion[..., largest], in_plane)
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


def _farthest_pair(points: np.ndarray) -> tuple[int, int]:
    best, pair = -1.0, (0, 0)
    for start in range(0, len(points), _PAIR_BLOCK):
        block = points[start : start + _PAIR_BLOCK]
        d2 = ((block[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1)
        flat = int(np.argmax(d2))
        row, col = divmod(flat, len(points))
        if d2[row, col] > best:
            best, pair = float(d2[row, col]), (start + row, col)
    return pair


def _min_neighbour_distance(points: np.ndarray) -> float:
    """Smallest distance between two distinct points (the in-plane voxel size of a grid)."""
    best = np.inf
    for start in range(0, len(points), _PAIR_BLOCK):
        block = points[start : start + _PAIR_BLOCK]
        d2 = ((block[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1)
        d2[d2 == 0] = np.inf
        best = min(best, float(d2.min()))
    return float(np.sqrt(best))
