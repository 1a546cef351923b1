"""Lesions of two scans matched across time, and what happened to each: the change rules.

Lesions are the 26-connected tumor components of at least ``ChangeRules.min_lesion_mm3`` in each
scan, measured in that scan's own geometry (volume, longest axial diameter as the report's
lesion table measures it, centroid in its own scanner mm). Matching happens on the baseline
grid, after the follow-up's lesion map was carried there by the liver alignment
(:mod:`liverseg.followup.registration`):

1. overlap: each baseline lesion is paired with the follow-up lesion it overlaps most; a
   follow-up lesion overlapped by several baseline lesions is their merge, a baseline lesion
   overlapping several follow-up lesions (each by >= 10% of that lesion) has split;
2. distance: a lesion left unpaired is paired with the nearest unpaired lesion of the other scan
   whose centroid lies within ``max_distance_mm`` after alignment;
3. baseline lesions still unpaired have disappeared, follow-up lesions still unpaired are new.

Statuses of paired lesions, by two rules (both reported, ``status`` follows ``ChangeRules.rule``):

- diameter, RECIST 1.1-like per lesion: growing at >= +20% of the longest axial diameter,
  shrinking at <= -30%, else stable;
- volume: growing at >= +73% (a sphere whose diameter grew 20%: 1.2^3), shrinking at <= -66%
  (one whose diameter shrank 30%: 0.7^3), else stable.

Per patient: tumor burden then and now, and RECIST 1.1's sum of longest diameters of the target
lesions (the largest baseline lesions, at most two per organ) then and now, with its response:
progression at >= +20% and >= 5 mm, or any new lesion; complete response when every lesion has
disappeared; partial response at <= -30%; else stable disease.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from liverseg.constants import TUMOR
from liverseg.evaluation.lesions import lesions
from liverseg.geometry import axial_diameters, voxel_volume_mm3

RULES = ("volume", "diameter")


@dataclass(frozen=True)
class ChangeRules:
    """Thresholds of the change statuses (defaults: module docstring)."""

    rule: str = "volume"
    diameter_growth: float = 0.20
    diameter_shrinkage: float = 0.30
    volume_growth: float = 0.73
    volume_shrinkage: float = 0.66
    max_distance_mm: float = 10.0
    split_share: float = 0.10
    min_lesion_mm3: float = 10.0
    target_lesions: int = 2
    progression_sum: float = 0.20
    progression_sum_mm: float = 5.0
    response_sum: float = 0.30

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r}: choose one of {', '.join(RULES)}")


@dataclass
class Lesion:
    """One lesion of one scan, in that scan's own geometry."""

    number: int  # 1 = largest of its scan
    voxels: int
    volume_ml: float
    long_axis_mm: float
    centroid_mm: np.ndarray

    def as_dict(self) -> dict:
        return {
            "lesion": self.number,
            "volume_ml": self.volume_ml,
            "long_axis_mm": self.long_axis_mm,
            "centroid_mm": [float(c) for c in self.centroid_mm],
        }


def scan_lesions(labels: np.ndarray, affine: np.ndarray, min_mm3: float):
    """The lesions of a scan, largest first, and their map (0 outside, lesion number inside)."""
    voxel_mm3 = voxel_volume_mm3(affine)
    labeled, count = lesions(np.asarray(labels) == TUMOR, voxel_mm3, min_mm3)
    found = []
    for index, region in enumerate(ndimage.find_objects(labeled), start=1):
        if region is None:
            continue
        mask = labeled[region] == index
        offset = np.array([s.start for s in region])
        centre = np.argwhere(mask).mean(axis=0) + offset
        found.append((index, mask, centre))
    found.sort(key=lambda item: -int(item[1].sum()))
    numbered = np.zeros(labeled.shape, dtype=np.int32)
    result = []
    for number, (index, mask, centre) in enumerate(found, start=1):
        numbered[labeled == index] = number
        voxels = int(mask.sum())
        result.append(
            Lesion(
                number=number,
                voxels=voxels,
                volume_ml=voxels * voxel_mm3 / 1000.0,
                long_axis_mm=axial_diameters(mask, affine)[0],
                centroid_mm=affine[:3, :3] @ centre + affine[:3, 3],
            )
        )
    return result, numbered


def match_lesions(
    baseline: list[Lesion],
    baseline_map: np.ndarray,
    warped_followup_map: np.ndarray,
    followup_in_baseline_mm: np.ndarray,
    followup_count: int,
    rules: ChangeRules,
) -> tuple[list[tuple[int | None, int | None]], dict[int, str]]:
    """Pairs ``(baseline number, follow-up number)`` (None: no partner) and notes per pair.

    Args:
        baseline: The baseline's lesions.
        baseline_map: Their numbers on the baseline grid.
        warped_followup_map: The follow-up's lesion numbers carried onto the baseline grid.
        followup_in_baseline_mm: ``(followup_count, 3)``: each follow-up centroid mapped to
            baseline scanner mm.
        followup_count: Number of follow-up lesions.
        rules: ``max_distance_mm`` and ``split_share``.

    Returns:
        The pairs, and notes keyed by baseline number (merge or split).
    """
    overlap = _overlaps(baseline_map, warped_followup_map, len(baseline), followup_count)
    pairs: dict[int, int] = {}
    notes: dict[int, str] = {}
    for b in range(1, len(baseline) + 1):
        if overlap[b].max() > 0:
            pairs[b] = int(overlap[b].argmax())
    split_parts = _note_merges_and_splits(overlap, pairs, notes, rules.split_share)
    free_b = [b for b in range(1, len(baseline) + 1) if b not in pairs]
    free_f = set(range(1, followup_count + 1)) - set(pairs.values()) - split_parts
    for b in free_b:
        distances = {
            f: float(np.linalg.norm(followup_in_baseline_mm[f - 1] - baseline[b - 1].centroid_mm))
            for f in free_f
        }
        if distances and min(distances.values()) <= rules.max_distance_mm:
            f = min(distances, key=distances.get)
            pairs[b] = f
            free_f.discard(f)
            notes[b] = f"matched by centroid distance ({distances[f]:.1f} mm), not overlap"
    matched = [(b, f) for b, f in sorted(pairs.items())]
    matched += [(b, None) for b in free_b if b not in pairs]
    matched += [(None, f) for f in sorted(free_f)]
    return matched, notes


