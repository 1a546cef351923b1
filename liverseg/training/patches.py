"""Training patches: centres drawn as ``tio.LabelSampler`` draws them, augmented patches cut out.

Augmentation works on a patch with a margin instead of the whole volume: the sampler draws a centre
the way ``tio.LabelSampler`` does (a class with the configured probability among the classes
present, then a voxel of that class uniformly), and resamples a rotated, scaled patch around it from
a crop just large enough to hold it, with the ranges of ``RandomAffine(scales, degrees)`` in
physical space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from liverseg.constants import BACKGROUND


def sample_centres(
    label: np.ndarray,
    patch_size: int,
    probabilities: dict[int, float],
    n: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Patch centres drawn as ``tio.LabelSampler`` draws them.

    A class is chosen with its probability, renormalised over the classes present among the
    voxels where a whole patch fits; then a voxel of that class, uniformly.

    Args:
        label: Label map (W, H, D).
        patch_size: Patch side (voxels).
        probabilities: Label value -> probability.
        n: Number of centres.
        rng: Random generator.

    Returns:
        Integer array (n, 3) of voxel indices.
    """
    lo = patch_size // 2
    hi = [size - (patch_size - 1) // 2 for size in label.shape]
    valid = label[lo : hi[0], lo : hi[1], lo : hi[2]]
    indices = {c: np.flatnonzero(valid == c) for c in probabilities if c != BACKGROUND}
    has_background = bool((valid == BACKGROUND).any())
    present = [
        c for c in probabilities if (c == BACKGROUND and has_background) or indices.get(c, []).size
    ]
    weights = np.array([probabilities[c] for c in present], dtype=np.float64)
    classes = rng.choice(present, size=n, p=weights / weights.sum())
    flat = []
    for c in classes:
        if c == BACKGROUND:
            # Rejection sampling: background is most voxels, listing them all would be slow.
            for _ in range(1000):
                index = int(rng.integers(valid.size))
                if valid.flat[index] == BACKGROUND:
                    break
            else:  # background is rare here: list it after all
                index = int(rng.choice(np.flatnonzero(valid == BACKGROUND)))
        else:
            index = int(rng.choice(indices[c]))
        flat.append(index)
    return np.stack(np.unravel_index(np.array(flat), valid.shape), axis=1) + lo


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


def extract_patch(
    image: np.ndarray,
    label: np.ndarray,
    centre: np.ndarray,
    patch_size: int,
    matrix: np.ndarray | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a patch around ``centre``, resampled through ``matrix`` when given.

    Only a crop just large enough to hold the rotated, scaled patch is read and resampled
    (trilinear for the image, nearest for the label); outside the volume the image is -1 (the
    clipped minimum) and the label background. Voxel ``k`` of the patch sits at offset
    ``k - patch_size // 2`` from the centre, torchio's convention.

    Returns:
        image (P, P, P) float32 and label (P, P, P) uint8.
    """
    half = patch_size // 2
    if matrix is None:
        start = centre - half
        size = np.array([patch_size] * 3)
        return (
            torch.from_numpy(_crop_padded(image, start, size, -1.0).astype(np.float32)),
            torch.from_numpy(_crop_padded(label, start, size, BACKGROUND)),
        )
    extent = np.ceil(np.abs(matrix).sum(axis=1) * (half + 1)).astype(int) + 1
    start, size = centre - extent, 2 * extent + 1
    crop_image = torch.from_numpy(_crop_padded(image, start, size, -1.0).astype(np.float32))
    crop_label = torch.from_numpy(_crop_padded(label, start, size, BACKGROUND).astype(np.float32))
    offsets = torch.arange(patch_size, dtype=torch.float32) - half
    grid = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), dim=-1)
    source = grid @ torch.from_numpy(matrix.T.astype(np.float32)) + torch.from_numpy(extent).float()
    normalised = source / torch.from_numpy(size - 1).float() * 2 - 1
    normalised = normalised.flip(-1)[None]  # grid_sample wants (z, y, x) for a (X, Y, Z) tensor
    sampled = [
        F.grid_sample(
            crop[None, None], normalised, mode=mode, padding_mode="border", align_corners=True
        )[0, 0]
        for crop, mode in ((crop_image, "bilinear"), (crop_label, "nearest"))
    ]
    return sampled[0], sampled[1].to(torch.uint8)


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
