"""Whole-volume inference: geometry, blending, reduction factor, post-processing, checkpoints."""

from __future__ import annotations

import logging
import math
import re

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from conftest import write_tiny_checkpoint
from torch import nn

from liverseg.checkpoints import load_model
from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.devices import cpu_supports_bf16, uses_channels_last
from liverseg.errors import CheckpointError, DataError, LiversegError
from liverseg.inference.postprocess import Postprocess, postprocess_labels
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.volume import predict_volume
from liverseg.model import UNet3D

torch.set_num_threads(1)

# The "CT" of the identity tests is a label map: the window (0, 2) maps BACKGROUND, LIVER, TUMOR
# to -1, 0, +1, and IdentityModel turns those back into region logits.
NO_POST = None


def window(**changes) -> InferenceSettings:
    """Settings of the identity tests: the window (0, 2), everything else as asked."""
    return InferenceSettings(**{"hu_min": 0.0, "hu_max": 2.0, **changes})


class IdentityModel(nn.Module):
    """Pointwise: liver-region logit > 0 where the scaled value > -0.5, tumor where > 0.5."""

    def __init__(self, size_multiple: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.fill_(20.0)
            self.conv.bias.copy_(torch.tensor([10.0, -10.0]))
        self.size_multiple = size_multiple

    def forward(self, x):
        assert x.shape[1] == 1 and x.ndim == 5
        return self.conv(x)


class DirectionalModel(nn.Module):
    """Liver where the value rises along canonical axis 0: depends on the orientation it sees."""

    size_multiple = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, kernel_size=3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 2, 1, 1] = 10.0
            self.conv.weight[0, 0, 0, 1, 1] = -10.0
            self.conv.weight[1, 0, 1, 1, 1] = -10.0

    def forward(self, x):
        return self.conv(x)


def random_labels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 3, size=shape).astype(np.uint8)


def as_image(array, affine=None):
    affine = np.eye(4) if affine is None else affine
    return tio.ScalarImage(tensor=torch.from_numpy(array.astype(np.int16))[None], affine=affine)


def oblique_affine():
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-30.0, 12.0, 7.5]
    return affine


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("blending", ["hann", "average"])
@pytest.mark.parametrize("shape", [(37, 29, 23), (10, 7, 5), (16, 16, 16), (17, 40, 9)])
def test_identity_model_returns_its_input(shape, blending):
    labels = random_labels(shape)
    settings = window(
        patch_size=16, overlap=0.5, batch_size=3, blending=blending, postprocess=NO_POST, amp="off"
    )
    prediction = predict_volume(IdentityModel(), as_image(labels), settings)
    assert prediction.labels.dtype == np.uint8
    assert prediction.labels.shape == shape
    np.testing.assert_array_equal(prediction.labels, labels)


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([0.7, 0.8, 2.0, 1.0]),
        np.array([[-0.7, 0, 0, 90.0], [0, -0.8, 0, 110.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]]),
        oblique_affine(),
    ],
    ids=["RAS", "LPS", "oblique"],
)
def test_output_keeps_input_geometry(affine, tmp_path):
    import nibabel as nib

    labels = random_labels((21, 18, 11), seed=1)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), str(path))
    settings = window(patch_size=16, postprocess=NO_POST, amp="off")
    prediction = predict_volume(IdentityModel(), path, settings)
    assert prediction.labels.shape == labels.shape
    np.testing.assert_array_equal(prediction.affine, nib.load(str(path)).affine)
    np.testing.assert_array_equal(prediction.labels, labels)


