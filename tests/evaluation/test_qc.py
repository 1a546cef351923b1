"""Per-case quality control: each reason for review is raised by its own cause, and only then."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liverseg.constants import LIVER, TUMOR
from liverseg.errors import DataError
from liverseg.evaluation.qc import OK, REVIEW, QcThresholds, case_qc, mean_entropy, summary_text
from liverseg.evaluation.report import case_report, format_report, lesion_table
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
    qc = case_qc(labels, affine(), regions, lesions=report["lesions"])
    assert qc["low_confidence_lesions"] == [1]
    report["qc"] = qc
    assert "confidence 0.40" in format_report(report)
    assert "quality control: review: uncertain tumor" in format_report(report)
    assert lesion_table(labels, affine())[0]["confidence"] is None
    with pytest.raises(DataError, match="do not match"):
        case_qc(labels, affine(), regions[:, :10])


def test_region_probabilities_of_both_heads():
    regions = torch.rand(2, 3, 4, 5)
    assert region_probabilities(regions, "regions") is regions
    softmax = torch.rand(3, 3, 4, 5).softmax(0)
    liver_region, tumor = region_probabilities(softmax, "softmax")
    torch.testing.assert_close(liver_region, softmax[1] + softmax[2])
    torch.testing.assert_close(tumor, softmax[2])
