"""The one reader and writer of volumes: voxels at their stored dtype, geometry, label checks."""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from liverseg.constants import LABEL_VALUES
from liverseg.errors import DataError
from liverseg.io.files import atomic_path
from liverseg.io.integrity import check_data_size, missing_file_reason
from liverseg.io.listing import list_dicom
from liverseg.labels import invalid_label_values

log = logging.getLogger(__name__)

# What read_volume accepts: a path, a nibabel image or a torchio image.
Source = Any  # str | os.PathLike | nib.spatialimages.SpatialImage | tio.Image


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a 3D array as NIfTI atomically.

    Args:
        array: Voxel data, shape ``(W, H, D)``; its dtype is kept (int16 HU, uint8 labels).
        affine: 4 x 4 voxel-to-scanner (RAS+) matrix in mm.
        path: Destination ``.nii`` or ``.nii.gz``.

    Returns:
        The destination path.
    """
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(np.asarray(array).dtype)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


def stored_voxels(image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """The voxels of a nibabel image without a float64 copy.

    Integer data stay at their stored dtype (int16 CT: 2 bytes a voxel); scaled data
    (``scl_slope``/``scl_inter``) and float data become float32. ``np.asanyarray(dataobj)`` would
    give float64 for scaled files: > 1.7 GB for the largest Task03 CTs.
    """
    proxy = image.dataobj
    scaled = getattr(proxy, "slope", 1.0) != 1 or getattr(proxy, "inter", 0.0) != 0
    data = image.get_fdata(dtype=np.float32) if scaled else np.asanyarray(proxy)
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    return data


def read_volume(
    source: Source, role: str = "CT volume", *, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The voxels and affine of a volume, at its stored dtype and orientation.

    Args:
        source: A NIfTI path, a folder of DICOM files (its CT series:
            :func:`liverseg.io.dicom.read_dicom_series`, needs ``liverseg[dicom]``), a nibabel
            image, or a torchio image (anything with ``data`` of shape ``(1, W, H, D)`` and
            ``affine``).
        role: What the volume is, for messages (``"CT volume"``, ``"label map"``).
        series_uid: For a DICOM folder, the ``SeriesInstanceUID`` to read (default: the CT
            series with the most slices); ignored for other sources.

    Returns:
        ``(data, affine)``: ``data`` of shape ``(W, H, D)`` (int16 stays int16; scaled or float
        data become float32), ``affine`` 4 x 4 float64.

    Raises:
        DataError: Missing or unreadable file (a broken symlink says so), data shorter than its
            header claims (:func:`check_data_size`), not 3D, or a singular affine; names the file.
            A DICOM folder: pydicom absent, or a series refused by
            :func:`~liverseg.io.dicom.read_dicom_series`.
    """
    name = source_name(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return _read_dicom_folder(Path(source), role, series_uid)
    try:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise DataError(
                    f"{path}: {missing_file_reason(path)}; expected a .nii or .nii.gz {role}"
                )
            source = nib.load(str(path))
        if isinstance(source, nib.spatialimages.SpatialImage):
            check_data_size(source)
            affine = np.asarray(source.affine, dtype=np.float64)
            data = stored_voxels(source)
        else:
            affine = np.asarray(source.affine, dtype=np.float64)
            data = np.asarray(source.data)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name}: cannot read it as a NIfTI {role} ({reason})") from None
    data = _as_3d(np.asarray(data), name, role)
    if not np.issubdtype(data.dtype, np.integer) and data.dtype != np.float32:
        data = data.astype(np.float32)
    if data.dtype.kind not in "iuf":
        raise DataError(f"{name}: expected numeric voxels, found dtype {data.dtype}")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{name}: the affine is singular or not finite:\n{affine}")
    return data, affine


def _read_dicom_folder(
    folder: Path, role: str, series_uid: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """A folder given as a volume: its DICOM CT series, pydicom imported only now."""
    if not list_dicom(folder, first_only=True):
        raise DataError(
            f"{folder}: is a folder without DICOM files; expected a .nii or .nii.gz {role} or a "
            "folder holding a DICOM series"
        )
    try:
        from liverseg.io.dicom import read_dicom_series
    except ImportError as exc:
        raise DataError(
            f"{folder}: holds DICOM files, and reading them needs pydicom 3 ({exc}): "
            "pip install 'liverseg[dicom]'"
        ) from None
    return read_dicom_series(folder, series_uid)


def read_labels(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """A label map as uint8 and its affine, its values checked.

    Args:
        source: As for :func:`read_volume`.

    Returns:
        ``(labels, affine)``: uint8 ``(W, H, D)`` in :data:`liverseg.constants.LABEL_VALUES`.

    Raises:
        DataError: Unreadable, not 3D, or values other than background, liver and tumor.
    """
    data, affine = read_volume(source, role="label map")
    invalid = invalid_label_values(data)
    if invalid:
        raise DataError(
            f"{source_name(source)}: label values {invalid} outside {list(LABEL_VALUES)} "
            "(background, liver, tumor); is this a label map rather than a CT or a probability "
            "map? Fix or re-export it"
        )
    return data.astype(np.uint8, copy=False), affine


def read_stored(
    path: str | Path, role: str = "CT volume"
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The unscaled stored voxels of a NIfTI file, its affine and its scaling.

    For code that works on stored values and applies ``scl_slope``/``scl_inter`` itself, slab by
    slab (``liverseg prepare``), so a scaled int16 file is never held as float.

    Returns:
        ``(stored (W, H, D), affine, slope, inter)``: value = stored * slope + inter.

    Raises:
        DataError: Missing, unreadable, shorter than its header claims, or not 3D; names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: {missing_file_reason(path)}; expected a .nii or .nii.gz {role} there. "
            "Restore it or remove the case"
        )
    try:
        image = nib.load(str(path))
        check_data_size(image)
        stored = np.asarray(image.dataobj.get_unscaled())
        slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
        affine = np.asarray(image.affine, dtype=np.float64)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a broken file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{path}: cannot read it as a NIfTI {role} ({type(exc).__name__}: {reason}); "
            "re-extract or re-download this file, or move the case out of the dataset folder"
        ) from None
    return _as_3d(stored, str(path), role), affine, slope, inter


def _as_3d(data: np.ndarray, name: str, role: str) -> np.ndarray:
    """``(W, H, D)`` from ``(W, H, D)``, ``(W, H, D, 1, ...)`` or ``(1, W, H, D)``."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise DataError(f"{name}: expected a 3D {role} (W, H, D), found shape {data.shape}")
    return data


def source_name(source: Source) -> str:
    """How messages name a volume: its path, or what it is when it has none."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, nib.spatialimages.SpatialImage):
        return source.get_filename() or "the nibabel image"
    path = getattr(source, "path", None)
    return str(path) if path else f"the {type(source).__name__}"