def test_model_sees_canonical_orientation():
    rng = np.random.default_rng(2)
    world = rng.integers(0, 3, size=(20, 19, 9)).astype(np.int16)
    ras = np.diag([1.0, 1.0, 2.0, 1.0])
    # The same voxels stored left-right and anterior-posterior flipped (LPS).
    lps = ras.copy()
    lps[0, 0], lps[1, 1] = -1.0, -1.0
    lps[:3, 3] = [19.0, 18.0, 0.0]
    stored_lps = world[::-1, ::-1].copy()
    settings = window(patch_size=16, postprocess=NO_POST, amp="off")
    from_ras = predict_volume(DirectionalModel(), as_image(world, ras), settings).labels
    from_lps = predict_volume(DirectionalModel(), as_image(stored_lps, lps), settings).labels
    assert set(np.unique(from_ras)) >= {BACKGROUND, LIVER}
    np.testing.assert_array_equal(from_lps[::-1, ::-1], from_ras)
    # Ignoring the orientation would give another answer: the test can fail.
    assert not np.array_equal(from_lps, from_ras)


@pytest.mark.parametrize("shape", [(40, 36, 30), (41, 37, 29)])
def test_factor_2_round_trip_keeps_a_blob(shape):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    centre = np.array(shape)[:, None, None, None] / 2
    mask = ((grid - centre) ** 2).sum(0) < 10**2
    volume = np.where(mask, LIVER, BACKGROUND).astype(np.uint8)
    settings = window(patch_size=16, factor=2, postprocess=NO_POST, amp="off")
    image = as_image(volume, np.diag([0.8, 0.8, 1.5, 1]))
    prediction = predict_volume(IdentityModel(), image, settings, keep_probabilities=True)
    assert prediction.labels.shape == shape
    assert prediction.probabilities.shape == (2, *shape)
    assert dice(prediction.labels == LIVER, mask) > 0.9


def test_patch_size_must_fit_the_model():
    with pytest.raises(LiversegError, match="multiple of the model's size multiple 8"):
        predict_volume(
            IdentityModel(size_multiple=8),
            as_image(random_labels((8, 8, 8))),
            window(patch_size=12),
        )


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(overlap=1.0), "overlap"),
        (dict(blending="gaussian"), "blending='gaussian'"),
        (dict(amp="fp8"), "amp='fp8'"),
        (dict(factor=0), "factor"),
        (dict(patch_size=0), "patch_size"),
        (dict(head="sigmoid"), "head='sigmoid'"),
        (dict(hu_min=300.0), "hu_max"),
    ],
)
def test_settings_are_checked_when_made(bad, message):
    with pytest.raises(LiversegError, match=message):
        window(**bad)


def test_settings_replace_is_checked_too():
    assert window(patch_size=8).replace(amp="bf16").amp == "bf16"
    with pytest.raises(LiversegError, match="overlap"):
        window().replace(overlap=-0.1)


def test_bad_input_file_is_a_data_error(tmp_path):
    junk = tmp_path / "._liver_1.nii.gz"
    junk.write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with pytest.raises(DataError, match="_liver_1"):
        predict_volume(IdentityModel(), junk, window(patch_size=8))
    with pytest.raises(DataError, match="not found"):
        predict_volume(IdentityModel(), tmp_path / "absent.nii.gz", window(patch_size=8))


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(training):
    model = IdentityModel().train(training)
    predict_volume(model, as_image(random_labels((9, 9, 9))), window(patch_size=8))
    assert model.training is training


