"""Geometry of a voxel grid from its 4 x 4 affine: spacing, trust in it, axial axis, diameters.

Every module that needs a voxel size, a voxel volume, the axial axis or a lesion's diameters in mm
gets it here, from the affine (never from ``pixdim``, which can disagree with it), so the report,
``liverseg evaluate``, the data doctor and post-processing measure alike. numpy/scipy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from liverseg.errors import DataError

# The voxel sizes a converter's placeholder affine shows: the identity's 1 mm, and 2 or 4 mm
# after `liverseg prepare` halved it once or twice (or reduced it by 4).
PLACEHOLDER_SPACINGS_MM = (1.0, 2.0, 4.0)
_EXACT_MM = 1e-6
# Pairs of boundary points compared at a time when measuring chords: bounds memory.
_PAIR_BLOCK = 1024


def checked_affine(affine: np.ndarray) -> np.ndarray:
    """The affine as a finite, non-singular 4 x 4 float64 matrix.

    Raises:
        DataError: Another shape, non-finite entries or a zero voxel volume.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"expected a finite 4 x 4 affine, found shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) == 0:
        raise DataError("the affine is singular (zero voxel volume); check the NIfTI header")
    return affine


def spacing_mm(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each voxel axis: the lengths of the affine's first three columns, mm."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(float(s) for s in sizes)


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel, ``|det(affine[:3, :3])|`` in mm^3 (exact for sheared grids too)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1 or 2) whose direction is most aligned with the scanner's z axis.

    Args:
        affine: 4 x 4 voxel-to-scanner matrix, mm.

    Returns:
        The axis index; slices across it are axial.
    """
    affine = checked_affine(affine)
    directions = affine[:3, :3] / np.asarray(spacing_mm(affine))
    return int(np.argmax(np.abs(directions[2])))


def label_affine_matches(
    image_affine: np.ndarray, label_affine: np.ndarray, tolerance_mm: float
) -> bool:
    """Whether a label's affine equals its image's up to float noise.

    Args:
        image_affine: 4 x 4 voxel-to-scanner matrix of the image, mm.
        label_affine: 4 x 4 matrix of the label, mm.
        tolerance_mm: Largest accepted absolute difference of any entry, mm (Task03's
            ``liver_2`` differs by about 3e-4 mm).

    Returns:
        True when every entry differs by at most ``tolerance_mm``.
    """
    difference = np.abs(np.asarray(image_affine, float) - np.asarray(label_affine, float))
    return bool(np.all(np.isfinite(difference)) and difference.max() <= tolerance_mm)


def spacing_is_trustworthy(affine: np.ndarray) -> bool:
    """Whether the affine's voxel size can be believed, or looks like a lost-spacing placeholder.

    The rule: untrusted when the rotation part is a signed permutation (axis-aligned, any
    flips or axis order) and the three voxel sizes are equal and exactly 1, 2 or 4 mm
    (``PLACEHOLDER_SPACINGS_MM``, to 1e-6 mm). That is the identity a converter writes when the
    true spacing is lost (Task03 cases 28-47) and what ``liverseg prepare`` makes of it
    (:func:`liverseg.data.downsampling.downsampled_affine` with factor 2, twice, or 4). The
    origin is ignored, so shifted or halved identities (origin 0.5) are caught too.

    Limits: a genuine axis-aligned scan of exactly 1, 2 or 4 mm isotropic voxels is flagged
    (rare for abdominal CT, whose slices are thicker than its pixels); an identity reduced by
    another factor (3 mm, 6 mm) or resampled to anything else is not recognised, so
    ``liverseg prepare`` records the source's verdict as ``spacing_trusted`` in prepare.json.
    An oblique 1 mm grid is trusted: a placeholder is never rotated.

    Args:
        affine: 4 x 4 voxel-to-scanner matrix, mm.

    Returns:
        False for such placeholder geometry, True otherwise.

    Raises:
        DataError: ``affine`` is not a finite 4 x 4 matrix.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"expected a finite 4 x 4 affine, found shape {affine.shape}")
    linear = affine[:3, :3]
    sizes = np.linalg.norm(linear, axis=0)
    size = sizes[0]
    if not np.any(np.isclose(size, PLACEHOLDER_SPACINGS_MM, rtol=0, atol=_EXACT_MM)):
        return True
    if not np.allclose(sizes, size, rtol=0, atol=_EXACT_MM):
        return True
    # Axis-aligned: each column of the direction matrix is +-1 on one axis, 0 elsewhere, and
    # each scanner axis is hit once.
    directions = np.abs(linear / size)
    one_hot = np.isclose(directions, 1.0, rtol=0, atol=_EXACT_MM)
    zero = np.isclose(directions, 0.0, rtol=0, atol=_EXACT_MM)
    each_once = np.all(one_hot.sum(axis=0) == 1) and np.all(one_hot.sum(axis=1) == 1)
    return not (np.all(one_hot | zero) and each_once)


