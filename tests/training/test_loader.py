import json

import nibabel as nib
import numpy as np
import pytest
import torch

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.data.cases import Case
from liverseg.data.splits import load_or_create_split
from liverseg.errors import DataError
from liverseg.training.cache import build_cache, load_class_locations, preprocess_case
from liverseg.training.loader import PatchSettings, build_loader
from liverseg.training.patches import (
    class_locations,
    extract_patch,
    mirror_patch,
    random_affine_matrix,
    sample_centres,
)

PROBS = {BACKGROUND: 0.2, LIVER: 0.3, TUMOR: 0.5}


def toy_label(shape=(40, 40, 40), tumor=True):
    label = np.zeros(shape, np.uint8)
    label[8:30, 10:32, 6:28] = LIVER
    if tumor:
        label[14:20, 15:21, 12:18] = TUMOR
    return label


def centre_frequencies(label, probabilities, n=4000, patch=16):
    rng = np.random.default_rng(0)
    centres = sample_centres(label, patch, probabilities, n, rng)
    values = label[tuple(centres.T)]
    return {c: float(np.mean(values == c)) for c in (BACKGROUND, LIVER, TUMOR)}, centres


def test_centres_follow_label_probabilities():
    freq, centres = centre_frequencies(toy_label(), PROBS)
    for c, p in PROBS.items():
        assert abs(freq[c] - p) < 0.03, (c, freq)
    # every centre leaves room for a whole patch, as in tio.LabelSampler
    assert centres.min() >= 8 and centres.max() <= 40 - 8


def test_tumor_free_case_renormalises_over_present_classes():
    freq, _ = centre_frequencies(toy_label(tumor=False), PROBS)
    assert freq[TUMOR] == 0
    assert abs(freq[BACKGROUND] - 0.4) < 0.03 and abs(freq[LIVER] - 0.6) < 0.03


def test_identity_matrix_resampling_equals_plain_crop():
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (30, 34, 26)).astype(np.float16)
    label = rng.integers(0, 3, (30, 34, 26)).astype(np.uint8)
    centre = np.array([12, 20, 13])
    plain = extract_patch(image, label, centre, 10, None)
    resampled = extract_patch(image, label, centre, 10, np.eye(3))
    torch.testing.assert_close(resampled[0], plain[0], atol=1e-4, rtol=0)
    assert torch.equal(resampled[1], plain[1])
    # voxel k of the patch sits at offset k - P // 2 from the centre (torchio's convention)
    assert plain[1][5, 5, 5] == label[12, 20, 13]


def test_augmented_patch_keeps_centre_label_and_shape():
    label = toy_label()
    image = np.where(label > 0, 0.5, -0.5).astype(np.float16)
    rng = np.random.default_rng(2)
    for centre in sample_centres(label, 16, PROBS, 20, rng):
        matrix = random_affine_matrix((0.9, 1.1), (-10, 10), (0.8, 0.8, 2.5), rng)
        patch_image, patch_label = extract_patch(image, label, centre, 16, matrix)
        assert patch_image.shape == patch_label.shape == (16, 16, 16)
        assert patch_label[8, 8, 8] == label[tuple(centre)]


def test_random_affine_ranges_in_physical_space():
    rng = np.random.default_rng(3)
    spacing = (1.0, 1.0, 3.0)
    for _ in range(50):
        m = random_affine_matrix((0.9, 1.1), (-10, 10), spacing, rng)
        physical = np.diag(spacing) @ m @ np.linalg.inv(np.diag(spacing))
        singular = np.linalg.svd(physical, compute_uv=False)
        # a rotation times 1/scale: singular values within 1/1.1 .. 1/0.9
        assert singular.min() >= 1 / 1.1 - 1e-6 and singular.max() <= 1 / 0.9 + 1e-6


