"""One physical scale: resampling to a target spacing and back, in the cache and at inference."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.evaluation.metrics import dice_score as dice
from liverseg.geometry import spacing_mm
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.volume import predict_volume
from liverseg.phantoms import generate_case
from liverseg.resampling import (
    grid_centres,
    resample_image,
    resample_labels,
    resampled_affine,
    resampled_shape,
    stored_target,
)


def _lps_affine(spacing):
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [100.0, 80.0, -40.0]
    return affine


def test_resampled_grid_keeps_the_field_of_view_and_voxel_centres():
    shape, spacing, target = (101, 64, 30), (0.7, 0.7, 5.0), (1.5, 1.5, 1.5)
    new_shape = resampled_shape(shape, spacing, target)
    assert new_shape == (47, 30, 100)
    affine = _lps_affine(spacing)
    new_affine = resampled_affine(affine, shape, new_shape)
    # Each new voxel centre is, in world mm, the old index coordinates grid_centres() gives.
    for new_index in ((0, 0, 0), (new_shape[0] - 1, 0, new_shape[2] // 2), (5, 29, 99)):
        old_index = [grid_centres(n, m)[i] for n, m, i in zip(shape, new_shape, new_index)]
        np.testing.assert_allclose(
            new_affine @ [*new_index, 1.0], affine @ [*old_index, 1.0], atol=1e-9
        )
    # The field of view (voxels x spacing) is kept exactly.
    np.testing.assert_allclose(
        np.array(new_shape) * spacing_mm(new_affine), np.array(shape) * spacing, rtol=1e-9
    )


def test_target_in_ras_order_maps_to_the_stored_axes():
    permuted = np.zeros((4, 4))
    permuted[0, 2] = -1.0  # stored axis 2 runs right-to-left: RAS x
    permuted[1, 0] = 1.0  # stored axis 0: RAS y
    permuted[2, 1] = 2.0  # stored axis 1: RAS z
    permuted[3, 3] = 1.0
    assert stored_target(permuted, (1.0, 2.0, 3.0)) == (2.0, 3.0, 1.0)
    assert stored_target(_lps_affine((1, 1, 1)), (1.0, 2.0, 3.0)) == (1.0, 2.0, 3.0)


def test_a_linear_ramp_stays_linear_and_unshifted():
    # Antialiasing must not shift anything: a ramp resampled is the ramp at the new centres.
    n = 60
    ramp = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, 8, 8)).copy()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for target in ((2.5, 1.0, 1.0), (0.5, 1.0, 1.0)):
        out, _ = resample_image(ramp, affine, target)
        expected = np.clip(grid_centres(n, out.shape[0]), 0, n - 1)
        inner = slice(3, -3)
        np.testing.assert_allclose(out[inner, 4, 4], expected[inner], atol=1e-3)


def test_a_volume_already_at_the_target_is_returned_unchanged():
    volume = np.zeros((10, 12, 14), np.int16)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    out, new_affine = resample_image(volume, affine, (2.0, 2.0, 3.0))
    assert out is volume and np.array_equal(new_affine, affine)
    labels = np.zeros((10, 12, 14), np.uint8)
    assert resample_labels(labels, affine, (2.005, 2.0, 3.0))[0] is labels


def test_labels_keep_their_volume_in_mm3_and_a_thin_tumor_survives():
    shape, spacing = (90, 90, 30), (0.8, 0.8, 4.0)
    x, y, z = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    liver = (x - 36) ** 2 + (y - 36) ** 2 + ((z - 60) * 0.8) ** 2 < 25**2
    tumor = (x - 30) ** 2 + (y - 36) ** 2 + (z - 60) ** 2 < 4**2  # 8 mm: two 4 mm slices
    labels = np.where(tumor, TUMOR, np.where(liver, LIVER, BACKGROUND)).astype(np.uint8)
    affine = np.diag([*spacing, 1.0])
    out, new_affine = resample_labels(labels, affine, (1.5, 1.5, 1.5))
    voxel_old, voxel_new = np.prod(spacing), np.prod(spacing_mm(new_affine))
    for value in (LIVER, TUMOR):
        old_mm3 = (labels >= value).sum() * voxel_old
        new_mm3 = (out >= value).sum() * voxel_new
        assert new_mm3 == pytest.approx(old_mm3, rel=0.12), value
    assert set(np.unique(out)) == {BACKGROUND, LIVER, TUMOR}


class _LiverByMeanHU(torch.nn.Module):
    """A fixed model: liver where the 7-voxel mean of the windowed CT is above 0 HU.

    Its kernel has a size in voxels, not mm, as a trained UNet's; deterministic, so two storages
    of one anatomy can be compared. Counts the voxels it is given.
    """

    size_multiple = 1

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 7, padding=3, bias=False)
        torch.nn.init.constant_(self.conv.weight, 1 / 343)
        self.voxels_seen = 0

    def forward(self, x):
        self.voxels_seen += x.numel()
        mean = self.conv(x)
        liver = 20 * (mean + 0.25)  # above 0 HU on average (window -150 to 250 HU)
        return torch.cat([liver, torch.full_like(liver, -20.0)], dim=1)


def _clean_ct(case):
    """The phantom's anatomy as a noise-free CT: liver 100 HU, tumor 40 HU, the rest -100 HU."""
    _, labels, affine = case
    hu = np.select([labels == LIVER, labels == TUMOR], [100, 40], -100).astype(np.int16)
    return nib.Nifti1Image(hu, affine), labels, affine


def _liver_dice_in_coarse_space(fine_labels, fine_affine, coarse_labels, coarse_affine):
    on_coarse, _ = resample_labels(fine_labels, fine_affine, spacing_mm(coarse_affine))
    assert on_coarse.shape == coarse_labels.shape
    return dice(on_coarse >= LIVER, coarse_labels >= LIVER)


def test_one_anatomy_stored_at_two_spacings_predicts_the_same_labels_in_scanner_space():
    # One seed drawn on two grids (4 mm and 1.6 mm, LPS): the same anatomy in mm. Its labels
    # agree at Dice 0.99 in scanner space; clean CTs keep intensity noise out of the comparison.
    fov = (288.0, 288.0, 192.0)
    coarse = _clean_ct(generate_case((72, 72, 48), seed=5, fov_mm=fov, lps=True))
    fine = _clean_ct(generate_case((180, 180, 120), seed=5, fov_mm=fov, lps=True))
    model = _LiverByMeanHU()
    base = InferenceSettings(hu_min=-150, hu_max=250, patch_size=32, batch_size=4)

    def predict(case, settings):
        model.voxels_seen = 0
        labels = predict_volume(model, case[0], settings).labels
        assert labels.shape == case[1].shape
        return labels, model.voxels_seen

    at_4mm = base.replace(spacing_mm=(4.0, 4.0, 4.0))
    (coarse_labels, coarse_seen), (fine_labels, fine_seen) = (
        predict(coarse, at_4mm),
        predict(fine, at_4mm),
    )
    assert fine_seen == coarse_seen  # the model saw one grid, whatever the storage
    assert dice(coarse_labels >= LIVER, coarse[1] >= LIVER) > 0.9  # it does find the liver
    assert _liver_dice_in_coarse_space(fine_labels, fine[2], coarse_labels, coarse[2]) >= 0.95
    # Without a target spacing the model is given the fine storage at its own, 2.5x finer grid.
    assert predict(fine, base)[1] > 10 * coarse_seen
