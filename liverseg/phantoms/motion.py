"""How a patient lies at a follow-up scan: a small rigid motion plus breathing, in scanner mm.

A point at baseline scanner coordinates ``s`` lies at follow-up scanner coordinates
``q = R (s + b e_z - c) + c + t``: ``b`` is the breathing, a smooth superior-inferior
displacement of the upper abdomen (``breathing_mm`` on the body's axis from the top down to
:data:`BREATHING_FULL_MM` below the right dome, fading to 0 at :data:`BREATHING_DEPTH_MM` below
it and away from the axis), ``c`` the baseline volume's centre, ``R = Rz Ry Rx`` right-handed
rotations about the scanner axes (x first) and ``t`` the translation. The follow-up's field of
view follows the patient to within a few mm, as a radiographer centres it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MAX_ROTATION_DEG = 5.0
MAX_TRANSLATION_MM = 10.0
BREATHING_MM = (2.0, 8.0)
# The breathing is full from the right dome to this far below it (most of the liver moves as
# one, so its lesions keep their volumes), then fades out.
BREATHING_FULL_MM = 150.0
BREATHING_DEPTH_MM = 300.0
# Sigma (mm) of its lateral fade from the body's axis: the body wall moves less than the liver.
BREATHING_WIDTH_MM = 150.0
# How far the follow-up's field of view may sit from where the patient's motion would put it.
FOV_JITTER_MM = 5.0
# Follow-up voxels resampled per call, so a large phantom needs no whole-volume coordinate array.
_CHUNK_VOXELS = 1 << 19


@dataclass(frozen=True)
class Motion:
    """The rigid motion and breathing of one follow-up (see the module's docstring).

    Attributes:
        rotation_deg: Rotations about scanner x, y, z, degrees.
        translation_mm: ``t``, mm.
        breathing_mm: Signed peak superior-inferior displacement (> 0: higher at follow-up), mm.
        centre_mm: ``c``, the baseline volume's centre, scanner mm.
        dome_mm: Scanner z of the right dome at baseline, mm.
        axis_mm: Scanner ``(x, y)`` of the body's axis at baseline, mm.
        fov_shift_mm: How far the follow-up's field of view sits from the baseline's, mm.
    """

    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    breathing_mm: float
    centre_mm: np.ndarray
    dome_mm: float
    axis_mm: np.ndarray
    fov_shift_mm: np.ndarray

    def rotation(self) -> np.ndarray:
        """``R = Rz Ry Rx``, 3 x 3."""
        ax, ay, az = np.radians(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def breathing(self, points: np.ndarray) -> np.ndarray:
        """Superior-inferior displacement ``b`` (mm) at baseline scanner points ``(N, 3)``."""
        depth = (points[:, 2] - (self.dome_mm - BREATHING_DEPTH_MM)) / (
            BREATHING_DEPTH_MM - BREATHING_FULL_MM
        )
        u = np.clip(depth, 0.0, 1.0)
        radial = ((points[:, :2] - self.axis_mm) ** 2).sum(1)
        fade = np.exp(-radial / (2 * BREATHING_WIDTH_MM**2))
        return self.breathing_mm * u * u * (3 - 2 * u) * fade

    def to_baseline(self, points: np.ndarray) -> np.ndarray:
        """Baseline scanner coordinates of follow-up scanner points, ``(N, 3)`` mm."""
        breathed = (points - self.centre_mm - self.translation_mm) @ self.rotation()
        breathed += self.centre_mm
        # s + b(s) = breathed: b varies slowly (|db/dz| < 0.1), so a few fixed-point steps.
        baseline = breathed.copy()
        for _ in range(6):
            baseline[:, 2] = breathed[:, 2] - self.breathing(baseline)
        return baseline

    def to_followup(self, points: np.ndarray) -> np.ndarray:
        """Follow-up scanner coordinates of baseline scanner points, ``(N, 3)`` mm."""
        breathed = np.array(points, dtype=float)
        breathed[:, 2] += self.breathing(breathed)
        moved = (breathed - self.centre_mm) @ self.rotation().T + self.centre_mm
        return moved + self.translation_mm


def draw_motion(rng: np.random.Generator, affine: np.ndarray, shape, dome_mm, axis_mm) -> Motion:
    """Draw a follow-up's motion (rounded to 0.01, so its stated figures are exact).

    Args:
        rng: The motion stream.
        affine: The baseline's voxel-to-scanner matrix (of its RAS arrays), mm.
        shape: The baseline's voxels ``(W, H, D)``.
        dome_mm: Scanner z of the right dome, mm.
        axis_mm: Scanner ``(x, y)`` of the body's axis, mm.
    """
    rotation = np.round(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3), 2)
    translation = np.round(rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3), 2)
    breathing = float(np.round(rng.uniform(*BREATHING_MM) * rng.choice([-1.0, 1.0]), 2))
    jitter = rng.uniform(-FOV_JITTER_MM, FOV_JITTER_MM, 3)
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    return Motion(
        rotation, translation, breathing, centre, float(dome_mm), np.asarray(axis_mm, float),
        translation + jitter,
    )  # fmt: skip


def baseline_points(motion: Motion, followup_affine: np.ndarray, box) -> np.ndarray:
    """Baseline scanner coordinates of the follow-up's voxels in ``box``.

    Args:
        motion: The follow-up's motion.
        followup_affine: Voxel-to-scanner matrix of the follow-up's (RAS) grid, mm.
        box: Three slices with explicit starts and stops, follow-up voxel indices.

    Returns:
        float64 ``(3, w, h, d)``, mm.
    """
    ijk = np.mgrid[box].astype(float)
    points = ijk.reshape(3, -1).T @ followup_affine[:3, :3].T + followup_affine[:3, 3]
    return motion.to_baseline(points).T.reshape(ijk.shape)


def resample_followup(
    motion: Motion, baseline_affine: np.ndarray, followup_affine: np.ndarray, hu, labels
):
    """Sample arrays drawn on the baseline's grid at the follow-up's voxels.

    HU is interpolated linearly; a label map takes at each voxel the label with the largest
    trilinear weight (linear interpolation of each label's mask, then the largest), so its
    boundaries move with the motion by fractions of a voxel, as the HU's do. Outside the
    baseline's grid the nearest edge voxel is used (the motion is a few mm).

    Args:
        motion: The follow-up's motion.
        baseline_affine: Voxel-to-scanner matrix of the arrays, mm.
        followup_affine: Voxel-to-scanner matrix of the follow-up's grid (same shape), mm.
        hu: Float arrays (HU), each ``(W, H, D)``.
        labels: Integer label maps (tissue ids), each ``(W, H, D)``.

    Returns:
        ``(hu, labels)``: lists of new arrays in the same order, dtypes kept.
    """
    shape = (hu + labels)[0].shape
    to_index = np.linalg.inv(baseline_affine)
    new_hu = [np.empty(shape, a.dtype) for a in hu]
    new_labels = [np.empty(shape, a.dtype) for a in labels]
    step = max(1, _CHUNK_VOXELS // (shape[0] * shape[1]))
    for k0 in range(0, shape[2], step):
        k1 = min(k0 + step, shape[2])
        points = baseline_points(motion, followup_affine, np.s_[0 : shape[0], 0 : shape[1], k0:k1])
        coords = np.tensordot(to_index[:3, :3], points, axes=1) + to_index[:3, 3, None, None, None]
        for array, out in zip(hu, new_hu):
            out[:, :, k0:k1] = ndimage.map_coordinates(array, coords, order=1, mode="nearest")
        for array, out in zip(labels, new_labels):
            out[:, :, k0:k1] = _vote(array, coords.reshape(3, -1)).reshape(coords.shape[1:])
    return new_hu, new_labels


def _vote(labels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """The label of largest trilinear weight at each point ``coords`` ``(3, N)`` (voxel units)."""
    corner = np.floor(coords)
    frac = (coords - corner).astype(np.float32)
    corner = corner.astype(np.int64)
    rows = np.arange(coords.shape[1])
    score = np.zeros((coords.shape[1], int(labels.max()) + 1), np.float32)
    for offset in itertools.product((0, 1), repeat=3):
        index = tuple(np.clip(corner[a] + offset[a], 0, labels.shape[a] - 1) for a in range(3))
        weight = np.prod([frac[a] if offset[a] else 1 - frac[a] for a in range(3)], axis=0)
        score[rows, labels[index]] += weight
    return score.argmax(1).astype(labels.dtype)
