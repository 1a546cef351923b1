"""Per-case quality control: each reason for review is raised by its own cause, and only then."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from liverseg.constants import LIVER, TUMOR
from liverseg.errors import DataError, LiversegError
from liverseg.evaluation.qc import OK, REVIEW, QcThresholds, case_qc, mean_entropy, summary_text
from liverseg.evaluation.report import MAX_LISTED_LESIONS, case_report, format_report, lesion_table
from liverseg.labels import region_probabilities

# 3.9 mm voxels (exactly 4 mm would be an untrustworthy placeholder spacing): a ball of radius
# 70 mm is a liver of about 1437 mL, inside the adult range.
SPACING = 3.9
SHAPE = (60, 60, 60)


def ball(centre_mm, radius_mm, shape=SHAPE):
    grid = np.indices(shape, dtype=float) * SPACING
    return sum((g - c) ** 2 for g, c in zip(grid, centre_mm)) <= radius_mm**2


def affine(sign=1.0):
    return np.diag([SPACING, SPACING, sign * SPACING, 1.0])


def scene(liver_radius=70.0, tumor_radius=15.0, centre=(120.0, 120.0, 120.0)):
    """Labels and confident region probabilities: a liver ball holding one tumor ball."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[ball(centre, liver_radius)] = LIVER
    labels[ball(centre, tumor_radius)] = TUMOR
    regions = np.stack([np.where(labels > 0, 253, 2), np.where(labels == TUMOR, 253, 2)])
    return labels, regions.astype(np.uint8)


def test_a_plausible_confident_case_is_ok():
    labels, regions = scene()
    qc = case_qc(labels, affine(), regions)
    assert qc["status"] == OK and qc["reasons"] == [] and summary_text(qc) == "ok"
    assert 1300 < qc["liver_volume_ml"] < 1600
    assert qc["liver_border_fraction"] == 0.0 and qc["liver_component_ratio"] == 0.0
    assert qc["liver_entropy"] < 0.1 and qc["tumor_entropy"] < 0.3


def test_small_and_large_livers_are_flagged():
    small, regions = scene(liver_radius=40.0, tumor_radius=5.0)  # 268 mL
    qc = case_qc(small, affine(), regions)
    assert qc["status"] == REVIEW and "outside 500-3700 mL" in qc["reasons"][0]
    empty = np.zeros(SHAPE, np.uint8)
    assert case_qc(empty, affine())["reasons"] == ["no liver found"]


@pytest.mark.parametrize("sign, face", [(1.0, "top slice"), (-1.0, "bottom slice")])
def test_a_liver_cut_by_the_last_slice_is_flagged_and_the_face_named(sign, face):
    labels, regions = scene(centre=(120.0, 120.0, 220.0))  # reaches past the last slice
    qc = case_qc(labels, affine(sign), regions)
    assert qc["liver_border_fraction"] > 0.5
    assert any(r.startswith(f"liver cut by the scan's border ({face}") for r in qc["reasons"])
    inside, regions = scene()
    assert case_qc(inside, affine(sign), regions)["status"] == OK


def test_two_liver_components_of_similar_size_are_flagged_before_postprocessing():
    labels, regions = scene(liver_radius=50.0, tumor_radius=5.0, centre=(70.0, 120.0, 120.0))
    second = ball((170.0, 120.0, 120.0), 45.0)
    regions[0][second] = 220  # the model saw a second liver; post-processing removed it
    qc = case_qc(labels, affine(), regions)
    assert 0.6 < qc["liver_component_ratio"] < 0.8
    assert any("several liver components" in r for r in qc["reasons"])
    regions[0][second] = 3
    regions[0][ball((170.0, 120.0, 120.0), 10.0)] = 220  # a small speck: not ambiguous
    assert case_qc(labels, affine(), regions)["liver_component_ratio"] < 0.05


def test_a_large_tumor_burden_is_flagged():
    labels, regions = scene(tumor_radius=60.0)  # (60/70)^3 = 63% of the liver
    qc = case_qc(labels, affine(), regions)
    assert qc["tumor_liver_percent"] > 50
    assert any(r.startswith("tumor burden 6") for r in qc["reasons"])


