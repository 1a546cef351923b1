"""Crash-safe file writing: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np


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
