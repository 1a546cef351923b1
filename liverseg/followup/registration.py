"""The follow-up scan's liver aligned to the baseline's: SimpleITK, rigid then affine.

Both scans are given as arrays with their 4 x 4 voxel-to-scanner affines (RAS mm, as
:func:`liverseg.io.read_volume` reads NIfTI and DICOM alike). The registration aligns the two
livers (labels LIVER or TUMOR), each blurred into a smooth field (Gaussian, 2 voxels), with a
mean-squares metric: first rigid (Euler angles and translation, started from the masks' centres
of mass), then affine (rigid plus scaling and shear: breathing and posture change the liver's
shape a little). Only the liver is aligned: the liver is what is compared, and the body around
it moves differently (arms, bowel, breathing).

:class:`Alignment` maps baseline scanner points to follow-up scanner points; :meth:`Alignment.
warp` resamples a follow-up volume onto the baseline's grid (labels by nearest neighbour, CT
linearly), so the two can be read voxel for voxel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from liverseg.constants import BACKGROUND
from liverseg.errors import DataError
from liverseg.geometry import checked_affine

log = logging.getLogger(__name__)

# Shrink factors and smoothing (voxels) of the multi-resolution pyramid.
_SHRINK = (4, 2, 1)
_SMOOTH = (2.0, 1.0, 0.0)
_BLUR_VOXELS = 2.0


@dataclass(frozen=True)
class Alignment:
    """The registration's result.

    Attributes:
        matrix: 4 x 4: baseline scanner mm -> follow-up scanner mm (RAS), affine.
        rigid_matrix: The rigid stage alone, the same way.
        metric: Final mean-squares mismatch of the blurred masks (0 = identical).
        liver_dice: Dice of the baseline liver and the aligned follow-up liver on the baseline
            grid: how well the livers were brought together (near 1: well; low: check it).
    """

    matrix: np.ndarray
    rigid_matrix: np.ndarray
    metric: float
    liver_dice: float

    @property
    def translation_mm(self) -> np.ndarray:
        """Where the baseline's scanner origin lands in follow-up scanner mm."""
        return self.matrix[:3, 3]

    def to_followup(self, points_mm: np.ndarray) -> np.ndarray:
        """Baseline scanner points ``(N, 3)`` mapped to follow-up scanner points."""
        points = np.atleast_2d(points_mm)
        return points @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def to_baseline(self, points_mm: np.ndarray) -> np.ndarray:
        """Follow-up scanner points ``(N, 3)`` mapped back to baseline scanner points."""
        inverse = np.linalg.inv(self.matrix)
        points = np.atleast_2d(points_mm)
        return points @ inverse[:3, :3].T + inverse[:3, 3]

    def warp(
        self,
        volume: np.ndarray,
        affine: np.ndarray,
        baseline_shape: tuple[int, int, int],
        baseline_affine: np.ndarray,
        *,
        labels: bool,
        fill: float = 0.0,
    ) -> np.ndarray:
        """A follow-up volume resampled onto the baseline grid through the alignment.

        Args:
            volume: On the follow-up grid ``affine``.
            labels: Nearest neighbour (labels, lesion ids) instead of linear (CT).
            fill: Value outside the follow-up scan.
        """
        from scipy import ndimage

        # baseline voxel -> baseline mm -> follow-up mm -> follow-up voxel
        index_map = np.linalg.inv(checked_affine(affine)) @ self.matrix @ baseline_affine
        return ndimage.affine_transform(
            np.asarray(volume, dtype=volume.dtype if labels else np.float32),
            index_map[:3, :3],
            offset=index_map[:3, 3],
            output_shape=tuple(baseline_shape),
            order=0 if labels else 1,
            mode="constant",
            cval=fill,
        )


def align_livers(
    baseline_labels: np.ndarray,
    baseline_affine: np.ndarray,
    followup_labels: np.ndarray,
    followup_affine: np.ndarray,
) -> Alignment:
    """Register the follow-up liver to the baseline liver: rigid, then affine.

    Raises:
        DataError: A scan has no liver (nothing to align).
    """
    import SimpleITK as sitk  # torchio's dependency: installed with liverseg

    baseline_affine = checked_affine(baseline_affine)
    followup_affine = checked_affine(followup_affine)
    for name, labels in (("baseline", baseline_labels), ("follow-up", followup_labels)):
        if not np.any(np.asarray(labels) != BACKGROUND):
            raise DataError(f"the {name} segmentation has no liver: nothing to align")
    fixed = _blurred_mask(sitk, baseline_labels, baseline_affine)
    moving = _blurred_mask(sitk, followup_labels, followup_affine)
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    rigid = _unwrapped(sitk, _register(sitk, fixed, moving, initial, learning_rate=2.0))
    affine_start = sitk.AffineTransform(3)
    affine_start.SetMatrix(rigid.GetMatrix())
    affine_start.SetTranslation(rigid.GetTranslation())
    affine_start.SetCenter(rigid.GetCenter())
    final = _unwrapped(sitk, _register(sitk, fixed, moving, affine_start, learning_rate=1.0))
    matrix, rigid_matrix = _as_matrix(final), _as_matrix(rigid)
    metric = _metric(sitk, fixed, moving, final)
    alignment = Alignment(matrix, rigid_matrix, metric, 0.0)
    dice = _liver_dice(
        alignment, baseline_labels, baseline_affine, followup_labels, followup_affine
    )
    log.info("livers aligned: mean-squares %.4f, liver Dice after alignment %.3f", metric, dice)
    return Alignment(matrix, rigid_matrix, metric, dice)


def _blurred_mask(sitk, labels: np.ndarray, affine: np.ndarray):
    """The liver mask as a float SimpleITK image in RAS scanner mm, blurred by 2 voxels."""
    mask = (np.asarray(labels) != BACKGROUND).astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    sigma = [float(_BLUR_VOXELS * s) for s in spacing]
    return sitk.SmoothingRecursiveGaussian(image, sigma)


def _register(sitk, fixed, moving, transform, learning_rate: float):
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, seed=0)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=1e-4, numberOfIterations=200,
        gradientMagnitudeTolerance=1e-8,
    )  # fmt: skip
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(_SHRINK))
    method.SetSmoothingSigmasPerLevel(list(_SMOOTH))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(transform, inPlace=False)
    return method.Execute(fixed, moving)


def _metric(sitk, fixed, moving, transform) -> float:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform)
    return float(method.MetricEvaluate(fixed, moving))


def _unwrapped(sitk, transform):
    """The one transform inside the composite that ``Execute`` returns, as its own type."""
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0)
    return transform.Downcast()


def _as_matrix(transform) -> np.ndarray:
    """A SimpleITK Euler/affine transform (fixed -> moving physical points) as a 4 x 4 matrix."""
    linear = np.array(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.array(transform.GetCenter(), dtype=np.float64)
    translation = np.array(transform.GetTranslation(), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = translation + centre - linear @ centre
    return matrix


def _liver_dice(alignment, baseline_labels, baseline_affine, followup_labels, followup_affine):
    warped = alignment.warp(
        (np.asarray(followup_labels) != BACKGROUND).astype(np.uint8),
        followup_affine, baseline_labels.shape, baseline_affine, labels=True,
    )  # fmt: skip
    fixed = np.asarray(baseline_labels) != BACKGROUND
    moved = warped > 0
    total = fixed.sum() + moved.sum()
    return float(2 * np.logical_and(fixed, moved).sum() / total) if total else 0.0