def test_uncertainty_is_flagged_only_above_its_threshold():
    labels, regions = scene()
    regions[0][labels > 0] = 128  # p = 0.5 everywhere in the liver: one bit
    thresholds = QcThresholds(liver_entropy=0.2, tumor_entropy=0.2)
    qc = case_qc(labels, affine(), regions, thresholds=thresholds)
    assert qc["liver_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert qc["reasons"] == ["uncertain liver (mean entropy 1.000 > 0.200 bits)"]
    unchecked = QcThresholds(liver_entropy=None, tumor_entropy=None)
    assert case_qc(labels, affine(), regions, thresholds=unchecked)["status"] == OK
    # The defaults (set on phantoms with the demo model) flag a liver this uncertain.
    assert case_qc(labels, affine(), regions)["status"] == REVIEW


def test_warnings_and_untrusted_spacing_are_reasons():
    labels, regions = scene()
    qc = case_qc(labels, np.diag([4.0, 4.0, 4.0, 1.0]), regions, ["no air"])
    assert qc["reasons"][0] == "CT values: no air"
    assert "voxel size not trustworthy" in qc["reasons"][1]
    assert summary_text(qc).startswith("review: CT values: no air; voxel size")


def test_mean_entropy():
    values = np.array([0, 255, 128, 128], np.uint8)
    assert mean_entropy(values, np.array([True, True, False, False])) == 0.0
    assert mean_entropy(values, values == 128) == pytest.approx(1.0, abs=1e-4)
    assert mean_entropy(values, np.zeros(4, bool)) is None


def test_lesion_confidence_in_the_table_and_the_report():
    labels, regions = scene()
    regions[1][labels == TUMOR] = 102  # the model gave the lesion p = 0.4
    (row,) = lesion_table(labels, affine(), regions=regions)
    assert row["confidence"] == pytest.approx(0.4) and row["entropy"] == pytest.approx(0.971, 1e-3)
    report = case_report(labels, affine(), regions=regions)
    qc = case_qc(labels, affine(), regions)
    assert qc["low_confidence_lesions"] == [1] and qc["low_confidence_lesion_count"] == 1
    assert qc["lesion_count"] == report["lesion_count"] == 1
    unscored = case_qc(labels, affine())
    assert unscored["low_confidence_lesion_count"] is None
    assert unscored["low_confidence_lesions"] == []
    report["qc"] = qc
    assert "confidence 0.40" in format_report(report)
    assert "quality control: review: uncertain tumor" in format_report(report)
    assert lesion_table(labels, affine())[0]["confidence"] is None
    with pytest.raises(DataError, match="do not match"):
        case_qc(labels, affine(), regions[:, :10])


def many_tiny_lesions(count=300):
    """The scene's confident lesion (1) and ``count`` one-voxel lesions in its liver, two voxels
    apart (so 26-connectivity keeps them apart), in scan order; every other one low-confidence
    (p = 0.2), the rest p = 0.8. Returns (labels, regions, specks as a voxel index tuple)."""
    centre = (120.0, 120.0, 120.0)
    labels, regions = scene(centre=centre)
    grid = np.zeros(SHAPE, bool)
    grid[::2, ::2, ::2] = True
    # More than a voxel diagonal (6.8 mm) from the lesion of radius 15 mm
    away = ~ball(centre, 15.0 + 2 * SPACING)
    specks = np.argwhere(grid & away & (labels == LIVER))[:count]
    assert len(specks) == count
    labels[tuple(specks.T)] = TUMOR
    regions[1][tuple(specks.T)] = 204
    regions[1][tuple(specks[::2].T)] = 51
    return labels, regions, tuple(specks.T)


def test_many_tiny_lesions_are_counted_flagged_and_listed_with_a_cap():
    labels, regions, specks = many_tiny_lesions(300)
    voxel_ml = SPACING**3 / 1000
    qc = case_qc(labels, affine(), regions)
    # Lesion 1 is the 15 mm ball; lesion 2 + k is speck k (ties keep scan order); the even
    # specks, lesions 2, 4, ..., are the low-confidence ones.
    assert qc["lesion_count"] == 301 and qc["low_confidence_lesion_count"] == 150
    assert qc["low_confidence_lesions"] == list(range(2, 42, 2))  # the 20 largest of 150
    assert qc["status"] == REVIEW
    assert "301 lesions (150 low-confidence): more than 50 is implausible" in qc["reasons"]
    assert "301 lesions: more than 50" in " ".join(case_qc(labels, affine())["reasons"])
    unchecked = case_qc(labels, affine(), regions, thresholds=QcThresholds(max_lesions=None))
    assert not any("lesions" in reason for reason in unchecked["reasons"])
    # 50 lesions are still plausible, 51 are not.
    at_limit, regions_at_limit, _ = many_tiny_lesions(49)
    assert case_qc(at_limit, affine(), regions_at_limit)["reasons"] == []
    over, regions_over, _ = many_tiny_lesions(50)
    assert case_qc(over, affine(), regions_over)["reasons"] == [
        "51 lesions (25 low-confidence): more than 50 is implausible"
    ]

    report = case_report(labels, affine(), regions=regions)
    rows = report["lesions"]
    assert report["lesion_count"] == 301 and len(rows) == MAX_LISTED_LESIONS == 100
    assert [row["lesion"] for row in rows] == list(range(1, 101))
    assert rows[0]["voxels"] > 200 and {row["voxels"] for row in rows[1:]} == {1}
    assert report["lesions_not_listed"] == 201
    assert report["lesions_not_listed_volume_ml"] == pytest.approx(201 * voxel_ml)
    # The burden covers every lesion, listed or not.
    listed_ml = sum(row["volume_ml"] for row in rows)
    assert listed_ml + report["lesions_not_listed_volume_ml"] == pytest.approx(
        report["tumor_burden_ml"]
    )
    assert report["tumor_burden_ml"] == pytest.approx(np.count_nonzero(labels == TUMOR) * voxel_ml)
    # The QC block's numbers are the table's: its low-confidence lesions have p = 0.2 there.
    by_number = {row["lesion"]: row for row in rows}
    for number in qc["low_confidence_lesions"]:
        assert by_number[number]["confidence"] == pytest.approx(0.2)
    assert by_number[3]["confidence"] == pytest.approx(0.8)
    assert by_number[2]["centroid_mm"] == pytest.approx([specks[a][0] * SPACING for a in range(3)])
    report["qc"] = qc
    text = format_report(report)
    assert "lesions >= 10 mm^3: 301" in text
    assert f"the 100 largest listed; 201 smaller lesions ({201 * voxel_ml:.2f} mL in all)" in text
    assert text.count("  lesion ") == 100
    json.dumps(report, allow_nan=False)


def test_the_lesion_table_cap_can_be_changed_or_lifted():
    labels, regions, _ = many_tiny_lesions(300)
    everything = case_report(labels, affine(), regions=regions, max_listed_lesions=None)
    assert len(everything["lesions"]) == 301 and everything["lesions_not_listed"] == 0
    assert everything["lesions_not_listed_volume_ml"] == 0.0
    assert "not listed" not in format_report(everything)
    none = case_report(labels, affine(), max_listed_lesions=0)
    assert none["lesions"] == [] and none["lesions_not_listed"] == none["lesion_count"] == 301
    assert len(lesion_table(labels, affine(), max_lesions=7)) == 7
    for bad in (-1, 2.5, True):
        with pytest.raises(LiversegError, match="max_listed_lesions"):
            case_report(labels, affine(), max_listed_lesions=bad)


def test_region_probabilities_of_both_heads():
    regions = torch.rand(2, 3, 4, 5)
    assert region_probabilities(regions, "regions") is regions
    softmax = torch.rand(3, 3, 4, 5).softmax(0)
    liver_region, tumor = region_probabilities(softmax, "softmax")
    torch.testing.assert_close(liver_region, softmax[1] + softmax[2])
    torch.testing.assert_close(tumor, softmax[2])
