"""Reduce a CT case by an integer factor along every axis: grid, image, label, and its files.

Geometry (block-centre convention): new voxel ``i`` covers old voxels ``i*f .. i*f+f-1`` along each
axis and its centre lies at old voxel coordinate ``i*f + (f-1)/2``. The new shape is
``ceil(n / f)``: no voxel is dropped; where ``n`` is not a multiple of ``f`` the last block is
partial (edge voxels repeated for the image, only the voxels present counted for the label), so
the grid then reaches half an old voxel past the old edge. The affine's voxel axes are multiplied
by ``f`` (spacing times ``f``) and the origin moves to the centre of block 0. Orientation is kept
as stored, never reoriented.

Image: Gaussian pre-filter with the sigma of Cardoso et al. (MICCAI 2015, also torchio's
``Resample(antialias=True)``), ``sigma = sqrt(f**2 - 1) / (2 * sqrt(2 * ln 2))`` voxels, then
linear interpolation at the block centres; rounded to int16 HU.

Label: per block of ``f**3`` voxels, count organ voxels (LIVER or TUMOR) and tumor voxels:

1. BACKGROUND where organ voxels are fewer than half the block (``LIVER_MIN_FRACTION``).
2. Otherwise TUMOR where tumor voxels are at least half of the organ voxels
   (``TUMOR_MIN_FRACTION``), even when tumor is not the block's majority (3 tumor, 2 liver,
   3 background -> TUMOR); otherwise LIVER. Ties go to the smaller class.
3. A group of 26-connected blocks that hold any tumor but got no TUMOR block from rule 2 (a lesion
   of a few voxels split over several blocks, or one at the liver's edge) gets TUMOR at its block
   with the largest tumor fraction: every lesion keeps at least one voxel.

Lower tumor thresholds keep thin rims but inflate every lesion: for spheres of radius 3-8 voxels
inside liver at random sub-voxel positions, a 1/4-of-block threshold grew the mean tumor volume by
21-53 %, rules 2-3 by 3-5 %, and they still keep a lesion of one voxel.

Memory: volumes are read at their stored dtype (int16 for Task03) and processed in slabs in
float32; no float64 whole-volume copy is made.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from liverseg.constants import BACKGROUND, LABEL_VALUES, LIVER, TUMOR
from liverseg.errors import DataError
from liverseg.geometry import label_affine_matches, spacing_is_trustworthy
from liverseg.io import fingerprint, read_stored, save_nifti
from liverseg.labels import invalid_label_values

logger = logging.getLogger(__name__)

LIVER_MIN_FRACTION = 0.5  # of the block's voxels
TUMOR_MIN_FRACTION = 0.5  # of the block's organ (LIVER or TUMOR) voxels
# Label affines that differ from their image's by at most this (mm, any element) are float
# noise (liver_2): the label is written with the image's new affine so the pair stays consistent.
LABEL_AFFINE_TOLERANCE_MM = 0.01
_SLAB = 32  # slices per slab; bounds float32 working memory to a few slices of the volume
_INT16 = np.iinfo(np.int16)


def antialias_sigma(factor: int) -> float:
    """Gaussian sigma in input voxels for downsampling by ``factor`` (0 for ``factor == 1``)."""
    return math.sqrt(factor**2 - 1) / (2 * math.sqrt(2 * math.log(2)))


def downsampled_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """``ceil(n / factor)`` per axis: the shape written by :func:`downsample_image`."""
    return tuple(-(-int(n) // factor) for n in shape)


def downsampled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """The 4 x 4 affine of the reduced grid (block-centre convention, see the module docstring).

    Args:
        affine: Voxel-to-world matrix of the input, mm; any orientation (RAS, LPS, oblique).
        factor: Integer reduction factor per axis.

    Returns:
        Voxel axes scaled by ``factor``; origin at the centre of the first block.
    """
    index_map = np.diag([factor, factor, factor, 1.0])
    index_map[:3, 3] = (factor - 1) / 2
    return np.asarray(affine, dtype=np.float64) @ index_map


def _reduce_axis(array: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Gaussian pre-filter along ``axis``, then linear samples at the block centres (float32)."""
    n = array.shape[axis]
    sigma = antialias_sigma(factor)
    if sigma > 0:
        array = ndimage.gaussian_filter1d(
            array, sigma, axis=axis, mode="nearest", output=np.float32
        )
    centres = np.minimum(np.arange(-(-n // factor)) * factor + (factor - 1) / 2, n - 1)
    low = np.floor(centres).astype(np.intp)
    high = np.minimum(low + 1, n - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = -1
    weight = (centres - low).astype(np.float32).reshape(weight_shape)
    return np.take(array, low, axis) * (1 - weight) + np.take(array, high, axis) * weight


def downsample_image(
    volume: np.ndarray, factor: int, slope: float = 1.0, inter: float = 0.0
) -> np.ndarray:
    """Antialiased linear reduction of a CT volume by ``factor`` along every axis.

    Args:
        volume: Stored voxel values, shape ``(W, H, D)``, any numeric dtype (int16 in Task03).
        factor: Integer reduction factor per axis (1 copies).
        slope: NIfTI scale slope; HU = stored * slope + inter.
        inter: NIfTI scale intercept.

    Returns:
        HU rounded to int16, shape ``ceil((W, H, D) / factor)``.
    """
    width, height, depth = volume.shape
    new_w, new_h, new_d = downsampled_shape(volume.shape, factor)
    in_plane = np.empty((new_w, new_h, depth), dtype=np.float32)
    for z0 in range(0, depth, _SLAB):
        slab = volume[:, :, z0 : z0 + _SLAB].astype(np.float32)
        if slope != 1 or inter != 0:
            slab = slab * np.float32(slope) + np.float32(inter)
        in_plane[:, :, z0 : z0 + _SLAB] = _reduce_axis(_reduce_axis(slab, 0, factor), 1, factor)
    out = np.empty((new_w, new_h, new_d), dtype=np.int16)
    for x0 in range(0, new_w, _SLAB):
        reduced = _reduce_axis(in_plane[x0 : x0 + _SLAB], 2, factor)
        out[x0 : x0 + _SLAB] = np.clip(np.rint(reduced), _INT16.min, _INT16.max)
    return out


def _block_counts(slab: np.ndarray, factor: int) -> tuple[np.ndarray, ...]:
    """Voxels present, foreground voxels and tumor voxels per ``factor**3`` block of a slab."""
    pad = [(0, -n % factor) for n in slab.shape]
    present = np.pad(np.ones(slab.shape, dtype=bool), pad)
    blocks = np.pad(slab, pad, constant_values=BACKGROUND)
    w, h, d = (n // factor for n in blocks.shape)
    block_shape = (w, factor, h, factor, d, factor)
    axes = (1, 3, 5)
    count = present.reshape(block_shape).sum(axis=axes, dtype=np.uint16)
    tumor = (blocks == TUMOR).reshape(block_shape).sum(axis=axes, dtype=np.uint16)
    foreground = (blocks == LIVER).reshape(block_shape).sum(axis=axes, dtype=np.uint16) + tumor
    return count, foreground, tumor


def downsample_label(label: np.ndarray, factor: int) -> np.ndarray:
    """Reduce a label map by ``factor`` along every axis, keeping small tumors.

    The rule (organ in at least half the block, tumor in at least half of the organ voxels, then
    one TUMOR block for every lesion that would vanish) is in the module docstring.

    Args:
        label: Shape ``(W, H, D)``, values in ``LABEL_VALUES`` (any integer or float dtype).
        factor: Integer reduction factor per axis.

    Returns:
        uint8 labels, shape ``ceil((W, H, D) / factor)``.

    Raises:
        ValueError: A value outside ``LABEL_VALUES``.
    """
    new_shape = downsampled_shape(label.shape, factor)
    out = np.empty(new_shape, dtype=np.uint8)
    tumor_count = np.empty(new_shape, dtype=np.uint16)
    present_count = np.empty(new_shape, dtype=np.uint16)
    step = factor * max(1, _SLAB // factor)
    for z0 in range(0, label.shape[2], step):
        slab = label[:, :, z0 : z0 + step]
        invalid = invalid_label_values(slab, limit=5)
        if invalid:
            raise ValueError(
                f"label values {invalid} at slices >= {z0}; expected only {list(LABEL_VALUES)} "
                "(background, liver, tumor)"
            )
        count, foreground, tumor = _block_counts(slab, factor)
        blocks = slice(z0 // factor, z0 // factor + count.shape[2])
        organ = foreground >= LIVER_MIN_FRACTION * count
        tumor_share = tumor >= TUMOR_MIN_FRACTION * foreground
        out[:, :, blocks] = np.where(organ, np.where(tumor_share, TUMOR, LIVER), BACKGROUND)
        tumor_count[:, :, blocks] = tumor
        present_count[:, :, blocks] = count
    _rescue_lost_tumors(out, tumor_count, present_count)
    return out


def _rescue_lost_tumors(out: np.ndarray, tumor_count: np.ndarray, present: np.ndarray) -> None:
    """Give TUMOR to the most tumorous block of each tumor group that lost all its tumor."""
    groups, n_groups = ndimage.label(tumor_count > 0, structure=np.ones((3, 3, 3), dtype=bool))
    for group_id, box in enumerate(ndimage.find_objects(groups), start=1):
        member = groups[box] == group_id
        if (out[box][member] == TUMOR).any():
            continue
        fraction = np.where(member, tumor_count[box] / present[box], -1.0)
        peak = np.unravel_index(np.argmax(fraction), fraction.shape)
        out[tuple(s.start + p for s, p in zip(box, peak, strict=True))] = TUMOR
    logger.debug("checked %d tumor groups", n_groups)


def downsample_case(
    image_path: str | Path,
    label_path: str | Path | None,
    out_image: str | Path,
    out_label: str | Path | None,
    factor: int,
) -> dict:
    """Reduce one case by ``factor`` along every axis and write it atomically.

    Args:
        image_path: CT volume, HU, shape ``(W, H, D)``.
        label_path: Its label map (values ``LABEL_VALUES``, same shape) or None (test cases).
        out_image: Destination of the int16 image, shape ``ceil((W, H, D) / factor)``.
        out_label: Destination of the uint8 label, or None.
        factor: Integer reduction factor per axis.

    Returns:
        The case's record: ``factor``, ``source_image`` / ``source_label`` (path, size,
        mtime_ns), ``image`` / ``label`` (outputs), ``original_shape``, ``original_affine``,
        ``new_shape``, ``new_affine`` (4 x 4 lists, mm), ``spacing_trusted`` (False when the
        source's affine is an identity-like placeholder,
        :func:`liverseg.geometry.spacing_is_trustworthy`: its mm are unreliable, and stay so in
        the output, whatever its new spacing) and, with a label, ``original_label_affine`` and
        ``new_label_affine``.

    Raises:
        DataError: A file is unreadable, not 3D, or the label's shape or values are wrong.
    """
    if (label_path is None) != (out_label is None):
        raise ValueError("label_path and out_label must both be given or both be None")
    image_path = Path(image_path)
    stored, affine, slope, inter = read_stored(image_path)
    new_affine = downsampled_affine(affine, factor)
    reduced = downsample_image(stored, factor, slope, inter)
    original_shape = stored.shape
    del stored
    save_nifti(reduced, new_affine, out_image)
    record = {
        "factor": factor,
        "source_image": fingerprint(image_path),
        "source_label": None,
        "image": str(out_image),
        "label": None,
        "original_shape": list(original_shape),
        "original_affine": affine.tolist(),
        "new_shape": list(reduced.shape),
        "new_affine": new_affine.tolist(),
        "spacing_trusted": spacing_is_trustworthy(affine),
    }
    if label_path is None:
        return record
    label_path = Path(label_path)
    label, label_affine, _, _ = read_stored(label_path, role="label map")
    if label.shape != original_shape:
        raise DataError(
            f"{label_path}: label shape {label.shape} differs from its image's "
            f"{original_shape} ({image_path}); expected the same voxel grid. Fix or remove "
            "this case."
        )
    try:
        reduced_label = downsample_label(label, factor)
    except ValueError as exc:
        raise DataError(f"{label_path}: {exc}. Fix or remove this case.") from exc
    if label_affine_matches(affine, label_affine, LABEL_AFFINE_TOLERANCE_MM):
        new_label_affine = new_affine
    else:
        logger.warning(
            "%s: label affine differs from its image's by %.3g mm; kept as stored",
            label_path,
            np.abs(label_affine - affine).max(),
        )
        new_label_affine = downsampled_affine(label_affine, factor)
    save_nifti(reduced_label, new_label_affine, out_label)
    record.update(
        source_label=fingerprint(label_path),
        label=str(out_label),
        original_label_affine=label_affine.tolist(),
        new_label_affine=new_label_affine.tolist(),
    )
    return record
