"""Resample one CT case and its label to a target spacing, as the training cache does.

``liverseg prepare --spacing`` (:mod:`liverseg.data.prepare`) runs :func:`resample_case` on every
case. The image and label are read as the training cache reads them and resampled by the
functions the cache and inference use (:mod:`liverseg.resampling`), in their stored axis order,
so the cache's own resampling at that spacing then has nothing to do. The image is written as
int16 HU, the label as uint8 on its image's new grid.

:mod:`liverseg.resampling` imports torch, so it is imported only inside the two functions that
resample: the factor path's workers, ``liverseg check`` and the data doctor run without torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from liverseg.data.downsampling import LABEL_AFFINE_TOLERANCE_MM
from liverseg.errors import DataError
from liverseg.geometry import label_affine_matches, spacing_is_trustworthy
from liverseg.io import fingerprint, read_labels, read_volume, save_nifti

logger = logging.getLogger(__name__)

_INT16 = np.iinfo(np.int16)


def resample_case(
    image_path: str | Path,
    label_path: str | Path | None,
    out_image: str | Path,
    out_label: str | Path | None,
    spacing_mm: Sequence[float],
) -> dict:
    """Resample one case to ``spacing_mm`` as the training cache does, and write it atomically.

    The image and label are read as the cache reads them and resampled by
    :func:`liverseg.resampling.resample_image` and :func:`~liverseg.resampling.resample_labels`
    in their stored axis order (the RAS target mapped to it by
    :func:`~liverseg.resampling.stored_target`; resampling commutes with the cache's
    reorientation). The label follows its image's grid, so the pair keeps one shape. Memory:
    the whole case as float32, a few copies of it (more than the factor path).

    Args:
        image_path: CT volume, HU, shape ``(W, H, D)``.
        label_path: Its label map (values ``LABEL_VALUES``, same shape) or None (test cases).
        out_image: Destination of the image: HU rounded to int16, shape
            ``max(1, round(n * s / t))`` per axis (:func:`liverseg.resampling.resampled_shape`).
        out_label: Destination of the uint8 label, or None.
        spacing_mm: Target spacing, mm per canonical RAS axis (x, y, z), as ``data.spacing_mm``.

    Returns:
        The case's record, with the keys of
        :func:`~liverseg.data.downsampling.downsample_case`'s but ``spacing_mm`` (the RAS target)
        in place of ``factor``.

    Raises:
        DataError: A file is unreadable or not 3D, or the label's shape or values are wrong.
    """
    if (label_path is None) != (out_label is None):
        raise ValueError("label_path and out_label must both be given or both be None")
    image_path = Path(image_path)
    record, affine, target = _resample_image(image_path, out_image, spacing_mm)
    if label_path is None:
        return record
    original_shape = tuple(record["original_shape"])
    label_record = _resample_label(
        Path(label_path), out_label, image_path, original_shape, affine, target
    )
    record.update(label_record)
    return record


def _resample_image(
    image_path: Path, out_image: str | Path, spacing_mm: Sequence[float]
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Write the image at ``spacing_mm``; return the case's record, its affine, stored target."""
    # Imported here: liverseg.resampling imports torch, which the factor path's workers never need.
    from liverseg.resampling import resample_image, stored_target

    hu, affine = read_volume(image_path)
    original_shape = hu.shape
    target = stored_target(affine, spacing_mm)
    resampled, new_affine = resample_image(hu, affine, target)
    del hu
    save_nifti(_int16_hu(resampled), new_affine, out_image)
    record = {
        "spacing_mm": [float(v) for v in spacing_mm],
        "source_image": fingerprint(image_path),
        "source_label": None,
        "image": str(out_image),
        "label": None,
        "original_shape": list(original_shape),
        "original_affine": affine.tolist(),
        "new_shape": list(resampled.shape),
        "new_affine": new_affine.tolist(),
        "spacing_trusted": spacing_is_trustworthy(affine),
    }
    return record, affine, target


def _resample_label(
    label_path: Path,
    out_label: str | Path,
    image_path: Path,
    original_shape: tuple[int, ...],
    affine: np.ndarray,
    target: np.ndarray,
) -> dict:
    """Write the label on its image's new grid; return the label's entries of the record."""
    from liverseg.resampling import resample_labels, resampled_affine

    labels, label_affine = read_labels(label_path)
    if labels.shape != original_shape:
        raise DataError(
            f"{label_path}: label shape {labels.shape} differs from its image's "
            f"{original_shape} ({image_path}); expected the same voxel grid. Fix or remove "
            "this case."
        )
    new_labels, new_label_affine = resample_labels(labels, affine, target)
    if not label_affine_matches(affine, label_affine, LABEL_AFFINE_TOLERANCE_MM):
        logger.warning(
            "%s: label affine differs from its image's by %.3g mm; kept as stored",
            label_path,
            np.abs(label_affine - affine).max(),
        )
        new_label_affine = resampled_affine(label_affine, labels.shape, new_labels.shape)
    save_nifti(new_labels, new_label_affine, out_label)
    return {
        "source_label": fingerprint(label_path),
        "label": str(out_label),
        "original_label_affine": label_affine.tolist(),
        "new_label_affine": np.asarray(new_label_affine).tolist(),
    }


def _int16_hu(volume: np.ndarray) -> np.ndarray:
    """HU rounded and clipped to int16, as the factor path writes them."""
    if volume.dtype == np.int16:
        return volume
    if volume.dtype.kind == "f":
        volume = np.rint(volume)
    return np.clip(volume, _INT16.min, _INT16.max).astype(np.int16)
