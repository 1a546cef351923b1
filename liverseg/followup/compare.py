"""``liverseg compare``: two scans of one patient, what is new, what grew, what shrank.

:func:`compare_scans` takes each scan's CT and label map with their affines (each in its own
geometry: another scanner position, grid or spacing is fine), aligns the follow-up's liver to the
baseline's (:mod:`liverseg.followup.registration`), matches the lesions and gives each a status
(:mod:`liverseg.followup.matching`). :func:`compare_files` reads NIfTI files or DICOM series
folders and writes ``comparison.json``, ``comparison.csv`` and ``comparison.html`` (the baseline
beside the aligned follow-up, lesions coloured by status) into a folder, atomically.

What the comparison cannot know, and how it says so: the alignment is affine, so a liver that
deformed more (breathing, posture, resection) leaves lesions near its surface misplaced: the
Dice of the two livers after alignment is reported, and below ``POOR_ALIGNMENT_DICE`` a warning
says that matches are unreliable. Lesions that merged or split between the scans are matched
to one partner and carry a ``note`` naming the others. Lesion identity is inferred from place
alone: a lesion that vanished and a new one at the same place would read as one lesion that
changed. Research use only, not for diagnosis.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from liverseg.constants import LIVER, TUMOR
from liverseg.errors import DataError
from liverseg.evaluation.report import DISCLAIMER
from liverseg.followup.matching import (
    ChangeRules,
    change_status,
    match_lesions,
    patient_response,
    scan_lesions,
)
from liverseg.followup.registration import Alignment, align_livers
from liverseg.geometry import checked_affine, voxel_volume_mm3
from liverseg.io import atomic_path, read_labels, read_volume

log = logging.getLogger(__name__)

POOR_ALIGNMENT_DICE = 0.85
STATUSES = ("new", "disappeared", "growing", "shrinking", "stable")
CSV_COLUMNS = (
    "id", "status", "status_volume", "status_diameter",
    "baseline_lesion", "baseline_volume_ml", "baseline_long_axis_mm", "baseline_centroid_mm",
    "followup_lesion", "followup_volume_ml", "followup_long_axis_mm", "followup_centroid_mm",
    "volume_change_percent", "diameter_change_percent", "note",
)  # fmt: skip


@dataclass
class Scan:
    """One time point: CT in HU, labels, and their voxel-to-scanner affine (mm)."""

    ct: np.ndarray
    labels: np.ndarray
    affine: np.ndarray


@dataclass
class Comparison:
    """The comparison (``result``, what ``comparison.json`` holds) and what the animation needs."""

    result: dict
    alignment: Alignment
    baseline_status_map: np.ndarray  # baseline grid: status index + 1 per lesion voxel, 0 else
    followup_status_map: np.ndarray  # follow-up lesions carried to the baseline grid, the same


def compare_scans(baseline: Scan, followup: Scan, rules: ChangeRules | None = None) -> Comparison:
    """Align, match and classify the lesions of two scans of one patient.

    Args:
        baseline: The earlier scan.
        followup: The later scan.
        rules: Change thresholds; None: :class:`ChangeRules`' defaults.

    Raises:
        DataError: A scan has no liver, or labels and CT differ in shape.
    """
    rules = rules or ChangeRules()
    for name, scan in (("baseline", baseline), ("follow-up", followup)):
        scan.affine = checked_affine(scan.affine)
        if scan.ct.shape != scan.labels.shape:
            raise DataError(
                f"{name}: CT shape {scan.ct.shape} differs from label shape {scan.labels.shape}"
            )
    alignment = align_livers(baseline.labels, baseline.affine, followup.labels, followup.affine)
    before, before_map = scan_lesions(baseline.labels, baseline.affine, rules.min_lesion_mm3)
    after, after_map = scan_lesions(followup.labels, followup.affine, rules.min_lesion_mm3)
    warped = alignment.warp(
        after_map, followup.affine, baseline.labels.shape, baseline.affine, labels=True
    )
    centroids = alignment.to_baseline(np.array([lesion.centroid_mm for lesion in after]))
    pairs, notes = match_lesions(before, before_map, warped, centroids, len(after), rules)
    rows = []
    for number, (b, f) in enumerate(pairs, start=1):
        first = before[b - 1] if b is not None else None
        second = after[f - 1] if f is not None else None
        rows.append({
            "id": number,
            **change_status(first, second, rules),
            "baseline": first.as_dict() if first else None,
            "followup": second.as_dict() if second else None,
            "note": notes.get(b, "") if b is not None else "",
        })  # fmt: skip
    result = {
        "disclaimer": DISCLAIMER,
        "warnings": _warnings(alignment),
        "rules": asdict(rules),
        "alignment": {
            "baseline_to_followup_mm": alignment.matrix.tolist(),
            "translation_mm": [float(v) for v in alignment.translation_mm],
            "liver_dice_after_alignment": alignment.liver_dice,
        },
        "patient": {
            **_burdens(baseline, followup),
            **patient_response(before, after, pairs, rules),
            "lesion_count": {"baseline": len(before), "followup": len(after)},
        },
        "lesions": rows,
    }
    return Comparison(
        result,
        alignment,
        _status_map(before_map, pairs, rows, side=0),
        _status_map(warped, pairs, rows, side=1),
    )


def compare_files(
    baseline: tuple[str | Path, str | Path | np.ndarray],
    followup: tuple[str | Path, str | Path | np.ndarray],
    out_dir: str | Path,
    rules: ChangeRules | None = None,
    animation: bool = True,
) -> dict:
    """Compare two scans given as ``(CT, segmentation)`` and write the outputs to ``out_dir``.

    Args:
        baseline: CT (NIfTI file or DICOM series folder) and its label map (a NIfTI file of
            ``liverseg predict``, or an array on the CT's grid).
        followup: The same for the later scan.
        out_dir: Folder for ``comparison.json``, ``comparison.csv`` and ``comparison.html``.
        rules: Change thresholds; None: the defaults.
        animation: Also write ``comparison.html``.

    Returns:
        The ``comparison.json`` content.
    """
    scans = [_read_scan(ct, seg, name) for (ct, seg), name in
             ((baseline, "baseline"), (followup, "follow-up"))]  # fmt: skip
    comparison = compare_scans(*scans, rules)
    comparison.result["inputs"] = {
        "baseline": [str(baseline[0]), _source(baseline[1])],
        "followup": [str(followup[0]), _source(followup[1])],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "comparison.json") as tmp:
        tmp.write_text(json.dumps(comparison.result, indent=2))
    write_csv(comparison.result["lesions"], out_dir / "comparison.csv")
    if animation:
        from liverseg.followup.animation import animate_comparison

        animate_comparison(scans[0], scans[1], comparison, out_dir / "comparison.html")
    return comparison.result


def write_csv(rows: list[dict], path: Path) -> None:
    """One row per lesion (:data:`CSV_COLUMNS`), atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            flat = {key: row.get(key) for key in CSV_COLUMNS if key in row}
            for side in ("baseline", "followup"):
                lesion = row[side] or {}
                flat[f"{side}_lesion"] = lesion.get("lesion", "")
                flat[f"{side}_volume_ml"] = _cell(lesion.get("volume_ml"))
                flat[f"{side}_long_axis_mm"] = _cell(lesion.get("long_axis_mm"))
                centroid = lesion.get("centroid_mm")
                flat[f"{side}_centroid_mm"] = (
                    " ".join(f"{c:.1f}" for c in centroid) if centroid else ""
                )
            for key in ("volume_change_percent", "diameter_change_percent"):
                flat[key] = _cell(row[key])
            writer.writerow(flat)


def _read_scan(ct, seg, name: str) -> Scan:
    hu, affine = read_volume(ct)
    if isinstance(seg, np.ndarray):
        labels = seg
    else:
        labels, label_affine = read_labels(seg)
        if not np.allclose(label_affine, affine, atol=1e-3):
            raise DataError(
                f"{name}: {seg} is not on the grid of {ct} (affines differ): pass the "
                "segmentation `liverseg predict` wrote for this CT"
            )
    return Scan(hu, np.asarray(labels), affine)


def _burdens(baseline: Scan, followup: Scan) -> dict:
    def ml(scan: Scan, values) -> float:
        return float(np.isin(scan.labels, values).sum() * voxel_volume_mm3(scan.affine) / 1000)

    return {
        "tumor_burden_ml": {"baseline": ml(baseline, TUMOR), "followup": ml(followup, TUMOR)},
        "liver_volume_ml": {
            "baseline": ml(baseline, (LIVER, TUMOR)),
            "followup": ml(followup, (LIVER, TUMOR)),
        },
    }


def _warnings(alignment: Alignment) -> list[str]:
    if alignment.liver_dice >= POOR_ALIGNMENT_DICE:
        return []
    return [
        f"the livers overlap with Dice {alignment.liver_dice:.2f} after alignment (below "
        f"{POOR_ALIGNMENT_DICE}): the liver changed shape more than an affine alignment follows, "
        "or a segmentation is wrong; matches and statuses are unreliable, check them"
    ]


def _status_map(lesion_map: np.ndarray, pairs, rows, side: int) -> np.ndarray:
    """Per voxel, 1 + index in :data:`STATUSES` of the status of the lesion there, else 0."""
    lookup = np.zeros(int(lesion_map.max()) + 1, dtype=np.uint8)
    for pair, row in zip(pairs, rows):
        if pair[side] is not None and pair[side] < len(lookup):
            lookup[pair[side]] = STATUSES.index(row["status"]) + 1
    return lookup[lesion_map]


def _source(seg) -> str:
    return "array" if isinstance(seg, np.ndarray) else str(seg)


def _cell(value) -> str:
    return "" if value is None else f"{value:.3f}"
