"""Voxel geometry from the affine: spacing, volume, axial axis, label/image match, diameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from liverseg.errors import DataError
from liverseg.geometry import (
    axial_axis,
    axial_diameters,
    checked_affine,
    chord_diameters,
    label_affine_matches,
    spacing_mm,
    voxel_volume_mm3,
)


def _disk(shape, centre, radii_vox) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    centre = np.asarray(centre, float).reshape(-1, *([1] * len(shape)))
    radii = np.asarray(radii_vox, float).reshape(-1, *([1] * len(shape)))
    return (((grid - centre) / radii) ** 2).sum(0) <= 1


def _slice_diameters(mask_2d: np.ndarray, spacing_2d: tuple[float, float]) -> tuple[float, float]:
    """Diameters of a 2D mask taken as the one axial slice of a volume (axis 2 axial)."""
    affine = np.diag([*spacing_2d, 5.0, 1.0])
    long_mm, short_mm, index = axial_diameters(mask_2d[..., None], affine)
    assert index == 0
    return long_mm, short_mm


def test_rectangle_diameters_by_hand():
    # 10 x 4 voxels at 1.5 x 0.8 mm, voxel centres: the longest chord is the diagonal between
    # corner centres, (13.5, 2.4) mm. Perpendicular to it, the chord between the two ends of one
    # column, offset (0, 2.4) mm, lies 2.4 * 2.4 / 13.71 = 0.42 mm along the long axis (within
    # one 0.8 mm voxel) and spans 2.4 * 13.5 / 13.71 mm across it.
    mask = np.zeros((14, 8), dtype=bool)
    mask[2:12, 2:6] = True
    long_mm, short_mm = _slice_diameters(mask, (1.5, 0.8))
    diagonal = math.hypot(13.5, 2.4)
    assert long_mm == pytest.approx(diagonal)
    assert short_mm == pytest.approx(2.4 * 13.5 / diagonal)


def test_line_and_disk_diameters():
    line = np.zeros((3, 9), dtype=bool)
    line[1, 1:8] = True
    assert _slice_diameters(line, (2.0, 0.8)) == pytest.approx((6 * 0.8, 0.0))
    assert chord_diameters(np.zeros((1, 2))) == (0.0, 0.0)
    disk = _disk((41, 41), (20, 20), (15, 15))
    long_mm, short_mm = _slice_diameters(disk, (0.5, 0.5))
    assert long_mm == pytest.approx(15.0, abs=0.5)
    assert short_mm == pytest.approx(15.0, abs=0.6)


def test_spacing_and_voxel_volume_of_a_sheared_grid():
    linear = np.array([[0.8, 0.3, 0.0], [0.0, 0.7, 0.0], [0.0, 0.0, 2.5]])
    affine = np.eye(4)
    affine[:3, :3] = linear
    assert spacing_mm(affine) == pytest.approx((0.8, math.hypot(0.3, 0.7), 2.5))
    # |det| is the true voxel volume; the product of column lengths is not, under shear.
    assert voxel_volume_mm3(affine) == pytest.approx(0.8 * 0.7 * 2.5)
    assert voxel_volume_mm3(affine) < np.prod(spacing_mm(affine))


def test_axial_axis_is_the_one_along_scanner_z():
    assert axial_axis(np.diag([0.7, 0.7, 3.0, 1.0])) == 2
    assert axial_axis(np.eye(4)[[2, 1, 0, 3]]) == 0


@pytest.mark.parametrize(
    "bad",
    [np.eye(3), np.full((4, 4), np.nan), np.diag([1.0, 1.0, 0.0, 1.0])],
    ids=["3x3", "nan", "singular"],
)
def test_bad_affines_are_data_errors(bad):
    with pytest.raises(DataError, match="affine"):
        checked_affine(bad)


def test_label_affine_matches_within_tolerance_only():
    shifted = np.eye(4)
    shifted[0, 3] = 3e-4
    assert label_affine_matches(np.eye(4), shifted, 0.01)
    shifted[0, 3] = 0.02
    assert not label_affine_matches(np.eye(4), shifted, 0.01)
    assert not label_affine_matches(np.eye(4), np.full((4, 4), np.nan), 0.01)


def test_diameters_are_measured_in_the_largest_axial_slice():
    lesion = np.zeros((12, 12, 5), bool)
    lesion[2:5, 2:5, 1] = True  # 3 x 3
    lesion[2:9, 2:5, 3] = True  # 7 x 3: the largest slice
    long_mm, short_mm, index = axial_diameters(lesion, np.diag([1.0, 1.0, 4.0, 1.0]))
    assert index == 3
    assert long_mm == pytest.approx(math.hypot(6, 2))
    assert chord_diameters(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx((5.0, 0.0))