def test_split_is_seeded_written_once_and_reused(tmp_path):
    ids = [f"liver_{i}" for i in range(10)]
    a = load_or_create_split(tmp_path / "a" / "split.json", ids, 7, seed=0)
    b = load_or_create_split(tmp_path / "b" / "split.json", ids, 7, seed=0)
    c = load_or_create_split(tmp_path / "c" / "split.json", ids, 7, seed=1)
    assert a == b and a != c
    assert len(a["train"]) == 7 and sorted(a["train"] + a["val"]) == sorted(ids)
    # written once: a later call with another seed keeps the file's split
    assert load_or_create_split(tmp_path / "a" / "split.json", ids, 7, seed=5) == a


def test_split_file_is_used_verbatim(tmp_path):
    ids = [f"liver_{i}" for i in range(6)]
    given = tmp_path / "mine.json"
    given.write_text(json.dumps({"train": ids[:2], "val": ids[2:]}))
    split = load_or_create_split(tmp_path / "run" / "split.json", ids, 4, 0, str(given))
    assert split == {"train": ids[:2], "val": ids[2:]}
    assert json.loads((tmp_path / "run" / "split.json").read_text()) == split


def test_split_refuses_impossible_num_train(tmp_path):
    with pytest.raises(DataError, match="data.num_train"):
        load_or_create_split(tmp_path / "split.json", ["a", "b"], 2, 0)


def write_case(folder, case_id, label, affine, hu=None):
    image = hu if hu is not None else np.where(label > 0, 110, -100).astype(np.int16)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    paths = folder / "imagesTr" / f"{case_id}.nii.gz", folder / "labelsTr" / f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), paths[0])
    nib.save(nib.Nifti1Image(label, affine), paths[1])
    return Case(case_id, *paths)


SETTINGS = {
    "hu_min": -150.0,
    "hu_max": 250.0,
    "shape": [24, 24, 16],
    "min_size": 16,
    "affine_tolerance_mm": 0.01,
    "copy_label_geometry": False,
}


def test_preprocess_keeps_whole_liver_maps_hu_and_reuses_cache(tmp_path):
    label = np.zeros((50, 44, 30), np.uint8)
    label[5:40, 10:20, 2:25] = LIVER  # longer than the 24-voxel crop on axis 0
    case = write_case(tmp_path, "liver_1", label, np.diag([0.8, 0.8, 2.0, 1.0]))
    cached = preprocess_case(case, tmp_path / "cache", SETTINGS)
    image, out = np.load(cached.image), np.load(cached.label)
    assert (out == LIVER).sum() == (label == LIVER).sum()  # no liver slice cut
    # axis 0 widened to the 35-slice liver; axis 2 keeps the liver's 23 slices, more than 16
    assert out.shape == (35, 24, 23)
    assert image.dtype == np.float16 and image.min() >= -1 and image.max() <= 1
    np.testing.assert_allclose(image[out == LIVER], (110 + 150) / 400 * 2 - 1, atol=2e-3)
    assert cached.spacing_mm == pytest.approx((0.8, 0.8, 2.0))
    mtime = cached.image.stat().st_mtime_ns
    assert preprocess_case(case, tmp_path / "cache", SETTINGS).image.stat().st_mtime_ns == mtime


def test_preprocess_reorients_lps_to_canonical(tmp_path):
    label = np.zeros((30, 30, 20), np.uint8)
    label[2:8, 3:9, 4:10] = LIVER
    ras = write_case(tmp_path / "ras", "liver_1", label, np.diag([1.0, 1.0, 2.0, 1.0]))
    lps_affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps_affine[:3, 3] = [29, 29, 0]  # same physical grid as the RAS case
    lps = write_case(tmp_path / "lps", "liver_1", label[::-1, ::-1].copy(), lps_affine)
    a = np.load(preprocess_case(ras, tmp_path / "c1", SETTINGS).label)
    b = np.load(preprocess_case(lps, tmp_path / "c2", SETTINGS).label)
    assert np.array_equal(a, b)


