"""Per-case quality control: should a reader trust this segmentation, or review it first?

Ground truth is not needed: :func:`case_qc` reads the predicted labels, the probabilities the
model gave the two nested regions (liver incl. tumor, tumor; uint8 ``round(255 p)`` from
:func:`liverseg.inference.volume.predict_volume` with ``keep_regions=True``) and the affine, and
gives ``status`` ``"ok"`` or ``"review"`` with the reasons. Two kinds of evidence:

Uncertainty
    The binary entropy (bits, 0 = certain, 1 = p of 0.5) of the liver-region probability,
    averaged over the predicted liver (incl. tumor), and of the tumor-region probability,
    averaged over the predicted tumor. An ensemble's or a mirrored (TTA) prediction averages
    its members' probabilities first, so their disagreement raises it too. The thresholds are
    set on phantoms with ``benchmarks/qc.py`` (see :class:`QcThresholds`); another model may
    need its own.

Plausibility
    A liver volume outside an adult range; a liver cut by the scan's border (incomplete
    coverage); several liver components of similar size before post-processing kept the
    largest; a tumor burden above a share of the liver; more lesions than a liver plausibly
    holds (a poor model's scattered specks); an untrustworthy voxel size, and the data doctor's
    warnings about implausible CT values (:mod:`liverseg.data.intensities`).

Lesions are numbered as the report's lesion table numbers them (1 = largest,
:func:`liverseg.evaluation.lesions.ranked_lesions`): the block counts every lesion and every
low-confidence one, and names at most a few of the latter, the largest first.

Research use only: "ok" means none of these signs was seen, not that the segmentation is right.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from liverseg.constants import BACKGROUND, TUMOR
from liverseg.errors import DataError
from liverseg.evaluation.lesions import ranked_lesions
from liverseg.evaluation.metrics import bounding_box
from liverseg.geometry import axial_axis, checked_affine, spacing_is_trustworthy, voxel_volume_mm3

OK = "ok"
REVIEW = "review"
# 26-connectivity, as post-processing and the lesion table use.
_STRUCTURE = ndimage.generate_binary_structure(3, 3)
# Binary entropy in bits of p = q / 255 for every uint8 q.
_P = np.arange(256) / 255.0
with np.errstate(divide="ignore", invalid="ignore"):
    ENTROPY_BITS = np.nan_to_num(-(_P * np.log2(_P) + (1 - _P) * np.log2(1 - _P))).astype(
        np.float64
    )


@dataclass(frozen=True)
class QcThresholds:
    """When :func:`case_qc` asks for review.

    Attributes:
        liver_ml_range: Liver volume (incl. tumor) outside this range (mL). Default 500-3700 mL:
            half the smallest and twice the largest adult standard liver volume of Urata et
            al. (Hepatology 1995;21:1317-21: SLV = 706.2 x BSA + 2.4 mL) over body surface
            areas 1.4-2.6 m^2 (991-1839 mL), wide enough for cirrhotic and tumor-laden livers.
        border_fraction: The liver's area on one face of the scan, as a share of its largest
            cross-section parallel to that face, at or above which it counts as cut off.
        component_ratio: Second-largest liver component over the largest (before
            post-processing), at or above which the liver is ambiguous.
        tumor_percent: Tumor volume as a percentage of the liver (incl. tumor) at or above
            which the burden is implausible enough to check.
        liver_entropy: Mean entropy (bits) of the liver-region probability over the predicted
            liver above which the model is uncertain; None: not checked. The defaults of both
            entropies were set on phantoms with the demo model (see the comment below).
        tumor_entropy: Mean entropy (bits) of the tumor-region probability over the predicted
            tumor above which the model is uncertain; None: not checked.
        lesion_confidence: Lesions whose mean tumor probability is below this are
            low-confidence: counted in ``low_confidence_lesion_count`` and named in
            ``low_confidence_lesions`` (for the reader; not a reason for review by itself).
        low_confidence_ids: At most this many low-confidence lesions are named, the largest
            first; the count covers them all.
        max_lesions: More lesions than this asks for review; None: not checked. Default 50:
            ten times the 5 target lesions RECIST 1.1 has a reader measure (Eisenhauer et al.,
            Eur J Cancer 2009;45:228-47), more than anyone checks one by one, and from a
            segmentation model far more often scattered false-positive specks than disease; a
            liver with that many true lesions deserves a reader's look anyway.
    """

    liver_ml_range: tuple[float, float] = (500.0, 3700.0)
    border_fraction: float = 0.2
    component_ratio: float = 0.2
    tumor_percent: float = 50.0
    # Set by `python benchmarks/qc.py` with the demo model on its 40 tuning phantoms (seed 2):
    # the 90th percentile of the clean cases' values (docs/performance.md#per-case-quality-
    # control). Another model, or real CT, needs its own: measure them the same way.
    liver_entropy: float | None = 0.237
    tumor_entropy: float | None = 0.721
    lesion_confidence: float = 0.6
    low_confidence_ids: int = 20
    max_lesions: int | None = 50


def mean_entropy(quantised: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean binary entropy (bits) of ``quantised / 255`` over ``mask``; None for an empty mask."""
    values = quantised[mask]
    return float(ENTROPY_BITS[values].mean()) if values.size else None