def axial_diameters(lesion: np.ndarray, affine: np.ndarray) -> tuple[float, float, int]:
    """RECIST-like long and short axis of a lesion, in its largest axial slice, in mm.

    The axial slice is the one across :func:`axial_axis` where the lesion has most voxels; the
    diameters are measured between voxel centres on the affine's real geometry (an oblique or
    sheared grid measures true mm), see :func:`chord_diameters`. A lesion ``n`` voxels across
    measures ``(n - 1)`` voxel sizes; a one-voxel lesion 0 mm.

    Args:
        lesion: Bool mask of one lesion, shape ``(W, H, D)`` (a crop is fine: only the voxel
            steps of ``affine`` are used, not its origin).
        affine: 4 x 4 voxel-to-scanner matrix of the grid, mm.

    Returns:
        ``(long_mm, short_mm, slice_index)``: the axes and the index of the slice (in
        ``lesion``'s own indexing along the axial axis) where they were measured.
    """
    lesion = np.asarray(lesion, dtype=bool)
    axis = axial_axis(affine)
    stacked = np.moveaxis(lesion, axis, -1)
    largest = int(np.argmax(stacked.sum(axis=(0, 1))))
    slice_mask = stacked[..., largest]
    in_plane = [a for a in range(3) if a != axis]
    columns = np.asarray(affine, dtype=np.float64)[:3, in_plane]  # mm per in-plane voxel step
    # An orthonormal basis of the slice plane, so oblique or sheared grids measure true mm.
    basis, _ = np.linalg.qr(columns)
    boundary = slice_mask & ~ndimage.binary_erosion(slice_mask)
    points_mm = np.argwhere(boundary) @ columns.T @ basis
    tolerance_mm = float(np.linalg.norm(columns, axis=0).min())
    long_mm, short_mm = chord_diameters(points_mm, tolerance_mm)
    return long_mm, short_mm, largest


def chord_diameters(
    points_mm: np.ndarray, tolerance_mm: float | None = None
) -> tuple[float, float]:
    """Longest chord of a set of coplanar points, and the longest chord perpendicular to it.

    The long axis is the largest distance between two points. The short axis is the largest
    extent, measured perpendicular to the long axis, of a pair of points whose offset along the
    long axis is at most ``tolerance_mm``: the discrete version of "the longest chord
    perpendicular to the long axis" (RECIST) on a voxel grid.

    Args:
        points_mm: Point coordinates in the plane, shape ``(N, 2)``, mm (voxel centres of one
            axial slice of a lesion; its boundary voxels suffice).
        tolerance_mm: How far apart along the long axis the two ends of a short-axis chord may
            be; default the smallest distance between two points (one voxel).

    Returns:
        ``(long_mm, short_mm)``; ``(0.0, 0.0)`` for a single point.
    """
    points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 2)
    if len(points) < 2:
        return 0.0, 0.0
    i, j = _farthest_pair(points)
    axis = points[j] - points[i]
    long_mm = float(np.linalg.norm(axis))
    along = axis / long_mm
    across = np.array([-along[1], along[0]])
    u, v = points @ along, points @ across
    step = _min_neighbour_distance(points) if tolerance_mm is None else float(tolerance_mm)
    short_mm = 0.0
    for start in range(0, len(points), _PAIR_BLOCK):
        du = np.abs(u[start : start + _PAIR_BLOCK, None] - u[None, :])
        dv = np.abs(v[start : start + _PAIR_BLOCK, None] - v[None, :])
        dv[du > step + 1e-9] = 0.0
        short_mm = max(short_mm, float(dv.max()))
    return long_mm, short_mm


def checked_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """``ndim`` positive finite voxel sizes in mm as floats.

    Raises:
        ValueError: Another count, or a size that is not positive and finite.
    """
    values = tuple(float(s) for s in np.ravel(spacing))
    if len(values) != ndim or not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"expected {ndim} positive voxel sizes in mm, got {spacing}")
    return values


def _farthest_pair(points: np.ndarray) -> tuple[int, int]:
    best, pair = -1.0, (0, 0)
    for start in range(0, len(points), _PAIR_BLOCK):
        block = points[start : start + _PAIR_BLOCK]
        d2 = ((block[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1)
        flat = int(np.argmax(d2))
        row, col = divmod(flat, len(points))
        if d2[row, col] > best:
            best, pair = float(d2[row, col]), (start + row, col)
    return pair


def _min_neighbour_distance(points: np.ndarray) -> float:
    """Smallest distance between two distinct points (the in-plane voxel size of a grid)."""
    best = np.inf
    for start in range(0, len(points), _PAIR_BLOCK):
        block = points[start : start + _PAIR_BLOCK]
        d2 = ((block[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1)
        d2[d2 == 0] = np.inf
        best = min(best, float(d2.min()))
    return float(np.sqrt(best))
