"""`liverseg predict`: files, folders, outputs, overwrite, bad inputs, names."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from liverseg.cli import main
from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.errors import CheckpointError
from liverseg.inference.batch import collect_inputs, predict_paths, safe_name

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
    import liverseg.inference.batch

    root = tmp_path / "Task03_prepared"
    prepared_ct = write_ct(root / folder / "liver_3.nii.gz")
    (root / "prepare.json").write_text(json.dumps({"factor": 2, "source_dir": "src", "cases": {}}))
    original_ct = write_ct(tmp_path / "originals" / folder / "liver_4.nii.gz")
    prepared = []
    predict_volume = liverseg.inference.batch.predict_volume

    def spy(model, image, settings, **kwargs):
        prepared.append(kwargs["prepared"])
        return predict_volume(model, image, settings, **kwargs)

    monkeypatch.setattr(liverseg.inference.batch, "predict_volume", spy)
    with caplog.at_level("INFO", logger="liverseg.inference.batch"):
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