def case_qc(
    labels: np.ndarray,
    affine: np.ndarray,
    regions: np.ndarray | None = None,
    warnings: list[str] | tuple[str, ...] = (),
    thresholds: QcThresholds = QcThresholds(),
    min_lesion_mm3: float = 10.0,
) -> dict:
    """The QC block of a case report: ``status``, ``reasons`` and the measures behind them.

    Args:
        labels: Predicted label volume ``(W, H, D)`` after post-processing.
        affine: Its 4 x 4 voxel-to-scanner matrix (mm).
        regions: uint8 ``(2, W, H, D)`` region probabilities before post-processing, or None
            (then no uncertainty and no component measure: they are None).
        warnings: The data doctor's warnings about the input's CT values; each is a reason.
        thresholds: When to ask for review.
        min_lesion_mm3: Tumor components smaller than this (mm^3) are not lesions; the report's
            ``min_tumor_mm3``, so that lesion numbers agree with its table.

    Returns:
        ``{"status", "reasons", "liver_volume_ml", "liver_border_fraction",
        "liver_component_ratio", "tumor_liver_percent", "liver_entropy", "tumor_entropy",
        "lesion_count", "low_confidence_lesion_count", "low_confidence_lesions",
        "thresholds"}``, JSON-serialisable. ``low_confidence_lesion_count`` is None without
        ``regions`` (then ``low_confidence_lesions`` is empty); ``low_confidence_lesions``
        holds the numbers of at most ``thresholds.low_confidence_ids`` of them, the largest
        first.
    """
    labels = np.asarray(labels)
    affine = checked_affine(affine)
    if regions is not None and regions.shape != (2, *labels.shape):
        raise DataError(f"region probabilities {regions.shape} do not match labels {labels.shape}")
    liver = labels != BACKGROUND
    tumor = labels == TUMOR
    voxel_mm3 = voxel_volume_mm3(affine)
    voxel_ml = voxel_mm3 / 1000.0
    liver_ml = float(np.count_nonzero(liver) * voxel_ml)
    tumor_percent = 100.0 * np.count_nonzero(tumor) / max(np.count_nonzero(liver), 1)
    border, border_where = _border_fraction(liver, affine)
    measures = {
        "liver_volume_ml": liver_ml,
        "liver_border_fraction": border,
        "liver_component_ratio": None if regions is None else _component_ratio(regions[0] >= 128),
        "tumor_liver_percent": float(tumor_percent),
        "liver_entropy": None if regions is None else mean_entropy(regions[0], liver),
        "tumor_entropy": None if regions is None else mean_entropy(regions[1], tumor),
        **_lesion_measures(tumor, voxel_mm3, regions, thresholds, min_lesion_mm3),
    }
    reasons = _reasons(measures, border_where, thresholds)
    reasons += [f"CT values: {warning}" for warning in warnings]
    if not spacing_is_trustworthy(affine):
        reasons.append("voxel size not trustworthy (placeholder affine): volumes unreliable")
    return {
        "status": REVIEW if reasons else OK,
        "reasons": reasons,
        **measures,
        "thresholds": asdict(thresholds),
    }


def summary_text(qc: dict) -> str:
    """One line for ``summary.csv``: ``ok`` or ``review: reason; reason``."""
    return qc["status"] if not qc["reasons"] else f"{qc['status']}: " + "; ".join(qc["reasons"])


