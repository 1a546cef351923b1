"""Training patches: centres drawn as ``tio.LabelSampler`` draws them, augmented patches cut out.

Augmentation works on a patch with a margin instead of the whole volume: the sampler draws a centre
the way ``tio.LabelSampler`` does (a class with the configured probability among the classes
present, then a voxel of that class uniformly), and resamples a rotated, scaled patch around it from
a crop just large enough to hold it, with the ranges of ``RandomAffine(scales, degrees)`` in
physical space.

The voxels of each foreground class are listed once, by the cache (:func:`class_locations`), so
drawing a centre reads a few entries of that list instead of scanning the label map. Resampling
uses PyTorch's vectorised 2D ``grid_sample``: trilinear interpolation is bilinear interpolation
in two neighbouring slices of the crop, then linear between them (:func:`resample_crop`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from liverseg.constants import BACKGROUND

# Presence of a class in the valid region is first looked for at this many listed voxels, spread
# evenly; only when none of them lies there is the whole list scanned.
_PROBES = 64
# Uniform draws tried before the voxels of a class in the valid region are listed explicitly.
_TRIES = 1000


def class_locations(label: np.ndarray) -> dict[int, np.ndarray]:
    """The voxels of each foreground class, as flat indices of ``label`` in ascending order.

    Args:
        label: Label map (W, H, D), C order.

    Returns:
        Label value -> int64 array of flat (C order) indices, for each non-background value present.
    """
    flat = np.flatnonzero(label != BACKGROUND)
    values = label.reshape(-1)[flat]
    return {int(c): flat[values == c] for c in np.unique(values)}


def _inside(flat, shape: Sequence[int], lo: int, hi: Sequence[int]):
    """Whether flat indices of a (W, H, D) array lie in [lo, hi) on axes 1 and 2 (bool array)."""
    y, z = flat // shape[2] % shape[1], flat % shape[2]
    return (y >= lo) & (y < hi[1]) & (z >= lo) & (z < hi[2])


def _valid_run(locations: np.ndarray, shape: Sequence[int], lo: int, hi: Sequence[int]):
    """The ascending locations whose axis-0 index lies in [lo, hi[0]): one contiguous run."""
    plane = shape[1] * shape[2]
    first, stop = np.searchsorted(locations, [lo * plane, hi[0] * plane])
    return locations[first:stop]


def _any_inside(run: np.ndarray, shape: Sequence[int], lo: int, hi: Sequence[int]) -> bool:
    """Whether a voxel of ``run`` lies in the valid box: a few probes first, exact in any case."""
    if run.size == 0:
        return False
    probes = run[np.linspace(0, run.size - 1, min(_PROBES, run.size)).astype(np.int64)]
    return bool(_inside(probes, shape, lo, hi).any() or _inside(run, shape, lo, hi).any())


def _draw_inside(run: np.ndarray, shape, lo: int, hi, rng: np.random.Generator) -> int:
    """A voxel of ``run`` drawn uniformly among those in the valid box (rejection sampling)."""
    for _ in range(_TRIES):
        index = int(run[rng.integers(run.size)])
        if _inside(index, shape, lo, hi):
            return index
    return int(rng.choice(run[_inside(run, shape, lo, hi)]))


def _draw_background(valid: np.ndarray, rng: np.random.Generator) -> int:
    """A background voxel of ``valid`` drawn uniformly, as a flat index of ``valid``."""
    # Rejection sampling: background is most voxels, listing them all would be slow.
    for _ in range(_TRIES):
        index = int(rng.integers(valid.size))
        if valid.flat[index] == BACKGROUND:
            return index
    return int(rng.choice(np.flatnonzero(valid == BACKGROUND)))  # background is rare here


def _has_background(valid: np.ndarray) -> bool:
    """Whether ``valid`` holds a background voxel: a few probes first, exact in any case."""
    probes = np.linspace(0, valid.size - 1, min(_PROBES, valid.size)).astype(np.int64)
    return bool((valid.flat[probes] == BACKGROUND).any() or (valid == BACKGROUND).any())


def sample_centres(
    label: np.ndarray,
    patch_size: int,
    probabilities: dict[int, float],
    n: int,
    rng: np.random.Generator,
    locations: dict[int, np.ndarray] | None = None,
) -> np.ndarray:
    """Patch centres drawn as ``tio.LabelSampler`` draws them.

    A class is chosen with its probability, renormalised over the classes present among the
    voxels where a whole patch fits; then a voxel of that class there, uniformly.

    Args:
        label: Label map (W, H, D).
        patch_size: Patch side (voxels).
        probabilities: Label value -> probability.
        n: Number of centres.
        rng: Random generator.
        locations: The foreground voxels of ``label`` by class, as :func:`class_locations`
            lists them (the cache keeps them); listed from ``label`` when None.

    Returns:
        Integer array (n, 3) of voxel indices.
    """
    if locations is None:
        locations = class_locations(label)
    shape = label.shape
    lo = patch_size // 2
    hi = [size - (patch_size - 1) // 2 for size in shape]
    valid = label[lo : hi[0], lo : hi[1], lo : hi[2]]
    empty = np.empty(0, dtype=np.int64)
    runs = {
        c: _valid_run(locations.get(c, empty), shape, lo, hi)
        for c in probabilities
        if c != BACKGROUND
    }
    present = [
        c
        for c in probabilities
        if (_has_background(valid) if c == BACKGROUND else _any_inside(runs[c], shape, lo, hi))
    ]
    weights = np.array([probabilities[c] for c in present], dtype=np.float64)
    classes = rng.choice(present, size=n, p=weights / weights.sum())
    centres = []
    for c in classes:
        if c == BACKGROUND:
            index = np.unravel_index(_draw_background(valid, rng), valid.shape)
            centres.append(np.array(index) + lo)
        else:
            index = np.unravel_index(_draw_inside(runs[c], shape, lo, hi, rng), shape)
            centres.append(np.array(index))
    return np.array(centres, dtype=np.int64).reshape(n, 3)


def random_affine_matrix(
    scales: Sequence[float],
    degrees: Sequence[float],
    spacing_mm: Sequence[float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Voxel-space matrix of a random rotation and scaling made in physical space.

    Draws one scale per axis from ``scales`` and one angle per axis from ``degrees``, as
    ``tio.RandomAffine`` does; a scale above 1 zooms in.

    Returns:
        (3, 3) matrix mapping an output voxel offset to a source voxel offset.
    """
    s = rng.uniform(*scales, size=3)
    ax, ay, az = np.deg2rad(rng.uniform(*degrees, size=3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    d = np.diag(spacing_mm)
    return np.linalg.inv(d) @ rz @ ry @ rx @ np.diag(1.0 / s) @ d


def _crop_padded(array: np.ndarray, start: np.ndarray, size: np.ndarray, fill: float) -> np.ndarray:
    """array[start:start+size] with out-of-bounds parts filled, read only where inside."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src = [slice(max(a, 0), min(a + n, dim)) for a, n, dim in zip(start, size, array.shape)]
    dst = [slice(s.start - a, s.stop - a) for s, a in zip(src, start)]
    out[tuple(dst)] = array[tuple(src)]
    return out


def _source_axis(
    row: np.ndarray, offset: float, patch_size: int, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * (row . (k - P // 2) + offset)`` at every patch voxel ``k``: (P, P, P) float32.

    One broadcast addition of a (P, P, 1) plane and a (P,) line, both computed in float64.
    """
    o = np.arange(patch_size) - patch_size // 2
    plane = (row[0] * o[:, None] + row[1] * o[None, :] + offset) * scale
    line = row[2] * o * scale
    plane, line = (torch.from_numpy(a.astype(np.float32)) for a in (plane, line))
    return torch.add(plane[:, :, None], line, out=out)


def _slice_pairs(crop: torch.Tensor) -> torch.Tensor:
    """A contiguous (X, Y, Z) crop seen as a 2-channel 2D image (1, 2, (X - 1) * Y, Z).

    Row ``x * Y + y`` of channel 0 is row ``y`` of slice ``x``; channel 1 is the same row of slice
    ``x + 1``. A view: nothing is copied.
    """
    x, y, z = crop.shape
    return crop.as_strided((1, 2, (x - 1) * y, z), (0, y * z, z, 1))


def resample_crop(
    image: torch.Tensor,
    label: torch.Tensor,
    matrix: np.ndarray,
    centre: np.ndarray,
    patch_size: int,
    out: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Resample a patch from crops: trilinear for the image, nearest for the label.

    Patch voxel ``k`` takes the crops' value at ``matrix @ (k - P // 2) + centre``. PyTorch's 2D
    ``grid_sample`` is vectorised, its 3D one is not: so each point is sampled bilinearly (or
    nearest) within slice ``x0 = floor(x)`` and slice ``x0 + 1`` of the crop, both as rows of
    :func:`_slice_pairs`, then interpolated linearly (or the nearer taken) between the two. That
    is trilinear (nearest) interpolation; the sampled points must lie in
    ``[0, X - 2] x [0, Y - 1] x [0, Z - 1]``, which the crop's margin ensures. Coordinates are
    float32, and the folded row coordinate runs to ``(X - 1) * Y`` (about 2e4 for 96^3 patches),
    so the second axis is resolved to about 3e-3 voxel (the others to 1e-4): an image value can
    differ from exact trilinear by that fraction of its step between neighbouring voxels, and a
    label from exact nearest where a point lies that close to half-way between two voxels.

    Args:
        image: Crop (X, Y, Z) float32, contiguous.
        label: Crop (X, Y, Z) float32 holding label values, contiguous.
        matrix: (3, 3) patch offset -> crop offset (:func:`random_affine_matrix`).
        centre: Where the patch centre falls in the crops (voxels, 3 numbers).
        patch_size: Patch side P (voxels).
        out: Image (P, P, P) float32 and label (P, P, P) uint8, written in place.
    """
    x_size, y_size, z_size = image.shape
    rows = (x_size - 1) * y_size
    x = _source_axis(matrix[0], centre[0], patch_size, 1.0)
    x0 = x.floor()
    fraction = x.sub_(x0)
    # align_corners=True: -1 and 1 are the centres of the first and last row (column).
    grid = torch.empty(patch_size, patch_size, patch_size, 2)
    _source_axis(matrix[2], centre[2], patch_size, 2 / (z_size - 1), out=grid[..., 0]).sub_(1)
    y = _source_axis(matrix[1], centre[1], patch_size, 2 / (rows - 1)).sub_(1)
    torch.add(y, x0, alpha=2 * y_size / (rows - 1), out=grid[..., 1])
    grid = grid.view(1, patch_size**2, patch_size, 2)
    shape = (2, patch_size, patch_size, patch_size)
    pairs = [
        F.grid_sample(_slice_pairs(crop), grid, mode, "border", align_corners=True).view(shape)
        for crop, mode in ((image, "bilinear"), (label, "nearest"))
    ]
    torch.lerp(pairs[0][0], pairs[0][1], fraction, out=out[0])
    out[1].copy_(torch.where(fraction < 0.5, pairs[1][0], pairs[1][1]))


def extract_patch(
    image: np.ndarray,
    label: np.ndarray,
    centre: np.ndarray,
    patch_size: int,
    matrix: np.ndarray | None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a patch around ``centre``, resampled through ``matrix`` when given.

    Only a crop just large enough to hold the rotated, scaled patch is read and resampled
    (trilinear for the image, nearest for the label, :func:`resample_crop`); outside the volume
    the image is -1 (the clipped minimum) and the label background. Voxel ``k`` of the patch sits
    at offset ``k - patch_size // 2`` from the centre, torchio's convention.

    Args:
        image: Volume (W, H, D), float16 or float32 (a memory map is read only where cropped).
        label: Label map (W, H, D) uint8.
        centre: Patch centre (voxel indices, 3 integers).
        patch_size: Patch side P (voxels).
        matrix: (3, 3) patch offset -> volume offset (:func:`random_affine_matrix`), or None.
        out: Image (P, P, P) float32 and label (P, P, P) uint8 to write into; new when None.

    Returns:
        image (P, P, P) float32 and label (P, P, P) uint8 (``out`` when given).
    """
    half = patch_size // 2
    if out is None:
        shape = (patch_size,) * 3
        out = torch.empty(shape), torch.empty(shape, dtype=torch.uint8)
    if matrix is None:
        start = centre - half
        size = np.array([patch_size] * 3)
        out[0].copy_(torch.from_numpy(_crop_padded(image, start, size, -1.0)))
        out[1].copy_(torch.from_numpy(_crop_padded(label, start, size, BACKGROUND)))
        return out
    # Offsets within +-(half + 1) voxels stay at least a voxel inside this crop.
    extent = np.ceil(np.abs(matrix).sum(axis=1) * (half + 1)).astype(int) + 1
    start, size = centre - extent, 2 * extent + 1
    crops = [
        torch.from_numpy(_crop_padded(array, start, size, fill)).float()
        for array, fill in ((image, -1.0), (label, BACKGROUND))
    ]
    resample_crop(*crops, matrix, extent, patch_size, out)
    return out


def mirror_patch(
    image: torch.Tensor, label: torch.Tensor, axes: Sequence[int], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a patch's image and label together along each of ``axes`` with probability 0.5.

    The patches are in canonical RAS order (the cache's), so axis 0 is left-right, 1
    anterior-posterior, 2 inferior-superior: the axes that test-time mirroring flips
    (:func:`liverseg.inference.windows.mirror_dims`).
    """
    flips = tuple(int(a) for a in axes if rng.random() < 0.5)
    if not flips:
        return image, label
    return image.flip(flips), label.flip(flips)