def test_label_affine_beyond_tolerance_is_refused_unless_copied(tmp_path):
    label = toy_label((24, 24, 16))
    case = write_case(tmp_path, "liver_1", label, np.eye(4))
    nib.save(nib.Nifti1Image(label, np.diag([2.0, 2.0, 2.0, 1.0])), case.label)
    with pytest.raises(DataError, match="liver_1"):
        preprocess_case(case, tmp_path / "cache", SETTINGS)
    cached = preprocess_case(case, tmp_path / "cache", {**SETTINGS, "copy_label_geometry": True})
    assert (np.load(cached.label) == TUMOR).sum() == (label == TUMOR).sum()


def test_queue_yields_patches_with_configured_centre_frequencies(tmp_path):
    torch.manual_seed(0)  # the patch draws come from torch's RNG: a fixed, not a lucky, sample
    cases = []
    for i in range(3):
        cases.append(write_case(tmp_path, f"liver_{i}", toy_label((40, 40, 40)), np.eye(4)))
    cached = build_cache(cases, tmp_path / "cache", {**SETTINGS, "shape": [40, 40, 40]})
    settings = PatchSettings(16, PROBS, samples_per_volume=5, augment=True)
    loader = build_loader(cached, settings, queue_length=15, batch_size=5, num_workers=0)
    centres = []
    for _ in range(30):
        for batch in loader:
            assert batch["image"]["data"].shape == (5, 1, 16, 16, 16)
            assert batch["label"]["data"].shape == (5, 1, 16, 16, 16)
            centres.extend(batch["label"]["data"][:, 0, 8, 8, 8].tolist())
    centres = np.array(centres)
    assert len(centres) == 30 * 15
    for c, p in PROBS.items():
        assert abs(np.mean(centres == c) - p) < 0.07, (c, np.mean(centres == c))


def test_seed_sized_patches_follow_probabilities(tmp_path):
    # The seed's sizes: a 256 x 256 x 200 volume, 96^3 patches.
    label = np.zeros((256, 256, 200), np.uint8)
    label[60:200, 50:190, 40:160] = LIVER
    label[100:120, 90:110, 80:95] = TUMOR
    freq, _ = centre_frequencies(label, PROBS, n=3000, patch=96)
    for c, p in PROBS.items():
        assert abs(freq[c] - p) < 0.03, (c, freq)
    case = write_case(tmp_path, "liver_0", label, np.eye(4))
    settings = {**SETTINGS, "shape": [256, 256, 200], "min_size": 96}
    cached = build_cache([case], tmp_path / "cache", settings)
    loader = build_loader(
        cached,
        PatchSettings(96, PROBS, 5, augment=True),
        queue_length=5,
        batch_size=5,
        num_workers=0,
    )
    batch = next(iter(loader))
    assert batch["image"]["data"].shape == (5, 1, 96, 96, 96)
    assert batch["label"]["data"].shape == (5, 1, 96, 96, 96)


def test_cache_lists_each_class_voxels_and_rebuilds_damaged_lists(tmp_path, caplog):
    label = toy_label((24, 24, 16))
    case = write_case(tmp_path, "liver_1", label, np.eye(4))
    cached = preprocess_case(case, tmp_path / "cache", SETTINGS)
    cached_label = np.load(cached.label)
    assert cached_label.flags.c_contiguous  # NIfTI's Fortran order is not kept
    expected = class_locations(cached_label)
    found = load_class_locations(cached)
    assert sorted(found) == sorted(expected) == [LIVER, TUMOR]
    for c in expected:
        assert np.array_equal(found[c], expected[c])
    whole = cached.locations.read_bytes()
    cached.locations.write_bytes(whole[: len(whole) - 8])
    again = preprocess_case(case, tmp_path / "cache", SETTINGS)
    assert again.locations.read_bytes() == whole
    assert any("is damaged" in r.message for r in caplog.records)


