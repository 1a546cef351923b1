"""DICOM CT in: which series of a folder is the CT, and its voxels in HU.

A folder from PACS may hold several series and other objects. Only single-frame CT Image Storage
slices of Modality CT are candidates; localizers (scouts), dose reports, secondary captures and
other modalities are skipped. Of several CT series the one with the most slices is read unless a
``SeriesInstanceUID`` is named. The slice order and affine come from the headers alone
(:mod:`liverseg.io.dicom_geometry`, the NIfTI path's RAS convention), so a scan and its NIfTI
conversion give the same voxels and affine.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian

from liverseg.errors import DataError
from liverseg.io.dicom_geometry import series_geometry
from liverseg.io.listing import list_dicom

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Multi-frame CT: skipped under their own reason, so a folder of them says why nothing was read.
ENHANCED_CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class Series:
    """The CT slices of one ``SeriesInstanceUID``: files and their headers (no pixels)."""

    uid: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]

    @property
    def label(self) -> str:
        """How messages name the series: UID, description and slice count."""
        description = getattr(self.headers[0], "SeriesDescription", "") or "no description"
        return f"series {self.uid} ({description}, {len(self.files)} slices)"


def read_dicom_series(
    folder: str | Path, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The HU voxels and affine of the CT series of a DICOM folder.

    Args:
        folder: A folder of DICOM files (any names; other files and sub-folders are ignored).
        series_uid: The ``SeriesInstanceUID`` to read; None: the CT series with the most slices
            (on a tie, the lowest ``SeriesNumber``). The choice is logged.

    Returns:
        ``(data, affine)`` as :func:`liverseg.io.read_volume` gives them: ``data`` ``(W, H, D)``
        = (columns, rows, slices), int16 HU where ``RescaleSlope``/``RescaleIntercept`` keep
        them whole and within int16, else float32; ``affine`` 4 x 4 float64 RAS in mm.

    Raises:
        DataError: No CT series (or not the one named); missing slices, gantry tilt or sheared
            geometry, slices at one position, mixed orientations, sizes or pixel spacings; pixel
            data missing or not decodable. The message names the folder and the series.
    """
    files, headers, affine, name = ordered_series(folder, series_uid)
    return read_hu(files, headers, name), affine


def ordered_series(
    folder: str | Path, series_uid: str | None = None
) -> tuple[list[Path], list[Dataset], np.ndarray, str]:
    """The chosen CT series' files and headers in the volume's slice order, its affine, its name.

    Slice ``k`` of the volume :func:`read_dicom_series` gives is ``files[k]``; ``name`` is how
    messages name the series (folder, UID, description, slice count). Raises as
    :func:`read_dicom_series` does, before any pixel is read.
    """
    folder = Path(folder)
    series = choose_series(folder, *find_series(folder), series_uid)
    name = f"{folder}: {series.label}"
    order, affine = series_geometry(series.headers, name)
    return [series.files[i] for i in order], [series.headers[i] for i in order], affine, name


def find_series(folder: Path) -> tuple[dict[str, Series], Counter]:
    """The CT image series of a folder, and what else it holds (``Counter`` of reasons)."""
    slices: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped: Counter = Counter()
    for path in list_dicom(folder):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a broken file
            log.warning("%s: skipped, not readable as DICOM (%s)", path, exc)
            skipped["unreadable"] += 1
            continue
        reason = _not_ct_image(header)
        if reason:
            skipped[reason] += 1
        else:
            slices.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    series = {
        uid: Series(uid, tuple(p for p, _ in found), tuple(h for _, h in found))
        for uid, found in slices.items()
    }
    return series, skipped


def _not_ct_image(header: Dataset) -> str:
    """Why a file is not a slice of a CT image series; empty when it is one."""
    sop_class = str(getattr(header, "SOPClassUID", ""))
    modality = getattr(header, "Modality", "")
    if sop_class in ENHANCED_CT_STORAGE:
        return "multi-frame Enhanced CT (not read; export single-frame CT slices)"
    if sop_class != CT_IMAGE_STORAGE:
        name = getattr(header.SOPClassUID, "name", sop_class) if sop_class else "no SOP class"
        return f"{name} (modality {modality or 'none'})"
    if modality != "CT":
        return f"CT Image Storage of modality {modality or 'none'}"
    if "LOCALIZER" in [str(t).upper() for t in getattr(header, "ImageType", [])]:
        return "localizer (scout)"
    if not getattr(header, "SeriesInstanceUID", ""):
        return "CT slice without SeriesInstanceUID"
    return ""