def change_status(before: Lesion | None, after: Lesion | None, rules: ChangeRules) -> dict:
    """Status by both rules, and the changes in percent (None where undefined)."""
    if before is None:
        return {"status": "new", "status_volume": "new", "status_diameter": "new",
                "volume_change_percent": None, "diameter_change_percent": None}  # fmt: skip
    if after is None:
        gone = "disappeared"
        return {"status": gone, "status_volume": gone, "status_diameter": gone,
                "volume_change_percent": -100.0, "diameter_change_percent": -100.0}  # fmt: skip
    volume = after.volume_ml / before.volume_ml - 1.0
    diameter = after.long_axis_mm / before.long_axis_mm - 1.0 if before.long_axis_mm > 0 else None
    by_volume = _trend(volume, rules.volume_growth, rules.volume_shrinkage)
    by_diameter = (
        by_volume
        if diameter is None
        else _trend(diameter, rules.diameter_growth, rules.diameter_shrinkage)
    )
    return {
        "status": by_volume if rules.rule == "volume" else by_diameter,
        "status_volume": by_volume,
        "status_diameter": by_diameter,
        "volume_change_percent": 100.0 * volume,
        "diameter_change_percent": None if diameter is None else 100.0 * diameter,
    }


def patient_response(
    baseline: list[Lesion], followup: list[Lesion], pairs, rules: ChangeRules
) -> dict:
    """RECIST 1.1-like sum of target-lesion diameters then and now, and the response."""
    partner = {b: f for b, f in pairs if b is not None}
    targets = sorted(baseline, key=lambda lesion: -lesion.long_axis_mm)[: rules.target_lesions]
    before = sum(lesion.long_axis_mm for lesion in targets)
    after = sum(
        followup[partner[t.number] - 1].long_axis_mm
        for t in targets
        if partner.get(t.number) is not None
    )
    new = sum(1 for b, _ in pairs if b is None)
    change = after / before - 1.0 if before > 0 else None
    if new or (change is not None and change >= rules.progression_sum
               and after - before >= rules.progression_sum_mm):  # fmt: skip
        response = "progressive disease"
    elif baseline and not followup:
        response = "complete response"
    elif change is not None and change <= -rules.response_sum:
        response = "partial response"
    else:
        response = "stable disease"
    return {
        "target_lesions": [t.number for t in targets],
        "sum_of_diameters_mm": {"baseline": before, "followup": after},
        "sum_change_percent": None if change is None else 100.0 * change,
        "new_lesions": new,
        "response": response,
    }


def _trend(change: float, growth: float, shrinkage: float) -> str:
    if change >= growth:
        return "growing"
    if change <= -shrinkage:
        return "shrinking"
    return "stable"


def _overlaps(baseline_map, followup_map, nb: int, nf: int) -> np.ndarray:
    """``(nb + 1, nf + 1)`` voxel counts of each baseline lesion over each follow-up lesion."""
    both = (baseline_map > 0) & (followup_map > 0)
    pairs = baseline_map[both].astype(np.int64) * (nf + 1) + followup_map[both]
    counts = np.bincount(pairs, minlength=(nb + 1) * (nf + 1)).reshape(nb + 1, nf + 1)
    counts[0, :] = 0
    counts[:, 0] = 0
    return counts


def _note_merges_and_splits(overlap, pairs, notes, split_share: float) -> set[int]:
    """Notes on merged and split lesions; returns the follow-up lesions that are split parts
    (they belong to a baseline lesion: never "new")."""
    followup_sizes = overlap.sum(axis=0)
    split_parts: set[int] = set()
    for b, f in pairs.items():
        sharing = [other for other, g in pairs.items() if g == f and other != b]
        if sharing:
            notes[b] = "merged at follow-up with baseline lesion(s) " + ", ".join(
                str(s) for s in sorted(sharing)
            )
        parts = [
            g
            for g in np.flatnonzero(overlap[b])
            if g != f and overlap[b, g] >= split_share * max(followup_sizes[g], 1)
        ]
        if parts:
            split_parts.update(int(g) for g in parts)
            notes[b] = (notes.get(b, "") + "; " if b in notes else "") + (
                "split at follow-up: also follow-up lesion(s) " + ", ".join(str(g) for g in parts)
            )
    return split_parts - set(pairs.values())
