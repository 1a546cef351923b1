"""DICOM-SEG out: written over the source series, read back voxel for voxel, coded, refused."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from dicom_series import edit_slices, write_ct_series, write_other_objects  # noqa: E402

from liverseg.constants import LIVER, TUMOR  # noqa: E402
from liverseg.errors import DataError  # noqa: E402
from liverseg.io import read_volume  # noqa: E402
from liverseg.io.dicom_seg import SEG_STORAGE, read_dicom_seg, write_dicom_seg  # noqa: E402
from liverseg.phantoms import generate_case  # noqa: E402
from liverseg.version import __version__  # noqa: E402

SHAPE = (48, 40, 24)


def pacs_folder(folder, image, affine):
    """The CT as a series with shuffled names, beside a scout and other objects."""
    uid = write_ct_series(folder, image, affine, seed=4)
    scout_affine = np.array([[0, 0, 2.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    scout = np.full((SHAPE[0], SHAPE[1], 1), 40, np.int16)
    write_ct_series(folder, scout, scout_affine, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_other_objects(folder)
    return uid


@pytest.mark.parametrize("lps", [False, True], ids=["ras", "lps"])
def test_seg_reads_back_voxel_for_voxel_and_references_its_series(tmp_path, lps):
    image, label, affine = generate_case(SHAPE, seed=3, lps=lps, tumor_free=False)
    uid = pacs_folder(tmp_path / "pacs", image, affine)
    # The series reads back on the phantom's own grid (tests/test_io_dicom.py), so its labels
    # are what a prediction of the series would give there.
    data, read_affine = read_volume(tmp_path / "pacs")
    np.testing.assert_array_equal(data, image)
    labels = label
    assert (labels == TUMOR).any() and (labels == LIVER).any()
    seg_path = write_dicom_seg(
        labels, tmp_path / "pacs", tmp_path / "out" / "case_seg.dcm",
        provenance={"checkpoint": "runs/x/last.pt", "epoch": 7},
    )  # fmt: skip
    np.testing.assert_array_equal(read_dicom_seg(seg_path, tmp_path / "pacs"), labels)
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == SEG_STORAGE and seg.SeriesInstanceUID != uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    # Frames only where a segment is present: one per (slice, segment) holding it.
    present = sum(
        int((labels[:, :, k] == value).any()) for k in range(SHAPE[2]) for value in (LIVER, TUMOR)
    )
    assert int(seg.NumberOfFrames) == present < 2 * SHAPE[2]
    liver, tumor = seg.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver
    assert tumor.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # SCT Neoplasm
    assert tumor.AnatomicRegionSequence[0].CodeValue == "10200004"
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "liverseg" and algorithm.AlgorithmVersion == __version__
    assert "runs/x/last.pt" in algorithm.AlgorithmParameters


def test_real_ct_series_round_trip(real_ct, tmp_path):
    image, affine = read_volume(real_ct[0])
    liver = np.asarray(read_volume(real_ct[1])[0]) > 0
    labels = np.where(liver, LIVER, 0).astype(np.uint8)
    centre = np.argwhere(liver).mean(axis=0).astype(int)
    labels[tuple(slice(c - 4, c + 4) for c in centre)] = TUMOR  # a block of "tumor" in the liver
    write_ct_series(tmp_path / "real", image, affine)
    seg_path = write_dicom_seg(labels, tmp_path / "real", tmp_path / "real_seg.dcm")
    np.testing.assert_array_equal(read_dicom_seg(seg_path, tmp_path / "real"), labels)


def test_empty_labels_and_refusals(tmp_path):
    image, _, affine = generate_case((24, 20, 12), seed=3)
    write_ct_series(tmp_path / "s", image, affine)
    empty = write_dicom_seg(np.zeros((24, 20, 12), np.uint8), tmp_path / "s", tmp_path / "e.dcm")
    assert read_dicom_seg(empty, tmp_path / "s").max() == 0
    with pytest.raises(DataError, match=r"labels of shape \(24, 20, 11\) do not match the series"):
        write_dicom_seg(np.zeros((24, 20, 11), np.uint8), tmp_path / "s", tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
    with pytest.raises(DataError, match="not a DICOM Segmentation"):
        read_dicom_seg(next(p for p in (tmp_path / "s").iterdir()), tmp_path / "s")
    uid = str(pydicom.dcmread(next((tmp_path / "s").iterdir())).SeriesInstanceUID)
    edit_slices(tmp_path / "s", uid, lambda ds: delattr(ds, "FrameOfReferenceUID"))
    with pytest.raises(DataError, match="without FrameOfReferenceUID"):
        write_dicom_seg(np.zeros((24, 20, 12), np.uint8), tmp_path / "s", tmp_path / "y.dcm")
