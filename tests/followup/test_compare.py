"""liverseg compare: alignment recovered, lesions matched, statuses as constructed, outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from liverseg.cli import main
from liverseg.constants import LIVER, TUMOR
from liverseg.followup.compare import Scan, compare_scans
from liverseg.followup.matching import ChangeRules
from liverseg.io import save_nifti

SHAPE = (64, 64, 48)
SPACING = np.array([3.0, 3.0, 3.5])


def ball(centre_mm, radius_mm):
    grid = np.indices(SHAPE, dtype=float) * SPACING[:, None, None, None]
    return sum((g - c) ** 2 for g, c in zip(grid, centre_mm)) <= radius_mm**2


def liver_with(lesions):
    """An ellipsoid-ish liver (two overlapping balls: not symmetric) with ball lesions in it."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[ball((90, 95, 80), 55) | ball((120, 80, 70), 40)] = LIVER
    for centre, radius in lesions:
        labels[ball(centre, radius) & (labels > 0)] = TUMOR
    ct = np.where(labels == LIVER, 100, np.where(labels == TUMOR, 50, -50)).astype(np.int16)
    return ct, labels


def affine(offset=(0.0, 0.0, 0.0)):
    matrix = np.diag([*SPACING, 1.0])
    matrix[:3, 3] = offset
    return matrix


LESIONS = [((70, 90, 80), 14), ((110, 100, 70), 9), ((95, 70, 95), 8)]


def test_identical_scans_are_all_stable():
    ct, labels = liver_with(LESIONS)
    result = compare_scans(Scan(ct, labels, affine()), Scan(ct, labels, affine())).result
    assert [row["status"] for row in result["lesions"]] == ["stable"] * 3
    assert result["patient"]["response"] == "stable disease"
    np.testing.assert_allclose(result["alignment"]["translation_mm"], 0, atol=0.3)
    assert result["alignment"]["liver_dice_after_alignment"] > 0.99 and not result["warnings"]


def test_a_shifted_copy_is_all_stable_and_the_shift_is_recovered():
    ct, labels = liver_with(LESIONS)
    shift = np.array([6.0, -9.0, 4.5])
    result = compare_scans(Scan(ct, labels, affine()), Scan(ct, labels, affine(shift))).result
    assert [row["status"] for row in result["lesions"]] == ["stable"] * 3
    np.testing.assert_allclose(result["alignment"]["translation_mm"], shift, atol=0.5)
    # Each lesion's centroid is reported in its own scan's scanner coordinates.
    for row in result["lesions"]:
        moved = np.subtract(row["followup"]["centroid_mm"], row["baseline"]["centroid_mm"])
        np.testing.assert_allclose(moved, shift, atol=1e-6)


def test_grown_shrunk_vanished_and_new_lesions_after_a_move():
    ct, labels = liver_with(LESIONS)
    (a, ra), (b, rb), (c, _) = LESIONS
    later = [(a, ra * 1.35), (b, rb * 0.55), ((125, 75, 60), 9)]  # c vanished, one new
    ct2, labels2 = liver_with(later)
    shift = np.array([-7.0, 5.0, 3.5])  # one slice
    comparison = compare_scans(Scan(ct, labels, affine()), Scan(ct2, labels2, affine(shift)))
    statuses = sorted(row["status"] for row in comparison.result["lesions"])
    assert statuses == ["disappeared", "growing", "new", "shrinking"]
    patient = comparison.result["patient"]
    assert patient["new_lesions"] == 1 and patient["response"] == "progressive disease"
    assert patient["tumor_burden_ml"]["followup"] > patient["tumor_burden_ml"]["baseline"]
    grown = next(r for r in comparison.result["lesions"] if r["status"] == "growing")
    assert grown["volume_change_percent"] > 73 and grown["status_diameter"] == "growing"
    # The status maps colour each lesion by its status on the baseline grid.
    assert comparison.baseline_status_map.max() > 0 and comparison.followup_status_map.max() > 0


def test_rules_are_checked():
    with pytest.raises(ValueError, match="choose one of volume, diameter"):
        ChangeRules(rule="area")


def test_cli_writes_json_csv_and_animation(tmp_path, capsys):
    ct, labels = liver_with(LESIONS)
    ct2, labels2 = liver_with(LESIONS[:2])
    paths = {}
    for name, (image, seg, matrix) in {
        "base": (ct, labels, affine()),
        "later": (ct2, labels2, affine((3.0, 0.0, 0.0))),
    }.items():
        paths[name] = (
            save_nifti(image, matrix, tmp_path / f"{name}.nii.gz"),
            save_nifti(seg, matrix, tmp_path / f"{name}_seg.nii.gz"),
        )
    out = tmp_path / "cmp"
    code = main(["compare", "--baseline", *map(str, paths["base"]),
                 "--followup", *map(str, paths["later"]), "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "1 disappeared, 2 stable" in printed
    result = json.loads((out / "comparison.json").read_text())
    assert result["inputs"]["baseline"][0].endswith("base.nii.gz")
    with (out / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == [r["status"] for r in result["lesions"]]
    assert (out / "comparison.html").stat().st_size > 10_000
    # CT without SEG and no checkpoint: a clear error, exit 2.
    code = main(["compare", "--baseline", str(paths["base"][0]),
                 "--followup", *map(str, paths["later"]), "--out", str(out)])  # fmt: skip
    assert code == 2 and "--baseline: give the CT and SEG" in capsys.readouterr().err


@pytest.mark.parametrize(
    "seed", [2, 6, 7]
)  # together: new, disappeared, growing, shrinking, stable
def test_statuses_match_the_truth_of_followup_phantoms(seed):
    """A phantom and its follow-up (rotated, shifted, breathing; lesions changed): every lesion
    of the truth is found in its own scan's coordinates with the status it was given."""
    from liverseg.phantoms.followup import render_followup

    baseline, followup, truth = render_followup((64, 64, 48), seed)
    result = compare_scans(
        Scan(baseline.image, baseline.label, baseline.affine),
        Scan(followup.image, followup.label, followup.affine),
    ).result
    assert len(result["lesions"]) == len(truth["lesions"])
    for lesion in truth["lesions"]:
        side = "baseline" if lesion["baseline"] else "followup"
        centre = np.array(lesion[side]["centroid_mm"])
        (row,) = [
            r for r in result["lesions"]
            if r[side] and np.linalg.norm(np.subtract(r[side]["centroid_mm"], centre)) < 1.0
        ]  # fmt: skip
        assert row["status"] == lesion["status"]
    assert result["alignment"]["liver_dice_after_alignment"] > 0.95
    burden = result["patient"]["tumor_burden_ml"]
    assert burden["followup"] == pytest.approx(truth["tumor_burden_ml"]["followup"], abs=1e-3)