def structured_ct(shape=(24, 24, 24), seed=0):
    """-200 HU body, a 60 HU ball of radius 9 and a 180 HU core of radius 3, 10 HU noise."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    radius2 = ((grid - np.array(shape)[:, None, None, None] / 2) ** 2).sum(0)
    ct = np.full(shape, -200.0)
    ct[radius2 < 9**2] = 60.0
    ct[radius2 < 3**2] = 180.0
    return ct + np.random.default_rng(seed).normal(0, 10, shape)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bf16 support")
def test_bf16_autocast_gives_the_same_labels_as_fp32():
    torch.manual_seed(3)
    model = UNet3D(1, 2, features=(16, 32))
    image = as_image(structured_ct())
    settings = InferenceSettings(hu_min=-150, hu_max=250, patch_size=16, postprocess=NO_POST)
    exact = predict_volume(model, image, settings.replace(amp="off"), device="cpu").labels
    fast = predict_volume(model, image, settings.replace(amp="bf16"), device="cpu").labels
    for label in (LIVER, TUMOR):
        assert (exact == label).sum() > 500  # both classes present: the Dice means something
        assert dice(fast == label, exact == label) >= 0.99


# --- post-processing ---------------------------------------------------------------------------


def scene():
    """Big liver with a big and a one-voxel tumor, a liver island, and tumor outside the liver."""
    labels = np.zeros((30, 30, 12), dtype=np.uint8)
    labels[2:20, 2:20, 2:10] = LIVER
    labels[5:8, 5:8, 4:7] = TUMOR  # 27 voxels
    labels[15, 15, 5] = TUMOR  # 1 voxel
    labels[24:27, 24:27, 2:5] = LIVER  # island
    labels[24:27, 2:5, 6:9] = TUMOR  # tumor outside the liver, 27 voxels
    return labels


def test_postprocess_all_off_changes_nothing():
    labels = scene()
    off = Postprocess(keep_largest_liver=False, tumor_inside_liver=False, min_tumor_mm3=0.0)
    np.testing.assert_array_equal(postprocess_labels(labels, (1, 1, 1), off), labels)


def test_keep_largest_liver():
    labels = scene()
    only = Postprocess(keep_largest_liver=True, tumor_inside_liver=False, min_tumor_mm3=0.0)
    out = postprocess_labels(labels, (1, 1, 1), only)
    expected = labels.copy()
    expected[24:27, 24:27, 2:5] = BACKGROUND
    expected[24:27, 2:5, 6:9] = BACKGROUND
    np.testing.assert_array_equal(out, expected)
    assert labels[24, 24, 2] == LIVER  # the input is not modified


def test_tumor_inside_liver():
    labels = scene()
    only = Postprocess(keep_largest_liver=False, tumor_inside_liver=True, min_tumor_mm3=0.0)
    out = postprocess_labels(labels, (1, 1, 1), only)
    expected = labels.copy()
    expected[24:27, 2:5, 6:9] = BACKGROUND
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("spacing, one_voxel_kept", [((1, 1, 1), False), ((3, 3, 3), True)])
def test_min_tumor_volume_uses_spacing(spacing, one_voxel_kept):
    labels = scene()
    only = Postprocess(keep_largest_liver=False, tumor_inside_liver=False, min_tumor_mm3=10.0)
    out = postprocess_labels(labels, spacing, only)
    assert out[15, 15, 5] == (TUMOR if one_voxel_kept else LIVER)
    assert (out[5:8, 5:8, 4:7] == TUMOR).all()
    assert (out[24:27, 2:5, 6:9] == TUMOR).all()


def test_predict_volume_applies_postprocessing():
    labels = scene()
    prediction = predict_volume(IdentityModel(), as_image(labels), window(patch_size=16))
    np.testing.assert_array_equal(
        prediction.labels, postprocess_labels(labels, (1, 1, 1), Postprocess())
    )
    assert not np.array_equal(prediction.labels, labels)


def test_postprocess_empty_volume():
    empty = np.zeros((5, 5, 5), dtype=np.uint8)
    np.testing.assert_array_equal(postprocess_labels(empty, (1, 1, 1), Postprocess()), empty)


# --- checkpoints -------------------------------------------------------------------------------


def test_load_model_rebuilds_model_and_settings(tmp_path):
    original = UNet3D(1, 2, features=(4, 8))
    write_tiny_checkpoint(tmp_path / "best.pt", model=original, epoch=3)
    model, settings = load_model(tmp_path / "best.pt", device="cpu")
    assert not model.training
    assert model.features == (4, 8)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert settings.patch_size == 16 and settings.factor == 2
    assert settings.head == "regions" and settings.overlap == 0.5
    assert (settings.hu_min, settings.hu_max) == (-150.0, 250.0)
    assert settings.postprocess == Postprocess()
    assert settings.provenance["epoch"] == 3 and settings.provenance["checkpoint"].endswith(
        "best.pt"
    )


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pt"):
        load_model(tmp_path / "absent.pt")
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(CheckpointError, match="corrupted.pt"):
        load_model(corrupted)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}, "epoch": 1}, foreign)
    with pytest.raises(CheckpointError, match="not a liverseg checkpoint.*config"):
        load_model(foreign)
    mismatched = tmp_path / "mismatched.pt"
    write_tiny_checkpoint(mismatched, model=UNet3D(1, 2, features=(4, 8, 16)))
    with pytest.raises(CheckpointError, match="mismatched.pt.*do not fit"):
        load_model(mismatched)


def test_real_ct_with_tiny_random_model(real_ct):
    import nibabel as nib

    image, _ = real_ct
    torch.manual_seed(0)
    model = UNet3D(1, 2, features=(4, 8))
    settings = InferenceSettings(hu_min=-150, hu_max=250, patch_size=32, factor=2)
    prediction = predict_volume(model, image, settings)
    stored = nib.load(str(image))
    assert prediction.labels.shape == stored.shape
    np.testing.assert_array_equal(prediction.affine, stored.affine)
    assert set(np.unique(prediction.labels)) <= {BACKGROUND, LIVER, TUMOR}


def test_fast_path_uses_channels_last_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = UNet3D(1, 2, features=(4, 8)).train()
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    # A conv with in_channels > 1: its weight is not channels-last unless converted.
    deep = next(m for m in model.modules() if isinstance(m, nn.Conv3d) and m.in_channels > 1)
    seen = []
    deep.register_forward_hook(
        lambda module, inputs, output: seen.append(
            module.weight.is_contiguous(memory_format=torch.channels_last_3d)
        )
    )
    image = as_image(np.random.default_rng(0).normal(50, 80, (12, 10, 9)))
    settings = InferenceSettings(hu_min=-150, hu_max=250, patch_size=8)
    predict_volume(model, image, settings.replace(amp="bf16"))
    assert seen and all(seen)
    assert model.training
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key][0], rtol=0, atol=0)
        assert value.stride() == before[key][1], key
        assert value.is_contiguous()
    # On CPU fp32 runs channels-last too (faster there); the model is again left as it was.
    seen.clear()
    predict_volume(model, image, settings.replace(amp="off"))
    assert seen and all(seen)
    for key, value in model.state_dict().items():
        assert value.stride() == before[key][1], key


def test_channels_last_choice():
    assert uses_channels_last(torch.device("cpu"), None)
    assert uses_channels_last(torch.device("cpu"), torch.bfloat16)
    assert uses_channels_last(torch.device("cuda"), torch.float16)
    assert not uses_channels_last(torch.device("cuda"), None)


def rewritten_checkpoint(tmp_path, name: str, version: str = "0.1.0", **preprocessing):
    """The tiny checkpoint with its version and some preprocessing values replaced."""
    state = torch.load(write_tiny_checkpoint(tmp_path / "tiny.pt"), weights_only=True)
    state["version"] = version
    state["preprocessing"].update(preprocessing)
    torch.save(state, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    ("preprocessing", "problem"),
    [
        ({"hu_min": math.nan}, "hu_min=nan (expected a finite number of HU)"),
        ({"hu_max": math.inf}, "hu_max=inf (expected a finite number of HU)"),
        ({"hu_min": 300.0}, "hu_max=250.0 does not exceed hu_min=300.0"),
        ({"head": "sigmoid"}, "head='sigmoid' (expected one of regions, softmax)"),
        ({"factor": 0}, "factor=0 (expected an integer >= 1)"),
        ({"factor": 1.5}, "factor=1.5 (expected an integer >= 1)"),
        (
            {"spacing_mm": [4, 0, 4]},
            "spacing_mm=[4, 0, 4] (expected 3 finite positive numbers in mm)",
        ),
        ({"spacing_mm": "4mm"}, "spacing_mm='4mm' (expected 3 numbers in mm)"),
    ],
)
def test_load_model_refuses_invalid_preprocessing_naming_file_and_key(
    tmp_path, preprocessing, problem
):
    path = rewritten_checkpoint(tmp_path, "edited.pt", **preprocessing)
    with pytest.raises(CheckpointError) as caught:
        load_model(path, device="cpu")
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} holds invalid preprocessing: {problem}; ")
    assert "\n" not in message


def test_inference_settings_refuse_a_nan_window():
    # NaN compares False both ways, so "hu_max > hu_min" catches it in either place.
    for hu_min, hu_max in ((math.nan, 250.0), (-150.0, math.nan)):
        with pytest.raises(LiversegError, match="hu_max .* must exceed hu_min"):
            InferenceSettings(hu_min=hu_min, hu_max=hu_max)


def test_a_checkpoint_of_a_newer_minor_release_is_refused(tmp_path):
    path = rewritten_checkpoint(tmp_path, "future.pt", version="0.2.0")
    match = r"future.pt was written by liverseg 0.2.0, newer than this liverseg 0.1.0; upgrade"
    with pytest.raises(CheckpointError, match=match):
        load_model(path, device="cpu")
    with pytest.raises(CheckpointError, match="upgrade liverseg to 1.0 or later"):
        load_model(rewritten_checkpoint(tmp_path, "major.pt", version="1.0.0"), device="cpu")


@pytest.mark.parametrize(
    ("version", "warning"),
    [("0.1.7", "a newer patch release"), ("0.1.0", None), ("0.0.9", None), ("dev", "no readable")],
)
def test_other_checkpoint_versions_load(tmp_path, caplog, version, warning):
    path = rewritten_checkpoint(tmp_path, "other.pt", version=version)
    with caplog.at_level(logging.WARNING, logger="liverseg.checkpoints"):
        _, settings = load_model(path, device="cpu")
    assert settings.provenance["liverseg_version"] == version
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0] and "other.pt" in warnings[0]


def test_a_checkpoint_folder_is_refused_with_the_files_it_holds(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"run is a folder and holds no .pt file; give"):
        load_model(run_dir)
    write_tiny_checkpoint(run_dir / "checkpoints" / "last.pt")
    write_tiny_checkpoint(run_dir / "checkpoints" / "best.pt")
    with pytest.raises(CheckpointError) as caught:
        load_model(run_dir)
    best, last = run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt"
    assert str(caught.value) == (
        f"checkpoint {run_dir} is a folder; give a .pt file such as {best} "
        f"(it holds {best}, {last})"
    )


# --------------------------------------------------------------------------- input checks


def ct_with(value, dtype=np.float32, shape=(20, 18, 12)):
    """A CT of ``shape`` in HU (air, body) with ``value`` at one voxel."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[4:16, 4:14, :] = 40.0
    hu[5, 6, 7] = value
    return hu.astype(dtype)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused_before_predicting(tmp_path, value):
    settings = window(patch_size=16, postprocess=NO_POST, amp="off")
    image = tio.ScalarImage(tensor=torch.from_numpy(ct_with(value))[None], affine=np.eye(4))
    with pytest.raises(DataError, match=r"cannot segment this volume: 1 NaN/Inf voxels: expected"):
        predict_volume(IdentityModel(), image, settings)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(ct_with(value), np.eye(4)), str(path))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: cannot segment"):
        predict_volume(IdentityModel(), path, settings)


