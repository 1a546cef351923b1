"""Lesion statistics of labeled CTs: each lesion's HU against its own liver, sizes, kinds.

Measured the way a reader sees them, on the scanned image (blur, partial volume and noise
included): a lesion is a 26-connected component of the tumor label
(:func:`liverseg.evaluation.lesions.lesions`), its liver is the case's liver label without tumor,
its size is its volume and its longest axial diameter
(:func:`liverseg.geometry.axial_diameters`, the size classes of the evaluation). Used to
calibrate the phantoms against real portal-venous CT (``benchmarks/phantoms.py``) and to keep
them calibrated (``tests/test_phantoms.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from liverseg.constants import LIVER, TUMOR
from liverseg.data.cases import find_cases
from liverseg.evaluation.lesions import lesions
from liverseg.geometry import axial_diameters, voxel_volume_mm3
from liverseg.io import read_labels, read_volume

DARK_HU = 15.0
"""A lesion whose mean is at least this much below its liver's counts as ``dark``."""

SMALL_MM = 10.0
"""A lesion whose longest axial diameter is under this is ``small`` (the evaluation's <10mm)."""

KINDS = ("dark", "subtle", "bright")
"""Measured kinds: ``dark`` at least :data:`DARK_HU` below the liver, ``bright`` above it,
``subtle`` in between."""

TARGETS = {
    "mean_contrast_hu": (-50.0, -25.0),
    "dark_share": (0.75, 1.0),
    "bright_share": (0.0, 0.10),
    "tumor_free_share": (0.05, 0.15),
}
"""Ranges the phantoms aim at, from real Task03/LiTS portal-venous CT, where tumors are mostly
20-60 HU darker than the liver (one LiTS case: liver 118 +- 22 HU, tumor 70 +- 23 HU), about
10% of cases have no tumor and hyperdense lesions are few."""


@dataclass(frozen=True)
class LesionStats:
    """One lesion of one case.

    Attributes:
        case_id: Which case it belongs to.
        voxels: Its size in voxels.
        volume_ml: Its volume, mL.
        diameter_mm: Its longest axial diameter, mm (0 for a one-voxel lesion).
        tumor_hu: Mean HU of its voxels.
        liver_hu: Mean HU of its case's liver (liver label, tumor excluded); NaN without liver.
    """

    case_id: str
    voxels: int
    volume_ml: float
    diameter_mm: float
    tumor_hu: float
    liver_hu: float

    @property
    def contrast_hu(self) -> float:
        """Lesion minus liver mean HU (negative: darker than its liver)."""
        return self.tumor_hu - self.liver_hu

    @property
    def kind(self) -> str:
        """``dark``, ``subtle`` or ``bright`` (see :data:`KINDS`)."""
        if self.contrast_hu <= -DARK_HU:
            return "dark"
        return "bright" if self.contrast_hu > 0 else "subtle"


def measure_lesions(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, case_id: str = ""
) -> list[LesionStats]:
    """Every lesion of one case with its mean HU, its liver's mean HU and its size.

    Args:
        image: CT in HU, shape ``(W, H, D)``, any numeric dtype.
        label: ``BACKGROUND``/``LIVER``/``TUMOR`` labels, same shape.
        affine: 4 x 4 voxel-to-scanner matrix, mm.
        case_id: Name to record with each lesion.

    Returns:
        One :class:`LesionStats` per 26-connected tumor component, in scan order; empty for a
        tumor-free case.
    """
    image = np.asarray(image, dtype=np.float64)
    label = np.asarray(label)
    liver = label == LIVER
    liver_hu = float(image[liver].mean()) if liver.any() else float("nan")
    voxel_mm3 = voxel_volume_mm3(affine)
    components, count = lesions(label == TUMOR, voxel_mm3)
    stats = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        mask = components[box] == index
        stats.append(
            LesionStats(
                case_id=case_id,
                voxels=int(mask.sum()),
                volume_ml=float(mask.sum() * voxel_mm3 / 1000),
                diameter_mm=axial_diameters(mask, affine)[0],
                tumor_hu=float(image[box][mask].mean()),
                liver_hu=liver_hu,
            )
        )
    return stats


def measure_folder(root: str | Path) -> tuple[list[LesionStats], list[str]]:
    """The lesions of every labeled case of a Task03-layout folder.

    Args:
        root: Dataset folder holding ``imagesTr/`` and ``labelsTr/`` (as ``liverseg phantoms``
            writes it).

    Returns:
        ``(lesions, case_ids)``: all lesions, and the ids of all cases measured (tumor-free
        ones included, so :func:`summarize` can count them).

    Raises:
        DataError: The folder is not in the Task03 layout or a file cannot be read.
    """
    found, case_ids = [], []
    for case in find_cases(root):
        image, affine = read_volume(case.image)
        label, _ = read_labels(case.label)
        found.extend(measure_lesions(image, label, affine, case.case_id))
        case_ids.append(case.case_id)
    return found, case_ids


def summarize(stats: Sequence[LesionStats], case_ids: Iterable[str]) -> dict[str, float]:
    """Dataset figures of a list of lesions, comparable with :data:`TARGETS`.

    Args:
        stats: Lesions of all cases (:func:`measure_lesions`, :func:`measure_folder`).
        case_ids: Every case measured, tumor-free ones included.

    Returns:
        ``cases``; ``tumor_free_share``; ``lesions`` and ``lesions_per_tumor_case``;
        ``mean_contrast_hu`` (voxel-weighted: all tumor voxels against their own liver);
        ``lesion_contrast_hu`` (the median lesion's), ``contrast_p10_hu`` and
        ``contrast_p90_hu``; ``dark_share``, ``subtle_share``, ``bright_share`` (of lesions,
        :data:`KINDS`); ``small_share`` (diameter < :data:`SMALL_MM`); ``median_volume_ml``
        and ``median_diameter_mm``. Lesion figures are NaN without lesions.
    """
    cases = set(case_ids)
    with_tumor = {s.case_id for s in stats}
    voxels = np.array([s.voxels for s in stats], dtype=float)
    contrast = np.array([s.contrast_hu for s in stats], dtype=float)
    kinds = [s.kind for s in stats]
    nan = float("nan")

    def share(values) -> float:
        return float(np.mean(values)) if len(stats) else nan

    p10, p50, p90 = np.percentile(contrast, [10, 50, 90]) if len(stats) else (nan,) * 3
    figures = {
        "cases": float(len(cases)),
        "tumor_free_share": len(cases - with_tumor) / len(cases) if cases else nan,
        "lesions": float(len(stats)),
        "lesions_per_tumor_case": len(stats) / len(with_tumor) if with_tumor else nan,
        "mean_contrast_hu": float(voxels @ contrast / voxels.sum()) if len(stats) else nan,
        "lesion_contrast_hu": float(p50),
        "contrast_p10_hu": float(p10),
        "contrast_p90_hu": float(p90),
    }
    figures.update({f"{kind}_share": share([k == kind for k in kinds]) for kind in KINDS})
    figures["small_share"] = share([s.diameter_mm < SMALL_MM for s in stats])
    figures["median_volume_ml"] = float(np.median([s.volume_ml for s in stats])) if stats else nan
    figures["median_diameter_mm"] = (
        float(np.median([s.diameter_mm for s in stats])) if stats else nan
    )
    return figures
