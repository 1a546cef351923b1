"""The grid of a DICOM series: slice order and RAS affine from the slices' headers alone.

Slices are ordered by ``ImagePositionPatient`` projected on the slice normal (the cross product of
``ImageOrientationPatient``'s row and column cosines); the slice spacing is the positions' mean
step, never ``SliceThickness``. The affine maps ``(column, row, slice)`` voxel indices to RAS mm,
the NIfTI path's convention: DICOM's patient coordinates are LPS, so x and y are negated. A series
whose slices do not lie on one regular grid is refused, never resampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from liverseg.errors import DataError

# A slice may lie this fraction of a voxel off the regular grid the affine describes.
GRID_TOLERANCE = 0.1
# Largest difference between two slices' direction cosines still taken as one orientation.
ORIENTATION_TOLERANCE = 1e-4
# LPS (DICOM patient coordinates) to RAS (NIfTI, nibabel): negate x and y.
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_geometry(headers: Sequence[Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """The slice order and RAS affine of a series, or a refusal naming every problem found.

    Args:
        headers: One header per slice, in any order (pydicom datasets, or anything with the
            attributes ``ImagePositionPatient``, ``ImageOrientationPatient``, ``PixelSpacing``,
            ``Rows`` and ``Columns``).
        name: How messages name the series (folder and series).

    Returns:
        ``(order, affine)``: indices of ``headers`` from the lowest position along the slice
        normal up; 4 x 4 float64 RAS affine of ``(column, row, slice)`` voxel indices in mm.

    Raises:
        DataError: Missing geometry tags, mixed orientations, sizes or pixel spacings, fewer
            than two slices, slices sharing a position, missing slices (a position step more
            than ``GRID_TOLERANCE`` of the usual step off it), gantry tilt or shear (a slice more
            than ``GRID_TOLERANCE`` of a pixel off the line along the normal).
    """
    problems = _header_problems(headers)
    if problems:
        raise DataError(f"{name}: " + "; ".join(problems))
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
    # Cosines are stored rounded (decimal strings): unit length again before any product.
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    column = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    spacing_row_mm, spacing_column_mm = (float(v) for v in headers[0].PixelSpacing)
    positions = np.array([h.ImagePositionPatient for h in headers], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    step = (along[-1] - along[0]) / (len(along) - 1)
    repeated = int(np.sum(steps <= GRID_TOLERANCE * step))
    if repeated:
        raise DataError(
            f"{name}: {repeated} slices repeat the position of another (several phases, "
            "echoes or acquisitions in one series?); export each as its own series"
        )
    uneven = np.abs(steps - np.median(steps)) > GRID_TOLERANCE * np.median(steps)
    if uneven.any():
        gaps = ", ".join(f"{steps[i]:.3g} mm after slice {i}" for i in np.flatnonzero(uneven)[:3])
        raise DataError(
            f"{name}: missing slices: uneven position steps ({gaps}; the others "
            f"{np.median(steps):.3g} mm); export the whole series again"
        )
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    shift_mm = float(np.linalg.norm(offsets, axis=1).max())
    if shift_mm > GRID_TOLERANCE * min(spacing_row_mm, spacing_column_mm):
        direction = (positions[-1] - positions[0]) / np.linalg.norm(positions[-1] - positions[0])
        angle = np.degrees(np.arccos(min(1.0, abs(float(direction @ normal)))))
        raise DataError(
            f"{name}: gantry tilt or sheared geometry: the slices step {angle:.2f} degrees off "
            f"the slice normal (in-plane shift up to {shift_mm:.2f} mm); resample it onto an "
            "untilted grid (dcm2niix corrects gantry tilt) and predict the NIfTI"
        )
    lps = np.eye(4)
    lps[:3, 0] = row * spacing_column_mm
    lps[:3, 1] = column * spacing_row_mm
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    return order, RAS_FROM_LPS @ lps


def _header_problems(headers: Sequence[Any]) -> list[str]:
    """Why the slices' headers cannot describe one grid: missing or disagreeing tags."""
    problems = []
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        missing = sum(1 for h in headers if not getattr(h, tag, None))
        if missing:
            problems.append(f"{missing} of {len(headers)} slices lack {tag}")
    if problems:
        return problems
    if len(headers) < 2:
        problems.append("only one slice; expected a 3D series of axial slices")
    orientations = np.array([h.ImageOrientationPatient for h in headers], dtype=np.float64)
    spread = float(np.ptp(orientations, axis=0).max())
    if spread > ORIENTATION_TOLERANCE:
        problems.append(
            f"mixed orientations (ImageOrientationPatient differs by up to {spread:.3g} between "
            "slices)"
        )
    row, column = orientations[0, :3], orientations[0, 3:]
    lengths = np.linalg.norm(orientations[0].reshape(2, 3), axis=1)
    if abs(row @ column) > 1e-3 or np.abs(lengths - 1).max() > 1e-3:
        problems.append(
            f"ImageOrientationPatient {orientations[0].tolist()} is not two perpendicular unit "
            "vectors"
        )
    for what, tags in (("sizes", ("Rows", "Columns")), ("pixel spacings", ("PixelSpacing",))):
        values = sorted({tuple(str(getattr(h, t, "")) for t in tags) for h in headers})
        if len(values) > 1:
            shown = ", ".join(" x ".join(v) for v in values[:4])
            problems.append(f"mixed {'row/column ' if what == 'sizes' else ''}{what} ({shown})")
    return problems