def test_int8_hu_are_refused(tmp_path):
    path = tmp_path / "wrapped.nii.gz"
    nib.save(nib.Nifti1Image(ct_with(100, dtype=np.int16).astype(np.int8), np.eye(4)), str(path))
    with pytest.raises(DataError, match=r"wrapped.nii.gz: cannot segment .* 8-bit integers"):
        predict_volume(IdentityModel(), path, window(patch_size=16, postprocess=NO_POST))


@pytest.mark.parametrize(
    ("hu", "words"),
    [
        (np.zeros((20, 18, 12), np.int16), "every voxel is 0: a blank volume"),
        (np.linspace(0, 4000, 20 * 18 * 12).reshape(20, 18, 12), "intensities span [0, 4000]"),
    ],
)
def test_implausible_intensities_are_predicted_with_a_warning(caplog, hu, words):
    settings = window(patch_size=16, postprocess=NO_POST, amp="off")
    with caplog.at_level(logging.WARNING, logger="liverseg.inference.volume"):
        prediction = predict_volume(IdentityModel(), as_image(hu), settings)
    assert prediction.labels.shape == hu.shape
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert words in warning and warning.startswith("the ScalarImage: ")


# --- test-time mirroring ------------------------------------------------------------------------


@pytest.mark.parametrize("flips", [2, 4, 8])
def test_mirroring_an_equivariant_model_changes_nothing(flips):
    labels = random_labels((20, 17, 11), seed=4)
    plain = window(patch_size=16, postprocess=NO_POST, amp="off")
    mirrored = plain.replace(tta_flips=flips)
    expected = predict_volume(IdentityModel(), as_image(labels), plain).labels
    got = predict_volume(IdentityModel(), as_image(labels), mirrored).labels
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, labels)


