"""Files: the one reader and writer of volumes, the one NIfTI lister, case ids.

Volumes are read at their stored dtype (no float64 copy), and only after the header's claimed data
size was compared with the file (:func:`check_data_size`): a header that lies is an error, not
gigabytes of memory spent before the truncation shows. Every write goes to a temporary name in
the same folder, then is renamed onto its destination, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import os
import re
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from liverseg.constants import HIDDEN_PREFIX, LABEL_VALUES
from liverseg.errors import DataError
from liverseg.labels import invalid_label_values

log = logging.getLogger(__name__)

# What read_volume accepts: a path, a nibabel image or a torchio image.
Source = Any  # str | os.PathLike | nib.spatialimages.SpatialImage | tio.Image

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Decompressed bytes read at a time when counting a .nii.gz's data: bounds the memory of the count.
GZIP_CHUNK_BYTES = 16 * 2**20


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


# atomic_path's temporary names: ".{name}.{mkstemp's random letters}.tmp{name's suffixes}".
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]+\.tmp(?P<suffixes>(?:\.[^.]+)*)")
# A folder other processes may write to at the same time (a shared cache, a --out folder): a temp
# file younger than this may be one being written, so it is left in place.
SHARED_TEMP_MIN_AGE_S = 3600.0


def temp_destination(path: str | Path) -> Path | None:
    """The file a temporary file of :func:`atomic_path` was to become, or None if it is not one.

    ``.last.pt.k3x9q0ab.tmp.pt`` -> ``last.pt``: a leading dot, the destination's name, random
    letters, ``.tmp`` and the destination's suffixes, exactly as :func:`atomic_path` names them.
    """
    path = Path(path)
    match = _TEMP_NAME.fullmatch(path.name)
    if match is None or match["suffixes"] != "".join(Path(match["name"]).suffixes):
        return None
    return path.with_name(match["name"])


def stale_temp_files(folder: str | Path) -> list[Path]:
    """The temporary files of :func:`atomic_path` in ``folder`` (not its sub-folders), sorted.

    A process killed while writing leaves them behind (a checkpoint's can be tens of MB); only
    names that :func:`temp_destination` recognises are listed, never another hidden file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if temp_destination(p) is not None and p.is_file())


def remove_stale_temp_files(folders: list[Path], min_age_s: float = 0.0) -> int:
    """Delete the :func:`stale_temp_files` of ``folders`` older than ``min_age_s``; log the count.

    Args:
        folders: Folders written only through :func:`atomic_path` (missing ones are skipped).
        min_age_s: Keep temp files modified less than this many seconds ago: in a folder that
            another process may be writing to, they may still be in use.

    Returns:
        How many files were removed.
    """
    removed, size, kept = 0, 0, 0
    now = time.time()
    for path in (p for folder in folders for p in stale_temp_files(folder)):
        try:
            stat = path.stat()
            if now - stat.st_mtime < min_age_s:
                kept += 1
                continue
            path.unlink()
        except OSError as exc:  # gone already, or a read-only folder: leave it
            log.debug("could not remove %s (%s)", path, exc)
            continue
        removed, size = removed + 1, size + stat.st_size
    if removed:
        where = ", ".join(str(f) for f in folders)
        log.info("removed %d temp files (%d bytes) of killed writes in %s", removed, size, where)
    if kept:
        log.info(
            "kept %d temp files younger than %.0f s: another process may still be writing them",
            kept,
            min_age_s,
        )
    return removed


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


def read_volume(source: Source, role: str = "CT volume") -> tuple[np.ndarray, np.ndarray]:
    """The voxels and affine of a volume, at its stored dtype and orientation.

    Args:
        source: A NIfTI path, a nibabel image, or a torchio image (anything with ``data`` of
            shape ``(1, W, H, D)`` and ``affine``).
        role: What the volume is, for messages (``"CT volume"``, ``"label map"``).

    Returns:
        ``(data, affine)``: ``data`` of shape ``(W, H, D)`` (int16 stays int16; scaled or float
        data become float32), ``affine`` 4 x 4 float64.

    Raises:
        DataError: Missing or unreadable file (a broken symlink says so), data shorter than its
            header claims (:func:`check_data_size`), not 3D, or a singular affine; names the file.
    """
    name = source_name(source)
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


def fingerprint(path: str | Path) -> dict:
    """Identity of a file's contents for resumable work: resolved path, size, mtime (ns)."""
    path = Path(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def case_id_of(path: str | Path) -> str:
    """The case id of a NIfTI path: its name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``liver_2`` before ``liver_10``."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", text)
        if part
    )


def list_nifti(folder: str | Path, suffixes: tuple[str, ...] = NIFTI_SUFFIXES) -> list[Path]:
    """The NIfTI files of a folder, sorted by name with digit runs by value.

    Names starting with ``"."`` (macOS ``._liver_N.nii.gz`` AppleDouble files, dot files) are
    never opened; sub-folders are not searched. A symlink whose target is missing or loops is
    listed too, so that reading it fails with its name (:func:`missing_file_reason`) instead of
    the file vanishing without a word.

    Args:
        folder: The folder; a missing one has no files.
        suffixes: Accepted name endings (``("_seg.nii.gz", "_seg.nii")`` for predictions).

    Returns:
        The files, ``liver_2`` before ``liver_10``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files, hidden = [], 0
    for path in folder.iterdir():
        if path.name.startswith(HIDDEN_PREFIX):
            hidden += 1
        elif path.name.endswith(suffixes) and (path.is_file() or path.is_symlink()):
            files.append(path)
    if hidden:
        log.info("%s: ignored %d hidden files (macOS ._ AppleDouble or dot files)", folder, hidden)
    return sorted(files, key=lambda p: natural_key(p.name))