def choose_series(
    folder: Path, series: dict[str, Series], skipped: Counter, series_uid: str | None
) -> Series:
    """The series to read, named or the one with the most slices; logs the choice.

    Args:
        folder: For messages.
        series: The CT image series of the folder by UID (:func:`find_series`).
        skipped: What else the folder holds, files by reason, for messages.
        series_uid: The series asked for, or None.
    """
    ranked = sorted(series.values(), key=lambda s: (-len(s.files), _series_number(s), s.uid))
    others = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
    if not ranked:
        raise DataError(
            f"{folder}: holds no CT image series (single-frame CT Image Storage slices of "
            f"Modality CT); found {others or 'no DICOM file'}"
        )
    if series_uid is None:
        chosen = ranked[0]
        reason = "the CT series with the most slices" if len(ranked) > 1 else "its one CT series"
    elif series_uid in series:
        chosen, reason = series[series_uid], "the series named"
    else:
        held = "; ".join(s.label for s in ranked)
        raise DataError(f"{folder}: holds no CT series {series_uid}; its CT series: {held}")
    not_read = [s.label for s in ranked if s is not chosen] + ([others] if others else [])
    log.info(
        "%s: reading %s, %s%s",
        folder,
        chosen.label,
        reason,
        f"; not read: {'; '.join(not_read)}" if not_read else "",
    )
    return chosen


def _series_number(series: Series) -> int:
    try:
        return int(getattr(series.headers[0], "SeriesNumber", None) or 0)
    except (TypeError, ValueError):
        return 0


def read_hu(files: list[Path], headers: list[Dataset], name: str) -> np.ndarray:
    """The slices' pixels in HU, stacked ``(columns, rows, slices)``, one slice in memory at a time.

    int16 when every slice's ``RescaleSlope`` and ``RescaleIntercept`` are whole numbers and the
    HU fit int16 (exact), else float32; never a float64 copy of the volume.

    Raises:
        DataError: A slice without pixel data, or whose pixel data cannot be decoded (a
            compressed transfer syntax without a decoder), or of another size; names the file.
    """
    rescale = [
        (
            float(getattr(h, "RescaleSlope", None) or 1),
            float(getattr(h, "RescaleIntercept", None) or 0),
        )
        for h in headers
    ]
    whole = all(slope.is_integer() and inter.is_integer() for slope, inter in rescale)
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    data = np.empty((columns, rows, len(files)), dtype=np.int16 if whole else np.float32)
    for k, (path, (slope, inter)) in enumerate(zip(files, rescale)):
        stored = _stored_pixels(path, name)
        if stored.shape != (rows, columns):
            raise DataError(
                f"{name}: {path.name} holds pixels of shape {stored.shape}, its header says "
                f"{rows} x {columns}; the file is damaged or not a single-frame slice"
            )
        if data.dtype == np.int16:
            hu = stored.astype(np.int32) * int(slope) + int(inter)
            if hu.min() >= INT16.min and hu.max() <= INT16.max:
                data[:, :, k] = hu.T
                continue
            log.info("%s: HU beyond int16 in %s; reading as float32", name, path.name)
            data = data.astype(np.float32)
        data[:, :, k] = (stored.astype(np.float32) * np.float32(slope) + np.float32(inter)).T
    return data


def _stored_pixels(path: Path, name: str) -> np.ndarray:
    """One slice's stored values ``(rows, columns)``, before rescaling."""
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a broken file
        raise DataError(f"{name}: {path.name} cannot be read as DICOM ({exc})") from None
    if "PixelData" not in dataset:
        raise DataError(f"{name}: {path.name} holds no pixel data; export the series again")
    syntax = dataset.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    problem = _decoder_problem(syntax)
    if problem:
        raise DataError(
            f"{name}: the pixel data of {path.name} ({getattr(syntax, 'name', syntax)}) cannot "
            f"be decoded: {problem}; or decompress the series first (e.g. `gdcmconv --raw`)"
        )
    # A failing decoder plugin logs its traceback on pydicom's logger before raising; the
    # DataError below carries the reason, and the CLI must show one line, not a traceback.
    decoder_log = logging.getLogger("pydicom.pixels.decoders.base")
    decoder_log.addFilter(_no_tracebacks)
    try:
        return np.asarray(dataset.pixel_array)
    except Exception as exc:  # noqa: BLE001 - each decoder plugin raises its own types
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"{name}: the pixel data of {path.name} ({getattr(syntax, 'name', syntax)}) cannot "
            f"be decoded ({reason}); the file is damaged: export the series again"
        ) from None
    finally:
        decoder_log.removeFilter(_no_tracebacks)


def _decoder_problem(syntax: str) -> str:
    """Why pydicom cannot decode this transfer syntax here; empty when it can."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return "pydicom has no decoder for this transfer syntax"
    if decoder.is_available:
        return ""
    return "no decoder for it is installed: install one of " + ", ".join(
        decoder.missing_dependencies
    )


def _no_tracebacks(record: logging.LogRecord) -> bool:
    return record.exc_info is None