def _lesion_measures(
    tumor: np.ndarray,
    voxel_mm3: float,
    regions: np.ndarray | None,
    thresholds: QcThresholds,
    min_lesion_mm3: float,
) -> dict:
    """``lesion_count``, ``low_confidence_lesion_count`` and ``low_confidence_lesions``."""
    measures = {
        "lesion_count": 0,
        "low_confidence_lesion_count": None if regions is None else 0,
        "low_confidence_lesions": [],
    }
    if not tumor.any():
        return measures
    box = bounding_box(tumor)
    labeled, voxels, _ = ranked_lesions(tumor[box], voxel_mm3, min_lesion_mm3)
    measures["lesion_count"] = int(voxels.size)
    if regions is None or not voxels.size:
        return measures
    inside = labeled > 0
    sums = np.bincount(labeled[inside], weights=regions[1][box][inside], minlength=voxels.size + 1)
    confidence = sums[1:] / voxels / 255.0
    low = np.flatnonzero(confidence < thresholds.lesion_confidence) + 1
    measures["low_confidence_lesion_count"] = int(low.size)
    measures["low_confidence_lesions"] = low[: thresholds.low_confidence_ids].tolist()
    return measures


def _reasons(measures: dict, border_where: str, thresholds: QcThresholds) -> list[str]:
    reasons = []
    low, high = thresholds.liver_ml_range
    liver_ml = measures["liver_volume_ml"]
    if liver_ml == 0:
        reasons.append("no liver found")
    elif not low <= liver_ml <= high:
        reasons.append(f"liver volume {liver_ml:.0f} mL outside {low:g}-{high:g} mL")
    if measures["liver_border_fraction"] >= thresholds.border_fraction:
        reasons.append(
            f"liver cut by the scan's border ({border_where}: "
            f"{measures['liver_border_fraction']:.0%} of its largest cross-section): "
            "incomplete coverage"
        )
    ratio = measures["liver_component_ratio"]
    if ratio is not None and ratio >= thresholds.component_ratio:
        reasons.append(f"several liver components of similar size (second/largest {ratio:.2f})")
    if measures["tumor_liver_percent"] >= thresholds.tumor_percent:
        reasons.append(f"tumor burden {measures['tumor_liver_percent']:.0f}% of the liver")
    count, limit = measures["lesion_count"], thresholds.max_lesions
    if limit is not None and count > limit:
        low = measures["low_confidence_lesion_count"]
        low_text = "" if low is None else f" ({low} low-confidence)"
        reasons.append(f"{count} lesions{low_text}: more than {limit} is implausible")
    for name, limit in (("liver", thresholds.liver_entropy), ("tumor", thresholds.tumor_entropy)):
        value = measures[f"{name}_entropy"]
        if limit is not None and value is not None and value > limit:
            reasons.append(f"uncertain {name} (mean entropy {value:.3f} > {limit:.3f} bits)")
    return reasons


def _border_fraction(liver: np.ndarray, affine: np.ndarray) -> tuple[float, str]:
    """The largest share of the liver's cross-section lying on a face of the scan, and where.

    For each axis and each end: the liver's voxels in the end slice over its largest slice
    perpendicular to that axis.
    """
    if not liver.any():
        return 0.0, ""
    axial = axial_axis(affine)
    best, where = 0.0, ""
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        areas = np.count_nonzero(liver, axis=other)
        for end, index in (("first", 0), ("last", -1)):
            share = float(areas[index] / areas.max())
            if share > best:
                best, where = share, _face_name(axis, end, axial, affine)
    return best, where


def _face_name(axis: int, end: str, axial: int, affine: np.ndarray) -> str:
    if axis != axial:
        return f"{end} voxel plane along axis {axis}"
    superior_last = affine[2, axis] > 0  # scanner z points up in RAS and LPS alike
    return "top slice" if (end == "last") == superior_last else "bottom slice"


def _component_ratio(mask: np.ndarray) -> float:
    """Second-largest 26-connected component of ``mask`` over the largest (0 for one or none)."""
    if not mask.any():
        return 0.0
    box = bounding_box(mask)
    components, count = ndimage.label(mask[box], structure=_STRUCTURE)
    if count < 2:
        return 0.0
    sizes = np.sort(np.bincount(components.ravel())[1:])[::-1]
    return float(sizes[1] / sizes[0])