def test_label_free_case_draws_background_centres_only(tmp_path):
    case = write_case(tmp_path, "liver_1", np.zeros((24, 24, 16), np.uint8), np.eye(4))
    cached = preprocess_case(case, tmp_path / "cache", SETTINGS)
    assert load_class_locations(cached) == {} and cached.class_counts == ()
    label = np.load(cached.label, mmap_mode="r")
    centres = sample_centres(label, 16, PROBS, 20, np.random.default_rng(0), {})
    assert (label[tuple(centres.T)] == BACKGROUND).all()


def test_workers_reproduce_patches_from_the_seed_without_replaying_them(tmp_path):
    label = toy_label((24, 24, 20))
    cases = [write_case(tmp_path, f"liver_{i}", label, np.eye(4)) for i in range(3)]
    cached = build_cache(cases, tmp_path / "cache", {**SETTINGS, "shape": [24, 24, 20]})
    settings = PatchSettings(8, PROBS, samples_per_volume=2, augment=True)

    def three_passes():
        torch.manual_seed(0)
        loader = build_loader(cached, settings, queue_length=6, batch_size=2, num_workers=2)
        batches = [batch["image"]["data"] for _ in range(3) for batch in loader]
        # one DataLoader, its workers kept, serves every pass (torchio would fork new ones)
        assert loader.dataset.subjects_loader.persistent_workers
        return batches

    first, second = three_passes(), three_passes()
    assert len(first) == 3 * 3  # 3 passes over 3 volumes, 2 patches each, batches of 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    patches = torch.cat(first).flatten(1)
    assert len(torch.unique(patches, dim=0)) == len(patches)  # no patch drawn twice


def test_trailing_singleton_axis_is_read_as_3d(tmp_path):
    label = toy_label((24, 24, 16))
    hu = np.where(label > 0, 110, -100).astype(np.int16)
    case = write_case(tmp_path, "liver_1", label[..., None], np.eye(4), hu=hu[..., None])
    cached = preprocess_case(case, tmp_path / "cache", SETTINGS)
    assert np.array_equal(np.load(cached.label), label)


def test_rare_background_is_still_sampled_at_its_probability():
    label = np.full((20, 20, 20), LIVER, np.uint8)
    label[10, 10, 10] = BACKGROUND
    freq, centres = centre_frequencies(label, {BACKGROUND: 0.5, LIVER: 0.5}, n=400, patch=4)
    assert abs(freq[BACKGROUND] - 0.5) < 0.08


def test_mirroring_flips_image_and_label_together_half_the_time():
    image = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    label = (image % 3).to(torch.uint8)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        flipped_image, flipped_label = mirror_patch(image, label, (0, 2), rng)
        # Which flips were made: the one combination of axes 0 and 2 that reproduces the patch.
        made = next(
            combo
            for combo in ((), (0,), (2,), (0, 2))
            if torch.equal(flipped_image, image.flip(combo) if combo else image)
        )
        assert torch.equal(flipped_label, label.flip(made) if made else label)
        seen.add(made)
    assert seen == {(), (0,), (2,), (0, 2)}  # each axis flipped at random, never axis 1
    # No axes: no flip and no random number drawn (runs without mirroring keep their patches).
    rng, untouched = np.random.default_rng(1), np.random.default_rng(1)
    assert mirror_patch(image, label, (), rng)[0] is image
    assert rng.random() == untouched.random()


def test_mirror_axes_are_checked_and_reach_the_patches(tmp_path):
    from liverseg.config import load_config
    from liverseg.errors import ConfigError

    assert load_config(None, ["data.mirror_axes=[0, 1, 2]"]).data.mirror_axes == (0, 1, 2)
    assert load_config(None, []).data.mirror_axes == ()
    for bad in ("[0, 0]", "[3]"):
        with pytest.raises(ConfigError, match="expected distinct axes among 0"):
            load_config(None, [f"data.mirror_axes={bad}"])
    with pytest.raises(ConfigError, match="mirror_axes"):
        load_config(None, ["data.mirror_axes=[true]"])
    assert PatchSettings(16, {0: 1.0}, 1, mirror_axes=(0,)).mirror_axes == (0,)
