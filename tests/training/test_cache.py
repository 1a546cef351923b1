"""The training cache and inference see the same intensities, in the same axis order."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from liverseg.constants import LIVER, TUMOR
from liverseg.data.cases import Case
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.volume import predict_volume
from liverseg.training.cache import preprocess_case

SHAPE = (32, 28, 24)
PATCH = 32


class InputProbe(nn.Module):
    """Records every patch it is given; predicts background everywhere."""

    size_multiple = 1

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().float().clone())
        return torch.full((x.shape[0], 2, *x.shape[2:]), -10.0)


def write_case(folder, affine) -> Case:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1200, size=SHAPE).astype(np.int16)  # beyond the window both ways
    label = np.zeros(SHAPE, np.uint8)
    label[4:28, 4:24, 2:22] = LIVER
    label[10:14, 10:14, 8:12] = TUMOR
    for sub, data in (("imagesTr", hu), ("labelsTr", label)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), folder / sub / "liver_0.nii.gz")
    return Case("liver_0", folder / "imagesTr/liver_0.nii.gz", folder / "labelsTr/liver_0.nii.gz")


LPS = np.array([[-0.8, 0, 0, 20.0], [0, -0.9, 0, 30.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [np.diag([0.8, 0.9, 2.5, 1.0]), LPS], ids=["RAS", "LPS"])
def test_cache_intensities_equal_what_inference_feeds_the_model(tmp_path, affine):
    case = write_case(tmp_path, affine)
    settings = {
        "hu_min": -150.0,
        "hu_max": 250.0,
        "shape": list(SHAPE),  # no crop: the whole volume, padded to one patch
        "min_size": PATCH,
        "affine_tolerance_mm": 0.01,
        "copy_label_geometry": False,
    }
    cached = np.load(preprocess_case(case, tmp_path / "cache", settings).image)
    probe = InputProbe()
    inference = InferenceSettings(hu_min=-150.0, hu_max=250.0, patch_size=PATCH, amp="off")
    predict_volume(probe, case.image, inference.replace(postprocess=None), device="cpu")
    (patch,) = probe.seen  # one patch covers the padded volume
    seen = patch[0, 0].numpy().astype(np.float16)
    assert cached.shape == seen.shape == (PATCH, PATCH, PATCH)
    assert cached.min() == -1 and cached.max() == 1  # the window clipped both ends
    np.testing.assert_array_equal(cached, seen)


@pytest.mark.parametrize("affine", [np.diag([0.8, 0.9, 2.5, 1.0]), LPS], ids=["RAS", "LPS"])
def test_at_a_target_spacing_cache_and_inference_resample_alike(tmp_path, affine):
    case = write_case(tmp_path, affine)
    target = (1.6, 1.8, 1.25)  # coarser in-plane, finer between slices
    settings = {
        "hu_min": -150.0,
        "hu_max": 250.0,
        "shape": [16, 14, 48],  # the whole resampled volume, padded to one patch
        "min_size": PATCH,
        "affine_tolerance_mm": 0.01,
        "copy_label_geometry": False,
        "spacing_mm": list(target),
    }
    cached_case = preprocess_case(case, tmp_path / "cache", settings)
    assert cached_case.spacing_mm == pytest.approx(target)
    label = np.load(cached_case.label)
    assert label.shape == (PATCH, PATCH, 48) and set(np.unique(label)) == {0, LIVER, TUMOR}
    probe = InputProbe()
    inference = InferenceSettings(
        hu_min=-150.0, hu_max=250.0, patch_size=PATCH, amp="off", spacing_mm=target
    )
    prediction = predict_volume(probe, case.image, inference.replace(postprocess=None))
    assert prediction.labels.shape == SHAPE  # back on the input grid
    cached = np.load(cached_case.image).astype(np.float32)
    seen = [p[0].numpy() for batch in probe.seen for p in batch]  # 2 patches cover 48 slices
    assert len(seen) == 2 and all(p.shape == (PATCH, PATCH, PATCH) for p in seen)
    np.testing.assert_allclose(seen[0], cached[:, :, :PATCH], atol=2e-3)
    np.testing.assert_allclose(seen[-1], cached[:, :, -PATCH:], atol=2e-3)
