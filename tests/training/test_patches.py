"""The law of the training patches, against reference implementations written here.

Centres: a class with its probability renormalised over the classes present where a whole patch
fits, then a voxel of that class there, uniformly (``tio.LabelSampler``). Patches: trilinear image
and nearest label at ``matrix @ (k - P // 2) + centre``, -1 and background outside the volume.
"""

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.stats import chisquare

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.training.patches import (
    class_locations,
    extract_patch,
    random_affine_matrix,
    sample_centres,
)

PROBS = {BACKGROUND: 0.2, LIVER: 0.3, TUMOR: 0.5}


def border_label():
    """12^3 labels whose liver and tumor lie partly where a 6^3 patch does not fit."""
    label = np.zeros((12, 12, 12), np.uint8)
    label[2:9, 4:11, 1:8] = LIVER
    label[8:11, 5:7, 5:7] = TUMOR  # x = 10 is outside the valid region [3, 10)
    return label


def expected_centre_law(label, patch_size, probabilities):
    """The probability of each voxel being drawn as a centre, as ``tio.LabelSampler`` gives it."""
    lo = patch_size // 2
    hi = [n - (patch_size - 1) // 2 for n in label.shape]
    valid = np.zeros(label.shape, bool)
    valid[lo : hi[0], lo : hi[1], lo : hi[2]] = True
    present = {c: p for c, p in probabilities.items() if (valid & (label == c)).any()}
    law = np.zeros(label.shape)
    for c, p in present.items():
        voxels = valid & (label == c)
        law[voxels] = p / sum(present.values()) / voxels.sum()
    return law


def cached_locations(label, tmp_path):
    """Class locations as the cache keeps them: int32, one file, memory-mapped slices."""
    found = class_locations(label)
    np.save(tmp_path / "locations.npy", np.concatenate(list(found.values())).astype(np.int32))
    mapped = np.load(tmp_path / "locations.npy", mmap_mode="r")
    bounds = np.cumsum([0] + [v.size for v in found.values()])
    return {c: mapped[a:b] for c, a, b in zip(found, bounds, bounds[1:])}


@pytest.mark.parametrize("source", ["listed from the label", "cached"])
def test_centres_follow_the_label_sampler_law_voxel_by_voxel(source, tmp_path):
    label = border_label()
    locations = cached_locations(label, tmp_path) if source == "cached" else None
    n = 20000
    centres = sample_centres(label, 6, PROBS, n, np.random.default_rng(0), locations)
    law = expected_centre_law(label, 6, PROBS)
    counts = np.zeros(label.shape)
    np.add.at(counts, tuple(centres.T), 1)
    assert counts[law == 0].sum() == 0  # only valid voxels of a present class
    # uniform within each class, each class at its probability: a chi-square test on every voxel
    assert chisquare(counts[law > 0], law[law > 0] * n).pvalue > 1e-3


def test_class_absent_from_the_valid_region_is_renormalised_away(tmp_path):
    label = border_label()
    label[label == TUMOR] = LIVER
    label[10, 5, 5] = TUMOR  # the only tumor voxels, where no patch fits: beyond the valid
    label[5, 5, 11] = TUMOR  # region on the first axis, and on the last one
    for locations in (None, cached_locations(label, tmp_path)):
        centres = sample_centres(label, 6, PROBS, 4000, np.random.default_rng(1), locations)
        values = label[tuple(centres.T)]
        assert not (values == TUMOR).any()
        assert abs(np.mean(values == LIVER) - 0.6) < 0.03


def test_class_locations_list_every_voxel_in_c_order():
    label = np.asfortranarray(border_label())  # NIfTI arrays arrive in Fortran order
    found = class_locations(label)
    assert sorted(found) == [LIVER, TUMOR]
    for c, flat in found.items():
        assert np.array_equal(flat, np.flatnonzero(np.ascontiguousarray(label) == c))


def reference_patch(image, label, centre, patch_size, matrix):
    """Exact (float64) trilinear image and nearest label of a patch; -1 / background outside."""
    pad = 2 * patch_size
    image = np.pad(image.astype(np.float64), pad, constant_values=-1.0)
    label = np.pad(label, pad, constant_values=BACKGROUND)
    offsets = np.arange(patch_size) - patch_size // 2
    grid = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij")).reshape(3, -1)
    points = matrix @ grid + np.asarray(centre, np.float64)[:, None] + pad
    shape = (patch_size,) * 3
    trilinear = ndimage.map_coordinates(image, points, order=1).reshape(shape)
    nearest = label[tuple(np.rint(points).astype(int))].reshape(shape)
    tie_distance = np.abs(points - np.floor(points) - 0.5).min(axis=0).reshape(shape)
    return trilinear, nearest, tie_distance


@pytest.mark.parametrize("patch_size", [15, 32])
def test_resampled_patch_equals_reference_trilinear_and_nearest(patch_size):
    rng = np.random.default_rng(4)
    shape = (44, 52, 30)
    smooth = ndimage.gaussian_filter(rng.uniform(-1, 1, shape), 1.5) * 4
    image = np.clip(smooth, -1, 1).astype(np.float16)
    label = np.digitize(smooth, [-0.3, 0.4]).astype(np.uint8)
    for trial in range(6):
        matrix = random_affine_matrix((0.9, 1.1), (-10, 10), (0.8, 0.9, 2.5), rng)
        # centres inside and near the borders, where the patch reaches outside the volume
        inside = np.array([rng.integers(0, n) for n in shape])
        centre = inside if trial % 2 else np.array([3, 50, 1])
        patch_image, patch_label = extract_patch(image, label, centre, patch_size, matrix)
        trilinear, nearest, tie_distance = reference_patch(image, label, centre, patch_size, matrix)
        assert patch_image.dtype == torch.float32 and patch_label.dtype == torch.uint8
        # float32 coordinates over the crop's folded rows: about 1e-3 voxel
        difference = np.abs(patch_image.numpy() - trilinear)
        assert difference.max() < 1e-2 and difference.mean() < 1e-4
        differs = patch_label.numpy() != nearest
        assert (tie_distance[differs] < 5e-3).all()  # only at a hair from half-way
        assert differs.mean() < 1e-3