def test_mirroring_averages_the_flipped_passes():
    # One window covers the volume: the mirrored probabilities must be the mean of the model's
    # output and its left-right flipped output on the flipped input, by hand.
    rng = np.random.default_rng(5)
    volume = rng.uniform(0.0, 2.0, size=(16, 16, 16)).astype(np.float32)
    image = tio.ScalarImage(tensor=torch.from_numpy(volume)[None], affine=np.eye(4))
    model = DirectionalModel()  # not mirror-symmetric: the average differs from one pass
    settings = window(patch_size=16, overlap=0.0, blending="average", postprocess=NO_POST)
    settings = settings.replace(amp="off", tta_flips=2)
    prediction = predict_volume(model, image, settings, keep_probabilities=True)
    x = torch.from_numpy(volume)[None, None] - 1.0  # the window (0, 2) -> (-1, 1)
    with torch.no_grad():
        one = torch.sigmoid(model(x))
        flipped = torch.sigmoid(model(x.flip(2))).flip(2)
    expected = ((one + flipped) / 2)[0].numpy()
    np.testing.assert_allclose(prediction.probabilities, expected, atol=1e-5)
    assert not np.allclose(one[0].numpy(), expected, atol=1e-3)


def test_tta_flips_is_checked_and_reaches_the_cli(tmp_path, tiny_checkpoint):
    with pytest.raises(LiversegError, match="tta_flips=3"):
        window(tta_flips=3)
    from liverseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "predict",
                "--checkpoint",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path),
                "x",
                "--tta",
                "3",
            ]
        )
    assert exit_info.value.code == 2


