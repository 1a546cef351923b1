"""Is a file what its header says? Missing files explained, data size checked before reading.

A header's claimed data size is compared with the file before anything is allocated: a header
that lies is an error naming the file, not gigabytes of memory spent before the truncation shows.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg.errors import DataError

log = logging.getLogger(__name__)

# Decompressed bytes read at a time when counting a .nii.gz's data: bounds the memory of the count.
GZIP_CHUNK_BYTES = 16 * 2**20


def missing_file_reason(path: str | Path) -> str:
    """Why ``path`` is not a file to read: a broken or looping symlink, a folder, or absent.

    Args:
        path: A path for which ``Path.is_file()`` is False.

    Returns:
        A phrase for a message, e.g. ``"broken symlink: it points to ../x.nii.gz, which does not
        exist"``.
    """
    path = Path(path)
    if path.is_symlink():
        target = os.readlink(path)
        try:
            path.stat()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"symlink loop: it points to {target}, which leads back to itself"
            return f"broken symlink: it points to {target}, which does not exist"
    if path.is_dir():
        return "a folder, not a file"
    return "not found"


def data_size_problem(image: nib.spatialimages.SpatialImage) -> str | None:
    """Whether a loaded image's file holds the data bytes its header claims; no voxel is read.

    ``.nii``: the file size against ``vox_offset + voxels x bytes per voxel``. ``.nii.gz``: the
    gzip trailer's size field (the uncompressed size modulo 2^32, written last, so a truncated
    copy lacks it) when it matches; otherwise the file is decompressed in
    :data:`GZIP_CHUNK_BYTES` chunks and counted, stopping as soon as the claimed size is
    reached. Memory stays bounded whatever the header claims.

    Args:
        image: From ``nib.load``; an image held in memory (no file, or voxels not in an
            ``ArrayProxy``) is not checked.

    Returns:
        None when the data are all there, else the problem (without the file's name): the
        claimed shape, dtype and bytes, the bytes present, and the fix.
    """
    filename, proxy = image.get_filename(), image.dataobj
    if not filename or not isinstance(proxy, nib.arrayproxy.ArrayProxy):
        return None
    path = Path(filename)
    shape, dtype, offset = tuple(int(n) for n in proxy.shape), proxy.dtype, int(proxy.offset)
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    needed = offset + claimed
    if path.name.endswith(".gz"):
        present, stop = _gzip_bytes_present(path, needed)
        where = f"only {present:,} bytes decompress from it{stop}"
    else:
        present = path.stat().st_size
        where = f"the file holds only {present:,} bytes"
    if present >= needed:
        return None
    return (
        f"the header claims {' x '.join(map(str, shape))} {dtype} voxels, {claimed:,} bytes after "
        f"a {offset:,}-byte header ({needed:,} in all), but {where}; the file is truncated or "
        "its header is wrong: copy it again"
    )


def check_data_size(source: str | Path | nib.spatialimages.SpatialImage) -> None:
    """Raise unless a NIfTI file holds the data bytes its header claims (:func:`data_size_problem`).

    Called by :func:`read_volume`, :func:`read_labels` and :func:`read_stored` before any voxel is
    read, so a truncated file or a lying header costs no memory.

    Args:
        source: A ``.nii``/``.nii.gz`` path, or an image loaded from one (its header is reused).

    Raises:
        DataError: The data are shorter than the header claims; names the file, the claimed
            shape, dtype and bytes, and the bytes present.
    """
    image = nib.load(str(source)) if isinstance(source, (str, os.PathLike)) else source
    problem = data_size_problem(image)
    if problem is not None:
        raise DataError(f"{image.get_filename()}: {problem}")


def _gzip_bytes_present(path: Path, needed: int) -> tuple[int, str]:
    """Decompressed bytes of ``path`` (counted up to ``needed``) and why the count stopped short.

    Returns:
        ``(bytes, reason)``: ``reason`` is "" or ``" (...)"`` naming the decompression error.
    """
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() >= 18:  # a gzip member: 10-byte header, 8-byte trailer (CRC32, ISIZE)
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == needed % 2**32:
                return needed, ""
    present = 0
    try:
        with gzip.open(path, "rb") as stream:
            while present < needed:
                chunk = stream.read1(GZIP_CHUNK_BYTES)
                if not chunk:
                    break
                present += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        return present, f" before the compressed stream breaks off ({type(exc).__name__}: {exc})"
    return present, ""
