"""What a radiologist needs for staging, in physical units: volumes in mL and a lesion table.

Everything is computed from a label volume and its 4 x 4 voxel-to-scanner affine (mm):

- voxel volume ``|det(affine[:3, :3])|`` mm^3; volumes are voxel counts times it, / 1000 for mL;
- the axial axis is the voxel axis whose direction is most aligned with scanner z;
- lesions are 26-connected tumor components of at least ``min_tumor_mm3``, numbered by size
  (1 = largest); the table lists the largest ``max_listed_lesions`` (default 100) and states how
  many were left out and their volume, so a poor model's thousands of specks do not bury the
  lesions that matter. Counts and volumes (tumor burden, lesion count) are always over all
  lesions;
- diameters are RECIST-like: in the axial slice where the lesion has most voxels, the longest
  chord between lesion voxel centres, and the longest chord perpendicular to it, on the affine's
  real geometry (:func:`liverseg.geometry.axial_diameters`, also what ``liverseg evaluate``
  sizes lesions by). A lesion ``n`` voxels across measures ``(n - 1)`` voxel sizes;
- a placeholder affine (identity-like, :func:`liverseg.geometry.spacing_is_trustworthy`) gets a
  warning.

Research use only, not for diagnosis.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.errors import DataError, LiversegError
from liverseg.evaluation.lesions import ranked_lesions
from liverseg.evaluation.metrics import bounding_box
from liverseg.evaluation.qc import mean_entropy, summary_text
from liverseg.geometry import (
    axial_axis,
    axial_diameters,
    checked_affine,
    spacing_is_trustworthy,
    spacing_mm,
    voxel_volume_mm3,
)
from liverseg.labels import invalid_label_values

DISCLAIMER = "research use only, not for diagnosis"
UNTRUSTED_SPACING_WARNING = (
    "the header gives an axis-aligned affine with exactly 1, 2 or 4 mm isotropic voxels: an "
    "identity placeholder (or its halving by `liverseg prepare`), usually not the true voxel size "
    "(e.g. Task03 cases 28-47 from 3D-IRCADb): volumes in mL, diameters in mm and the lesion size "
    "threshold are unreliable for this case"
)
# A table a reader can go through; the lesions beyond it are counted and their volume given.
MAX_LISTED_LESIONS = 100


def lesion_table(
    labels: np.ndarray,
    affine: np.ndarray,
    image_hu: np.ndarray | None = None,
    min_tumor_mm3: float = 10.0,
    regions: np.ndarray | None = None,
    max_lesions: int | None = None,
) -> list[dict]:
    """One row per tumor lesion, largest first.

    Args:
        labels: Label volume, shape ``(W, H, D)`` (or ``(1, W, H, D)``), values BACKGROUND,
            LIVER, TUMOR.
        affine: 4 x 4 voxel-to-scanner matrix of ``labels``, mm.
        image_hu: CT in HU, the labels' shape, or None.
        min_tumor_mm3: Tumor components smaller than this are not lesions.
        regions: uint8 ``(2, W, H, D)`` region probabilities ``round(255 p)`` (liver incl.
            tumor, tumor; :func:`liverseg.inference.volume.predict_volume` with
            ``keep_regions=True``), or None.
        max_lesions: Measure only the largest this many lesions; None: all.

    Returns:
        Dicts with ``lesion`` (1 = largest), ``voxels``, ``volume_ml``, ``long_axis_mm``,
        ``short_axis_mm``, ``axial_slice`` (index along the axial axis of the slice where the
        lesion is largest, in which the axes are measured), ``centroid_mm`` (scanner
        coordinates ``[x, y, z]``), ``mean_hu`` (None without an image), ``confidence`` (the
        mean tumor probability over the lesion, 0-1) and ``entropy`` (its mean binary entropy,
        bits; both None without ``regions``).
    """
    return _lesion_rows(labels, affine, image_hu, min_tumor_mm3, regions, max_lesions)[0]


def case_report(
    labels: np.ndarray,
    affine: np.ndarray,
    image_hu: np.ndarray | None = None,
    min_tumor_mm3: float = 10.0,
    case_id: str | None = None,
    regions: np.ndarray | None = None,
    max_listed_lesions: int | None = MAX_LISTED_LESIONS,
) -> dict:
    """Liver and tumor volumes, tumor burden and the lesion table of one case, JSON-serialisable.

    Args:
        labels: Label volume, shape ``(W, H, D)`` (or ``(1, W, H, D)``).
        affine: 4 x 4 voxel-to-scanner matrix of ``labels``, mm.
        image_hu: CT in HU, the labels' shape, or None.
        min_tumor_mm3: Tumor components smaller than this are not counted as lesions (their
            voxels still count in the tumor burden).
        case_id: Name to put in the report.
        regions: uint8 region probabilities (see :func:`lesion_table`), or None: the lesions'
            ``confidence`` and ``entropy``.
        max_listed_lesions: The table (``lesions``) lists the largest this many lesions; the
            others are counted in ``lesions_not_listed`` with their total volume in
            ``lesions_not_listed_volume_ml``. None: list them all.

    Returns:
        A dict of plain Python values; undefined numbers (tumor/liver ratio without liver) are
        None. ``lesion_count`` and ``tumor_burden_ml`` cover every lesion, listed or not.
        ``warnings`` lists reasons to distrust the numbers; ``disclaimer`` is always
        "research use only, not for diagnosis". :func:`format_report` renders it as text.

    Raises:
        LiversegError: ``max_listed_lesions`` is not a whole number >= 0 or None.
    """
    labels = _as_labels(labels)
    affine = checked_affine(affine)
    voxel_mm3 = voxel_volume_mm3(affine)
    liver_voxels = int(np.count_nonzero(labels == LIVER))
    tumor_voxels = int(np.count_nonzero(labels == TUMOR))
    liver_incl_ml = (liver_voxels + tumor_voxels) * voxel_mm3 / 1000.0
    tumor_ml = tumor_voxels * voxel_mm3 / 1000.0
    rows, voxels, small = _lesion_rows(
        labels, affine, image_hu, min_tumor_mm3, regions, max_listed_lesions
    )
    trusted = spacing_is_trustworthy(affine)
    warnings = [] if trusted else [UNTRUSTED_SPACING_WARNING]
    if tumor_voxels and liver_voxels == 0:
        warnings.append("tumor without liver in the labels")
    return {
        "case_id": case_id,
        "disclaimer": DISCLAIMER,
        "warnings": warnings,
        "spacing_mm": [float(s) for s in spacing_mm(affine)],
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
        "lesion_count": int(voxels.size),
        "small_tumor_components_excluded": small,
        "max_listed_lesions": None if max_listed_lesions is None else int(max_listed_lesions),
        "lesions_not_listed": int(voxels.size - len(rows)),
        "lesions_not_listed_volume_ml": float(voxels[len(rows) :].sum() * voxel_mm3 / 1000.0),
        "lesions": rows,
    }


def format_report(report: dict) -> str:
    """Render a :func:`case_report` dict as lines of text for a reader."""
    ratio = report["tumor_liver_ratio_percent"]
    lines = [
        f"case: {report['case_id'] or '(unnamed)'}",
        DISCLAIMER,
        *(f"WARNING: {warning}" for warning in report["warnings"]),
        *(["quality control: " + summary_text(report["qc"])] if report.get("qc") else []),
        "voxel size: " + " x ".join(f"{s:.3g}" for s in report["spacing_mm"]) + " mm",
        f"liver volume (incl. tumor): {report['liver_volume_ml']:.1f} mL",
        f"liver parenchyma (excl. tumor): {report['liver_parenchyma_volume_ml']:.1f} mL",
        f"tumor burden: {report['tumor_burden_ml']:.2f} mL",
        "tumor/liver ratio: " + ("n/a (no liver)" if ratio is None else f"{ratio:.2f} %"),
        f"lesions >= {report['min_lesion_volume_mm3']:g} mm^3: {report['lesion_count']}"
        f" ({report['small_tumor_components_excluded']} smaller tumor components not counted)",
    ]
    not_listed = report.get("lesions_not_listed", 0)
    if not_listed:
        lines.append(
            f"  the {len(report['lesions'])} largest listed; {not_listed} smaller lesions "
            f"({report['lesions_not_listed_volume_ml']:.2f} mL in all) not listed"
        )
    for row in report["lesions"]:
        hu = "" if row["mean_hu"] is None else f", mean {row['mean_hu']:.0f} HU"
        if row.get("confidence") is not None:
            hu += f", confidence {row['confidence']:.2f}"
        centroid = ", ".join(f"{c:.1f}" for c in row["centroid_mm"])
        lines.append(
            f"  lesion {row['lesion']}: {row['volume_ml']:.2f} mL, "
            f"{row['long_axis_mm']:.1f} x {row['short_axis_mm']:.1f} mm "
            f"(axial slice {row['axial_slice']}), centroid ({centroid}) mm{hu}"
        )
    return "\n".join(lines)


def _lesion_rows(
    labels: np.ndarray,
    affine: np.ndarray,
    image_hu: np.ndarray | None,
    min_tumor_mm3: float,
    regions: np.ndarray | None = None,
    max_rows: int | None = None,
) -> tuple[list[dict], np.ndarray, int]:
    """The rows of the largest ``max_rows`` lesions (None: all), every lesion's voxel count
    (largest first) and the number of tumor components below ``min_tumor_mm3``."""
    if max_rows is not None and (
        isinstance(max_rows, bool) or not isinstance(max_rows, int | np.integer)
    ):
        raise LiversegError(f"max_listed_lesions={max_rows!r}: expected a whole number or None")
    if max_rows is not None and max_rows < 0:
        raise LiversegError(f"max_listed_lesions={max_rows}: expected 0 or more (None: all)")
    labels = _as_labels(labels)
    affine = checked_affine(affine)
    image_hu = _checked_hu(image_hu, labels.shape)
    tumor_probability = None
    if regions is not None:
        if regions.shape != (2, *labels.shape):
            raise DataError(
                f"region probabilities {regions.shape} do not match label shape {labels.shape}"
            )
        tumor_probability = regions[1]
    voxel_mm3 = voxel_volume_mm3(affine)
    tumor = labels == TUMOR
    if not tumor.any():
        return [], np.zeros(0, dtype=np.int64), 0
    box = bounding_box(tumor)
    offset = np.array([s.start for s in box])
    labeled, voxels, small = ranked_lesions(tumor[box], voxel_mm3, min_tumor_mm3)
    listed = voxels.size if max_rows is None else min(int(max_rows), voxels.size)
    rows = []
    # find_objects reads a max_label of 0 as "all labels".
    regions_listed = ndimage.find_objects(labeled, listed) if listed else []
    for number, region in enumerate(regions_listed, start=1):
        crop_region = tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, offset))
        row = _lesion_row(
            labeled[region] == number, crop_region, affine, image_hu, tumor_probability, voxel_mm3
        )
        row["lesion"] = number
        rows.append(row)
    return rows, voxels, small


def _checked_hu(image_hu: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The CT as a ``shape`` array (a leading channel of 1 dropped), or None."""
    if image_hu is None:
        return None
    image_hu = np.asarray(image_hu)
    if image_hu.ndim == 4 and image_hu.shape[0] == 1:
        image_hu = image_hu[0]
    if image_hu.shape != shape:
        raise DataError(
            f"CT shape {image_hu.shape} differs from label shape {shape}; "
            "pass the CT the labels were drawn on"
        )
    return image_hu


