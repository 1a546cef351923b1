"""The staging report: volumes in mL, lesion diameters, centroids, warnings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.data.downsampling import downsampled_affine
from liverseg.errors import DataError
from liverseg.evaluation.lesions import lesion_detection, size_class
from liverseg.evaluation.report import DISCLAIMER, case_report, format_report, lesion_table
from liverseg.geometry import axial_axis, axial_diameters, spacing_is_trustworthy

SPACING = (0.7, 0.9, 2.5)
VOXEL_MM3 = 0.7 * 0.9 * 2.5


def _ball(shape, centre_mm, radius_mm, spacing) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    d2 = sum(((g * s - c) ** 2) for g, s, c in zip(grid, spacing, centre_mm))
    return d2 <= radius_mm**2


def _phantom() -> np.ndarray:
    """A liver ball of radius 14 mm holding a tumor ball of radius 6 mm, anisotropic voxels."""
    shape = (48, 40, 16)
    labels = np.full(shape, BACKGROUND, dtype=np.uint8)
    labels[_ball(shape, (16, 18, 18), 14, SPACING)] = LIVER
    labels[_ball(shape, (14, 18, 18), 6, SPACING)] = TUMOR
    return labels


def test_volumes_are_voxel_counts_times_voxel_volume():
    labels = _phantom()
    report = case_report(labels, np.diag([*SPACING, 1.0]), case_id="phantom")
    liver, tumor = int((labels == LIVER).sum()), int((labels == TUMOR).sum())
    assert report["liver_volume_ml"] == pytest.approx((liver + tumor) * VOXEL_MM3 / 1000)
    assert report["liver_parenchyma_volume_ml"] == pytest.approx(liver * VOXEL_MM3 / 1000)
    assert report["tumor_burden_ml"] == pytest.approx(tumor * VOXEL_MM3 / 1000)
    assert report["tumor_liver_ratio_percent"] == pytest.approx(100 * tumor / (liver + tumor))
    # The voxelised balls are close to the true ones: 4/3 pi r^3.
    assert report["tumor_burden_ml"] == pytest.approx(4 / 3 * math.pi * 6**3 / 1000, rel=0.1)
    assert report["liver_volume_ml"] == pytest.approx(4 / 3 * math.pi * 14**3 / 1000, rel=0.05)
    assert report["lesion_count"] == 1
    assert report["lesions"][0]["volume_ml"] == pytest.approx(report["tumor_burden_ml"])
    assert report["disclaimer"] == DISCLAIMER
    assert report["warnings"] == []
    json.dumps(report, allow_nan=False)


def test_rectangle_lesion_diameters_and_axial_slice():
    labels = np.zeros((16, 10, 6), dtype=np.uint8)
    labels[2:12, 3:7, 2] = TUMOR  # 10 x 4 voxels at 1.5 x 0.8 mm in axial slice 2
    labels[4:8, 4:6, 3] = TUMOR  # a smaller slice above
    (row,) = lesion_table(labels, np.diag([1.5, 0.8, 3.0, 1.0]))
    diagonal = math.hypot(9 * 1.5, 3 * 0.8)  # centre to centre, see test_metrics
    assert row["long_axis_mm"] == pytest.approx(diagonal)
    assert row["short_axis_mm"] == pytest.approx(2.4 * 13.5 / diagonal)
    assert row["axial_slice"] == 2
    assert row["voxels"] == 48
    assert row["volume_ml"] == pytest.approx(48 * 1.5 * 0.8 * 3.0 / 1000)


def test_axial_axis_follows_the_affine_not_axis_2():
    # Voxel axis 0 runs along scanner z (3 mm), axis 1 along x (1.5 mm), axis 2 along y (0.8 mm).
    affine = np.array(
        [[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 0.8, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    assert axial_axis(affine) == 0
    labels = np.zeros((6, 16, 10), dtype=np.uint8)
    labels[4, 2:12, 3:7] = TUMOR
    (row,) = lesion_table(labels, affine)
    diagonal = math.hypot(13.5, 2.4)
    assert row["long_axis_mm"] == pytest.approx(diagonal)
    assert row["short_axis_mm"] == pytest.approx(2.4 * 13.5 / diagonal)
    assert row["axial_slice"] == 4


def test_centroid_in_scanner_coordinates_under_a_rotated_affine():
    # x = 10 - 0.8 j, y = -20 + 1.5 i, z = 5 + 3 k
    affine = np.array(
        [[0.0, -0.8, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1.0]]
    )
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[4:6, 4:6, 4:6] = TUMOR  # centre index (4.5, 4.5, 4.5)
    image = np.full(labels.shape, 100, dtype=np.int16)
    image[4:6, 4:6, 4] = 30
    image[4:6, 4:6, 5] = 50
    (row,) = lesion_table(labels, affine, image_hu=image)
    assert row["centroid_mm"] == pytest.approx([10 - 0.8 * 4.5, -20 + 1.5 * 4.5, 5 + 3 * 4.5])
    assert row["mean_hu"] == pytest.approx(40.0)
    assert row["volume_ml"] == pytest.approx(8 * 0.8 * 1.5 * 3.0 / 1000)
    assert row["long_axis_mm"] == pytest.approx(math.hypot(0.8, 1.5))


def test_lesion_threshold_order_and_count():
    labels = np.full((20, 20, 6), LIVER, dtype=np.uint8)
    labels[1:3, 1:3, 1] = TUMOR  # 4 voxels = 4 mm^3: below 10 mm^3
    labels[5:8, 5:8, 1:3] = TUMOR  # 18 voxels
    labels[12:16, 12:16, 1:4] = TUMOR  # 48 voxels
    report = case_report(labels, np.eye(4))
    assert report["lesion_count"] == 2
    assert report["small_tumor_components_excluded"] == 1
    assert [row["voxels"] for row in report["lesions"]] == [48, 18]
    assert [row["lesion"] for row in report["lesions"]] == [1, 2]
    assert report["tumor_burden_ml"] == pytest.approx((4 + 18 + 48) / 1000)
    assert case_report(labels, np.eye(4), min_tumor_mm3=0)["lesion_count"] == 3


def test_untrustworthy_spacing_is_flagged():
    assert not spacing_is_trustworthy(np.eye(4))
    shifted = np.eye(4)
    shifted[:3, 3] = (-100, 20, 7)
    shifted[0, 0] = -1.0
    assert not spacing_is_trustworthy(shifted)
    assert spacing_is_trustworthy(np.diag([0.7, 0.7, 5.0, 1.0]))
    report = case_report(_phantom(), np.eye(4), case_id="liver_30")
    assert not report["spacing_trustworthy"]
    assert any("28-47" in warning for warning in report["warnings"])
    text = format_report(report)
    assert DISCLAIMER in text.splitlines()
    assert "WARNING" in text and "liver_30" in text


# A real-looking LPS affine: 0.7 mm in-plane, 2.5 mm slices.
REAL_LOOKING = np.array(
    [[-0.7, 0, 0, 180.0], [0, -0.7, 0, 160.0], [0, 0, 2.5, -400.0], [0, 0, 0, 1]], dtype=float
)
HALVED_IDENTITY = downsampled_affine(np.eye(4), 2)
PLACEHOLDERS = {
    "identity": np.eye(4),
    "identity halved by prepare": HALVED_IDENTITY,
    "identity halved twice": downsampled_affine(HALVED_IDENTITY, 2),
    "identity reduced by 4": downsampled_affine(np.eye(4), 4),
    "axes swapped and flipped": np.array(
        [[0, -1.0, 0, 5], [1.0, 0, 0, 0], [0, 0, -1.0, 9], [0, 0, 0, 1]]
    ),
}
REAL_GEOMETRIES = {
    "0.7 mm in-plane, 2.5 mm slices": REAL_LOOKING,
    "the same halved": downsampled_affine(REAL_LOOKING, 2),
    "2 mm but not isotropic": np.diag([2.0, 2.0, 4.0, 1.0]),
    "isotropic 1.5 mm": np.diag([1.5, 1.5, 1.5, 1.0]),
    "oblique 1 mm": np.array(
        [[0.8, -0.6, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]], dtype=float
    ),
}


@pytest.mark.parametrize("name", PLACEHOLDERS)
def test_placeholder_spacing_is_untrusted_also_after_prepare(name):
    affine = PLACEHOLDERS[name]
    assert not spacing_is_trustworthy(affine)
    report = case_report(_phantom(), affine, case_id="liver_30")
    assert not report["spacing_trustworthy"]
    assert any("28-47" in warning for warning in report["warnings"])


@pytest.mark.parametrize("name", REAL_GEOMETRIES)
def test_real_geometry_is_trusted(name):
    assert spacing_is_trustworthy(REAL_GEOMETRIES[name])
    assert case_report(_phantom(), REAL_GEOMETRIES[name])["warnings"] == []


def test_halved_identity_has_2_mm_voxels_and_a_moved_origin():
    # What the predicate has to see through: neither an identity nor 1 mm any more.
    np.testing.assert_array_equal(HALVED_IDENTITY[:3, :3], 2 * np.eye(3))
    np.testing.assert_array_equal(HALVED_IDENTITY[:3, 3], [0.5, 0.5, 0.5])


def test_report_text_and_json_without_liver():
    labels = np.zeros((5, 5, 5), dtype=np.uint8)
    report = case_report(labels, np.diag([*SPACING, 1.0]))
    assert report["tumor_liver_ratio_percent"] is None
    assert report["lesion_count"] == 0 and report["lesions"] == []
    json.dumps(report, allow_nan=False)
    assert "n/a" in format_report(report)
    assert DISCLAIMER in format_report(report).splitlines()


def test_bad_inputs_raise_data_error():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, 0] = 3
    with pytest.raises(DataError, match="label values"):
        case_report(labels, np.eye(4))
    with pytest.raises(DataError, match="CT shape"):
        lesion_table(np.zeros((4, 4, 4), np.uint8), np.eye(4), image_hu=np.zeros((4, 4, 5)))
    with pytest.raises(DataError, match="4 x 4"):
        case_report(np.zeros((4, 4, 4), np.uint8), np.eye(3))


def test_real_liver_report(real_ct):
    nib = pytest.importorskip("nibabel")
    image, mask = (nib.load(str(path)) for path in real_ct)
    labels = np.asarray(mask.dataobj)
    report = case_report(labels, mask.affine, image_hu=np.asarray(image.dataobj), case_id="real")
    voxel_mm3 = abs(np.linalg.det(mask.affine[:3, :3]))
    assert report["liver_volume_ml"] == pytest.approx((labels > 0).sum() * voxel_mm3 / 1000)
    assert 500 < report["liver_volume_ml"] < 3500  # an adult liver
    assert report["spacing_trustworthy"] and report["warnings"] == []
    assert spacing_is_trustworthy(downsampled_affine(mask.affine, 2))
    assert report["axial_axis"] == 2
    json.dumps(report, allow_nan=False)


def test_report_diameters_and_evaluate_size_classes_agree_on_an_oblique_scan():
    # A grid tilted 30 degrees in-plane and sheared: per-axis spacings would mis-measure it. The
    # report's long axis and `evaluate`'s size class must come from one measure.
    angle = np.deg2rad(30)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    linear = rotation @ np.array([[0.85, 0.3, 0], [0, 0.8, 0], [0, 0, 2.5]])
    affine = np.eye(4)
    affine[:3, :3] = linear
    labels = np.full((40, 40, 6), LIVER, dtype=np.uint8)
    labels[5:29, 10:14, 1:4] = TUMOR  # one lesion, long along voxel axis 0
    report = case_report(labels, affine, min_tumor_mm3=0.0)
    (row,) = report["lesions"]
    # By hand: the longest chord joins opposite corner centres, 23 steps along voxel axis 0 and
    # 3 along axis 1 of the sheared columns c0, c1: |23 c0 +- 3 c1| mm.
    corners = [23 * linear[:, 0] + 3 * linear[:, 1], 23 * linear[:, 0] - 3 * linear[:, 1]]
    true_long = max(float(np.linalg.norm(c)) for c in corners)
    assert row["long_axis_mm"] == pytest.approx(true_long)
    assert row["long_axis_mm"] == pytest.approx(axial_diameters(labels == TUMOR, affine)[0])
    detection = lesion_detection(labels == TUMOR, labels == TUMOR, affine)
    by_size = {name: counts["total"] for name, counts in detection["by_size"].items()}
    assert by_size[size_class(row["long_axis_mm"])] == 1
    assert sum(by_size.values()) == 1
    # Per-axis spacings (column lengths 0.85 and 0.854 mm, what evaluate used before) would give
    # hypot(23 * 0.85, 3 * 0.854) = 19.7 mm, "10-20mm": the report said > 20 mm for the same lesion.
    assert row["long_axis_mm"] > 20.0 and size_class(row["long_axis_mm"]) == ">20mm"
