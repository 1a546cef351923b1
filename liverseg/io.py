"""NIfTI files: voxels read without a float64 copy; every write crash-safe.

A write goes to a temporary name in the same folder, then is renamed onto its destination.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torchio as tio

from liverseg.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    A crash or exception inside the block leaves ``path`` as it was (absent or the old file)
    and removes the temporary file. The temporary name keeps the final suffixes, so writers
    that infer the format from the extension (``.nii.gz``) still work.

    Args:
        path: Final destination.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file 0600; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    image: str | Path | tio.ScalarImage | nib.Nifti1Image,
) -> tuple[np.ndarray, np.ndarray]:
    """The HU voxels and affine of a CT, at its stored dtype and orientation.

    Args:
        image: A NIfTI path, a ``tio.ScalarImage`` or a nibabel image.

    Returns:
        ``(hu, affine)``: ``hu`` of shape ``(W, H, D)`` (int16 stays int16; scaled or float data
        become float32), ``affine`` 4 x 4 float64.

    Raises:
        DataError: Missing or unreadable file, not 3D, or a singular affine.
    """
    if isinstance(image, tio.ScalarImage):
        name = str(image.path) if image.path else "the tio.ScalarImage"
    elif isinstance(image, nib.spatialimages.SpatialImage):
        name = image.get_filename() or "the nibabel image"
    else:
        name = str(image)
    try:
        if isinstance(image, tio.ScalarImage):
            data = image.data.numpy()
            affine = np.asarray(image.affine, dtype=np.float64)
        else:
            if not isinstance(image, nib.spatialimages.SpatialImage):
                path = Path(image)
                if not path.is_file():
                    raise DataError(f"{path}: file not found; expected a .nii or .nii.gz CT")
                image = nib.load(str(path))
            affine = np.asarray(image.affine, dtype=np.float64)
            data = stored_voxels(image)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name}: cannot read it as a NIfTI CT volume ({reason})") from None
    data = np.asarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise DataError(f"{name}: expected a 3D CT volume, found shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer) and data.dtype != np.float32:
        data = data.astype(np.float32)
    if data.dtype.kind not in "iuf":
        raise DataError(f"{name}: expected numeric voxels, found dtype {data.dtype}")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{name}: the affine is singular or not finite:\n{affine}")
    return data, affine
