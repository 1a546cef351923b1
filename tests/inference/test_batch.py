"""`liverseg predict`: files, folders, outputs, overwrite, bad inputs, names."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoint

from liverseg.cli import main
from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.errors import CheckpointError
from liverseg.inference.batch import predict_paths
from liverseg.inference.inputs import collect_inputs, safe_name
from liverseg.model import UNet3D

torch.set_num_threads(1)


@pytest.fixture
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def write_ct(path, shape=(20, 18, 12), affine=None, seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.normal(50, 80, size=shape).astype(np.int16)
    affine = np.diag([1.5, 1.5, 2.5, 1.0]) if affine is None else affine
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return path


def read_summary(out):
    with (out / "summary.csv").open(newline="") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


def test_writes_segmentation_report_and_summary(tmp_path, checkpoint):
    lps = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 27.0], [0, 0, 2.5, -5.0], [0, 0, 0, 1]])
    ct = write_ct(tmp_path / "in" / "liver_7.nii.gz", affine=lps)
    out = tmp_path / "out"
    failures = predict_paths(checkpoint, [ct], out, device="cpu")
    assert failures == []
    seg = nib.load(str(out / "liver_7_seg.nii.gz"))
    assert seg.shape == (20, 18, 12)
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, lps)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {BACKGROUND, LIVER, TUMOR}
    report = json.loads((out / "liver_7_report.json").read_text())
    assert report["case_id"] == "liver_7"
    # QC counts lesions with the report's minimum size, so its lesion numbers are the table's
    assert report["qc"]["lesion_count"] == report["lesion_count"]
    assert report["lesions_not_listed"] == max(report["lesion_count"] - 100, 0)
    assert report["model"] == {
        "checkpoint": str(checkpoint),
        "epoch": 1,
        "liverseg_version": "0.1.0",
    }
    rows = read_summary(out)
    assert rows["liver_7"]["status"] == "ok"
    assert float(rows["liver_7"]["liver_ml"]) == pytest.approx(report["liver_volume_ml"], abs=1e-3)
    assert float(rows["liver_7"]["seconds"]) > 0
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_refuses_to_overwrite_unless_asked(tmp_path, checkpoint):
    ct = write_ct(tmp_path / "in" / "case.nii.gz")
    out = tmp_path / "out"
    assert predict_paths(checkpoint, [ct], out, device="cpu") == []
    seg = out / "case_seg.nii.gz"
    seg.write_bytes(b"sentinel")
    failures = predict_paths(checkpoint, [ct], out, device="cpu")
    assert len(failures) == 1 and failures[0][0] == ct
    assert "exists" in failures[0][1] and "--overwrite" in failures[0][1]
    assert seg.read_bytes() == b"sentinel"
    assert predict_paths(checkpoint, [ct], out, overwrite=True, device="cpu") == []
    assert nib.load(str(seg)).shape == (20, 18, 12)


def test_bad_input_fails_alone(tmp_path, checkpoint):
    folder = tmp_path / "in"
    good = write_ct(folder / "good.nii.gz")
    bad = folder / "bad.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    (folder / "._good.nii.gz").write_bytes(b"AppleDouble")  # ignored, never opened
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    failures = predict_paths(checkpoint, [folder, tmp_path / "absent.nii.gz"], out, device="cpu")
    failed = {path.name: message for path, message in failures}
    assert set(failed) == {"bad.nii.gz", "absent.nii.gz"}
    assert "bad.nii.gz" in failed["bad.nii.gz"]
    assert (out / "good_seg.nii.gz").is_file()
    rows = read_summary(out)
    assert rows["good"]["status"] == "ok" and rows["bad"]["status"].startswith("failed")
    assert not (out / "bad_seg.nii.gz").exists()
    assert good.is_file()


def test_task03_root_uses_images_ts(tmp_path):
    root = tmp_path / "Task03_Liver"
    write_ct(root / "imagesTr" / "liver_0.nii.gz")
    test_a = write_ct(root / "imagesTs" / "liver_132.nii.gz")
    test_b = write_ct(root / "imagesTs" / "liver_20.nii.gz")
    files, failures = collect_inputs([root])
    assert files == [test_b, test_a] and failures == []
    (test_a).unlink()
    (test_b).unlink()
    files, _ = collect_inputs([root])
    assert [f.name for f in files] == ["liver_0.nii.gz"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert collect_inputs([empty])[1][0][0] == empty


@pytest.mark.parametrize(
    "case_id, expected",
    [("liver_1", "liver_1"), ("a b/c", "a_b_c"), ("..", "_."), ("", "case"), ("ü:x", "__x")],
)
def test_safe_name(case_id, expected):
    assert safe_name(case_id) == expected


def test_odd_file_names_stay_inside_the_output_folder(tmp_path, checkpoint):
    ct = write_ct(tmp_path / "in" / "pat ient#1;rm.nii.gz")
    out = tmp_path / "out"
    assert predict_paths(checkpoint, [ct], out, device="cpu") == []
    assert (out / "pat_ient_1_rm_seg.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "in", "out"]


def test_bad_checkpoint_stops_before_predicting(tmp_path):
    ct = write_ct(tmp_path / "ct.nii.gz")
    with pytest.raises(CheckpointError, match="missing.pt"):
        predict_paths(tmp_path / "missing.pt", [ct], tmp_path / "out")


def test_cli_exit_codes(tmp_path, checkpoint, capsys):
    ct = write_ct(tmp_path / "ct.nii.gz")
    bad = tmp_path / "bad.nii"
    bad.write_text("not nifti")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]
    assert main([*argv, str(ct)]) == 0
    assert main([*argv, "--overwrite", str(ct), str(bad)]) == 1
    assert "bad.nii" in capsys.readouterr().err


def test_an_ensemble_is_recorded_in_report_and_summary(tmp_path, checkpoint):
    torch.manual_seed(1)
    other = write_tiny_checkpoint(tmp_path / "fold_1.pt", model=UNet3D(1, 2, features=(4, 8)))
    ct = write_ct(tmp_path / "in" / "liver_7.nii.gz")
    assert predict_paths([checkpoint, other], [ct], tmp_path / "out", device="cpu") == []
    report = json.loads((tmp_path / "out" / "liver_7_report.json").read_text())
    assert [m["checkpoint"] for m in report["model"]["ensemble"]] == [str(checkpoint), str(other)]
    row = read_summary(tmp_path / "out")["liver_7"]
    assert row["status"] == "ok" and row["checkpoints"] == f"{checkpoint} | {other}"
    assert predict_paths(checkpoint, [ct], tmp_path / "one", device="cpu") == []
    assert read_summary(tmp_path / "one")["liver_7"]["checkpoints"] == str(checkpoint)


def test_real_ct_predicts_and_reports(real_ct, tmp_path, checkpoint):
    image, _ = real_ct
    out = tmp_path / "out"
    assert predict_paths(checkpoint, [image], out, device="cpu") == []
    stored = nib.load(str(image))
    seg = nib.load(str(out / "real_ct_sm_seg.nii.gz"))
    assert seg.shape == stored.shape
    np.testing.assert_allclose(seg.affine, stored.affine)
    report = json.loads((out / "real_ct_sm_report.json").read_text())
    assert report["spacing_mm"] == pytest.approx([3.0, 3.0, 3.0])
    assert read_summary(out)["real_ct_sm"]["status"] == "ok"


@pytest.mark.parametrize("folder", ["imagesTr", "imagesTs"])
def test_inputs_of_a_prepared_folder_are_not_reduced_again(
    tmp_path, checkpoint, folder, monkeypatch, caplog
):
    import liverseg.inference.share

    root = tmp_path / "Task03_prepared"
    prepared_ct = write_ct(root / folder / "liver_3.nii.gz")
    (root / "prepare.json").write_text(json.dumps({"factor": 2, "source_dir": "src", "cases": {}}))
    original_ct = write_ct(tmp_path / "originals" / folder / "liver_4.nii.gz")
    prepared = []
    predict_volume = liverseg.inference.share.predict_volume

    def spy(model, image, settings, **kwargs):
        prepared.append(kwargs["prepared"])
        return predict_volume(model, image, settings, **kwargs)

    monkeypatch.setattr(liverseg.inference.share, "predict_volume", spy)
    with caplog.at_level("INFO", logger="liverseg.inference.share"):
        failures = predict_paths(checkpoint, [prepared_ct, original_ct], tmp_path / "out")
    assert failures == []
    assert prepared == [True, False]  # the checkpoint's factor is 2: only the original is reduced
    messages = [r.getMessage() for r in caplog.records]
    assert any("prepare.json" in m and "own resolution" in m and "liver_3" in m for m in messages)
    assert nib.load(str(tmp_path / "out" / "liver_3_seg.nii.gz")).shape == (20, 18, 12)


def test_unreadable_prepare_record_fails_that_input(tmp_path, checkpoint):
    root = tmp_path / "Task03_prepared"
    ct = write_ct(root / "imagesTs" / "liver_5.nii.gz")
    (root / "prepare.json").write_text("{not json")
    failures = predict_paths(checkpoint, [ct], tmp_path / "out")
    assert len(failures) == 1 and failures[0][0] == ct
    assert "prepare.json" in failures[0][1]


def test_stale_temp_files_of_a_killed_run_are_removed_at_start(tmp_path, checkpoint):
    import os
    import time

    out = tmp_path / "out"
    out.mkdir()
    hour_ago = time.time() - 3700
    stale = [out / ".case_seg.nii.gz.k3x9q0ab.tmp.nii.gz", out / ".summary.csv.abc123.tmp.csv"]
    fresh = out / ".other_seg.nii.gz.z8y7x6wv.tmp.nii.gz"  # another predict may be writing it
    unrelated = [out / "notes.txt", out / ".hidden", out / ".notes.txt.abc123.tmp.png"]
    for path in [*stale, fresh, *unrelated]:
        path.write_bytes(b"x" * 100)
    for path in [*stale, *unrelated]:
        os.utime(path, (hour_ago, hour_ago))
    ct = write_ct(tmp_path / "in" / "case.nii.gz")
    assert predict_paths(checkpoint, [ct], out, device="cpu") == []
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and all(p.exists() for p in unrelated)
    assert read_summary(out)["case"]["status"] == "ok"


# --------------------------------------------------------------------------- input checks


def write_volume(path, hu, affine=None):
    affine = np.diag([1.5, 1.5, 2.5, 1.0]) if affine is None else affine
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return path


def test_inputs_that_cannot_be_segmented_fail_alone_naming_the_file(tmp_path, checkpoint, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    write_ct(folder / "good.nii.gz")
    hu = np.random.default_rng(0).normal(50, 80, size=(20, 18, 12)).astype(np.float32)
    bad = {}
    for name, value, suffix in (("nan", np.nan, ".nii.gz"), ("inf", np.inf, ".nii")):
        volume = hu.copy()
        volume[5, 6, 7] = value
        bad[name] = write_volume(folder / f"{name}{suffix}", volume)
    bad["wrapped"] = write_volume(folder / "wrapped.nii.gz", hu.astype(np.int16).astype(np.int8))
    argv = ["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    for name, path in bad.items():
        (line,) = [line for line in errors if line.startswith(f"error: {path}: ")]
        assert ("8-bit integers" if name == "wrapped" else "1 NaN/Inf voxels") in line
        assert not (out / f"{name}_seg.nii.gz").exists()
    assert (out / "good_seg.nii.gz").is_file()
    rows = read_summary(out)
    assert rows["good"]["status"] == "ok" and rows["good"]["warnings"] == ""
    assert all(rows[name]["status"].startswith("failed: DataError") for name in bad)


def test_implausible_intensities_are_warned_in_report_and_summary(tmp_path, checkpoint):
    folder, out = tmp_path / "in", tmp_path / "out"
    mr = np.random.default_rng(0).integers(100, 3000, size=(20, 18, 12)).astype(np.int16)
    mr[0, 0, 0], mr[1, 1, 1] = 0, 4000
    write_volume(folder / "mr.nii.gz", mr)
    write_volume(folder / "blank.nii.gz", np.zeros((20, 18, 12), np.int16))
    assert predict_paths(checkpoint, [folder], out, device="cpu") == []
    rows = read_summary(out)
    for name, words in (("mr", "intensities span [0, 4000]"), ("blank", "every voxel is 0")):
        report = json.loads((out / f"{name}_report.json").read_text())
        assert report["warnings"][0].startswith(words)
        assert rows[name]["status"] == "ok"
        assert rows[name]["warnings"] == " | ".join(report["warnings"])
        assert rows[name]["warnings"].startswith(words)
        # Implausible CT values are a reason for review, in the report and in summary.csv.
        assert report["qc"]["status"] == "review"
        assert any(r.startswith(f"CT values: {words}") for r in report["qc"]["reasons"])
        assert (
            rows[name]["qc"].startswith("review: ") and f"; CT values: {words}" in rows[name]["qc"]
        )
    with (out / "summary.csv").open() as f:
        assert f.readline().strip().endswith(",status,qc,input,checkpoints,warnings")
