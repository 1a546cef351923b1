"""The sliding window: cropped to the body, air windows skipped, ensembles, mirroring, overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from torch import nn

from liverseg.constants import BACKGROUND, LIVER
from liverseg.errors import LiversegError
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.volume import predict_volume
from liverseg.inference.windows import body_box, mirror_dims, patch_overlap_voxels
from liverseg.model import UNet3D
from liverseg.phantoms import generate_case

torch.set_num_threads(1)

HU_MIN, HU_MAX = -150.0, 250.0


def settings(**changes) -> InferenceSettings:
    values = dict(hu_min=HU_MIN, hu_max=HU_MAX, patch_size=16, amp="off", postprocess=None)
    return InferenceSettings(**{**values, **changes})


def image(hu: np.ndarray) -> tio.ScalarImage:
    return tio.ScalarImage(tensor=torch.from_numpy(hu.astype(np.int16))[None], affine=np.eye(4))


def phantom_in_air() -> np.ndarray:
    """A 40 x 36 x 24 phantom in an 88 x 80 x 40 field: air, and outside-field padding of -3024
    and -2048 HU along two sides, as scanners write it."""
    hu, _, _ = generate_case((40, 36, 24), seed=3, tumor_free=False, lps=False)
    field = np.full((88, 80, 40), -1024, np.int16)
    field[:, :6], field[:, -6:] = -3024, -2048
    field[4:44, 30:66, 8:32] = hu
    return field


def dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


class AirKnowingModel(nn.Module):
    """Stands in for a trained model: it has context (a 5^3 mean) and knows that air is
    background, at the window's border too (replicate padding): liver region where the mean
    scaled value exceeds -0.5 (about -50 HU), tumor region where it exceeds 0.3 (110 HU)."""

    size_multiple = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 5, padding=2, padding_mode="replicate")
        with torch.no_grad():
            self.conv.weight.fill_(20 / 125)
            self.conv.bias.copy_(torch.tensor([10.0, -6.0]))

    def forward(self, x):
        return self.conv(x)


class CountingModel(nn.Module):
    """Pointwise: liver where the scaled value exceeds -0.5, with the regions (2 channels) or
    softmax (3) head; counts the patches it is run on."""

    size_multiple = 1

    def __init__(self, channels: int = 2):
        super().__init__()
        self.conv = nn.Conv3d(1, channels, 1)
        weight, bias = (
            ([20.0, 0.0], [10.0, -10.0])
            if channels == 2
            else ([-20.0, 20.0, 0.0], [-10.0, 10.0, -10.0])
        )
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(weight).view(-1, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor(bias))
        self.patches = 0

    def forward(self, x):
        self.patches += len(x)
        return self.conv(x)


def test_overlap_is_an_even_voxel_count():
    assert patch_overlap_voxels(96, 0.5) == 48
    assert patch_overlap_voxels(16, 0.3) == 4
    assert patch_overlap_voxels(16, 0.99) == 14
    assert patch_overlap_voxels(16, 0.0) == 0


def test_mirror_dims_cover_every_flip_once():
    assert mirror_dims(1) == [()]
    assert mirror_dims(2) == [(), (2,)]
    assert sorted(mirror_dims(8)) == sorted(
        [(), (2,), (3,), (2, 3), (4,), (2, 4), (3, 4), (2, 3, 4)]
    )


# --- air windows ---------------------------------------------------------------------------------


def test_skipping_air_changes_nothing_a_model_can_see():
    # A random UNet answers noise in air (a constant input gives it no reason for background), so
    # its labels there may change; what must not change is any voxel that is not air: the grid
    # stays where it was (not cropped to the body) and those voxels are blended from the same
    # windows.
    torch.manual_seed(0)
    model = UNet3D(1, 2, features=(4, 8))
    hu = phantom_in_air()
    skipped = predict_volume(
        model, image(hu), settings(crop_to_body=False), keep_probabilities=True
    )
    full = predict_volume(
        model,
        image(hu),
        settings(skip_air_windows=False, crop_to_body=False),
        keep_probabilities=True,
    )
    assert 0.5 < skipped.skipped_share < 1 and full.skipped_share == 0
    assert np.isfinite(skipped.probabilities).all()
    seen = hu > HU_MIN
    np.testing.assert_allclose(
        skipped.probabilities[:, seen], full.probabilities[:, seen], rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(skipped.labels[seen], full.labels[seen])
    assert not np.allclose(skipped.probabilities, full.probabilities, atol=1e-3)  # air differs


@pytest.mark.parametrize(
    "blending, crop_to_body", [("hann", False), ("average", False), ("hann", True)]
)
def test_a_model_that_knows_air_gives_the_same_labels(blending, crop_to_body):
    hu = phantom_in_air()
    model = AirKnowingModel()
    skipped = predict_volume(
        model,
        image(hu),
        settings(blending=blending, crop_to_body=crop_to_body),
        keep_probabilities=True,
    )
    every = settings(blending=blending, skip_air_windows=False, crop_to_body=False)
    full = predict_volume(model, image(hu), every)
    assert skipped.skipped_share > 0.5
    assert np.isfinite(skipped.probabilities).all()
    assert (full.labels == LIVER).sum() > 1000  # a body is found: the Dice means something
    # Cropping moves the windows: window borders (this model's replicate padding) fall
    # elsewhere in the body, so boundary voxels may flip: 0.9955 measured with 16^3 windows and
    # Hann blending; 0.965 with "average", which weighs a window's border as its centre.
    assert dice(skipped.labels > 0, full.labels > 0) >= (0.99 if crop_to_body else 0.999)


@pytest.mark.parametrize("blending", ["hann", "average"])
@pytest.mark.parametrize(
    "head, channels, background", [("regions", 2, [0, 0]), ("softmax", 3, [1, 0, 0])]
)
def test_voxels_only_skipped_windows_cover_are_background_not_nan(
    blending, head, channels, background
):
    # Two bodies in opposite corners: the windows between them hold only air, and the voxels in
    # the middle lie in no run window (their aggregated weight is 0: 0/0 without the fill).
    hu = np.full((64, 64, 16), -1024, np.int16)
    hu[:8, :8], hu[-8:, -8:] = 60, 60
    model = CountingModel(channels)
    prediction = predict_volume(
        model, image(hu), settings(head=head, blending=blending), keep_probabilities=True
    )
    assert np.isfinite(prediction.probabilities).all()
    middle = prediction.probabilities[:, 24:40, 24:40]
    np.testing.assert_array_equal(
        middle, np.broadcast_to(np.reshape(background, (-1, 1, 1, 1)), middle.shape)
    )
    assert (prediction.labels[:8, :8] != BACKGROUND).all()
    assert (prediction.labels[24:40, 24:40] == BACKGROUND).all()
    assert model.patches == 2 and prediction.skipped_share == pytest.approx(1 - 2 / 49)


def test_an_all_air_volume_runs_no_window():
    class Refusing(nn.Module):
        def forward(self, x):
            raise AssertionError("the model was run on air")

    hu = np.full((30, 20, 10), -1024, np.int16)
    hu[:, :, :3] = -3024
    prediction = predict_volume(Refusing(), image(hu), settings(), keep_probabilities=True)
    assert prediction.skipped_share == 1.0
    assert (prediction.labels == BACKGROUND).all()
    assert (prediction.probabilities == 0).all()


def test_air_is_what_the_hu_window_clips():
    # Lung at -600 HU and outside-field padding at -3024: below a -150 window both are one
    # constant to the model (skipped); a lung window starting at -1000 shows the lung (run).
    hu = np.full((32, 32, 16), -600, np.int16)
    hu[:4] = -3024
    abdomen, lung = CountingModel(), CountingModel()
    assert predict_volume(abdomen, image(hu), settings()).skipped_share == 1.0
    assert abdomen.patches == 0
    wide = predict_volume(lung, image(hu), settings(hu_min=-1000.0))
    assert lung.patches == 9 and wide.skipped_share == 0


def test_skipping_can_be_switched_off():
    model = CountingModel()
    hu = np.full((32, 32, 16), -1024, np.int16)
    every = settings(skip_air_windows=False, crop_to_body=False)
    prediction = predict_volume(model, image(hu), every)
    assert model.patches == 9 and prediction.skipped_share == 0
    with pytest.raises(LiversegError, match="skip_air_windows"):
        settings(skip_air_windows="no")
    with pytest.raises(LiversegError, match="crop_to_body"):
        settings(crop_to_body=1)


# --- cropping to the body ------------------------------------------------------------------------


def scaled(hu: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(hu > HU_MIN, 0.0, -1.0).astype(np.float32))[None]


def test_the_body_box_holds_the_body_and_a_margin_of_air_fitted_to_the_windows():
    hu = np.full((80, 60, 50), -1024, np.int16)
    hu[20:40, 10:44, 6:30] = 40
    hu[57, 20, 20] = -100  # one voxel above hu_min far from the rest: inside the box
    # Patch 16, step 8, margin 2: axis 0 holds 20..57 -> 18..60 (42 voxels) -> 5 windows span 48,
    # centred: 15..63; axis 1: 8..46 (38) -> 4 windows span 40: 7..47; axis 2: 4..32 (28) -> 3
    # windows span 32: 2..34.
    assert body_box(scaled(hu), 16, 8) == (slice(15, 63), slice(7, 47), slice(2, 34))


def test_a_box_at_the_border_or_thinner_than_a_patch_stays_within_the_volume():
    hu = np.full((60, 50, 40), -1024, np.int16)
    hu[28:32, 0:3, 36:40] = 40
    # Centred where it fits (axis 0), moved inside the volume where it does not (axes 1, 2).
    assert body_box(scaled(hu), 16, 8) == (slice(22, 38), slice(0, 16), slice(24, 40))
    small = np.full((10, 50, 40), 40, np.int16)  # an axis shorter than a patch: all of it
    assert body_box(scaled(small), 16, 8)[0] == slice(0, 10)


def test_an_all_air_volume_has_no_body_box():
    assert body_box(scaled(np.full((20, 20, 20), -1024, np.int16)), 16, 8) is None


def test_cropping_runs_fewer_windows_and_outside_the_body_is_background():
    hu = phantom_in_air()  # a 40 x 36 x 24 body in an 88 x 80 x 40 field
    model, every_model = CountingModel(), CountingModel()
    cropped = predict_volume(model, image(hu), settings(), keep_probabilities=True)
    every = settings(skip_air_windows=False, crop_to_body=False)
    full = predict_volume(every_model, image(hu), every)
    assert every_model.patches == 10 * 9 * 4
    box = body_box(scaled(hu), 16, 8)
    windows = np.prod([(s.stop - s.start - 16) // 8 + 1 for s in box])
    assert model.patches == windows < 360 / 4
    assert cropped.skipped_share == pytest.approx(1 - windows / 360)
    outside = np.ones(hu.shape, bool)
    outside[box] = False
    assert (cropped.probabilities[:, outside] == 0).all()  # background of the regions head
    np.testing.assert_array_equal(cropped.labels, full.labels)  # pointwise: nothing moves


# --- ensembles -----------------------------------------------------------------------------------


def tiny_unet(seed: int) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(1, 2, features=(4, 8))


@pytest.mark.parametrize("tta_flips", [1, 2])
def test_an_ensemble_averages_the_probabilities_of_its_models(tta_flips):
    hu = phantom_in_air()[:48, 24:72, 4:36]
    these = settings(tta_flips=tta_flips)
    models = [tiny_unet(1), tiny_unet(2), tiny_unet(3)]
    each = [predict_volume(m, image(hu), these, keep_probabilities=True) for m in models]
    together = predict_volume(models, image(hu), these, keep_probabilities=True)
    mean = np.mean([p.probabilities for p in each], axis=0)
    np.testing.assert_allclose(together.probabilities, mean, rtol=0, atol=1e-5)
    assert not np.allclose(each[0].probabilities, mean, atol=1e-3)  # the models differ
    assert together.skipped_share == each[0].skipped_share


def test_an_ensemble_restores_each_model_and_needs_one():
    models = [tiny_unet(1).train(), tiny_unet(2).eval()]
    predict_volume(models, image(np.full((16, 16, 16), 40, np.int16)), settings())
    assert [m.training for m in models] == [True, False]
    with pytest.raises(LiversegError, match="needs a model"):
        predict_volume([], image(np.zeros((16, 16, 16), np.int16)), settings())