def test_inference_settings_refuse_an_infinite_window():
    # -inf < 250 passes the order check; scaling by an infinite width would give NaN everywhere.
    with pytest.raises(LiversegError, match=r"hu_min=-inf \(expected a finite number of HU\)"):
        InferenceSettings(hu_min=-math.inf, hu_max=250.0)


@pytest.mark.parametrize("changes", [{}, {"factor": 2}, {"spacing_mm": (1.6, 1.6, 3.0)}])
def test_kept_regions_are_the_quantised_region_probabilities(changes):
    """keep_regions gives round(255 p) of the two regions on the input grid, whatever the grid."""
    shape = (40, 36, 30)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    distance = np.sqrt(((grid - np.array(shape)[:, None, None, None] / 2) ** 2).sum(0))
    volume = np.where(distance < 12, LIVER, BACKGROUND).astype(np.uint8)
    volume[distance < 5] = TUMOR
    settings = window(patch_size=16, postprocess=NO_POST, amp="off", **changes)
    image = as_image(volume, np.diag([0.8, 0.8, 1.5, 1]))
    prediction = predict_volume(
        IdentityModel(), image, settings, keep_probabilities=True, keep_regions=True
    )
    assert prediction.regions.dtype == np.uint8 and prediction.regions.shape == (2, *shape)
    expected = np.round(np.clip(prediction.probabilities, 0, 1) * 255)
    assert np.abs(prediction.regions.astype(int) - expected).max() <= 1
    # The liver region holds the tumor region, and the quantised maps say the same.
    assert (prediction.regions[0][volume == TUMOR] >= 128).all()
    assert (prediction.regions[1][distance > 14] < 128).all()
    assert predict_volume(IdentityModel(), image, settings).regions is None
