"""What a radiologist needs for staging, in physical units: volumes in mL and a lesion table.

Everything is computed from a label volume and its 4 x 4 voxel-to-scanner affine (mm):

- voxel volume ``|det(affine[:3, :3])|`` mm^3; volumes are voxel counts times it, / 1000 for mL;
- the axial axis is the voxel axis whose direction is most aligned with scanner z;
- lesions are 26-connected tumor components of at least ``min_tumor_mm3``;
- diameters are RECIST-like: in the axial slice where the lesion has most voxels, the longest
  chord between lesion voxel centres, and the longest chord perpendicular to it
  (:func:`liverseg.evaluation.lesions.chord_diameters`), measured with the affine's real voxel sizes.
  Centre-to-centre means a lesion ``n`` voxels across measures ``(n - 1)`` voxel sizes;
- a placeholder affine (identity-like, see :func:`spacing_is_trustworthy`) gets a warning.

Research use only, not for diagnosis.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.errors import DataError
from liverseg.evaluation.lesions import chord_diameters, lesions
from liverseg.evaluation.metrics import bounding_box

DISCLAIMER = "research use only, not for diagnosis"
# The voxel sizes a converter's placeholder affine shows: the identity's 1 mm, and 2 or 4 mm
# after `liverseg prepare` halved it once or twice (or reduced it by 4).
PLACEHOLDER_SPACINGS_MM = (1.0, 2.0, 4.0)
_EXACT_MM = 1e-6
UNTRUSTED_SPACING_WARNING = (
    "the header gives an axis-aligned affine with exactly 1, 2 or 4 mm isotropic voxels: an "
    "identity placeholder (or its halving by `liverseg prepare`), usually not the true voxel size "
    "(e.g. Task03 cases 28-47 from 3D-IRCADb): volumes in mL, diameters in mm and the lesion size "
    "threshold are unreliable for this case"
)


def spacing_is_trustworthy(affine: np.ndarray) -> bool:
    """Whether the affine's voxel size can be believed, or looks like a lost-spacing placeholder.

    The rule: untrusted when the rotation part is a signed permutation (axis-aligned, any
    flips or axis order) and the three voxel sizes are equal and exactly 1, 2 or 4 mm
    (``PLACEHOLDER_SPACINGS_MM``, to 1e-6 mm). That is the identity a converter writes when the
    true spacing is lost (Task03 cases 28-47) and what ``liverseg prepare`` makes of it
    (:func:`liverseg.data.downsampling.downsampled_affine` with factor 2, twice, or 4). The origin is
    ignored, so shifted or halved identities (origin 0.5) are caught too.

    Limits: a genuine axis-aligned scan of exactly 1, 2 or 4 mm isotropic voxels is flagged
    (rare for abdominal CT, whose slices are thicker than its pixels); an identity reduced by
    another factor (3 mm, 6 mm) or resampled to anything else is not recognised, so
    ``liverseg prepare`` records the source's verdict as ``spacing_trusted`` in prepare.json.
    An oblique 1 mm grid is trusted: a placeholder is never rotated.

    Args:
        affine: 4 x 4 voxel-to-scanner matrix, mm.

    Returns:
        False for such placeholder geometry, True otherwise.

    Raises:
        DataError: ``affine`` is not a finite 4 x 4 matrix.
    """
    linear = _as_matrix(affine)[:3, :3]
    sizes = np.linalg.norm(linear, axis=0)
    size = sizes[0]
    if not np.any(np.isclose(size, PLACEHOLDER_SPACINGS_MM, rtol=0, atol=_EXACT_MM)):
        return True
    if not np.allclose(sizes, size, rtol=0, atol=_EXACT_MM):
        return True
    # Axis-aligned: each column of the direction matrix is +-1 on one axis, 0 elsewhere, and
    # each scanner axis is hit once.
    directions = np.abs(linear / size)
    one_hot = np.isclose(directions, 1.0, rtol=0, atol=_EXACT_MM)
    zero = np.isclose(directions, 0.0, rtol=0, atol=_EXACT_MM)
    each_once = np.all(one_hot.sum(axis=0) == 1) and np.all(one_hot.sum(axis=1) == 1)
    return not (np.all(one_hot | zero) and each_once)


def voxel_sizes_mm(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each voxel axis: the lengths of the affine's first three columns, mm."""
    return np.linalg.norm(_as_affine(affine)[:3, :3], axis=0)


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1 or 2) whose direction is most aligned with the scanner's z axis.

    Args:
        affine: 4 x 4 voxel-to-scanner matrix, mm.

    Returns:
        The axis index; slices across it are axial.
    """
    directions = _as_affine(affine)[:3, :3] / voxel_sizes_mm(affine)
    return int(np.argmax(np.abs(directions[2])))


def lesion_table(
    labels: np.ndarray,
    affine: np.ndarray,
    image_hu: np.ndarray | None = None,
    min_tumor_mm3: float = 10.0,
) -> list[dict]:
    """One row per tumor lesion, largest first.

    Args:
        labels: Label volume, shape ``(W, H, D)`` (or ``(1, W, H, D)``), values BACKGROUND,
            LIVER, TUMOR.
        affine: 4 x 4 voxel-to-scanner matrix of ``labels``, mm.
        image_hu: CT in HU, the labels' shape, or None.
        min_tumor_mm3: Tumor components smaller than this are not lesions.

    Returns:
        Dicts with ``lesion`` (1 = largest), ``voxels``, ``volume_ml``, ``long_axis_mm``,
        ``short_axis_mm``, ``axial_slice`` (index along the axial axis of the slice where the
        lesion is largest, in which the axes are measured), ``centroid_mm`` (scanner
        coordinates ``[x, y, z]``) and ``mean_hu`` (None without an image).
    """
    return _lesion_rows(labels, affine, image_hu, min_tumor_mm3)[0]


def case_report(
    labels: np.ndarray,
    affine: np.ndarray,
    image_hu: np.ndarray | None = None,
    min_tumor_mm3: float = 10.0,
    case_id: str | None = None,
) -> dict:
    """Liver and tumor volumes, tumor burden and the lesion table of one case, JSON-serialisable.

    Args:
        labels: Label volume, shape ``(W, H, D)`` (or ``(1, W, H, D)``).
        affine: 4 x 4 voxel-to-scanner matrix of ``labels``, mm.
        image_hu: CT in HU, the labels' shape, or None.
        min_tumor_mm3: Tumor components smaller than this are not counted as lesions (their
            voxels still count in the tumor burden).
        case_id: Name to put in the report.

    Returns:
        A dict of plain Python values; undefined numbers (tumor/liver ratio without liver) are
        None. ``warnings`` lists reasons to distrust the numbers; ``disclaimer`` is always
        "research use only, not for diagnosis". :func:`format_report` renders it as text.
    """
    labels = _as_labels(labels)
    affine = _as_affine(affine)
    voxel_mm3 = _voxel_mm3(affine)
    liver_voxels = int(np.count_nonzero(labels == LIVER))
    tumor_voxels = int(np.count_nonzero(labels == TUMOR))
    liver_incl_ml = (liver_voxels + tumor_voxels) * voxel_mm3 / 1000.0
    tumor_ml = tumor_voxels * voxel_mm3 / 1000.0
    rows, small = _lesion_rows(labels, affine, image_hu, min_tumor_mm3)
    trusted = spacing_is_trustworthy(affine)
    warnings = [] if trusted else [UNTRUSTED_SPACING_WARNING]
    if tumor_voxels and liver_voxels == 0:
        warnings.append("tumor without liver in the labels")
    return {
        "case_id": case_id,
        "disclaimer": DISCLAIMER,
        "warnings": warnings,
        "spacing_mm": [float(s) for s in voxel_sizes_mm(affine)],
        "voxel_volume_mm3": voxel_mm3,
        "spacing_trustworthy": trusted,
        "axial_axis": axial_axis(affine),
        "liver_volume_ml": liver_incl_ml,
        "liver_volume_definition": "liver including tumor (labels liver + tumor)",
        "liver_parenchyma_volume_ml": liver_voxels * voxel_mm3 / 1000.0,
        "tumor_burden_ml": tumor_ml,
        "tumor_liver_ratio_percent": (
            100.0 * tumor_ml / liver_incl_ml if liver_incl_ml > 0 else None
        ),
        "min_lesion_volume_mm3": float(min_tumor_mm3),
        "lesion_count": len(rows),
        "small_tumor_components_excluded": small,
        "lesions": rows,
    }


def format_report(report: dict) -> str:
    """Render a :func:`case_report` dict as lines of text for a reader."""
    ratio = report["tumor_liver_ratio_percent"]
    lines = [
        f"case: {report['case_id'] or '(unnamed)'}",
        DISCLAIMER,
        *(f"WARNING: {warning}" for warning in report["warnings"]),
        "voxel size: " + " x ".join(f"{s:.3g}" for s in report["spacing_mm"]) + " mm",
        f"liver volume (incl. tumor): {report['liver_volume_ml']:.1f} mL",
        f"liver parenchyma (excl. tumor): {report['liver_parenchyma_volume_ml']:.1f} mL",
        f"tumor burden: {report['tumor_burden_ml']:.2f} mL",
        "tumor/liver ratio: " + ("n/a (no liver)" if ratio is None else f"{ratio:.2f} %"),
        f"lesions >= {report['min_lesion_volume_mm3']:g} mm^3: {report['lesion_count']}"
        f" ({report['small_tumor_components_excluded']} smaller tumor components not counted)",
    ]
    for row in report["lesions"]:
        hu = "" if row["mean_hu"] is None else f", mean {row['mean_hu']:.0f} HU"
        centroid = ", ".join(f"{c:.1f}" for c in row["centroid_mm"])
        lines.append(
            f"  lesion {row['lesion']}: {row['volume_ml']:.2f} mL, "
            f"{row['long_axis_mm']:.1f} x {row['short_axis_mm']:.1f} mm "
            f"(axial slice {row['axial_slice']}), centroid ({centroid}) mm{hu}"
        )
    return "\n".join(lines)


def _lesion_rows(
    labels: np.ndarray, affine: np.ndarray, image_hu: np.ndarray | None, min_tumor_mm3: float
) -> tuple[list[dict], int]:
    """The lesion table and the number of tumor components below ``min_tumor_mm3``."""
    labels = _as_labels(labels)
    affine = _as_affine(affine)
    if image_hu is not None:
        image_hu = np.asarray(image_hu)
        if image_hu.ndim == 4 and image_hu.shape[0] == 1:
            image_hu = image_hu[0]
        if image_hu.shape != labels.shape:
            raise DataError(
                f"CT shape {image_hu.shape} differs from label shape {labels.shape}; "
                "pass the CT the labels were drawn on"
            )
    voxel_mm3 = _voxel_mm3(affine)
    tumor = labels == TUMOR
    if not tumor.any():
        return [], 0
    box = bounding_box(tumor)
    offset = np.array([s.start for s in box])
    labeled, count = lesions(tumor[box], voxel_sizes_mm(affine))
    # Threshold on voxel count times |det| so the cut agrees with the reported volumes.
    keep = np.bincount(labeled.ravel(), minlength=count + 1) * voxel_mm3 >= min_tumor_mm3
    rows = []
    for index, region in enumerate(ndimage.find_objects(labeled), start=1):
        if region is None or not keep[index]:
            continue
        crop_region = tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, offset))
        rows.append(_lesion_row(labeled[region] == index, crop_region, affine, image_hu, voxel_mm3))
    rows.sort(key=lambda row: -row["voxels"])
    for number, row in enumerate(rows, start=1):
        row["lesion"] = number
    return rows, count - len(rows)


def _lesion_row(
    lesion: np.ndarray,
    region: tuple[slice, ...],
    affine: np.ndarray,
    image_hu: np.ndarray | None,
    voxel_mm3: float,
) -> dict:
    """Measure one lesion, given as a mask cropped to its bounding box ``region``."""
    offset = np.array([s.start for s in region])
    voxels = int(lesion.sum())
    centroid_index = np.argwhere(lesion).mean(axis=0) + offset
    centroid_mm = affine[:3, :3] @ centroid_index + affine[:3, 3]
    axis = axial_axis(affine)
    per_slice = np.moveaxis(lesion, axis, -1).sum(axis=(0, 1))
    largest = int(np.argmax(per_slice))
    slice_mask = np.moveaxis(lesion, axis, -1)[..., largest]
    long_mm, short_mm = _slice_diameters(slice_mask, affine, axis)
    mean_hu = None if image_hu is None else float(image_hu[region][lesion].mean())
    return {
        "lesion": 0,
        "voxels": voxels,
        "volume_ml": voxels * voxel_mm3 / 1000.0,
        "long_axis_mm": long_mm,
        "short_axis_mm": short_mm,
        "axial_slice": largest + int(offset[axis]),
        "centroid_mm": [float(c) for c in centroid_mm],
        "mean_hu": mean_hu,
    }


def _slice_diameters(slice_mask: np.ndarray, affine: np.ndarray, axis: int) -> tuple[float, float]:
    """Long and short axis of a 2D lesion mask across ``axis``, on the affine's geometry."""
    in_plane = [a for a in range(3) if a != axis]
    columns = affine[:3, in_plane]  # (3, 2): mm per voxel step along the two in-plane axes
    # An orthonormal basis of the slice plane, so oblique or sheared grids measure true mm.
    basis, _ = np.linalg.qr(columns)
    boundary = slice_mask & ~ndimage.binary_erosion(slice_mask)
    points_mm = np.argwhere(boundary) @ columns.T @ basis
    tolerance_mm = float(np.linalg.norm(columns, axis=0).min())
    return chord_diameters(points_mm, tolerance_mm)


def _voxel_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3])))


def _as_matrix(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"expected a finite 4 x 4 affine, found shape {affine.shape}")
    return affine


def _as_affine(affine: np.ndarray) -> np.ndarray:
    affine = _as_matrix(affine)
    if abs(np.linalg.det(affine[:3, :3])) == 0:
        raise DataError("the affine is singular (zero voxel volume); check the NIfTI header")
    return affine


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 3:
        raise DataError(f"expected a 3D label volume (W, H, D), found shape {labels.shape}")
    if labels.size and (labels.min() < BACKGROUND or labels.max() > TUMOR):
        raise DataError(
            f"label values must be {BACKGROUND}, {LIVER} or {TUMOR}; found values from "
            f"{labels.min()} to {labels.max()}"
        )
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise DataError("label values must be whole numbers; found fractional values")
    return labels
