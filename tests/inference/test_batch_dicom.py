"""`liverseg predict` on DICOM folders: listing, output geometry, the NIfTI conversion, --series."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")

from dicom_series import write_ct_series, write_other_objects  # noqa: E402

from liverseg.cli import main  # noqa: E402
from liverseg.inference.batch import predict_paths  # noqa: E402
from liverseg.inference.inputs import collect_inputs  # noqa: E402
from liverseg.io import read_volume, save_nifti  # noqa: E402
from liverseg.phantoms import generate_case  # noqa: E402

torch.set_num_threads(1)
SHAPE = (24, 20, 12)


@pytest.fixture(scope="module")
def phantom():
    image, _, affine = generate_case(SHAPE, seed=5, lps=True)
    return image, affine


def test_dicom_folder_is_one_input_and_nifti_folders_stay_nifti(tmp_path, phantom):
    image, affine = phantom
    write_ct_series(tmp_path / "series", image, affine)
    write_other_objects(tmp_path / "series")
    save_nifti(image, affine, tmp_path / "mixed" / "a.nii.gz")
    write_ct_series(tmp_path / "mixed", image[:, :, :3], affine)
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "slice.dcm").write_bytes(b"no preamble" * 20)
    inputs, failures = collect_inputs([tmp_path / "series", tmp_path / "mixed", tmp_path / "fake"])
    assert inputs == [tmp_path / "series", tmp_path / "mixed" / "a.nii.gz"]
    assert failures == [
        (tmp_path / "fake", "folder holds no .nii/.nii.gz or DICOM file (nor imagesTs/, imagesTr/)")
    ]


def test_prediction_of_a_series_equals_that_of_its_nifti_conversion(
    tmp_path, phantom, tiny_checkpoint
):
    image, affine = phantom
    folder = tmp_path / "patient 1"
    write_ct_series(folder, image, affine)
    write_ct_series(folder, image[:, :, :4], affine, description="short")
    hu, series_affine = read_volume(folder)
    save_nifti(hu, series_affine, tmp_path / "nifti" / "converted.nii.gz")
    failures = predict_paths(
        tiny_checkpoint, [folder, tmp_path / "nifti"], tmp_path / "out", device="cpu"
    )
    assert failures == []
    from_dicom = nib.load(tmp_path / "out" / "patient_1_seg.nii.gz")
    from_nifti = nib.load(tmp_path / "out" / "converted_seg.nii.gz")
    assert from_dicom.shape == SHAPE
    np.testing.assert_allclose(from_dicom.affine, series_affine, atol=1e-6)
    np.testing.assert_allclose(from_dicom.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj))
    with (tmp_path / "out" / "summary.csv").open(newline="") as f:
        rows = {row["case_id"]: row for row in csv.DictReader(f)}
    assert rows["patient_1"]["input"] == str(folder) and rows["patient_1"]["status"] == "ok"


def test_cli_series_option_reads_the_named_series(tmp_path, phantom, tiny_checkpoint, capsys):
    image, affine = phantom
    folder = tmp_path / "study"
    write_ct_series(folder, image, affine)
    short = write_ct_series(folder, image[:, :, :5], affine, description="short")
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), str(folder), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--series", short]) == 0
    assert nib.load(tmp_path / "a" / "study_seg.nii.gz").shape == (*SHAPE[:2], 5)
    assert main([*argv, "--out", str(tmp_path / "b"), "--series", "1.2.3"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder}: DataError: {folder}: ")
    assert "holds no CT series 1.2.3; its CT series: series" in errors[0] and short in errors[0]


def test_format_both_writes_a_dicom_seg_equal_to_the_nifti_output(tmp_path, tiny_checkpoint):
    pytest.importorskip("highdicom")
    from liverseg.io.dicom_seg import read_dicom_seg

    image, _, affine = generate_case((32, 28, 16), seed=7, lps=True)
    folder = tmp_path / "pacs"
    write_ct_series(folder, image, affine, seed=3)  # shuffled names, LPS
    write_ct_series(
        folder, image[:, :, :1], affine, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    write_other_objects(folder)
    save_nifti(image, affine, tmp_path / "nifti" / "ct.nii.gz")
    code = main(["predict", "--checkpoint", str(tiny_checkpoint), str(folder),
                 str(tmp_path / "nifti"), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--format", "both"])  # fmt: skip
    assert code == 1  # the NIfTI input cannot get a DICOM-SEG; the series is predicted
    nifti = np.asarray(nib.load(tmp_path / "out" / "pacs_seg.nii.gz").dataobj)
    seg = read_dicom_seg(tmp_path / "out" / "pacs_seg.dcm", folder)
    np.testing.assert_array_equal(seg, nifti)
    with (tmp_path / "out" / "summary.csv").open() as f:
        rows = {row["case_id"]: row for row in csv.DictReader(f)}
    assert rows["pacs"]["status"] == "ok"
    assert (
        rows["ct"]["status"].startswith("failed: DataError")
        and "not a series folder" in (rows["ct"]["status"])
    )
    assert not (tmp_path / "out" / "ct_seg.nii.gz").exists()
