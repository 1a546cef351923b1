"""Writes volumes as DICOM CT series for the tests (needs pydicom: import after importorskip).

A RAS affine (the NIfTI convention) becomes DICOM's LPS geometry: ``ImageOrientationPatient``
from the first two voxel axes, ``ImagePositionPatient`` per slice, ``PixelSpacing``. Files get
shuffled names without extension, so a reader must order slices by their headers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    affine: np.ndarray,
    *,
    description: str = "abdomen",
    series_number: int = 2,
    intercept: float = -1024.0,
    slope: float = 1.0,
    seed: int = 0,
    tilt_mm_per_slice: float = 0.0,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> str:
    """Write ``hu`` ``(W, H, D)`` as one CT series in ``folder``; return its SeriesInstanceUID.

    Args:
        folder: Created if needed; files are named ``IM<shuffled number>_<end of series UID>``.
        hu: HU volume; voxel ``[i, j, k]`` is column ``i``, row ``j`` of slice ``k``.
        affine: RAS affine of ``hu``; its third axis should be the first two's cross product in
            LPS (right-handed), as a reader sorting along the normal gives back.
        description: ``SeriesDescription``.
        series_number: ``SeriesNumber``.
        intercept: ``RescaleIntercept``: stored = (hu - intercept) / slope.
        slope: ``RescaleSlope``.
        seed: Shuffles the file names.
        tilt_mm_per_slice: Shift each slice this far along the row direction per slice index
            (a gantry tilt the orientation does not show).
        image_type: ``ImageType`` values (``LOCALIZER`` for a scout).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row, column = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    stored = np.round((np.asarray(hu, dtype=np.float64) - intercept) / slope).astype(np.int16)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    names = np.random.default_rng(seed).permutation(hu.shape[2])
    for k in range(hu.shape[2]):
        position = lps[:3, 3] + k * lps[:3, 2] + k * tilt_mm_per_slice * row
        ds = _image(CTImageStorage, study, series, stored[:, :, k].T, modality="CT")
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, series_number, k
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = [_ds(v) for v in (*row, *column)]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.SliceThickness = _ds(spacing[2] * 2)  # deliberately wrong: spacing is from positions
        ds.RescaleIntercept, ds.RescaleSlope = _ds(intercept), _ds(slope)
        save(ds, folder / f"IM{names[k]:05d}_{series[-8:]}")
    return series


def write_other_objects(folder: Path) -> None:
    """A dose report, a secondary capture (Modality CT) and two non-DICOM files."""
    study = generate_uid()
    dose = _dataset(XRayRadiationDoseSRStorage, study, generate_uid(), modality="SR")
    save(dose, folder / "dose")
    screen = _image(
        SecondaryCaptureImageStorage, study, generate_uid(), np.zeros((8, 8), np.int16), "CT"
    )
    save(screen, folder / "screen.dcm")
    (folder / "README.txt").write_text("exported from PACS\n")
    (folder / "notes.dcm").write_bytes(b"not a DICOM file, despite its name" * 8)


def edit_slices(folder: Path, series_uid: str, edit, which: int | None = None) -> None:
    """Apply ``edit(dataset)`` to the slices of a series (only the ``which``-th by position)."""
    slices = []
    for path in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if str(getattr(ds, "SeriesInstanceUID", "")) == series_uid:
            slices.append((float(ds.ImagePositionPatient[2]), path, ds))
    slices.sort(key=lambda s: s[0])
    for _, path, ds in slices if which is None else [slices[which]]:
        edit(ds)
        save(ds, path)


def save(ds: Dataset, path: Path) -> None:
    """Write a PS3.10 file: 128-byte preamble, ``DICM``, file meta."""
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=True)


def _dataset(sop_class, study: str, series: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID = modality, "PHANTOM"
    return ds


def _image(sop_class, study: str, series: str, pixels: np.ndarray, modality: str) -> Dataset:
    ds = _dataset(sop_class, study, series, modality)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def _ds(value: float) -> str:
    """A decimal string (at most 16 characters) precise to 1e-6 mm."""
    return f"{float(value):.6f}".rstrip("0").rstrip(".")[:16]