def _lesion_row(
    lesion: np.ndarray,
    region: tuple[slice, ...],
    affine: np.ndarray,
    image_hu: np.ndarray | None,
    tumor_probability: np.ndarray | None,
    voxel_mm3: float,
) -> dict:
    """Measure one lesion, given as a mask cropped to its bounding box ``region``."""
    offset = np.array([s.start for s in region])
    voxels = int(lesion.sum())
    centroid_index = np.argwhere(lesion).mean(axis=0) + offset
    centroid_mm = affine[:3, :3] @ centroid_index + affine[:3, 3]
    axis = axial_axis(affine)
    long_mm, short_mm, largest = axial_diameters(lesion, affine)
    mean_hu = None if image_hu is None else float(image_hu[region][lesion].mean())
    confidence = entropy = None
    if tumor_probability is not None:
        quantised = tumor_probability[region][lesion]
        confidence = float(quantised.mean() / 255.0)
        entropy = mean_entropy(tumor_probability[region], lesion)
    return {
        "lesion": 0,
        "voxels": voxels,
        "volume_ml": voxels * voxel_mm3 / 1000.0,
        "long_axis_mm": long_mm,
        "short_axis_mm": short_mm,
        "axial_slice": largest + int(offset[axis]),
        "centroid_mm": [float(c) for c in centroid_mm],
        "mean_hu": mean_hu,
        "confidence": confidence,
        "entropy": entropy,
    }


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 3:
        raise DataError(f"expected a 3D label volume (W, H, D), found shape {labels.shape}")
    invalid = invalid_label_values(labels)
    if invalid:
        raise DataError(
            f"label values must be {BACKGROUND}, {LIVER} or {TUMOR}; found {invalid}: pass a "
            "label map, not probabilities or another task's labels"
        )
    return labels
