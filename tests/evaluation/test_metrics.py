"""Metrics against hand-computed values and against MONAI as an independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.evaluation.lesions import (
    lesion_detection,
    lesions,
    pool_detection,
    size_class,
)
from liverseg.evaluation.metrics import (
    case_dice,
    class_masks,
    dice_score,
    relative_volume_difference,
    surface_distances,
    volume_overlap_error,
)


def _cube(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
    return mask


def test_dice_voe_rvd_of_offset_cubes_by_hand():
    pred = _cube((12, 12, 12), (2, 2, 2), (4, 4, 4))  # 64 voxels
    truth = _cube((12, 12, 12), (4, 2, 2), (5, 4, 4))  # 80 voxels, overlap x 4..5: 2*4*4 = 32
    assert dice_score(pred, truth) == pytest.approx(2 * 32 / (64 + 80))
    assert volume_overlap_error(pred, truth) == pytest.approx(1 - 32 / (64 + 80 - 32))
    assert relative_volume_difference(pred, truth) == pytest.approx((64 - 80) / 80)
    assert relative_volume_difference(truth, pred) == pytest.approx((80 - 64) / 64)


def test_empty_masks_give_nan_or_extremes():
    empty = np.zeros((5, 5, 5), dtype=bool)
    full = _cube((5, 5, 5), (1, 1, 1), (2, 2, 2))
    assert math.isnan(dice_score(empty, empty))
    assert math.isnan(volume_overlap_error(empty, empty))
    assert math.isnan(relative_volume_difference(full, empty))
    assert dice_score(empty, full) == 0.0
    assert volume_overlap_error(full, empty) == 1.0
    assert relative_volume_difference(empty, full) == -1.0
    assert all(math.isnan(v) for v in surface_distances(empty, empty, (1, 1, 1)))
    assert surface_distances(empty, full, (1, 1, 1)) == (math.inf, math.inf)
    assert surface_distances(full, empty, (1, 1, 1)) == (math.inf, math.inf)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice_score(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


def test_class_masks_and_case_dice():
    truth = np.full((4, 4, 4), BACKGROUND, dtype=np.uint8)
    truth[:2] = LIVER  # 32 voxels
    truth[0, 0, :] = TUMOR  # 4 of them tumor
    pred = truth.copy()
    pred[0, 0, :] = LIVER  # tumor called liver
    masks = class_masks(truth)
    assert masks["liver_excl_tumor"].sum() == 28
    assert masks["liver_incl_tumor"].sum() == 32
    assert masks["tumor"].sum() == 4
    scores = case_dice(pred, truth)
    assert scores["liver_incl_tumor"] == 1.0
    assert scores["liver_excl_tumor"] == pytest.approx(2 * 28 / (32 + 28))
    assert scores["tumor"] == 0.0
    assert math.isnan(case_dice(truth * 0, truth * 0)["tumor"])


def test_surface_distances_of_shifted_bars_by_hand():
    # Bars 2 x 2 voxels in cross-section: every voxel is a surface voxel. Shifting by k voxels
    # along x (spacing sx) leaves 4 (L - k) distances of 0 and 4 each of sx, 2 sx, ..., k sx in
    # each direction. ASSD = sx k (k + 1) / (2 L); the 95th percentile of 32 zeros, 4 x sx and
    # 4 x 2 sx (L = 10, k = 2) is 2 sx.
    sx, length, shift = 1.5, 10, 2
    truth = _cube((16, 6, 6), (1, 2, 2), (length, 2, 2))
    pred = _cube((16, 6, 6), (1 + shift, 2, 2), (length, 2, 2))
    assd, hd95 = surface_distances(pred, truth, (sx, 0.7, 0.9))
    assert assd == pytest.approx(sx * shift * (shift + 1) / (2 * length))
    assert hd95 == pytest.approx(2 * sx)


def _ellipsoid(shape, centre, radii_vox) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii_vox))
    return d2 <= 1.0


def test_surface_distances_agree_with_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    spacing = (0.8, 1.3, 2.0)
    truth = _ellipsoid((26, 22, 14), (12, 10, 6), (8, 6, 4))
    pred = _ellipsoid((26, 22, 14), (14, 9, 7), (7, 6, 3.5)) | _cube(
        (26, 22, 14), (0, 0, 0), (3, 3, 2)
    )

    def as_tensor(mask):
        return torch.from_numpy(mask[None, None].astype(np.float32))

    assd, hd95 = surface_distances(pred, truth, spacing)
    reference_hd95 = monai_metrics.compute_hausdorff_distance(
        as_tensor(pred), as_tensor(truth), include_background=True, percentile=95, spacing=spacing
    ).item()
    reference_assd = monai_metrics.compute_average_surface_distance(
        as_tensor(pred), as_tensor(truth), include_background=True, symmetric=True, spacing=spacing
    ).item()
    assert hd95 == pytest.approx(reference_hd95, rel=1e-4)
    assert assd == pytest.approx(reference_assd, rel=1e-4)
    assert hd95 > 0 and assd > 0


def test_lesions_use_26_connectivity_and_a_volume_threshold():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner-touching: one lesion of 2 voxels
    mask[6:8, 6, 6] = True
    mask[7, 7, 6] = True  # three voxels
    labeled, count = lesions(mask, 2.0)
    assert count == 2
    assert labeled[1, 1, 1] == labeled[2, 2, 2] != 0
    assert sorted(np.bincount(labeled.ravel())[1:].tolist()) == [2, 3]
    # voxel volume 2 mm^3: sizes 4 and 6 mm^3
    assert lesions(mask, 2.0, min_volume_mm3=6.0)[1] == 1
    kept, count = lesions(mask, 2.0, min_volume_mm3=6.1)
    assert count == 0 and not kept.any()
    kept, count = lesions(mask, 2.0, min_volume_mm3=5.0)
    assert count == 1 and kept[7, 7, 6] == 1 and kept[1, 1, 1] == 0


def test_size_classes():
    assert [size_class(d) for d in (0.0, 9.99, 10.0, 20.0, 20.01)] == [
        "<10mm",
        "<10mm",
        "10-20mm",
        "10-20mm",
        ">20mm",
    ]


def test_lesion_detection_by_hand():
    shape = (40, 12, 12)
    truth = np.zeros(shape, dtype=bool)
    truth[1:16, 2, 2] = True  # 15 voxels along x at 1 mm: 14 mm, "10-20mm"
    truth[1:4, 8, 8] = True  # 2 mm, "<10mm", missed
    truth[18:40, 5, 5] = True  # 22 voxels: 21 mm, ">20mm"
    pred = np.zeros(shape, dtype=bool)
    pred[15, 2, 2:5] = True  # touches lesion 1 in one voxel
    pred[30, 5, 4:7] = True  # inside the big lesion
    pred[10, 10, 10] = True  # false positive
    result = lesion_detection(pred, truth, np.eye(4))
    assert (result["true_lesions"], result["found"]) == (3, 2)
    assert (result["pred_lesions"], result["true_positive"]) == (3, 2)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    by_size = result["by_size"]
    assert (by_size["<10mm"]["found"], by_size["<10mm"]["total"]) == (0, 1)
    assert (by_size["10-20mm"]["found"], by_size["10-20mm"]["total"]) == (1, 1)
    assert (by_size[">20mm"]["found"], by_size[">20mm"]["total"]) == (1, 1)
    # Along the axial axis the lesions are lines: every one measures 0 mm in its axial slice.
    swap_x_z = np.eye(4)[[2, 1, 0, 3]]  # voxel axis 0 runs along scanner z
    across = lesion_detection(pred, truth, swap_x_z)
    assert across["by_size"]["<10mm"]["total"] == 3
    # Lesions under the volume threshold vanish from both sides.
    big_only = lesion_detection(pred, truth, np.eye(4), min_volume_mm3=4.0)
    assert (big_only["true_lesions"], big_only["pred_lesions"]) == (2, 0)
    assert big_only["recall"] == 0.0 and math.isnan(big_only["precision"])

    pooled = pool_detection([result, big_only])
    assert (pooled["true_lesions"], pooled["found"]) == (5, 2)
    assert pooled["recall"] == pytest.approx(2 / 5)
    assert pooled["by_size"][">20mm"]["total"] == 2


def test_lesion_detection_empty():
    empty = np.zeros((4, 4, 4), dtype=bool)
    result = lesion_detection(empty, empty, np.eye(4))
    assert result["true_lesions"] == result["pred_lesions"] == 0
    assert math.isnan(result["recall"]) and math.isnan(result["f1"])


def test_surface_distances_on_the_real_liver_agree_with_monai(real_ct):
    monai_metrics = pytest.importorskip("monai.metrics")
    nib = pytest.importorskip("nibabel")
    image = nib.load(str(real_ct[1]))
    liver = np.asarray(image.dataobj) > 0
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    shrunk = ndimage.binary_erosion(liver, iterations=2)
    assd, hd95 = surface_distances(shrunk, liver, spacing)
    pred, truth = (torch.from_numpy(m[None, None].astype(np.float32)) for m in (shrunk, liver))
    kwargs = {"include_background": True, "spacing": spacing}
    assert hd95 == pytest.approx(
        monai_metrics.compute_hausdorff_distance(pred, truth, percentile=95, **kwargs).item(),
        rel=1e-4,
    )
    assert assd == pytest.approx(
        monai_metrics.compute_average_surface_distance(
            pred, truth, symmetric=True, **kwargs
        ).item(),
        rel=1e-4,
    )
    # Two 6-neighbour erosions move the surface about two voxels inwards.
    assert 1.0 * spacing[0] < assd < 3.0 * spacing[0]
